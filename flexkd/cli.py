"""The ``flexkd`` command.

flexkd run pipelines/quickstart.yaml [--set loss.gamma=0.5] [--stages tokenize,score] [--force distill]
flexkd validate pipelines/x.yaml        check a pipeline file, its models, tokenizer and data rows; start nothing
flexkd plan pipelines/x.yaml [--gpus 8 --gpu-memory 80GB]   memory per GPU, FLOPs and cache size per stage
flexkd fetch-teacher                    download and convert the offline demo teacher
flexkd ui pipelines/x.yaml              print the command that opens this pipeline's MLflow runs
flexkd tune pipelines/x.yaml [--num-samples 16]   Ray Tune sweep of its tune.search_space
flexkd submit pipelines/x.yaml --address http://HEAD:8265 [--wait]   run it on a Ray cluster
flexkd status|logs|stop JOB --address http://HEAD:8265              follow a submitted pipeline
flexkd watch pipelines/x.yaml [--once] [--interval 300] [--address URL]   distill each new teacher release
flexkd bench quality|speed|generation[-recipe] [--gpu]   benchmarks -> benchmarks/results/, benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from flexkd import console
from flexkd.config.schema import ConfigError, load_config, parse_yaml, yaml_problem
from flexkd.data.sources import DataError
from flexkd.errors import StageError


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as YAML scalars/lists, never evaluated as code."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise ConfigError(f"--set {pair}: expected key=value, e.g. --set loss.gamma=0.5")
        try:
            overrides[key.strip()] = parse_yaml(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key.strip()}: not a YAML value ({yaml_problem(error, value)})") from None
    return overrides


def _stage_list(text: str | None) -> tuple[str, ...]:
    from flexkd.pipeline.stages import STAGE_NAMES

    if not text:
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; stages are: {', '.join(STAGE_NAMES)}")
    return names


def cmd_run(args: argparse.Namespace) -> int:
    from flexkd.pipeline.runner import run_pipeline, summary_table
    from flexkd.pipeline.stages import STAGE_NAMES

    config = load_config(args.pipeline, _overrides(args.set))
    result = run_pipeline(config, stages=_stage_list(args.stages) or STAGE_NAMES, force=_stage_list(args.force))
    print(summary_table(result))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from flexkd.models.capacity import Hardware, fit_warning, parse_memory, plan_pipeline
    from flexkd.pipeline.preflight import preflight

    config = load_config(args.pipeline, _overrides(args.set))
    plan = preflight(config)
    if config.tune is not None:  # every value it would try, as `flexkd tune` checks them before its trials
        from flexkd.sweep.tune import plan_sweep

        plan_sweep(config)
    pairs = "chosen by the score stage" if plan.layer_pairs is None else list(plan.layer_pairs)
    print(
        f"{args.pipeline}: valid. teacher d={plan.teacher_hidden} L={plan.teacher_layers}, "
        f"student d={plan.student_hidden} L={plan.student_layers}, k={plan.k}, layer pairs {pairs}"
    )
    if config.resources.use_gpu:  # the plan is of GPU memory; a CPU run's memory is the machine's
        hardware = Hardware(config.resources.num_workers, parse_memory(args.gpu_memory))
        warning = fit_warning(plan_pipeline(config, hardware, args.pipeline))
        if warning:
            print(f"flexkd: warning: {warning}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from flexkd.models.capacity import Hardware, format_plan, parse_memory, plan_pipeline

    config = load_config(args.pipeline, _overrides(args.set))
    hardware = Hardware(
        args.gpus or config.resources.num_workers, parse_memory(args.gpu_memory), args.peak_tflops * 1e12, args.mfu
    )
    print(format_plan(plan_pipeline(config, hardware, args.pipeline)))
    return 0


def cmd_fetch_teacher(args: argparse.Namespace) -> int:
    from flexkd.models.loading import fetch_demo_teacher

    print(fetch_demo_teacher(args.cache_dir))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from flexkd.sweep.tune import run_sweep

    overrides = _overrides(args.set) | ({"tune.num_samples": args.num_samples} if args.num_samples else {})
    result = run_sweep(load_config(args.pipeline, overrides), Path(args.pipeline))
    print(Path(result.report_path).read_text())
    print(f"best pipeline: {result.best_config_path}  (MLflow parent run {result.parent_run_id})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flexkd.tracking.runs import tracking_uri, ui_command

    print(ui_command(tracking_uri(load_config(args.pipeline))))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from flexkd.cluster.jobs import load_runtime_env, submit

    config = load_config(args.pipeline, _overrides(args.set))
    return submit(
        args.address,
        Path(args.pipeline),
        config,
        args.set,
        Path(args.working_dir),
        load_runtime_env(args.runtime_env),
        wait=args.wait,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from flexkd.cluster.jobs import status

    return status(args.address, args.job)


def cmd_logs(args: argparse.Namespace) -> int:
    from flexkd.cluster.jobs import logs

    return logs(args.address, args.job, follow_logs=args.follow)


def cmd_stop(args: argparse.Namespace) -> int:
    from flexkd.cluster.jobs import stop

    return stop(args.address, args.job)


def cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks live in the checkout, not in the installed package: they write into the
    # checkout's benchmarks/ folder. PYTHONPATH, not only sys.path, so the Ray workers they start
    # import them too.
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "cli.py").is_file():
        raise ConfigError(f"flexkd bench runs from a source checkout; no benchmarks/ beside {checkout / 'flexkd'}")
    sys.path.insert(0, str(checkout))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    from benchmarks.cli import run_benchmark

    return run_benchmark(args)


def cmd_watch(args: argparse.Namespace) -> int:
    from flexkd.cluster.jobs import load_runtime_env, parse_address
    from flexkd.watch.watcher import Cluster, Watcher, watch

    if args.address is not None:
        parse_address(args.address)  # refused now, not once per teacher version
    cluster = (
        None
        if args.address is None
        else Cluster(args.address, Path(args.working_dir), load_runtime_env(args.runtime_env))
    )
    watcher = Watcher(Path(args.pipeline), _overrides(args.set), cluster=cluster, set_pairs=args.set)
    return watch(watcher, once=args.once, interval_s=args.interval)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
        help="the cluster's dashboard (default: $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexkd", description="Flex-KD distillation pipelines on Ray")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, tracebacks, and the known-harmless Ray lines and library warnings (docs/FAILURES.md)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a pipeline on this machine (local Ray, local MLflow by default)")
    run.add_argument("pipeline")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    run.add_argument("--stages", help="comma-separated subset of stages to run")
    run.add_argument("--force", help="comma-separated stages to rerun even if done")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser(
        "validate", help="check a pipeline file, its model shapes, tokenizer and every data row (no Ray)"
    )
    validate.add_argument("pipeline")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument(
        "--gpu-memory", default="80GB", help="with resources.use_gpu: warn when a stage's plan does not fit this"
    )
    validate.set_defaults(handler=cmd_validate)

    plan = commands.add_parser(
        "plan", help="memory per GPU, FLOPs per step and cache size of each stage, from the model configs alone"
    )
    plan.add_argument("pipeline")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    plan.add_argument("--gpus", type=_positive_int, help="GPUs (FSDP ranks); default: resources.num_workers")
    plan.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (default 80GB)")
    plan.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (default 989, an H100 SXM)"
    )
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for s/step (default 0.4)")
    plan.set_defaults(handler=cmd_plan)

    fetch = commands.add_parser("fetch-teacher", help="download the offline demo teacher (SmolLM2-135M-Instruct)")
    fetch.add_argument("--cache-dir", default=None)
    fetch.set_defaults(handler=cmd_fetch_teacher)

    tune = commands.add_parser("tune", help="sweep the pipeline's tune.search_space with Ray Tune (ASHA)")
    tune.add_argument("pipeline")
    tune.add_argument("--num-samples", type=int, help="override tune.num_samples")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    tune.set_defaults(handler=cmd_tune)

    ui = commands.add_parser("ui", help="print the command that opens this pipeline's MLflow UI")
    ui.add_argument("pipeline")
    ui.set_defaults(handler=cmd_ui)

    submit = commands.add_parser("submit", help="run a pipeline on a Ray cluster (Ray Jobs API)")
    submit.add_argument("pipeline")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    _add_address(submit)
    submit.add_argument("--wait", action="store_true", help="stream the logs and exit with the job's outcome")
    submit.add_argument("--working-dir", default=".", help="folder uploaded with the job; holds the pipeline file")
    submit.add_argument("--runtime-env", metavar="YAML", help="extra runtime_env, e.g. clusters/runtime_env/cpu.yaml")
    submit.set_defaults(handler=cmd_submit)

    watch = commands.add_parser("watch", help="distill every new version of the pipeline's registered teacher")
    watch.add_argument("pipeline", help="a pipeline with a watch section and teacher.path models:/<name>[@<alias>]")
    watch.add_argument("--once", action="store_true", help="poll once and exit (1 if a version failed); for cron")
    watch.add_argument("--interval", type=float, default=300.0, help="seconds between polls (default 300)")
    watch.add_argument(
        "--address", help="submit each version to this Ray cluster's dashboard instead of running it here"
    )
    watch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    watch.add_argument("--working-dir", default=".", help="with --address: folder uploaded with each job")
    watch.add_argument("--runtime-env", metavar="YAML", help="with --address: extra runtime_env")
    watch.set_defaults(handler=cmd_watch)

    for name, handler, text in (
        ("status", cmd_status, "print a submitted pipeline's status"),
        ("logs", cmd_logs, "print a submitted pipeline's logs"),
        ("stop", cmd_stop, "stop a submitted pipeline"),
    ):
        job = commands.add_parser(name, help=text)
        job.add_argument("job", help="the submission id that flexkd submit printed")
        _add_address(job)
        if name == "logs":
            job.add_argument("--follow", action="store_true", help="stream until the job ends")
        job.set_defaults(handler=handler)

    bench = commands.add_parser("bench", help="run a benchmark; writes benchmarks/results/ and benchmarks/RESULTS.md")
    bench.add_argument("benchmark", choices=("quality", "speed", "generation", "generation-recipe"))
    bench.add_argument("--gpu", action="store_true", help="the larger GPU setting (use_gpu, bigger data and batches)")
    bench.add_argument("--seeds", help="comma-separated seeds (quality, generation)")
    bench.add_argument("--steps", type=int, help="distill steps per run")
    bench.add_argument("--train-rows", type=int, help="training rows")
    bench.add_argument("--methods", help="comma-separated subset of the benchmark's methods")
    bench.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads of the driver and of every worker (CPU default 1, "
        "right when other jobs share the cores; 2 on an idle 2-core machine is faster)",
    )
    bench.add_argument(
        "--regime",
        help="quality: random-init (default), pruned (the student cut out of the teacher) or low-label (256 "
        "labeled rows and the rest unlabeled); each writes benchmarks/results/quality-<regime>.*",
    )
    bench.add_argument(
        "--only",
        help="speed: re-measure only these parts (plain,feature,score,workers,trl), "
        "keeping the others from the last benchmarks/results/speed.json; generation-recipe: "
        "run only these recipes (ids of RECIPES in benchmarks/generation_recipe.py)",
    )
    variant = bench.add_argument_group(
        "quality variants (an investigation run; with --label its results are kept "
        "as quality-<regime>-<label> beside the regime's table)"
    )
    variant.add_argument("--layer-map", help="layer_map of every method (default: uniform; pruned: source)")
    variant.add_argument(
        "--score-rows", type=_positive_int, help="dev sentences the importance is scored on (CPU default 96)"
    )
    variant.add_argument(
        "--k",
        type=_positive_int,
        help="teacher units the selections keep per mapped layer (default: the student's hidden size, 192)",
    )
    variant.add_argument("--gamma", type=float, help="feature loss weight, summed over the mapped pairs (default 1.0)")
    variant.add_argument("--learning-rate", type=float, help="student learning rate (CPU default 1e-3)")
    variant.add_argument(
        "--tune",
        action="store_true",
        default=None,
        help="tune each method first (its own flexkd tune sweep, scored on held-out dev rows), "
        "then compare the methods with their best values",
    )
    variant.add_argument(
        "--label", help="write benchmarks/results/quality-<regime>-<label>.* instead of quality-<regime>.*"
    )
    bench.add_argument("--work-dir", help="artifacts, cached teacher and MLflow store (default: runs/bench)")
    bench.set_defaults(handler=cmd_bench)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        console.quiet()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # The error boundary: what a user can cause is one line per problem (a traceback too with
    # --verbose); anything else is a bug, and says so above its traceback.
    try:
        return args.handler(args)
    except DataError as error:
        return _report("flexkd: data error: ", error, 2, args.verbose)
    except ConfigError as error:
        return _report("flexkd: config error: ", error, 2, args.verbose)
    except (StageError, OSError) as error:  # OSError: a file, a folder, a full disk, a network
        return _report("flexkd: ", error, 1, args.verbose)
    except Exception as error:
        print(
            f"flexkd: internal error: this is a bug in flexkd, please report it with the traceback below "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})",
            file=sys.stderr,
        )
        traceback.print_exc()
        return 3


def _report(prefix: str, error: BaseException, code: int, verbose: bool) -> int:
    """Print each line of the error's message after ``prefix``; the traceback first if verbose."""
    if verbose:
        traceback.print_exc()
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"{prefix}{line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
