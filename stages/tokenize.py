"""tokenize: raw rows to token shards, streamed through Ray Data.

For each split (train, eval, score) Ray Data reads the source with its rows numbered, a pool of
tokenizer actors turns them into training rows (``flexkd.data.tokenize_rows``) and
``flexkd.data.shards.write_shards`` writes them, in row order:

    <output_dir>/<split>/*.parquet    rows in flexkd.data.ROW_SCHEMA, about data.shard_rows per file

The score split defaults to the train split's source; it is then a copy (hard links) of train's
shards, so later stages always just read ``<output_dir>/score``. ``data.transfer`` (unlabeled rows,
classification) is tokenized without its label column into ``<output_dir>/transfer``: class_label
-1 and reference "" on every row (``flexkd.data.rows.tokenize_rows(labeled=False)``).

``example_id`` is the row's position in its split's source, exact on every (re)run
(``flexkd.data.numbered``); ``preserve_order`` makes ``data.<split>.limit`` keep the *first* rows.
With a ``generate`` section the train split is the generate stage's ``responses.parquet`` (the
prompts with the teacher's responses; its limit already applied), so every later stage trains
on the teacher's responses.

Every split is read and checked in full before any is tokenized (``flexkd.data.splits``: file
present, columns present, not empty, every row's text UTF-8, not blank, free of NUL bytes, every
label in the label set), and the read tasks keep only the rows that pass the same check, so with
``data.on_bad_rows: skip`` the bad rows are left out, their ids with them. Every failure reaches
the user as one line: ``tokenize: data.<split> (<path>): <cause>``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.exceptions import RayTaskError

from flexkd.cluster.local import ACTOR_POOL_OPTIONS
from flexkd.config.schema import ConfigError, DataConfig, DataSplit, PipelineConfig, TaskConfig
from flexkd.data.numbered import numbered_dataset
from flexkd.data.rows import ROW_SCHEMA, TRANSFER_SPLIT, tokenize_rows, verbalizer_token_ids
from flexkd.data.shards import ordered_execution, shard_files, write_shards
from flexkd.data.sources import RowRules
from flexkd.data.splits import check_split, pipeline_splits, split_task
from flexkd.errors import StageError
from flexkd.models.plan import load_pipeline_tokenizer

SPLITS = ("train", "eval", "score")
TOKENIZE_BATCH_ROWS = 256

_CAUSE_SEPARATOR = "The above exception was the direct cause of the following exception:"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Invalid): (.+)$")


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    """Tokenize every split into ``output_dir/<split>/``; returns counts and the ids later
    stages need (``pad_token_id``, ``verbalizer_ids``)."""
    # Imported here, not at the top: Ray Data imports this module in every actor it starts, and
    # the model code behind flexkd.resolve costs seconds per process. Actors get the tokenizer.

    tokenizer = load_pipeline_tokenizer(config)
    try:
        verbalizer_ids = (
            verbalizer_token_ids(tokenizer, config.task.label_names) if config.task.kind == "classification" else None
        )
    except ValueError as error:
        raise StageError(f"tokenize: {error}") from None
    sources = pipeline_splits(config, inputs.get("generate"))
    tasks = {split: split_task(config.task, source) for split, source in sources.items()}

    rows, tokens, skipped = {}, {}, {}
    with ordered_execution():
        split_datasets = {}
        for split, source in sources.items():
            split_datasets[split], skipped[split] = _checked_dataset(
                split, source, config.task, config.data.on_bad_rows
            )
        for split in SPLITS + ((TRANSFER_SPLIT,) if TRANSFER_SPLIT in sources else ()):
            split_dir = output_dir / split
            shutil.rmtree(split_dir, ignore_errors=True)  # a crashed attempt may have left shards
            if split in split_datasets:
                _tokenize_and_write(
                    split, sources[split], split_datasets[split], tokenizer, tasks[split], config.data, split_dir
                )
            else:
                shutil.copytree(output_dir / "train", split_dir, copy_function=_link_or_copy)
                skipped[split] = skipped["train"]
            rows[split], tokens[split] = _count_rows_and_tokens(split_dir)
    return {
        "rows": rows,
        "tokens": tokens,
        "bad_rows_skipped": skipped,
        "verbalizer_ids": verbalizer_ids,
        "pad_token_id": int(tokenizer.pad_token_id),
        "max_length": config.data.max_length,
    }


def _checked_dataset(split: str, source: DataSplit, task: TaskConfig, on_bad_rows: str) -> tuple[ray.data.Dataset, int]:
    """The split's good rows, numbered (limited; the needed columns and example_id), and how
    many bad rows are left out, after reading and checking the whole split (up to its limit)."""
    try:
        summary = check_split(split, source, task, on_bad_rows)
        rules = RowRules.for_task(split_task(task, source), labeled=split != TRANSFER_SPLIT)
        return numbered_dataset(source, rules), summary.bad
    except ConfigError as error:  # DataError included: "data.<split> (<path>): <cause>"
        raise StageError(f"tokenize: {error}") from None


class _TokenizeRows:
    """Training rows from raw rows, with the driver's tokenizer (shipped once per actor: loading
    it again per actor would fetch a demo or MLflow teacher on every node)."""

    def __init__(self, tokenizer, task: TaskConfig, max_length: int, labeled: bool = True):
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.labeled = labeled

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = tokenize_rows(batch, self.tokenizer, self.task, self.max_length, self.labeled)
        return pa.Table.from_pydict(rows, schema=ROW_SCHEMA)


def _tokenize_and_write(
    split: str,
    source: DataSplit,
    dataset: ray.data.Dataset,
    tokenizer,
    task: TaskConfig,
    data: DataConfig,
    split_dir: Path,
) -> None:
    tokenized = dataset.map_batches(
        _TokenizeRows,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "task": task,
            "max_length": data.max_length,
            "labeled": split != TRANSFER_SPLIT,
        },
        batch_format="numpy",
        batch_size=TOKENIZE_BATCH_ROWS,
        udf_modifying_row_count=False,
        # Half a CPU each: on a small machine the reader and the writer still get CPU.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.5,
        **ACTOR_POOL_OPTIONS,
    )
    try:
        write_shards(tokenized, split_dir, data.shard_rows)
    except Exception as error:  # e.g. a label outside the label set, raised in a tokenizer actor
        raise StageError(f"tokenize: data.{split} ({source.path}): {_root_message(error)}") from error


def _root_message(error: BaseException) -> str:
    """The original error's message, for one line of output.

    Ray does not ship a worker's exception object to the driver: RayTaskError carries it as the
    text of the remote traceback, where the innermost exception is the last "Type: message"
    line before the first "direct cause" separator (Ray appends retry advice after it)."""
    while not isinstance(error, RayTaskError) and error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).split(_CAUSE_SEPARATOR)[0].splitlines() if line.strip()]
    if isinstance(error, RayTaskError):
        for line in reversed(lines):
            if match := _EXCEPTION_LINE.match(line):
                return match.group(1)
    return lines[0] if lines else type(error).__name__


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target)


def _count_rows_and_tokens(split_dir: Path) -> tuple[int, int]:
    """Rows and tokens written, read back from the shards one record batch at a time."""
    rows = tokens = 0
    for file in shard_files(split_dir):
        shard = pq.ParquetFile(file)
        rows += shard.metadata.num_rows
        for batch in shard.iter_batches(columns=["input_ids"]):
            tokens += pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0
    return rows, tokens
