"""tokenize: raw rows to token shards, streamed through Ray Data.

For each split (train, eval, score) Ray Data reads the source with its rows numbered, a pool of
tokenizer actors turns them into training rows (``flexkd.data.tokenize_rows``) and
``write_parquet`` writes them:

    <output_dir>/<split>/*.parquet    rows in flexkd.data.ROW_SCHEMA, about data.shard_rows per file

The score split defaults to the train split's source; it is then a copy (hard links) of train's
shards, so later stages always just read ``<output_dir>/score``. ``data.transfer`` (unlabeled rows,
classification) is tokenized without its label column into ``<output_dir>/transfer``: class_label
-1 and reference "" on every row (``flexkd.data.rows.tokenize_rows(labeled=False)``).

``example_id`` is the row's position in its split's source; a folder of parquet files counts
its files in sorted order. Ray Data's readers number nothing, and numbering downstream of them
would need one stateful actor seeing every block in order, which Ray Data does not promise
(its actors may run tasks out of order). So the stage reads through ``_NumberedSource``: one
read task per file (or per slice of a saved ``datasets`` folder) that streams the file with
pyarrow and counts, starting from the rows before it (parquet footers; a single text file
starts at 0). A retried read task starts its file again, so ids are exact on every (re)run.
``preserve_order`` makes ``data.<split>.limit`` keep the *first* rows.

Every split is checked before any is tokenized (file present, columns present, not empty), and
every failure reaches the user as one line: ``tokenize: data.<split> (<path>): <cause>``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.fs
import pyarrow.json
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.exceptions import RayTaskError

from flexkd.config.schema import DataConfig, DataSplit, PipelineConfig, TaskConfig
from flexkd.data.rows import ROW_SCHEMA, TRANSFER_SPLIT, required_columns, tokenize_rows, verbalizer_token_ids
from flexkd.errors import StageError

SPLITS = ("train", "eval", "score")
FORMATS = (
    ".jsonl or .json (JSON lines), .tsv, .csv, .parquet, a folder of parquet files, a datasets save_to_disk folder"
)
TOKENIZE_BATCH_ROWS = 256
SAVED_DATASET_ROWS_PER_READ = 8192

_CAUSE_SEPARATOR = "The above exception was the direct cause of the following exception:"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Invalid): (.+)$")

BatchReader = Callable[[], Iterator[pa.RecordBatch]]


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    """Tokenize every split into ``output_dir/<split>/``; returns counts and the ids later
    stages need (``pad_token_id``, ``verbalizer_ids``)."""
    # Imported here, not at the top: Ray Data imports this module in every actor it starts, and
    # the model code behind flexkd.resolve costs seconds per process. Actors get the tokenizer.
    from flexkd.models.plan import load_pipeline_tokenizer

    tokenizer = load_pipeline_tokenizer(config)
    try:
        verbalizer_ids = (
            verbalizer_token_ids(tokenizer, config.task.label_names) if config.task.kind == "classification" else None
        )
    except ValueError as error:
        raise StageError(f"tokenize: {error}") from None
    sources = {"train": config.data.train, "eval": config.data.eval}
    if config.data.score is not None:
        sources["score"] = config.data.score
    if config.data.transfer is not None:
        sources[TRANSFER_SPLIT] = config.data.transfer
    tasks = {split: _split_task(config.task, source) for split, source in sources.items()}

    rows, tokens = {}, {}
    with _ordered_execution():
        split_datasets = {
            split: _checked_dataset(split, source, tasks[split], labeled=split != TRANSFER_SPLIT)
            for split, source in sources.items()
        }
        for split in SPLITS + ((TRANSFER_SPLIT,) if TRANSFER_SPLIT in sources else ()):
            split_dir = output_dir / split
            shutil.rmtree(split_dir, ignore_errors=True)  # a crashed attempt may have left shards
            if split in split_datasets:
                _tokenize_and_write(
                    split, sources[split], split_datasets[split], tokenizer, tasks[split], config.data, split_dir
                )
            else:
                shutil.copytree(output_dir / "train", split_dir, copy_function=_link_or_copy)
            rows[split], tokens[split] = _count_rows_and_tokens(split_dir)
    return {
        "rows": rows,
        "tokens": tokens,
        "verbalizer_ids": verbalizer_ids,
        "pad_token_id": int(tokenizer.pad_token_id),
        "max_length": config.data.max_length,
    }


def _split_task(task: TaskConfig, source: DataSplit) -> TaskConfig:
    """The task as this split sees it: a split may bring its own template and response column."""
    return task.model_copy(
        update={
            "prompt_template": source.prompt_template or task.prompt_template,
            "response_column": source.response_column or task.response_column,
        }
    )


@contextmanager
def _ordered_execution():
    """Datasets made inside keep rows in source order (each Dataset snapshots this setting)."""
    options = ray.data.DataContext.get_current().execution_options
    previous = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = previous


def _checked_dataset(split: str, source: DataSplit, task: TaskConfig, labeled: bool = True) -> ray.data.Dataset:
    """The split's numbered rows (limited, only the needed columns and example_id), after
    checking that the source exists, has every needed column and is not empty. ``labeled=False``
    (data.transfer): the label column is neither needed nor kept."""
    where = f"tokenize: data.{split} ({source.path})"
    try:
        columns = required_columns(task, labeled)
        pieces = _batch_readers(source.path, where)
        # One block stream per piece: Ray Data would otherwise cut a small file into ~200 blocks
        # of a few rows each, and per-block overhead would dominate the stage.
        dataset = ray.data.read_datasource(_NumberedSource(pieces), override_num_blocks=len(pieces))
        if source.limit is not None:
            dataset = dataset.limit(source.limit)
        # One partial read gives both the column names and whether there is any row at all.
        first_rows = dataset.take(1)
    except StageError:
        raise
    except Exception as error:  # a bad template, a malformed file (Ray wraps the reader's error)
        raise StageError(f"{where}: {_root_message(error)}") from error
    if not first_rows:
        raise StageError(f"{where}: the split is empty")
    present = [name for name in first_rows[0] if name != "example_id"]
    for column in columns:
        if column not in present:
            raise StageError(f"{where}: missing column '{column}'; columns are: {', '.join(present)}")
    return dataset.select_columns([*columns, "example_id"])


def _batch_readers(path: str, where: str) -> list[tuple[BatchReader, int]]:
    """The source as ordered pieces: (read the piece's record batches, example_id of its first row)."""
    path = path if "://" in path else os.path.abspath(path)  # read tasks may run in another folder
    filesystem, location = pyarrow.fs.FileSystem.from_uri(path)
    info = filesystem.get_file_info(location)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StageError(f"{where}: file not found")
    if info.type == pyarrow.fs.FileType.File and info.size == 0:
        raise StageError(f"{where}: the split is empty")
    if info.type == pyarrow.fs.FileType.Directory:
        names = {entry.base_name for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(location))}
        if "dataset_dict.json" in names:
            raise StageError(f"{where}: a datasets DatasetDict; point the path at one of its split folders")
        if names & {"dataset_info.json", "state.json"}:
            import datasets  # slow to import, and only this format needs it

            # load_from_disk memory-maps the arrow files: the length costs no reading.
            total = len(datasets.load_from_disk(path))
            return [
                (functools.partial(_saved_dataset_batches, path, start, start + SAVED_DATASET_ROWS_PER_READ), start)
                for start in range(0, total, SAVED_DATASET_ROWS_PER_READ)
            ]
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(location, recursive=True))
        files = sorted(entry.path for entry in entries if entry.path.endswith(".parquet"))
        if not files:
            raise StageError(f"{where}: no parquet files in this folder; formats are: {FORMATS}")
        pieces, first_id = [], 0
        for file in files:
            pieces.append((functools.partial(_parquet_batches, filesystem, file), first_id))
            with filesystem.open_input_file(file) as handle:  # the footer alone: no rows are read
                first_id += pq.ParquetFile(handle).metadata.num_rows
        return pieces
    suffix = Path(location).suffix
    if suffix in (".jsonl", ".json"):
        return [(functools.partial(_json_batches, filesystem, location), 0)]
    if suffix in (".tsv", ".csv"):
        # GLUE-style TSV is unquoted: a sentence may begin with '"' and must not open a quote.
        options = (
            pyarrow.csv.ParseOptions(delimiter="\t", quote_char=False)
            if suffix == ".tsv"
            else pyarrow.csv.ParseOptions()
        )
        return [(functools.partial(_csv_batches, filesystem, location, options), 0)]
    if suffix == ".parquet":
        return [(functools.partial(_parquet_batches, filesystem, location), 0)]
    raise StageError(f"{where}: unsupported format '{suffix}'; formats are: {FORMATS}")


