"""Task metrics of a model on eval rows: accuracy and macro-F1 of the verbalizer scores at the last
prompt token (classification); ROUGE-L of greedy continuations and the perplexity of the reference
responses (generation). The evaluate stage and the periodic evaluation inside distill both use them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from rouge_score.rouge_scorer import RougeScorer

from flexkd.config.schema import PipelineConfig
from flexkd.data.rows import collate_batch
from flexkd.data.shards import shard_files
from flexkd.method.decoding import left_padded
from flexkd.method.objective import class_logits, scored_positions
from flexkd.progress import Progress

# The row columns that collate_batch turns into tensors; `reference` stays text.
TOKEN_COLUMNS = ("example_id", "input_ids", "labels", "prompt_length", "class_label")


def read_eval_rows(eval_dir: Path) -> pa.Table:
    """All eval rows, shard by shard in file-name order (the eval split is small)."""
    shards = shard_files(eval_dir)
    if not shards:
        raise FileNotFoundError(f"{eval_dir}: no eval parquet shards")
    table = pa.concat_tables([pq.read_table(shard) for shard in shards])
    if table.num_rows == 0:
        raise ValueError(f"{eval_dir}: the eval split has no rows")
    return table


@torch.no_grad()
def classify(
    model,
    table: pa.Table,
    config: PipelineConfig,
    pad_token_id: int,
    verbalizer_ids: list[int],
    device: torch.device,
    progress_label: str | None = None,
    progress_bars: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """Accuracy and macro-F1 of the argmax verbalizer score, and the predicted label names.
    ``progress_label``: the label of its progress (flexkd.progress: a bar if ``progress_bars``,
    else lines); None reports none."""
    verbalizers = torch.tensor(verbalizer_ids, device=device)
    predicted: list[int] = []
    for chunk in _batches(table, config.evaluation.batch_size, progress_label, progress_bars):
        batch = _collate(chunk, pad_token_id, device)
        # Only the last prompt token's logits are read: projecting every position onto the
        # vocabulary would be most of the forward's cost.
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=scored_positions("classification", batch),
        ).logits
        predicted += class_logits(logits, batch["attention_mask"], verbalizers).argmax(dim=-1).tolist()
    actual = table.column("class_label").to_pylist()
    scores = {"accuracy": float(np.mean(np.equal(predicted, actual))), "macro_f1": macro_f1(predicted, actual)}
    return scores, [config.task.label_names[label] for label in predicted]


@torch.no_grad()
def generate_and_score(
    model,
    table: pa.Table,
    config: PipelineConfig,
    tokenizer,
    pad_token_id: int,
    device: torch.device,
    progress_label: str | None = None,
    progress_bars: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """ROUGE-L of greedy continuations and response perplexity, and the continuations.
    ``progress_label``, ``progress_bars``: as in :func:`classify`."""
    continuations: list[str] = []
    summed_nll, response_tokens = 0.0, 0
    for chunk in _batches(table, config.evaluation.batch_size, progress_label, progress_bars):
        generated = greedy_continuations(model, chunk, pad_token_id, config.evaluation.max_new_tokens, device)
        continuations += tokenizer.batch_decode(generated, skip_special_tokens=True)
        batch = _collate(chunk, pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t + 1; labels are -100 on the prompt and on padding.
        targets = batch["labels"][:, 1:]
        summed_nll += F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        ).item()
        response_tokens += int((targets != -100).sum())

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    references = table.column("reference").to_pylist()
    rouge = [scorer.score(reference, text)["rougeL"].fmeasure for reference, text in zip(references, continuations)]
    # Corpus perplexity: the mean NLL over all response tokens, not a mean of per-example values.
    perplexity = math.exp(summed_nll / response_tokens) if response_tokens else float("nan")
    return {"rougeL": 100.0 * float(np.mean(rouge)), "perplexity": perplexity}, continuations


def greedy_continuations(
    model, chunk: pa.Table, pad_token_id: int, max_new_tokens: int, device: torch.device
) -> torch.Tensor:
    """Greedy new tokens after each row's prompt, [B, <= max_new_tokens] (pad after an early stop)."""
    prompts = [
        ids[:length]
        for ids, length in zip(chunk.column("input_ids").to_pylist(), chunk.column("prompt_length").to_pylist())
    ]
    input_ids, attention_mask = left_padded(prompts, pad_token_id, device)
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return generated[:, input_ids.shape[1] :]


def distinct_n(outputs: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016) of a set of outputs: the distinct n-grams of words (split on
    whitespace) over all n-grams, pooled over the outputs; 0.0 when no output has n words. A
    student that says the same thing to every prompt, or one thing over and over, scores low."""
    ngrams = [
        tuple(words[i : i + n]) for words in (text.split() for text in outputs) for i in range(len(words) - n + 1)
    ]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def is_one_repeated_ngram(text: str, cut: bool = True) -> bool:
    """Whether an output is a single n-gram of words said at least twice and nothing else ("the the
    the", "I am I am I"): its words repeat with a period n <= half their count. With ``cut`` (the
    output may have stopped at max_new_tokens, mid-word) the last word may be a prefix of the word
    due there; an output that ended by itself must end on the whole word ("and a" is no loop)."""
    words = text.split()
    for n in range(1, len(words) // 2 + 1):
        periodic = all(words[i] == words[i % n] for i in range(len(words) - 1))
        due = words[(len(words) - 1) % n]
        if periodic and (due.startswith(words[-1]) if cut else due == words[-1]):
            return True
    return False


def fluency_scores(outputs: Sequence[str]) -> dict[str, float]:
    """Of a model's generated outputs: ``distinct_2``, and ``repeated_ngram_outputs``, how many of
    them are one n-gram repeated (``is_one_repeated_ngram``): the failure of a student that
    degenerates into a loop, which ROUGE-L alone does not show."""
    return {
        "distinct_2": distinct_n(outputs, 2),
        "repeated_ngram_outputs": float(sum(is_one_repeated_ngram(text) for text in outputs)),
    }


def macro_f1(predicted: Sequence[int], actual: Sequence[int]) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), over the classes that occur in
    either sequence (as scikit-learn's ``f1_score(average="macro")``)."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    scores = []
    for label in np.union1d(predicted, actual):
        true_positives = np.sum((predicted == label) & (actual == label))
        errors = np.sum((predicted == label) != (actual == label))  # false positives + false negatives
        scores.append(2 * true_positives / (2 * true_positives + errors))
    return float(np.mean(scores))


def _batches(table: pa.Table, batch_size: int, progress_label: str | None, progress_bars: bool):
    progress = None if progress_label is None else Progress(progress_label, table.num_rows, terminal=progress_bars)
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        yield chunk
        if progress is not None:
            progress.update(chunk.num_rows)
    if progress is not None:
        progress.close()


def _collate(chunk: pa.Table, pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    batch = collate_batch(chunk.select(TOKEN_COLUMNS).to_pydict(), pad_token_id)
    return {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "labels")}
