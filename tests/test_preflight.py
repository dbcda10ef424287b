from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flexkd.models.loading import TINY_TOKENIZER_DIR, load_tokenizer
from flexkd.models.preflight import TOKENIZER_PROBE, TokenizerMismatchError, check_same_tokenizer


def _tiny_with_backend(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def test_same_tokenizer_passes(tiny_tokenizer):
    check_same_tokenizer(tiny_tokenizer, load_tokenizer(TINY_TOKENIZER_DIR))


def test_probe_covers_hard_cases():
    assert any(ord(char) > 0xFFFF for char in TOKENIZER_PROBE)  # an emoji
    assert "  " in TOKENIZER_PROBE and "\t" in TOKENIZER_PROBE and "\n" in TOKENIZER_PROBE
    assert any(char.isdigit() for char in TOKENIZER_PROBE)


def test_added_token_fails_on_vocabulary_size(tiny_tokenizer):
    student = load_tokenizer(TINY_TOKENIZER_DIR)
    student.add_tokens(["<|new|>"])
    with pytest.raises(TokenizerMismatchError) as raised:
        check_same_tokenizer(tiny_tokenizer, student)
    assert str(raised.value) == (
        "tokenizer mismatch: vocabulary size 512 (teacher) != 513 (student); "
        "logit and feature KD need the same tokenizer"
    )
    assert isinstance(raised.value, ValueError)


def test_different_special_tokens_fail(tiny_tokenizer):
    student = load_tokenizer(TINY_TOKENIZER_DIR)
    student.pad_token = "<|im_end|>"
    with pytest.raises(TokenizerMismatchError, match=r"pad token id 0 \(teacher\) != 2 \(student\)"):
        check_same_tokenizer(tiny_tokenizer, student)


def test_same_size_but_swapped_ids_fail(tiny_tokenizer):
    spec = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    student = _tiny_with_backend(Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(TokenizerMismatchError, match=r"token 'a' has id \d+ \(teacher\) != \d+ \(student\)"):
        check_same_tokenizer(tiny_tokenizer, student)


def test_same_vocabulary_but_different_splitting_fails(tiny_tokenizer):
    backend = Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(TokenizerMismatchError, match=r"probe text tokenizes differently from token 0 on"):
        check_same_tokenizer(tiny_tokenizer, _tiny_with_backend(backend))
