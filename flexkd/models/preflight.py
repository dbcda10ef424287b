"""Checks run before any expensive work, so a pipeline refuses early with a clear reason."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Mixed scripts, digits, punctuation, whitespace runs, a newline, an emoji and a chat marker-like
# string: the places where two tokenizers with the same vocabulary size usually still disagree.
TOKENIZER_PROBE = (
    "Flex-KD 2025: naïve café, Straße & 東京 / Москва / नमस्ते — x=3.14159, y=-42%!\n"
    "\ttabs\tand    spaces   <b>tags</b> `code()` 🙂👍🏽 <|im_start|>user: done?"
)
_SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")
_WHY = "logit and feature KD need the same tokenizer"


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenize text differently, so their tokens cannot be aligned."""


def check_same_tokenizer(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    probe: str = TOKENIZER_PROBE,
) -> None:
    """Raise `TokenizerMismatchError` naming the first difference between the two tokenizers.

    Logit KD compares distributions over the same vocabulary, and feature KD pairs hidden states
    token by token, so both need identical vocabularies, special tokens and tokenization.
    Compared in order: vocabulary size (`len`, added tokens included), token-to-id mapping,
    bos/eos/pad/unk ids, and the ids of `probe` (special tokens added as each tokenizer would).
    """
    teacher_size, student_size = len(teacher_tokenizer), len(student_tokenizer)
    if teacher_size != student_size:
        _mismatch(f"vocabulary size {teacher_size} (teacher) != {student_size} (student)")
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        token = min(token for token in teacher_vocab if teacher_vocab[token] != student_vocab.get(token))
        _mismatch(f"token {token!r} has id {teacher_vocab[token]} (teacher) != {student_vocab.get(token)} (student)")
    for name in _SPECIAL_TOKENS:
        teacher_id = getattr(teacher_tokenizer, f"{name}_token_id")
        student_id = getattr(student_tokenizer, f"{name}_token_id")
        if teacher_id != student_id:
            _mismatch(f"{name} token id {teacher_id} (teacher) != {student_id} (student)")
    teacher_ids = teacher_tokenizer(probe)["input_ids"]
    student_ids = student_tokenizer(probe)["input_ids"]
    if teacher_ids != student_ids:
        position = next(
            (i for i, (t, s) in enumerate(zip(teacher_ids, student_ids)) if t != s),
            min(len(teacher_ids), len(student_ids)),
        )
        _mismatch(
            f"probe text tokenizes differently from token {position} on "
            f"({len(teacher_ids)} tokens (teacher), {len(student_ids)} (student))"
        )


def _mismatch(difference: str) -> None:
    raise TokenizerMismatchError(f"tokenizer mismatch: {difference}; {_WHY}")
