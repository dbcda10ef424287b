"""Raw data sources: the formats flexkd reads, and every row checked as it is read. No Ray here.

A source is read as ordered pieces (``batch_readers``): one per file, or per slice of a saved
``datasets`` folder; each piece is a function that streams its pyarrow record batches, with the
example_id of its first row (a row's example_id is its position in the source, header excluded,
counting from 0).

Text is never read as bytes. pyarrow's CSV reader, left to itself, types a column holding one
byte that is not UTF-8 as *binary*, and a prompt template would then render ``b'...'`` for every
row of it; so CSV and TSV columns are all read as strings, unchecked, and ``check_rows`` checks the
UTF-8 of every text column of every format itself, strictly (pyarrow's JSON and Parquet readers do
not check it either). A row is bad when one of its text columns (the prompt template's, and a
generation task's response column) is null, blank, not UTF-8 or holds a NUL byte, or when a
classification label is not one of ``task.label_names`` (a name, or its index as a number or a
decimal string: CSV and TSV labels are strings).
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.fs
import pyarrow.json
import pyarrow.parquet as pq

from flexkd.config.schema import ConfigError, TaskConfig
from flexkd.data.rows import class_index, template_columns

FORMATS = (
    ".jsonl or .json (JSON lines, or one array of objects), .tsv, .csv (these three also compressed: .gz, .bz2, "
    ".zst), .parquet, a folder of parquet files, a datasets save_to_disk folder"
)
# Compressed text files, by their last suffix. The readers' open_input_stream decompresses them
# by that same suffix (pyarrow's compression="detect").
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")
ROWS_PER_READ = 8192  # rows per record batch where flexkd, not pyarrow, cuts a source into batches
# Bytes per block of pyarrow's JSON and CSV readers, and so the longest row they can read (their
# default, 1 MB, is a long document or two).
BLOCK_BYTES = 16 << 20

BatchReader = Callable[[], Iterator[pa.RecordBatch]]


class DataError(ConfigError):
    """A data source that cannot be used as it is (missing, empty, unreadable, bad rows); one line."""


def batch_readers(path: str) -> list[tuple[BatchReader, int]]:
    """The source at ``path`` as ordered pieces: (read the piece's record batches, example_id of
    its first row). Raises DataError for a missing, empty or unsupported source."""
    path = path if "://" in path else os.path.abspath(path)  # read tasks may run in another folder
    try:
        filesystem, location = pyarrow.fs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, OSError) as error:  # a scheme pyarrow has no filesystem for (foo://, hf://)
        raise DataError(f"cannot open {path}: {str(error).splitlines()[0]}") from None
    info = filesystem.get_file_info(location)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise DataError("file not found")
    if info.type == pyarrow.fs.FileType.File and info.size == 0:
        raise DataError("the split is empty")
    if info.type == pyarrow.fs.FileType.Directory:
        names = {entry.base_name for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(location))}
        if "dataset_dict.json" in names:
            splits = sorted(name for name in names if name != "dataset_dict.json")
            raise DataError(f"a datasets DatasetDict; point the path at one of its split folders: {', '.join(splits)}")
        if names & {"dataset_info.json", "state.json"}:
            # load_from_disk memory-maps the arrow files: the length costs no reading.
            total = len(datasets.load_from_disk(path))
            return [
                (functools.partial(_saved_dataset_batches, path, start, start + ROWS_PER_READ), start)
                for start in range(0, total, ROWS_PER_READ)
            ]
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(location, recursive=True))
        files = sorted(entry.path for entry in entries if entry.path.endswith(".parquet"))
        if not files:
            raise DataError(f"no parquet files in this folder; formats are: {FORMATS}")
        pieces, first_id = [], 0
        for file in files:
            pieces.append((functools.partial(_parquet_batches, filesystem, file), first_id))
            with filesystem.open_input_file(file) as handle:  # the footer alone: no rows are read
                try:
                    first_id += pq.ParquetFile(handle).metadata.num_rows
                except (pa.ArrowInvalid, OSError) as error:  # not parquet after all, or cut short
                    raise DataError(f"{file}: {str(error).splitlines()[0]}") from None
        return pieces
    suffix = Path(location).suffix
    if suffix in COMPRESSED_SUFFIXES:
        suffix = Path(Path(location).stem).suffix
        if suffix not in (".jsonl", ".json", ".tsv", ".csv"):
            raise DataError(f"unsupported format '{suffix}{Path(location).suffix}'; formats are: {FORMATS}")
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
    raise DataError(f"unsupported format '{suffix}'; formats are: {FORMATS}")


def _json_batches(filesystem: pyarrow.fs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    with filesystem.open_input_stream(path) as stream:
        start = b""
        while not start and (chunk := stream.read(4096)):  # past any leading whitespace
            start = chunk.lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    if not start:  # blank lines only: no rows, as an empty file (pyarrow would say "Empty JSON stream")
        return
    if start.startswith(b"["):
        yield from _json_array_batches(filesystem, path)
        return
    with filesystem.open_input_stream(path) as stream:
        yield from pyarrow.json.open_json(stream, read_options=pyarrow.json.ReadOptions(block_size=BLOCK_BYTES))


def _json_array_batches(filesystem: pyarrow.fs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    # One array of row objects (Alpaca's data.json), which pyarrow's JSON-lines reader refuses.
    # Read whole, as any JSON document must be; the struct array takes every key of every row.
    with filesystem.open_input_stream(path) as stream:
        raw = stream.read()
    try:
        rows = json.loads(raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as error:
        raise DataError(f"JSON parse error: {error}") from None
    not_object = next((index for index, value in enumerate(rows) if not isinstance(value, dict)), None)
    if not_object is not None:
        raise DataError(f"row {not_object}: not a JSON object; a .json array must hold one object per row")
    # A byte that is not UTF-8 was kept as a lone surrogate: its column goes on as bytes, and
    # check_rows names the row, as for every other format.
    for key in {key for row in rows for key, value in row.items() if isinstance(value, str) and _not_utf8(value)}:
        for row in rows:
            if isinstance(row.get(key), str):
                row[key] = _raw_bytes(row[key])
    if not rows:
        return
    try:
        table = pa.Table.from_struct_array(pa.array(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:  # a column with a string in one row, a number in another
        raise DataError(f"a column mixes types: {str(error).splitlines()[0]}") from None
    except UnicodeEncodeError:  # a key, or text nested in a list or an object, that is not UTF-8
        raise DataError("a key or a nested value is not UTF-8 text") from None
    except OverflowError:
        raise DataError("a number does not fit in 64 bits") from None
    yield from table.to_batches(max_chunksize=ROWS_PER_READ)


def _raw_bytes(text: str) -> bytes:
    """The bytes of text that is not UTF-8: each byte kept as a lone surrogate goes back to that
    byte; a surrogate written as a JSON escape ("\\ud800") stays the invalid UTF-8 it encodes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_batches(
    filesystem: pyarrow.fs.FileSystem, path: str, options: pyarrow.csv.ParseOptions
) -> Iterator[pa.RecordBatch]:
    # Every column a string, UTF-8 unchecked here (check_rows does it, naming the row): inferred
    # types would read a text column with one bad byte as binary, and "007" as the number 7.
    read = pyarrow.csv.ReadOptions(block_size=BLOCK_BYTES)
    with filesystem.open_input_stream(path) as stream:
        names = pyarrow.csv.open_csv(stream, read_options=read, parse_options=options).schema.names
    convert = pyarrow.csv.ConvertOptions(column_types={name: pa.string() for name in names}, check_utf8=False)
    with filesystem.open_input_stream(path) as stream:
        yield from pyarrow.csv.open_csv(stream, read_options=read, parse_options=options, convert_options=convert)


