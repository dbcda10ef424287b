"""A pipeline's data splits (train, eval, score), each checked row by row before anything runs.

``check_data`` is the data part of the preflight (``flexkd validate``, and ``flexkd run`` before
Ray starts): every split is read once, in full up to its ``limit``, and every row checked
(``flexkd.data.sources``); the tokenize stage checks again with the same code as it reads. A bad
row stops the run with one line naming the split's file, the first bad row, its column and how
many rows are bad; with ``data.on_bad_rows: skip`` the count is logged and the bad rows are left out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from flexkd.config.schema import ConfigError, DataSplit, PipelineConfig, TaskConfig
from flexkd.data.rows import TRANSFER_SPLIT, template_columns, verbalizer_token_ids
from flexkd.data.sources import DataError, RowRules, SourceSummary, scan_source

log = logging.getLogger("flexkd")

# The generate stage's output: the train prompts with the teacher's responses (sequence-level KD).
GENERATED_TRAIN_FILE = "responses.parquet"


def pipeline_splits(config: PipelineConfig, generated: Path | None = None) -> dict[str, DataSplit]:
    """The splits the pipeline reads; score only when the config gives it (else train's rows), and
    the unlabeled transfer rows with ``data.transfer``. ``generated``: the generate stage's folder,
    whose responses file (the train prompts with the teacher's responses, limit applied) is then
    the train split."""
    train = config.data.train
    if generated is not None:
        train = train.model_copy(update={"path": str(generated / GENERATED_TRAIN_FILE), "limit": None})
    splits = {"train": train, "eval": config.data.eval}
    if config.data.score is not None:
        splits["score"] = config.data.score
    if config.data.transfer is not None:
        splits[TRANSFER_SPLIT] = config.data.transfer
    return splits


def split_task(task: TaskConfig, source: DataSplit) -> TaskConfig:
    """The task as this split sees it: a split may bring its own template and response column."""
    return task.model_copy(
        update={
            "prompt_template": source.prompt_template or task.prompt_template,
            "response_column": source.response_column or task.response_column,
        }
    )


def reads_references(config: PipelineConfig, split: str) -> bool:
    """Whether the split's rows need their label or response column: not the unlabeled rows of
    data.transfer, nor the train prompts whose references the teacher's responses replace."""
    replaced = split == "train" and config.generate is not None and config.generate.replace_references
    return split != TRANSFER_SPLIT and not replaced


def check_split(
    split: str,
    source: DataSplit,
    task: TaskConfig,
    on_bad_rows: str,
    labeled: bool | None = None,
    prompt_digests: bool = False,
) -> SourceSummary:
    """Read and check every row of one split (up to its limit). Raises ConfigError for a bad
    prompt template, DataError ``data.<split> (<path>): <cause>`` for a bad source or bad rows
    (with on_bad_rows 'skip': only when no good row is left). ``labeled``: whether rows need their
    label or response column (default: every split but data.transfer). ``prompt_digests``: as
    ``scan_source``'s."""
    where = f"data.{split} ({source.path})"
    labeled = split != TRANSFER_SPLIT if labeled is None else labeled
    try:
        rules = RowRules.for_task(split_task(task, source), labeled=labeled)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        summary = scan_source(source.path, rules, source.limit, prompt_digests)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    if not summary.bad:
        return summary
    read = summary.good + summary.bad
    if on_bad_rows == "error":
        raise DataError(
            f"{where}: {summary.first_bad}; {summary.bad} of {read} rows are bad; "
            "fix them, or set data.on_bad_rows: skip"
        )
    if not summary.good:
        raise DataError(f"{where}: {summary.first_bad}; all {read} rows are bad, none is left to use")
    log.warning(
        "%s: skipping %d bad rows of %d (data.on_bad_rows: skip); the first: %s",
        where,
        summary.bad,
        read,
        summary.first_bad,
    )
    return summary


def transfer_rows_per_batch(batch_size: int, labeled_rows: int, transfer_rows: int, workers: int = 1) -> int:
    """How many rows of each worker's share of a batch (``batch_size // workers``) are unlabeled
    transfer rows: their share of all rows, rounded, leaving at least one row of each kind.
    Raises ConfigError if a worker's share cannot hold both."""
    per_worker = batch_size // workers
    if per_worker < 2:
        raise ConfigError(
            f"training.batch_size = {batch_size} gives each of {workers} workers {per_worker} row; with "
            "data.transfer a worker's batch holds labeled and unlabeled rows, so it needs at least 2"
        )
    return min(per_worker - 1, max(1, round(per_worker * transfer_rows / (labeled_rows + transfer_rows))))


def smallest_batch(config: PipelineConfig) -> int:
    """training.batch_size, or the smallest a sweep tries: what any run of this config must fill."""
    swept = config.tune.search_space.get("training.batch_size") if config.tune else None
    return int(min(swept.values())) if swept else config.training.batch_size


def train_rows_per_worker(config: PipelineConfig) -> int:
    """The fewest training rows each worker needs for a batch, whatever the row counts: its share
    of the smallest batch, or with data.transfer 1 (how many of that share are labeled rows
    depends on how many rows of each kind there are, ``transfer_rows_per_batch``)."""
    if config.data.transfer is not None:
        return 1
    return max(1, smallest_batch(config) // config.resources.num_workers)


def check_batches(config: PipelineConfig, summaries: dict[str, SourceSummary]) -> None:
    """Refuse training rows too few to fill one batch on every worker: distill drops a last short
    batch, so such a worker would have nothing to train on. With data.transfer, each batch holds
    both kinds of row (``transfer_rows_per_batch``), and each kind must fill its share. Only what
    would fail for certain is refused: a sweep is checked at the smallest batch it tries, and
    SeqKD that keeps the references (``generate.replace_references: false``) at twice the rows.
    A ``data.score`` of its own needs a row for every worker: each holds a shard of the teacher,
    and one with no row to score has nothing to run the collective forwards on."""
    workers = config.resources.num_workers
    batch_size = smallest_batch(config)
    shares = {"train": train_rows_per_worker(config)}
    if TRANSFER_SPLIT in summaries:
        labeled, transfer = summaries["train"].good, summaries[TRANSFER_SPLIT].good
        unlabeled = transfer_rows_per_batch(batch_size, labeled, transfer, workers)
        shares = {"train": batch_size // workers - unlabeled, TRANSFER_SPLIT: unlabeled}
    splits = pipeline_splits(config)
    for split, share in shares.items():
        rows = summaries[split].good
        most_rows = (
            2 * rows if split == "train" and config.generate and not config.generate.replace_references else rows
        )
        if most_rows // workers < share:
            raise DataError(
                f"data.{split} ({splits[split].path}): {rows} rows cannot give each of {workers} workers "
                f"(resources.num_workers) the {share} it takes per batch (training.batch_size "
                f"{batch_size}); use more rows, a smaller batch or fewer workers"
            )
    if "score" in summaries and summaries["score"].good < workers:
        raise DataError(
            f"data.score ({splits['score'].path}): {summaries['score'].good} rows cannot give each of {workers} "
            "workers (resources.num_workers) one to score; use more rows or fewer workers"
        )


def check_data(config: PipelineConfig, tokenizer) -> dict[str, SourceSummary]:
    """The verbalizers (classification), every split, and enough training rows for one batch per
    worker; raises ConfigError or DataError (one line)."""
    if config.task.kind == "classification":
        try:
            verbalizer_token_ids(tokenizer, config.task.label_names)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    summaries = {
        split: check_split(
            split,
            source,
            config.task,
            config.data.on_bad_rows,
            reads_references(config, split),
            prompt_digests=split in ("train", "eval"),
        )
        for split, source in pipeline_splits(config).items()
    }
    check_batches(config, summaries)
    _warn_if_scored_on_training_rows(config, summaries)
    return summaries


def _warn_if_scored_on_training_rows(config: PipelineConfig, summaries: dict[str, SourceSummary]) -> None:
    """A warning, not an error: a smoke run may well score on its training rows, but a real run
    that does reports how well the student memorized, not how well it learned. Rows count as the
    same when the columns both splits' prompt templates read hold the same text: a copy of the
    training file, or rows of it pasted into the eval file, as well as the file itself. Splits
    whose templates read other columns are compared only by file."""
    train, held_out = (split_task(config.task, source) for source in (config.data.train, config.data.eval))
    columns = set(template_columns(train.prompt_template))
    if columns != set(template_columns(held_out.prompt_template)):
        train_file, eval_file = Path(config.data.train.path), Path(config.data.eval.path)
        if train_file.exists() and eval_file.exists() and train_file.samefile(eval_file):
            log.warning(
                "data.eval (%s) is the file data.train reads: the student is scored on rows it trained on", eval_file
            )
        return
    seen = np.isin(summaries["eval"].prompt_digests, summaries["train"].prompt_digests)
    if seen.any():
        log.warning(
            "data.eval (%s): %d of %d rows have the prompt of a data.train row (the first: row %d): the student "
            "is scored on rows it trained on",
            config.data.eval.path,
            int(seen.sum()),
            len(seen),
            int(summaries["eval"].example_ids[np.argmax(seen)]),
        )
