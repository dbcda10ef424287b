"""The SST-2 teacher of the quality benchmark: SmolLM2-135M-Instruct with its top blocks, its
final norm and the two verbalizer rows of the output layer fine-tuned on the task.

The pipeline's classifier is the logits of the label words' first tokens (" negative",
" positive") at the last prompt token, i.e. two rows of ``lm_head`` applied to the final hidden
state. The recipe, all from one frozen forward pass per sentence:

1. the verbalizer rows alone, as a logistic regression on the frozen final features (L2 picked
   on the last tenth of the rows): a good start for step 2, and the teacher if ``top_layers=0``;
2. the top ``top_layers`` blocks, the final norm and those rows trained together with AdamW on
   the hidden states that enter the first trained block (cached by the forward of step 1, so an
   epoch costs the top blocks only); the epoch with the best held-out accuracy is kept.

A probe on frozen final features stays near the zero-shot level on SST-2 (CALIBRATION.md), and
importance computed through it carries little task signal; a teacher whose top blocks learned
the task passes a task gradient down to every mapped layer. The result is still a plain Hugging
Face causal LM that every stage loads as usual. SmolLM2 ties ``lm_head`` to the input embeddings,
so the saved copy unties them (changing the two rows must not change those tokens' embeddings).

The folder is cached under a hash of everything it is made from; ``adaptation.json`` inside it
records the zero-shot, probe and per-epoch held-out accuracies.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flexkd.config.schema import TaskConfig, stable_hash
from flexkd.data.rows import collate_batch, tokenize_rows, verbalizer_token_ids
from flexkd.method.layers import last_token_positions
from flexkd.models.loading import load_model, load_tokenizer
from flexkd.progress import progress_bars_wanted

log = logging.getLogger("flexkd")

RECIPE = "verbalizer-rows-logreg+top-blocks-v3"
L2_CHOICES = (1e-4, 1e-3, 1e-2, 1e-1)
TOP_LAYERS = 4  # of SmolLM2's 30 blocks: an epoch over 3,000 sentences takes about a minute on 2 cores
EPOCHS = 3
LEARNING_RATE = 5e-5
BATCH_SIZE = 32
DONE_FILE = "adaptation.json"


def read_tsv(path: Path, limit: int | None, label_column: str) -> list[dict[str, Any]]:
    """GLUE-style unquoted TSV rows (as the tokenize stage reads them), labels as ints."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [{**row, label_column: int(row[label_column])} for row in rows]