def _parquet_batches(filesystem: pyarrow.fs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    with filesystem.open_input_file(path) as file:
        yield from pq.ParquetFile(file).iter_batches()


def _saved_dataset_batches(path: str, start: int, stop: int) -> Iterator[pa.RecordBatch]:

    yield from datasets.load_from_disk(path).with_format("arrow")[start:stop].to_batches()


@dataclass(frozen=True)
class RowRules:
    """What a task needs of each row: the prompt template's columns, and the response column
    (generation) or the label column and its label set (classification)."""

    template_columns: tuple[str, ...]
    response_column: str | None = None
    label_column: str | None = None
    label_names: tuple[str, ...] = ()

    @classmethod
    def for_task(cls, task: TaskConfig, labeled: bool = True) -> RowRules:
        """Raises ValueError for a prompt template that names anything but columns, or names the
        label or response column. ``labeled=False`` (data.transfer; train prompts the teacher
        answers, stage generate): the label or response column is neither needed nor read."""
        template = tuple(template_columns(task.prompt_template))
        if (
            task.answer_column in template
        ):  # a model that reads its answer learns to copy it, and scores as if it knew it
            setting = "task.response_column" if task.kind == "generation" else "task.label_column"
            raise ValueError(
                f"task.prompt_template reads '{task.answer_column}', {setting}: the answer would be in the prompt"
            )
        if task.kind == "generation":
            return cls(template, response_column=task.response_column if labeled else None)
        if not labeled:
            return cls(template)
        return cls(template, label_column=task.label_column, label_names=tuple(task.label_names))

    @property
    def text_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.template_columns, *([self.response_column] if self.response_column else [])]))

    @property
    def columns(self) -> list[str]:
        """Every column a row needs, in order of first use."""
        return list(dict.fromkeys([*self.text_columns, *([self.label_column] if self.label_column else [])]))

    def needs(self, column: str) -> str:
        """Which setting names ``column``."""
        if column in self.template_columns:
            return "the prompt template"
        return "task.label_column" if column == self.label_column else "the response column"


