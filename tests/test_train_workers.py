"""``flexkd.cluster.train_workers``: the datasets a pass over every row gives its Ray Train workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from flexkd.cluster.train_workers import REMAINDER_SUFFIX, every_row_batches, run_workers, split_every_row
from flexkd.config.schema import load_config

DEBUG = Path(__file__).resolve().parent.parent / "pipelines" / "debug.yaml"


def _record_row_ids(loop_config: dict) -> None:
    """A worker: write the ids of the rows ``every_row_batches`` gives it, in batches of 2."""
    rank = ray.train.get_context().get_world_rank()
    ids = [int(row_id) for batch in every_row_batches("rows", 2) for row_id in batch["id"]]
    (Path(loop_config["out"]) / f"rank{rank}.json").write_text(json.dumps(ids))


@pytest.mark.parametrize(("rows", "per_worker"), [(8, [3, 3, 2]), (6, [2, 2, 2])])
def test_every_row_reaches_one_worker_once(local_ray, tmp_path, rows, per_worker):
    """8 rows on 3 workers: Ray Train's equal split would give each 2 and drop 2. Each gets 2 of
    the first 6, and workers 0 and 1 one of the last 2 each. 6 rows: 2 each, no remainder."""
    # A batch size the 3 workers divide, as the schema asks (the loop does not train), and a CPU
    # of the local Ray's 2 left free for Ray Data to read the rows.
    overrides = {"resources.num_workers": 3, "resources.cpus_per_worker": 0.25, "training.batch_size": 6}
    config = load_config(DEBUG, overrides)
    datasets = split_every_row("rows", ray.data.range(rows, override_num_blocks=3), rows, workers=3)
    assert datasets["rows" + REMAINDER_SUFFIX].count() == rows % 3
    run_workers("test", config, _record_row_ids, {"out": str(tmp_path)}, datasets, "rows", tmp_path / "ray")
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert [len(ids) for ids in seen] == per_worker
    assert sorted(row_id for ids in seen for row_id in ids) == list(range(rows))
