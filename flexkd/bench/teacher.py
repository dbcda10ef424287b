"""The SST-2 teacher of the quality benchmark: SmolLM2-135M-Instruct with its two verbalizer rows
of the output layer trained on the task, everything else frozen.

The pipeline's classifier is the logits of the label words' first tokens (" negative",
" positive") at the last prompt token, i.e. two rows of ``lm_head`` applied to the final hidden
state. Training only those rows is a logistic regression on frozen features: one teacher forward
per sentence, a few seconds of fitting, and the result is still a plain Hugging Face causal LM
that every stage loads as usual. SmolLM2 ties ``lm_head`` to the input embeddings, so the saved
copy unties them (changing the two rows must not change the input embeddings of those tokens).

The folder is cached under a hash of everything it is made from; ``adaptation.json`` inside it
records the zero-shot and adapted accuracies on held-out training sentences.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flexkd.config import TaskConfig, stable_hash
from flexkd.data import collate_batch, tokenize_rows, verbalizer_token_ids
from flexkd.layers import last_token_positions
from flexkd.models import load_model, load_tokenizer

log = logging.getLogger("flexkd")

RECIPE = "verbalizer-rows-logreg-v1"
L2_CHOICES = (1e-4, 1e-3, 1e-2, 1e-1)
DONE_FILE = "adaptation.json"


def read_tsv(path: Path, limit: int | None, label_column: str) -> list[dict[str, Any]]:
    """GLUE-style unquoted TSV rows (as the tokenize stage reads them), labels as ints."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [{**row, label_column: int(row[label_column])} for row in rows]


def adapted_teacher(base: Path, train_path: Path, rows: int, task: TaskConfig, max_length: int,
                    cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The adapted teacher's folder (made once) and its adaptation record. Its test accuracy is
    the evaluate stage's (``teacher.accuracy``): one teacher pass over the test set, not two."""
    base_marker = next((p.read_text() for p in base.glob("flexkd-done.txt")), str(base))
    key = stable_hash({"recipe": RECIPE, "base": base_marker, "train": str(train_path), "rows": rows,
                       "task": task.model_dump(mode="json"), "max_length": max_length, "l2": L2_CHOICES})
    folder = cache_dir / f"smollm2-135m-sst2-{key}"
    if (folder / DONE_FILE).is_file():
        return folder, json.loads((folder / DONE_FILE).read_text()) | {"made_now": False}

    started = time.time()
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    model.requires_grad_(False)
    verbalizers = torch.tensor(verbalizer_token_ids(tokenizer, task.label_names))
    train = _features(model, tokenizer, read_tsv(train_path, rows, task.label_column), task, max_length)
    zero_shot = model.lm_head.weight[verbalizers].detach().clone()

    # Pick the L2 strength on the last tenth of the training rows, then refit on all of them.
    cut = int(len(train[1]) * 0.9)
    held_out = {l2: _accuracy(_fit(train[0][:cut], train[1][:cut], zero_shot, l2), *_slice(train, cut))
                for l2 in L2_CHOICES}
    l2 = max(held_out, key=held_out.get)
    rows_weight = _fit(train[0], train[1], zero_shot, l2)

    lm_head = model.model.embed_tokens.weight.detach().clone()  # untie: the input embeddings stay as they were
    lm_head[verbalizers] = rows_weight
    model.lm_head.weight = torch.nn.Parameter(lm_head, requires_grad=False)
    model.config.tie_word_embeddings = False
    record = {"recipe": RECIPE, "base": str(base), "train_rows": len(train[1]), "l2": l2,
              "held_out_accuracy": {str(k): v for k, v in held_out.items()},
              "zero_shot_held_out_accuracy": _accuracy(zero_shot, *_slice(train, cut)),
              "train_accuracy": _accuracy(rows_weight, *train), "seconds": round(time.time() - started, 1)}
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    _check_saved(staging, verbalizers, rows_weight)
    (staging / DONE_FILE).write_text(json.dumps(record, indent=2))
    staging.rename(folder)
    record["made_now"] = True
    log.info("adapted teacher at %s: held-out accuracy %.4f (zero-shot %.4f)", folder, held_out[l2],
             record["zero_shot_held_out_accuracy"])
    return folder, record


@torch.no_grad()
def _features(model, tokenizer, rows: list[dict[str, str]], task: TaskConfig, max_length: int,
              batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden state (after the last norm) at the last prompt token [N, d], and labels [N],
    tokenized exactly as the pipeline's tokenize stage does."""
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    tokenized = tokenize_rows(columns, tokenizer, task, max_length)
    order = sorted(range(len(rows)), key=lambda i: len(tokenized["input_ids"][i]))  # little padding per batch
    features = torch.empty(len(rows), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate_batch({name: [values[i] for i in chunk] for name, values in tokenized.items()},
                              tokenizer.pad_token_id)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows_index = torch.arange(len(chunk))
        features[chunk] = hidden[rows_index, last_token_positions(batch["attention_mask"])].float()
    return features, torch.tensor(tokenized["class_label"])


def _fit(features: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, l2: float) -> torch.Tensor:
    """Logistic regression of the verbalizer rows [C, d], starting at the pretrained rows and
    penalized by the squared distance from them (scaled per feature, since a few units of the
    final hidden state are orders of magnitude larger than the rest)."""
    scale = features.std(dim=0).clamp(min=1e-6)
    weight = (start * scale).clone().requires_grad_(True)  # in standardized-feature coordinates
    origin = weight.detach().clone()
    standardized = features / scale
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(standardized @ weight.T, labels) + l2 * (weight - origin).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (weight.detach() / scale).to(start.dtype)


def _slice(data: tuple[torch.Tensor, torch.Tensor], cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    return data[0][cut:], data[1][cut:]


def _accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((features @ weight.T).argmax(dim=1) == labels).float().mean())


def _check_saved(folder: Path, verbalizers: torch.Tensor, rows_weight: torch.Tensor) -> None:
    """Reload the saved folder: untied, with the trained rows, the embeddings untouched."""
    reloaded = load_model(folder)
    if reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"{folder}: lm_head is still tied to the input embeddings")
    if not torch.allclose(reloaded.lm_head.weight[verbalizers], rows_weight, atol=1e-6):
        raise RuntimeError(f"{folder}: the saved verbalizer rows differ from the trained ones")