@dataclass(frozen=True)
class BadRow:
    example_id: int
    column: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.example_id}, column '{self.column}': {self.reason}"


@dataclass(frozen=True)
class CheckedRows:
    good: pa.Table  # the good rows: the rule columns (text columns as strings) and example_id
    bad_ids: np.ndarray  # example_ids of the bad rows, ascending
    first_bad: BadRow | None


# One check of a column: the rows it fails, and the reason for one such row (by index).
_Check = tuple[np.ndarray, Callable[[int], str]]


def check_rows(table: pa.Table, rules: RowRules) -> CheckedRows:
    """Split numbered raw rows (``table`` has an ``example_id`` column and every rule column)
    into good rows and bad ones; a text column of the good rows is a valid UTF-8 string column."""
    checks: list[tuple[str, list[_Check]]] = []
    columns = {}
    for name in rules.columns:
        column = table.column(name).combine_chunks()
        if pa.types.is_dictionary(column.type):  # a categorical column (pandas, Parquet)
            column = column.dictionary_decode()
        column_checks: list[_Check] = []
        if name in rules.text_columns or name == rules.label_column:  # a CSV label is text too
            column, column_checks = _text_checks(column)
        if name == rules.label_column and not pa.types.is_nested(column.type):
            column_checks += _label_checks(column, list(rules.label_names), name)
        columns[name] = column
        checks.append((name, column_checks))
    bad = np.zeros(table.num_rows, dtype=bool)
    for _, column_checks in checks:
        for failed, _ in column_checks:
            bad |= failed
    ids = table.column("example_id").to_numpy()
    first_bad = None
    if bad.any():
        index = int(np.argmax(bad))
        name, reason = next(
            (name, reason(index)) for name, column_checks in checks for failed, reason in column_checks if failed[index]
        )
        first_bad = BadRow(int(ids[index]), name, reason)
    good = pa.table({**columns, "example_id": table.column("example_id")})
    if bad.any():
        good = good.filter(pa.array(~bad))
    return CheckedRows(good, ids[bad], first_bad)