def adapted_teacher(
    base: Path,
    train_path: Path,
    rows: int,
    task: TaskConfig,
    max_length: int,
    cache_dir: Path,
    top_layers: int = TOP_LAYERS,
    epochs: int = EPOCHS,
) -> tuple[Path, dict[str, Any]]:
    """The adapted teacher's folder (made once) and its adaptation record. Its test accuracy is
    the evaluate stage's (``teacher.accuracy``): one teacher pass over the test set, not two."""
    base_marker = next((p.read_text() for p in base.glob("flexkd-done.txt")), str(base))
    key = stable_hash(
        {
            "recipe": RECIPE,
            "base": base_marker,
            "train": str(train_path),
            "rows": rows,
            "task": task.model_dump(mode="json"),
            "max_length": max_length,
            "l2": L2_CHOICES,
            "top_layers": top_layers,
            "epochs": epochs,
            "lr": LEARNING_RATE,
            "batch": BATCH_SIZE,
        }
    )
    folder = cache_dir / f"smollm2-135m-sst2-{key}"
    if (folder / DONE_FILE).is_file():
        return folder, json.loads((folder / DONE_FILE).read_text()) | {"made_now": False}

    started = time.time()
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    model.requires_grad_(False)
    verbalizers = torch.tensor(verbalizer_token_ids(tokenizer, task.label_names))
    examples = read_tsv(train_path, rows, task.label_column)
    cut = int(len(examples) * 0.9)  # the last tenth is held out: it picks L2 and the epoch
    if not 0 <= top_layers <= model.config.num_hidden_layers:
        raise ValueError(f"top_layers={top_layers}: the teacher has {model.config.num_hidden_layers} blocks")
    first_trained = model.config.num_hidden_layers - top_layers
    train = _forward(model, tokenizer, examples[:cut], task, max_length, first_trained)
    held_out = _forward(model, tokenizer, examples[cut:], task, max_length, first_trained)
    zero_shot = model.lm_head.weight[verbalizers].detach().clone()

    probe_accuracy = {l2: _accuracy(_fit(*_features(train), zero_shot, l2), *_features(held_out)) for l2 in L2_CHOICES}
    l2 = max(probe_accuracy, key=probe_accuracy.get)
    rows_weight = _fit(*_features(train), zero_shot, l2)
    record = {
        "recipe": RECIPE,
        "base": str(base),
        "train_rows": len(examples),
        "l2": l2,
        "top_layers": top_layers,
        "held_out_rows": len(examples) - cut,
        "zero_shot_held_out_accuracy": _accuracy(zero_shot, *_features(held_out)),
        "probe_held_out_accuracy": {str(k): v for k, v in probe_accuracy.items()},
        "probe_train_accuracy": _accuracy(rows_weight, *_features(train)),
    }
    best = probe_accuracy[l2]
    if top_layers:
        rows_weight, best, record["epochs"] = _fine_tune_top_blocks(
            model, train, held_out, rows_weight, first_trained, epochs
        )
    # The same tenth picked L2 and the epoch, so this number leans high; the test set is the judge.
    record |= {"held_out_accuracy": best, "seconds": round(time.time() - started, 1)}

    lm_head = model.model.embed_tokens.weight.detach().clone()  # untie: the input embeddings stay as they were
    lm_head[verbalizers] = rows_weight
    model.lm_head.weight = torch.nn.Parameter(lm_head, requires_grad=False)
    model.config.tie_word_embeddings = False
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    _check_saved(staging, verbalizers, rows_weight)
    (staging / DONE_FILE).write_text(json.dumps(record, indent=2))
    staging.rename(folder)
    record["made_now"] = True
    log.info(
        "adapted teacher at %s: held-out accuracy %.4f (zero-shot %.4f)",
        folder,
        best,
        record["zero_shot_held_out_accuracy"],
    )
    return folder, record


@torch.no_grad()
def _forward(
    model,
    tokenizer,
    rows: list[dict[str, str]],
    task: TaskConfig,
    max_length: int,
    first_trained: int,
    batch_size: int = BATCH_SIZE,
) -> list[dict[str, torch.Tensor]]:
    """One frozen forward over ``rows`` in batches of similar length, tokenized exactly as the
    pipeline's tokenize stage does. Per batch: ``entering`` [B, T, d] the hidden state entering
    block ``first_trained``, ``attention_mask`` [B, T], ``final`` [B, d] the final hidden state
    (after the last norm) at the last prompt token, ``labels`` [B]."""
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    tokenized = tokenize_rows(columns, tokenizer, task, max_length)
    order = sorted(range(len(rows)), key=lambda i: len(tokenized["input_ids"][i]))  # little padding per batch
    batches = []
    for start in tqdm(
        range(0, len(order), batch_size),
        desc="teacher forward",
        unit="batch",
        leave=False,
        disable=not progress_bars_wanted(),
    ):
        chunk = order[start : start + batch_size]
        batch = collate_batch(
            {name: [values[i] for i in chunk] for name, values in tokenized.items()}, tokenizer.pad_token_id
        )
        output = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        last = last_token_positions(batch["attention_mask"])
        batches.append(
            {
                "entering": output.hidden_states[first_trained].float(),
                "attention_mask": batch["attention_mask"],
                "final": output.last_hidden_state[torch.arange(len(chunk)), last].float(),
                "labels": batch["class_label"],
            }
        )
    return batches


def _features(batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, d] final features at the last prompt token and [N] labels, over all batches."""
    return torch.cat([b["final"] for b in batches]), torch.cat([b["labels"] for b in batches])


@contextlib.contextmanager
def _top_blocks_only(model, first_trained: int) -> Iterator[torch.nn.Module]:
    """``model.model`` running blocks ``first_trained``.. only, fed ``inputs_embeds`` = the hidden
    state entering them: the same positions, causal mask and rotary embeddings as the full model,
    so the output is the full model's (checked on the first batch)."""
    if getattr(model, "_top_blocks_only", False):  # nested, it would cut the already cut stack again
        raise ValueError("_top_blocks_only: the model already runs its top blocks only")
    blocks, count = model.model.layers, model.config.num_hidden_layers
    if not 0 <= first_trained < count:
        raise ValueError(f"_top_blocks_only({first_trained}): the model has {count} blocks")
    model.model.layers = torch.nn.ModuleList(list(blocks)[first_trained:])
    model.config.num_hidden_layers = count - first_trained
    model._top_blocks_only = True
    try:
        yield model.model
    finally:
        model.model.layers, model.config.num_hidden_layers = blocks, count
        model._top_blocks_only = False


