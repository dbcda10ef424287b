"""A data split as a Ray Dataset of its good rows, numbered: what the tokenize and generate stages read.

``example_id`` is the row's position in its split's source; a folder of parquet files counts
its files in sorted order. Ray Data's readers number nothing, and numbering downstream of them
would need one stateful actor seeing every block in order, which Ray Data does not promise
(its actors may run tasks out of order). So a split is read through ``NumberedSource``: one
read task per file (or per slice of a saved ``datasets`` folder) that streams the file with
pyarrow and counts, starting from the rows before it (parquet footers; a single text file
starts at 0). A retried read task starts its file again, so ids are exact on every (re)run.
"""

from __future__ import annotations

import functools
from typing import Any

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flexkd.config.schema import DataSplit
from flexkd.data.sources import BatchReader, RowRules, batch_readers, read_checked


def numbered_dataset(source: DataSplit, rules: RowRules) -> ray.data.Dataset:
    """The split's good rows (``rules``' columns and example_id), up to its limit; ``limit``
    keeps the *first* rows when read inside ``flexkd.data.shards.ordered_execution``. Raises DataError for a
    missing, empty or unsupported source."""
    pieces = batch_readers(source.path)
    # One block stream per piece: Ray Data would otherwise cut a small file into ~200 blocks
    # of a few rows each, and per-block overhead would dominate the stage.
    dataset = ray.data.read_datasource(NumberedSource(pieces, rules), override_num_blocks=len(pieces))
    return dataset if source.limit is None else dataset.limit(source.limit)


class NumberedSource(Datasource):
    """One read task per piece; each streams its piece, numbers the rows from the piece's first
    id (so numbering needs no coordination between tasks) and keeps the rows that pass
    ``flexkd.data.sources.check_rows``, with the columns the task needs."""

    def __init__(self, pieces: list[tuple[BatchReader, int]], rules: RowRules):
        self.pieces = pieces
        self.rules = rules

    def get_name(self) -> str:
        return "NumberedRows"

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_checked, read_batches, first_id, self.rules),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for read_batches, first_id in self.pieces
        ]