def _mask(array: pa.Array) -> np.ndarray:
    """A boolean array as numpy, nulls as False."""
    return np.asarray(array.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _text_checks(column: pa.Array) -> tuple[pa.Array, list[_Check]]:
    """The column as strings, and its checks: UTF-8, null, blank, NUL. Other scalars (numbers,
    dates) are text enough, a template may name a year; lists, structs and maps are not."""
    null = _mask(column.is_null())
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        raw, target = column.view(pa.binary()), pa.string()
    elif pa.types.is_large_string(kind) or pa.types.is_large_binary(kind):
        raw, target = column.view(pa.large_binary()), pa.large_string()
    elif pa.types.is_nested(kind):
        return column, [(np.ones(len(column), dtype=bool), lambda _: f"holds {kind} values, not text")]
    else:
        return column, [(null, lambda _: "empty (null)")]
    invalid = np.zeros(len(column), dtype=bool)
    errors: dict[int, UnicodeDecodeError] = {}
    try:
        text = raw.cast(target)
        text.validate(full=True)
    except pa.ArrowInvalid:  # find the rows, and only then pay for a Python pass
        values = []
        for index, value in enumerate(raw.to_pylist()):
            try:
                values.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError as error:
                invalid[index], errors[index] = True, error
                values.append(None)
        text = pa.array(values, type=target)
    blank = _mask(blank_text(text))
    nul = _mask(pc.match_substring(text, "\x00"))

    def not_utf8(index: int) -> str:
        error = errors[index]
        return f"not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start})"

    def nul_at(index: int) -> str:
        return f"holds a NUL byte (at offset {text[index].as_py().index(chr(0))})"

    return text, [
        (invalid, not_utf8),
        (null & ~invalid, lambda _: "empty (null)"),
        (blank, lambda _: "empty text"),
        (nul, nul_at),
    ]


def _label_checks(column: pa.Array, label_names: list[str], label_column: str) -> list[_Check]:
    """Labels outside the label set, judged by ``class_index`` once per distinct value (nulls
    are the text checks')."""

    def reason(value: Any) -> str | None:
        try:
            class_index(value, label_names, label_column)
        except ValueError as error:
            return str(error).removeprefix(f"task.label_column '{label_column}': ")
        return None

    refused = [value for value in pc.unique(column.drop_null()).to_pylist() if reason(value) is not None]
    if not refused:
        return []
    outside = _mask(pc.is_in(column, value_set=pa.array(refused, type=column.type)))
    return [(outside, lambda index: reason(column[index].as_py()))]


@dataclass(frozen=True)
class SourceSummary:
    """What a full read of a source found (up to its limit)."""

    columns: list[str]
    good: int
    bad: int
    first_bad: BadRow | None
    # With scan_source's prompt_digests, of each good row in order: its example_id, and a digest of
    # its prompt template's columns (equal for rows whose columns are; within one process only:
    # Python's string hash is salted).
    example_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prompt_digests: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def blank_text(text: pa.Array) -> pa.Array:
    """Which strings are empty or whitespace only: what check_rows refuses as "empty text"."""
    return pc.equal(pc.utf8_trim_whitespace(text), "")


def numbered(batch: pa.RecordBatch, first_id: int) -> pa.Table:
    """The batch with an ``example_id`` column counting from ``first_id``."""
    ids = np.arange(first_id, first_id + batch.num_rows, dtype=np.int64)
    return pa.Table.from_batches([batch]).append_column("example_id", pa.array(ids))


def scan_source(path: str, rules: RowRules, limit: int | None = None, prompt_digests: bool = False) -> SourceSummary:
    """Read the source once, checking every row, until ``limit`` good rows (the rows a split's
    ``limit`` keeps). Raises DataError (one line, without the source's name) for a missing,
    empty, unsupported or malformed source and a missing column. ``prompt_digests``: also keep
    the good rows' ids and prompt digests (16 bytes a row; else the summary's arrays are empty)."""
    pieces = batch_readers(path)
    columns: list[str] = []
    good = bad = next_id = 0
    first_bad: BadRow | None = None
    ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    digests: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]

    def summary() -> SourceSummary:
        return SourceSummary(columns, good, bad, first_bad, np.concatenate(ids), np.concatenate(digests))

    try:
        for read_batches, first_id in pieces:
            next_id = first_id
            for batch in read_batches():
                columns = columns or batch.schema.names
                missing = [name for name in rules.columns if name not in batch.schema.names]
                if missing:
                    raise DataError(
                        f"missing column '{missing[0]}' (named by {rules.needs(missing[0])}); "
                        f"columns are: {', '.join(batch.schema.names)}"
                    )
                repeated = [name for name in rules.columns if batch.schema.names.count(name) > 1]
                if repeated:
                    raise DataError(
                        f"column '{repeated[0]}' (named by {rules.needs(repeated[0])}) appears "
                        f"{batch.schema.names.count(repeated[0])} times in the header; rename all but one"
                    )
                checked = check_rows(numbered(batch, next_id), rules)
                next_id += batch.num_rows
                kept, bad_ids = checked.good.num_rows, checked.bad_ids
                if limit is not None and good + kept >= limit:  # the bad rows after the last kept one do not count
                    last_kept = checked.good.column("example_id")[limit - good - 1].as_py()
                    kept, bad_ids = limit - good, bad_ids[bad_ids < last_kept]
                good, bad = good + kept, bad + len(bad_ids)
                if prompt_digests:
                    kept_rows = checked.good.slice(0, kept)
                    ids.append(kept_rows.column("example_id").to_numpy())
                    digests.append(_prompt_digests(kept_rows, rules.template_columns))
                if first_bad is None and len(bad_ids):
                    first_bad = checked.first_bad
                if limit is not None and good >= limit:
                    return summary()
    except (pa.ArrowInvalid, OSError) as error:  # a malformed file: pyarrow names the row
        raise DataError(_reader_error(str(error).splitlines()[0], next_id)) from None
    if good == bad == 0:
        raise DataError("the split is empty")
    return summary()


