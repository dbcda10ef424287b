"""Ray at the stage edges: how the score and distill stages launch their Ray Train workers.

The per-worker loops are plain PyTorch calling the library; this module only builds the
``TorchTrainer`` around them and turns a failed run into one readable line.
"""

from __future__ import annotations

from collections.abc import Callable
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
        dataset_config=DataConfig(execution_options=ordered_ingest_options()),
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