def _json_batches(filesystem: pyarrow.fs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    with filesystem.open_input_stream(path) as stream:
        yield from pyarrow.json.open_json(stream)


def _csv_batches(
    filesystem: pyarrow.fs.FileSystem, path: str, options: pyarrow.csv.ParseOptions
) -> Iterator[pa.RecordBatch]:
    with filesystem.open_input_stream(path) as stream:
        yield from pyarrow.csv.open_csv(stream, parse_options=options)


def _parquet_batches(filesystem: pyarrow.fs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    with filesystem.open_input_file(path) as file:
        yield from pq.ParquetFile(file).iter_batches()


def _saved_dataset_batches(path: str, start: int, stop: int) -> Iterator[pa.RecordBatch]:
    import datasets

    yield from datasets.load_from_disk(path).with_format("arrow")[start:stop].to_batches()


class _NumberedSource(Datasource):
    """One read task per piece; each streams its piece and numbers the rows from the piece's
    first id, so numbering needs no coordination between tasks."""

    def __init__(self, pieces: list[tuple[BatchReader, int]]):
        self.pieces = pieces

    def get_name(self) -> str:
        return "NumberedRows"

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(_numbered_tables, read_batches, first_id),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for read_batches, first_id in self.pieces
        ]


def _numbered_tables(read_batches: BatchReader, first_id: int) -> Iterator[pa.Table]:
    next_id = first_id
    for batch in read_batches():
        ids = np.arange(next_id, next_id + batch.num_rows, dtype=np.int64)
        next_id += batch.num_rows
        yield pa.Table.from_batches([batch]).append_column("example_id", pa.array(ids))


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
    )
    try:
        tokenized.write_parquet(str(split_dir), min_rows_per_file=data.shard_rows, max_rows_per_file=data.shard_rows)
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
    for file in sorted(split_dir.glob("*.parquet")):
        shard = pq.ParquetFile(file)
        rows += shard.metadata.num_rows
        for batch in shard.iter_batches(columns=["input_ids"]):
            tokens += pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0
    return rows, tokens
