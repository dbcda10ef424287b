"""Shards keep row order from one stage to the next. Ray Data's write_parquet did not: the
targets stage's cache listed the training rows in another order than the tokenize stage's shards
(1 of 2 debug runs), so a cached run trained on other batches than an online one."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import ray

from flexkd.data.shards import SHARD_NAME, ordered_execution, read_shards, shard_files, write_shards

ROWS = 2000


def _many_blocks() -> ray.data.Dataset:
    """Rows with ids 0..ROWS-1 in 80 blocks of 25, each block's rows in reverse (as a writer's
    threads may leave them), mapped so blocks finish out of order."""

    def jittered(batch):
        import random
        import time

        time.sleep(random.random() * 0.02)  # blocks finish in any order; the writer must not care
        return batch

    ids = [i for start in range(0, ROWS, 25) for i in reversed(range(start, start + 25))]
    rows = ray.data.from_items([{"example_id": i, "value": float(i)} for i in ids], override_num_blocks=ROWS // 25)
    return rows.map_batches(jittered, batch_format="pyarrow")


def test_written_shards_list_their_rows_in_order_and_read_back_in_order(tmp_path, local_ray):
    directory = tmp_path / "train"
    (tmp_path / "train").mkdir()
    (directory / "stale.parquet").write_bytes(b"")  # a crashed attempt's leftover is removed
    with ordered_execution():
        written = write_shards(_many_blocks(), directory, rows_per_file=300)
    assert written == ROWS
    files = shard_files(directory)
    assert len(files) >= ROWS // 300 and all(file.name.startswith("rows-") for file in files)
    ids = [i for file in files for i in pq.read_table(file).column("example_id").to_pylist()]
    assert ids == list(range(ROWS))
    assert files[0].name == SHARD_NAME.format(0)

    with ordered_execution():
        read = read_shards(directory, columns=["example_id"]).take_all()
    assert [row["example_id"] for row in read] == list(range(ROWS))


def test_reading_a_folder_without_shards_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}: no parquet shards$"):
        read_shards(tmp_path)
