"""Ray at the stage edges: how the score and distill stages launch their Ray Train workers.

The per-worker loops are plain PyTorch calling the library; this module only builds the
``TorchTrainer`` around them, feeds them their data shards and turns a failed run into one
readable line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from flexkd import distributed
from flexkd.config.schema import PipelineConfig
from flexkd.errors import StageError


def ordered_ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's dataset ingest options with ``preserve_order``: without it a shard's rows
    come in the order their blocks finish, so a seeded shuffle (and the batches a resumed run
    skips) would differ from run to run."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


# run_workers splits no dataset so named among the workers: each reads it (split_every_row).
REMAINDER_SUFFIX = ".remainder"


def split_every_row(name: str, dataset: ray.data.Dataset, rows: int, workers: int) -> dict[str, ray.data.Dataset]:
    """``dataset`` (``rows`` rows) as the datasets ``run_workers`` needs for every row of it to
    reach one worker once (``every_row_batches``).

    Ray Train splits a dataset into equal shards and drops the ``rows % workers`` rows left over
    (``streaming_split(equal=True)``): harmless for endless training, wrong for a pass that sums
    over every row. Those rows travel unsplit as ``<name>.remainder``, fewer than ``workers``.
    Finding them reads the whole dataset into the object store once: meant for a sample of rows
    such as the score split, not for a corpus."""
    whole = rows - rows % workers
    if whole == rows:
        return {name: dataset, name + REMAINDER_SUFFIX: dataset.limit(0)}
    head, tail = dataset.split_at_indices([whole])
    return {name: head, name + REMAINDER_SUFFIX: tail}


def every_row_batches(name: str, batch_size: int) -> Iterator[dict]:
    """Inside a worker: its shard of ``name`` in numpy batches of ``batch_size`` rows, then, as a
    batch of one, the remainder row whose position is its rank (``split_every_row``)."""
    yield from ray.train.get_dataset_shard(name).iter_batches(batch_size=batch_size, batch_format="numpy")
    rank = ray.train.get_context().get_world_rank()
    remainder = ray.train.get_dataset_shard(name + REMAINDER_SUFFIX)
    # Its first batch holds rows 0..rank, or all of them when there are fewer.
    first = next(iter(remainder.iter_batches(batch_size=rank + 1, batch_format="numpy")), None)
    if first is not None and len(next(iter(first.values()))) > rank:
        yield {column: values[rank : rank + 1] for column, values in first.items()}


def scaling(config: PipelineConfig) -> ScalingConfig:
    resources = config.resources
    return ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=resources.use_gpu,
        resources_per_worker={"CPU": resources.cpus_per_worker},
    )


def run_workers(
    stage: str,
    config: PipelineConfig,
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
    run_name: str,
    storage: Path,
    max_failures: int = 0,
    callbacks: list | None = None,
) -> None:
    """Run ``loop`` on ``config.resources.num_workers`` Ray Train workers and wait.

    Reusing ``run_name`` and ``storage`` makes Ray Train V2 resume the same run after a crash
    of the driver; our own checkpoints (distributed.save_checkpoint) carry the model state.
    ``callbacks`` are Ray Train callbacks, e.g. Tune's TuneReportCallback inside a Tune trial.
    Each dataset is split among the workers, but for those named ``<name>.remainder``, which
    every worker reads (``split_every_row``).
    """
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        # Spelled out rather than left to Ray's default, so the stages and
        # distributed.init_process_group_from_env follow one rule.
        torch_config=TorchConfig(backend=distributed.backend_for(config.resources.use_gpu)),
        scaling_config=scaling(config),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=[name for name in datasets if not name.endswith(REMAINDER_SUFFIX)],
            execution_options=ordered_ingest_options(),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps the worker's exception; surface its own message
        raise StageError(f"{stage}: {_root_message(error)}") from error
    if result.error is not None:
        raise StageError(f"{stage}: {_root_message(result.error)}") from result.error


def _root_message(error: BaseException) -> str:
    """The innermost cause's first line (Ray nests worker errors several levels deep)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    line = next((candidate for candidate in reversed(text) if candidate.strip()), type(error).__name__)
    return line.strip()
