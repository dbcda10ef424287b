"""From raw rows to training rows, and from training rows to padded tensors. No Ray here.

A training row (one per example; what the tokenize stage writes as parquet, ``ROW_SCHEMA``):

    example_id     int64         stable id: the row's position in its split's source
    input_ids      list<int32>   prompt tokens, then (generation) response tokens and eos
    labels         list<int32>   same length as input_ids; -100 = not a target. Classification:
                                 all -100 (the task loss reads the verbalizer logits at the last
                                 prompt token). Generation: -100 on the prompt, the response
                                 tokens and eos otherwise (unshifted, as in Hugging Face)
    prompt_length  int32         the prompt is input_ids[:prompt_length]
    class_label    int32         index into task.label_names; -1 (UNLABELED) for generation and
                                 for an unlabeled transfer row (data.transfer), whose reference is ""
    reference      string        the response text, or the label name

``collate_batch`` right-pads a batch of such rows to its longest row.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from flexkd.config.schema import TaskConfig
from flexkd.method.losses import IGNORE_INDEX, UNLABELED

TRANSFER_SPLIT = "transfer"  # the tokenized (and cached) unlabeled rows of data.transfer

ROW_SCHEMA = pa.schema(
    [
        ("example_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("prompt_length", pa.int32()),
        ("class_label", pa.int32()),
        ("reference", pa.string()),
    ]
)

# A prompt ends mid-line ("Sentiment:"); tokenizing a continuation after this anchor and dropping
# the anchor's ids gives the tokens the text has *after* a prompt, not at the start of a text
# (SentencePiece tokenizers differ there).
_ANCHOR = ":"


def template_columns(template: str) -> list[str]:
    """The columns a prompt template reads, in order of first use (``"{a} {b} {a}"`` -> a, b).

    Only plain column names are allowed: ``{text.__class__}`` or ``{0}`` would reach into
    Python objects or positional arguments, and a config value must never do either."""
    columns: list[str] = []
    try:
        fields = [parts[1:] for parts in string.Formatter().parse(template) if parts[1] is not None]
    except ValueError as error:
        raise ValueError(f"task.prompt_template: {error}") from None
    for field, spec, conversion in fields:
        if not field.isidentifier():
            raise ValueError(f"task.prompt_template: '{{{field}}}' is not a column name; use {{column}} fields only")
        # "{n:d}" fails on text and "{text!r:>99}" quotes and pads it: a prompt is the row's text as it is.
        if spec or conversion:
            written = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            raise ValueError(
                f"task.prompt_template: '{written}' formats the column; use plain {{{field}}} (the row's text as it is)"
            )
        if field not in columns:
            columns.append(field)
    if not columns:
        raise ValueError(
            f"task.prompt_template: {template!r} names no column, so every row would get the same prompt; "
            "use {column} fields"
        )
    return columns


def required_columns(task: TaskConfig, labeled: bool = True) -> list[str]:
    """Every column a row needs for ``task``: the template's, then the label or response (not for
    ``labeled=False``, the unlabeled rows of data.transfer)."""
    target = task.answer_column
    columns = template_columns(task.prompt_template)
    return columns + ([target] if labeled and target not in columns else [])


def render_prompt(template: str, row: dict[str, Any], tokenizer, chat_template: bool) -> str:
    """``template.format(**row)``, wrapped as one user message in the chat template if asked."""
    try:
        prompt = template.format(**row)
    except KeyError as error:
        raise ValueError(
            f"task.prompt_template: no column '{error.args[0]}' in the row; columns are: {', '.join(row)}"
        ) from None
    if not chat_template:
        return prompt
    if not tokenizer.chat_template:
        raise ValueError("task.chat_template is true but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def prompt_token_ids(batch: dict[str, Sequence[Any]], tokenizer, task: TaskConfig) -> tuple[list[str], list[list[int]]]:
    """Each row's prompt as text (template rendered, chat template applied if asked) and as token
    ids: what a training row starts with, and what the teacher answers in stage generate."""
    columns = template_columns(task.prompt_template)
    rows = len(next(iter(batch.values())))
    prompts = [
        render_prompt(task.prompt_template, {c: batch[c][i] for c in columns}, tokenizer, task.chat_template)
        for i in range(rows)
    ]
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
    return prompts, [list(ids) for ids in tokenizer(prompts, add_special_tokens=not task.chat_template)["input_ids"]]


def continuation_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as it follows a prompt (no special tokens)."""
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    encoded = tokenizer([_ANCHOR + text for text in texts], add_special_tokens=False)["input_ids"]
    plain = None
    result = []
    for index, ids in enumerate(encoded):
        if ids[: len(anchor)] == anchor:
            result.append(list(ids[len(anchor) :]))
        else:  # the anchor merged with the text: fall back to tokenizing the text alone
            plain = plain or tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            result.append(list(plain[index]))
    return result


def _as_continuation(text: str) -> str:
    """The text as it reads after a prompt that does not end in whitespace: " positive"."""
    return text if not text or text[:1].isspace() else " " + text


def verbalizer_token_ids(tokenizer, label_names: list[str]) -> list[int]:
    """The first token of each label name as it follows the prompt (" positive"): the class
    scores are the logits of these tokens at the last prompt position."""
    first_ids = []
    for name, ids in zip(label_names, continuation_ids(tokenizer, [_as_continuation(n) for n in label_names])):
        if not ids:
            raise ValueError(f"task.label_names: {name!r} has no tokens")
        first_ids.append(ids[0])
    for index, token in enumerate(first_ids):
        other = first_ids.index(token)
        if other != index:
            shared = tokenizer.convert_ids_to_tokens(token)
            raise ValueError(
                f"task.label_names: {label_names[other]!r} and {label_names[index]!r} share their "
                f"first token {shared!r}; use names that start differently"
            )
    return first_ids