def _fine_tune_top_blocks(
    model,
    train: list[dict[str, torch.Tensor]],
    held_out: list[dict[str, torch.Tensor]],
    rows_weight: torch.Tensor,
    first_trained: int,
    epochs: int,
) -> tuple[torch.Tensor, float, list[dict]]:
    """Train the top blocks, the final norm and the verbalizer rows [C, d] on cross-entropy at the
    last prompt token; keep the epoch (0 = the probe alone) with the best held-out accuracy.
    Returns the kept rows, their held-out accuracy and the per-epoch history."""
    trained = torch.nn.ModuleDict(
        {"blocks": torch.nn.ModuleList(list(model.model.layers)[first_trained:]), "norm": model.model.norm}
    )
    rows = torch.nn.Parameter(rows_weight.clone())
    trained.requires_grad_(True)
    optimizer = torch.optim.AdamW([*trained.parameters(), rows], lr=LEARNING_RATE, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    history = []
    with _top_blocks_only(model, first_trained) as top:
        best = (_held_out_accuracy(top, held_out, rows), 0, copy.deepcopy(trained.state_dict()), rows.detach().clone())
        final = top(
            inputs_embeds=train[0]["entering"], attention_mask=train[0]["attention_mask"], use_cache=False
        ).last_hidden_state
        last = last_token_positions(train[0]["attention_mask"])
        if not torch.allclose(final[torch.arange(len(last)), last], train[0]["final"], atol=1e-3, rtol=1e-3):
            raise RuntimeError("the top blocks run alone do not reproduce the full model's output")
        for epoch in range(1, epochs + 1):
            losses = []
            for index in tqdm(
                torch.randperm(len(train), generator=generator).tolist(),
                desc=f"top blocks, epoch {epoch}",
                unit="batch",
                leave=False,
                disable=not progress_bars_wanted(),
            ):
                batch = train[index]
                hidden = top(
                    inputs_embeds=batch["entering"], attention_mask=batch["attention_mask"], use_cache=False
                ).last_hidden_state
                last = last_token_positions(batch["attention_mask"])
                loss = F.cross_entropy(hidden[torch.arange(len(last)), last] @ rows.T, batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            accuracy = _held_out_accuracy(top, held_out, rows)
            history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "held_out_accuracy": accuracy})
            log.info(
                "teacher top blocks, epoch %d: train loss %.4f, held-out accuracy %.4f",
                epoch,
                history[-1]["train_loss"],
                accuracy,
            )
            if accuracy > best[0]:
                best = (accuracy, epoch, copy.deepcopy(trained.state_dict()), rows.detach().clone())
    trained.load_state_dict(best[2])
    trained.requires_grad_(False)
    for entry in history:
        entry["kept"] = entry["epoch"] == best[1]
    return best[3], best[0], history


@torch.no_grad()
def _held_out_accuracy(top: torch.nn.Module, held_out: list[dict[str, torch.Tensor]], rows: torch.Tensor) -> float:
    """Accuracy of ``top`` (``_top_blocks_only``'s module) with the verbalizer rows [C, d] on ``held_out``."""
    correct = total = 0
    for batch in held_out:
        hidden = top(
            inputs_embeds=batch["entering"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        last = last_token_positions(batch["attention_mask"])
        predicted = (hidden[torch.arange(len(last)), last] @ rows.T).argmax(dim=1)
        correct += int((predicted == batch["labels"]).sum())
        total += len(last)
    return correct / max(total, 1)


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


def _accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((features @ weight.T).argmax(dim=1) == labels).float().mean())


def _check_saved(folder: Path, verbalizers: torch.Tensor, rows_weight: torch.Tensor) -> None:
    """Reload the saved folder: untied, with the trained rows, the embeddings untouched."""
    reloaded = load_model(folder)
    if reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"{folder}: lm_head is still tied to the input embeddings")
    if not torch.allclose(reloaded.lm_head.weight[verbalizers], rows_weight, atol=1e-6):
        raise RuntimeError(f"{folder}: the saved verbalizer rows differ from the trained ones")
