"""``flexkd bench``: parse the benchmark's options, run it, rebuild the results page."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.common import DEFAULT_WORK_DIR
from benchmarks.page import write_results_page

log = logging.getLogger("flexkd")


def _seeds(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(seed) for seed in text.split(",")) if text else None


def _names(text: str | None, known: dict, default_all: bool = True) -> tuple[str, ...]:
    if not text:
        return tuple(known) if default_all else ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown:
        from flexkd.config.schema import ConfigError

        raise ConfigError(f"unknown name {unknown[0]!r}; known: {', '.join(known)}")
    return names


QUALITY_VARIANT_OPTIONS = ("layer_map", "score_rows", "k", "gamma", "learning_rate", "tune", "label")


def run_benchmark(args: argparse.Namespace) -> int:
    import torch

    from flexkd.config.schema import ConfigError

    misplaced = [name for name in (*QUALITY_VARIANT_OPTIONS, "regime") if getattr(args, name, None) is not None]
    if args.benchmark != "quality" and misplaced:
        raise ConfigError(f"--{misplaced[0].replace('_', '-')} is an option of 'flexkd bench quality' only")
    unlabelled = [name for name in misplaced if name not in ("label", "regime")]
    if unlabelled and args.label is None:
        # Without a label a variant would overwrite the regime's table, which notes.md reads.
        raise ConfigError(
            f"--{unlabelled[0].replace('_', '-')} makes a variant: name it with --label NAME "
            "(it is kept as quality-<regime>-NAME beside the regime's table)"
        )

    tuned = [name for name in ("learning_rate", "gamma", "layer_map") if args.tune and getattr(args, name) is not None]
    if tuned:
        raise ConfigError(f"--{tuned[0].replace('_', '-')} is tuned per method under --tune; leave it out")

    work_dir = Path(args.work_dir) if args.work_dir else DEFAULT_WORK_DIR
    if args.threads or not args.gpu:
        # The driver's own model work (teacher adaptation, the plain loop, TRL) on as many threads as
        # a worker: by default one, see QualitySettings.threads_per_worker.
        torch.set_num_threads(args.threads or 1)
    if args.benchmark == "quality":
        from benchmarks.quality import METHODS, QualitySettings, run_quality, with_overrides

        settings = QualitySettings.for_regime(args.regime or "random-init", gpu=args.gpu)
        settings = with_overrides(
            settings,
            seeds=_seeds(args.seeds),
            steps=args.steps,
            train_rows=args.train_rows,
            threads_per_worker=args.threads,
            layer_map=args.layer_map,
            score_rows=args.score_rows,
            k=args.k,
            gamma=args.gamma,
            learning_rate=args.learning_rate,
        )
        # By default the regime's methods (benchmarks.regimes).
        methods = _names(args.methods, METHODS, default_all=False) or None
        run_quality(settings, work_dir, methods, label=args.label, tune=bool(args.tune))
    elif args.benchmark == "speed":
        from benchmarks.speed import PARTS, SpeedSettings, run_speed

        settings = SpeedSettings.gpu() if args.gpu else SpeedSettings.cpu()
        run_speed(
            settings.with_overrides(steps=args.steps, cpus=args.threads),
            work_dir,
            only=_names(args.only, dict.fromkeys(PARTS), default_all=False),
        )
    elif args.benchmark == "generation-recipe":
        from benchmarks.generation_recipe import RECIPES, recipe_settings, run_generation_recipe

        if args.gpu or args.methods or args.seeds:
            raise ConfigError(
                "flexkd bench generation-recipe runs plain kd, seed 0, on the CPU: no --gpu, --methods, --seeds"
            )
        settings = recipe_settings().with_overrides(
            steps=args.steps, train_rows=args.train_rows, threads_per_worker=args.threads
        )
        run_generation_recipe(settings, work_dir, _names(args.only, RECIPES))
    else:
        from benchmarks.generation import DEFAULT_METHODS, METHODS, GenerationSettings, run_generation

        settings = GenerationSettings.gpu() if args.gpu else GenerationSettings.cpu()
        settings = settings.with_overrides(
            seeds=_seeds(args.seeds), steps=args.steps, train_rows=args.train_rows, threads_per_worker=args.threads
        )
        # By default forward KL only; the logit-loss variants (kd-jsd, ...) run when named.
        run_generation(settings, work_dir, _names(args.methods, METHODS, default_all=False) or DEFAULT_METHODS)
    print(write_results_page().read_text())
    return 0