def class_index(value: Any, label_names: list[str], label_column: str) -> int:
    """A row's label as an index into label_names: one of the names, or an index in range as a
    number or a decimal string (CSV and TSV labels are strings)."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, str) and value in label_names:
        return label_names.index(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) < len(label_names):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value < len(label_names):
        return int(value)
    raise ValueError(
        f"task.label_column '{label_column}': label {value!r} is not in the label set "
        f"0..{len(label_names) - 1} / {', '.join(label_names)}"
    )


def _truncate_generation(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Left-truncate the prompt so at least min(len(response), max_length // 2) response tokens
    fit, then cut the response's end."""
    reserved = min(len(response), max_length // 2)
    prompt = prompt[max(0, len(prompt) - (max_length - reserved)) :]
    return prompt, response[: max_length - len(prompt)]


def tokenize_rows(
    batch: dict[str, Sequence[Any]], tokenizer, task: TaskConfig, max_length: int, labeled: bool = True
) -> dict[str, list]:
    """Raw rows (columns of equal length) to training rows (see the module docstring).

    ``labeled=False`` (classification, the rows of data.transfer): the label column is not read,
    even where the rows have one; every row gets class_label UNLABELED and reference "".

    ``batch["example_id"]`` is carried through; without it rows are numbered 0..n-1.
    Classification prompts are left-truncated to ``max_length`` (the end, "Sentiment:", is what
    the verbalizer logits are read after); generation rows follow ``_truncate_generation``.
    Raises ValueError (one line) on a missing column, an unknown label or an empty prompt."""
    rows = len(next(iter(batch.values())))
    example_ids = [int(i) for i in batch.get("example_id", range(rows))]
    if not labeled and task.kind != "classification":
        raise ValueError("unlabeled rows (data.transfer) are for task.kind 'classification' only")
    for column in required_columns(task, labeled):
        if column not in batch:
            raise ValueError(f"task: no column '{column}' in the data; columns are: {', '.join(batch)}")
        for example_id, value in zip(example_ids, batch[column]):
            if value is None:
                raise ValueError(f"example {example_id}: column '{column}' is empty (null)")
    prompts, prompt_ids = prompt_token_ids(batch, tokenizer, task)
    for example_id, ids in zip(example_ids, prompt_ids):
        if not ids:
            raise ValueError(f"example {example_id}: the prompt has no tokens")
    out: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    out["example_id"] = example_ids

    if not labeled:
        for prompt in prompt_ids:
            prompt = list(prompt[-max_length:])
            _append(out, prompt, [IGNORE_INDEX] * len(prompt), len(prompt), UNLABELED, "")
        return out

    if task.kind == "classification":
        for example_id, value, prompt in zip(example_ids, batch[task.label_column], prompt_ids):
            try:
                label = class_index(value, task.label_names, task.label_column)
            except ValueError as error:
                raise ValueError(f"example {example_id}: {error}") from None
            prompt = list(prompt[-max_length:])
            _append(out, prompt, [IGNORE_INDEX] * len(prompt), len(prompt), label, task.label_names[label])
        return out

    if tokenizer.eos_token_id is None:
        raise ValueError("task.kind 'generation' needs a tokenizer with an eos token")
    responses = [str(text) for text in batch[task.response_column]]
    response_ids = continuation_ids(
        tokenizer, [_as_continuation(r) if not p[-1:].isspace() else r for r, p in zip(responses, prompts)]
    )
    for prompt, response, text in zip(prompt_ids, response_ids, responses):
        prompt, response = _truncate_generation(list(prompt), response + [tokenizer.eos_token_id], max_length)
        _append(out, prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt), -1, text)
    return out


def _append(
    out: dict[str, list], input_ids: list[int], labels: list[int], prompt_length: int, class_label: int, reference: str
) -> None:
    out["input_ids"].append(input_ids)
    out["labels"].append(labels)
    out["prompt_length"].append(prompt_length)
    out["class_label"].append(class_label)
    out["reference"].append(reference)


def collate_batch(rows: dict[str, Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of training rows to its longest row.

    Args:
        rows: columns of ``ROW_SCHEMA``; list columns may be object arrays of arrays (Ray Data's
            numpy batches), 2-D arrays or lists of lists.
    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` [B, T] long (pad_token_id / 0 / -100 on
        padding, T = the longest row), ``prompt_length``, ``class_label``, ``example_id`` [B] long.
    """
    sequences = [np.asarray(ids, dtype=np.int64) for ids in rows["input_ids"]]
    targets = [np.asarray(ids, dtype=np.int64) for ids in rows["labels"]]
    longest = max(len(ids) for ids in sequences)
    input_ids = np.full((len(sequences), longest), pad_token_id, dtype=np.int64)
    labels = np.full_like(input_ids, IGNORE_INDEX)
    attention_mask = np.zeros_like(input_ids)
    for i, (ids, target) in enumerate(zip(sequences, targets)):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(target)] = target
        attention_mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for name in ("prompt_length", "class_label", "example_id"):
        # A copy: Ray Data hands out read-only arrays, which torch refuses to wrap silently.
        batch[name] = np.array(rows[name], dtype=np.int64)
    return {name: torch.from_numpy(value) for name, value in batch.items()}
