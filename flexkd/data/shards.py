"""Row shards on disk in a known order: what one stage writes and the next one reads.

Training order must be a function of the data and the seed, or two runs of one config (and the
online and cached teacher) see different batches. Ray Data keeps a dataset's order only so far:
``write_parquet`` hands each write task's blocks to pyarrow's multi-threaded dataset writer,
which interleaves them, and ``read_parquet`` of a folder lists its files in the filesystem's
order. So a stage writes each shard itself: one batch of rows, sorted by ``example_id``, written
by a single thread under a name made of its first id; and a folder is read as the sorted list of
those names. Both run inside ``ordered_execution``, so batches reach the writers in order.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

# Zero-padded, so the names sort as the ids do.
SHARD_NAME = "rows-{:012d}.parquet"


@contextmanager
def ordered_execution() -> Iterator[None]:
    """Datasets made inside keep rows in source order (each Dataset snapshots this setting)."""
    options = ray.data.DataContext.get_current().execution_options
    previous = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = previous


def write_shards(dataset: ray.data.Dataset, directory: Path, rows_per_file: int) -> int:
    """Write ``dataset`` (rows with ``example_id``) to ``directory`` as shards of about
    ``rows_per_file`` rows that ``shard_files`` lists in row order; returns the rows written.
    The folder is emptied first: a crashed attempt may have left shards."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    with ordered_execution():
        written = dataset.map_batches(
            _write_shard,
            fn_kwargs={"directory": str(directory)},
            batch_format="pyarrow",
            batch_size=rows_per_file,
            zero_copy_batch=True,
        ).take_all()
    return sum(record["rows"] for record in written)


def _write_shard(rows: pa.Table, directory: str) -> pa.Table:
    if rows.num_rows == 0:
        return pa.table({"rows": pa.array([], pa.int64())})
    rows = rows.sort_by("example_id")
    first = rows.column("example_id")[0].as_py()
    pq.write_table(rows, str(Path(directory) / SHARD_NAME.format(first)))
    return pa.table({"rows": [rows.num_rows]})


def shard_files(directory: Path) -> list[Path]:
    """The folder's parquet shards in row order (their names sort as their first ids)."""
    return sorted(Path(directory).glob("*.parquet"))


def read_shards(directory: Path, columns: list[str] | None = None) -> ray.data.Dataset:
    """The folder's rows as a Ray Dataset in row order, when executed with ``preserve_order``
    (``ordered_execution``, or Ray Train's ingest in ``flexkd.cluster.train_workers``)."""
    files = shard_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no parquet shards")
    return ray.data.read_parquet([str(file) for file in files], columns=columns)
