"""How distill draws its batches: the seeded shuffle, and labeled rows beside unlabeled transfer rows."""

from __future__ import annotations

import random
import time
from itertools import islice

import numpy as np
import pytest

from flexkd.cluster.train_workers import ordered_ingest_options
from flexkd.config.schema import ConfigError
from flexkd.data.splits import transfer_rows_per_batch
from flexkd.stages.distill import _endless_batches, joined_batch, training_rows


def test_a_batch_holds_the_transfer_rows_share_and_at_least_one_row_of_each_kind():
    assert transfer_rows_per_batch(32, 256, 744) == 24  # 32 * 744 / 1000 = 23.8
    assert transfer_rows_per_batch(32, 999, 1) == 1  # 0.03 rounds to 0: one unlabeled row all the same
    assert transfer_rows_per_batch(32, 1, 999) == 31  # 31.97 rounds to 32: one labeled row all the same
    assert transfer_rows_per_batch(2, 5, 5) == 1
    with pytest.raises(ConfigError, match="training.batch_size = 1"):
        transfer_rows_per_batch(1, 5, 5)


def test_joined_batch_puts_the_second_batchs_rows_after_the_firsts():
    first = {"class_label": np.array([0, 1]), "input_ids": np.array([[1, 2], [3, 4]])}  # equal lengths: 2-D
    ragged = np.empty(1, dtype=object)
    ragged[0] = np.array([5, 6, 7])
    second = {"class_label": np.array([-1]), "input_ids": ragged}
    joined = joined_batch(first, second)
    assert joined["class_label"] == [0, 1, -1]
    assert [list(ids) for ids in joined["input_ids"]] == [[1, 2], [3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="differ"):
        joined_batch(first, {"class_label": np.array([-1])})


class _RecordingShard:
    """A dataset shard that yields its batches in order and records how it was asked for them."""

    def __init__(self, batches: int):
        self.batches, self.calls = batches, []

    def iter_batches(self, **options):
        self.calls.append(options)
        return iter([{"row": np.array([index])} for index in range(self.batches)])


def test_each_epoch_is_shuffled_by_the_seed_and_the_epoch_and_a_rerun_repeats_it():
    plain = _RecordingShard(3)
    assert [batch["row"][0] for batch in islice(_endless_batches(plain, 1, skip=2), 4)] == [2, 0, 1, 2]

    def order(seed: int, skip: int = 0) -> list[int]:
        shard = _RecordingShard(16)
        return [
            int(batch["row"][0])
            for batch in islice(_endless_batches(shard, 1, skip=skip, shuffle_buffer=8, seed=seed), 32)
        ]

    first = order(3)
    assert first == order(3)  # a rerun draws the same orders
    assert order(3, skip=5)[:27] == first[5:]  # a resumed run continues the same order
    assert first[:16] != first[16:] and sorted(first[:16]) == list(range(16))  # a new order every epoch
    assert first != order(4)  # another seed, another order


def test_the_seeded_shuffle_of_a_ray_dataset_gives_the_same_order_again(local_ray):
    """What the pipeline relies on: the same seed reproduces the shuffle of a Ray Data shard, batch for batch."""

    def late_at_random(batch):  # blocks finish in a new order each time, as on a busy cluster
        time.sleep(random.uniform(0.0, 0.2))
        return batch

    dataset = local_ray.data.range(40, override_num_blocks=8).map_batches(late_at_random)
    dataset.context.execution_options = ordered_ingest_options()  # as the distill trainer ingests

    def epochs(seed: int) -> list[list[int]]:
        batches = _endless_batches(dataset.iterator(), 8, skip=0, shuffle_buffer=40, seed=seed)
        rows = [batch["id"].tolist() for batch in islice(batches, 10)]
        return [sum(rows[:5], []), sum(rows[5:], [])]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again and first != other
    assert sorted(first[0]) == sorted(first[1]) == list(range(40))  # each epoch: every row once
    assert first[0] != first[1] and first[0] != list(range(40))


def test_rows_a_sweep_read_once_are_narrowed_to_the_columns_the_run_reads(local_ray, tmp_path):
    """A sweep reads a cache's rows once, every column; a kd trial, or one mapping other layers,
    reads fewer from its transfer rows, and a batch joins both: the training rows must match them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = tmp_path / "train"
    directory.mkdir()
    table = pa.table(
        {"input_ids": [[1, 2]] * 4, "teacher_class_logits": [[0.1, 0.2]] * 4, "teacher_units_8": [[1.0]] * 4}
    )
    pq.write_table(table, directory / "part-0.parquet")
    read_once = training_rows(directory, None).materialize()
    columns = ["input_ids", "teacher_class_logits"]

    narrowed = training_rows(directory, columns, read_once)
    assert sorted(narrowed.columns()) == sorted(training_rows(directory, columns).columns()) == sorted(columns)
    assert training_rows(directory, None, read_once) is read_once
    batch = next(iter(narrowed.iter_batches(batch_size=2, batch_format="numpy")))
    assert joined_batch(batch, batch)["input_ids"] == [*batch["input_ids"], *batch["input_ids"]]