def _prompt_digests(rows: pa.Table, template_columns: Sequence[str]) -> np.ndarray:
    """[rows] int64: a hash of each row's prompt template columns, by name, as the template shows
    them (``str``: a JSON 1 and a CSV "1" are the same text, 1 and 1.0 are not)."""
    names = sorted(set(template_columns))  # "{a} {b}" and "{b} {a}" read the same row
    texts = zip(*(rows.column(name).to_pylist() for name in names))
    return np.fromiter((hash(tuple(map(str, text))) for text in texts), dtype=np.int64, count=rows.num_rows)


def _reader_error(message: str, block_start: int) -> str:
    """pyarrow's message for a malformed file, with the row counted from the file's start: its
    JSON reader counts from the start of the block it was reading, which begins at ``block_start``."""
    if "straddl" in message:  # pyarrow's words for a row longer than a block
        return f"row {block_start} or one after it is longer than {BLOCK_BYTES / 2**20:g} MB, the most one row may hold"
    return re.sub(r" in row (\d+)", lambda found: f" in row {block_start + int(found.group(1))}", message)


def read_checked(read_batches: BatchReader, first_id: int, rules: RowRules) -> Iterator[pa.Table]:
    """A piece's good rows, numbered, with the rule columns only: what the tokenize stage reads
    (``scan_source`` has refused the bad rows before, or reported them skipped)."""
    next_id = first_id
    for batch in read_batches():
        checked = check_rows(numbered(batch, next_id), rules)
        next_id += batch.num_rows
        yield checked.good
