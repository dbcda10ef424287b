"""The first check on a GPU machine: ``scripts/gpu_smoke.sh`` (offline, one GPU, under 10 minutes).

In order, each part timed and recorded whether it passes or not:

1. device facts: the GPU, its memory, bf16 support, the CUDA and NCCL versions torch carries;
2. the debug pipeline with ``resources.use_gpu`` and ``training.precision: bf16``, the teacher
   online, then cached (the targets stage on the GPU);
3. a generation variant with the top-K teacher-logit cache (the shipped SAMSum sample);
4. one score step (forward, and backward to the hidden states) of a random Llama-3.2-1B-shaped
   teacher (vocabulary 128,256) on 8 x 512 tokens, in float32 and in bf16: the measured peak
   memory next to what ``flexkd plan``'s formulas predict for it;
5. the fast test suite with the GPU visible (``make test``, or the command it runs when the
   machine has no ``.venv``).

Each part gets what is left of a 10-minute budget (the pipelines at most 150 s each); one that
runs out is recorded as timed out, and the report is written either way. It writes
``benchmarks/results/gpu_smoke.json`` and ``gpu_smoke.md``. ``--dry-run`` needs no GPU: it
validates the pipeline variants (config, models, tokenizer and data rows, as ``flexkd validate``),
prints the commands it would run and the planned peaks of the score steps, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from flexkd.config.schema import load_config
from flexkd.method.importance import hidden_state_gradients
from flexkd.method.layers import forward_with_hidden_states
from flexkd.method.objective import summed_task_loss
from flexkd.models.capacity import GB, Hardware, ModelShape, plan_score
from flexkd.models.loading import random_model_config
from flexkd.pipeline.preflight import preflight

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEBUG = REPO_ROOT / "pipelines" / "debug.yaml"
BUDGET_S = 600
PIPELINE_S = 150
SCORE_STEPS_S = 60  # kept back for the score steps while the pipelines run
GPU = ["resources.use_gpu=true", "training.precision=bf16"]
# Paths in --set are relative to the pipeline file, as in the file itself.
SAMSUM = "../flexkd/assets/samples/samsum.jsonl"
PIPELINES: dict[str, list[str]] = {
    "debug, online teacher": [*GPU, "training.teacher=online"],
    "debug, cached teacher": [*GPU, "training.teacher=cache"],
    "generation, top-K cache": [
        *GPU,
        "training.teacher=cache",
        "task={kind: generation}",
        f"data.train={{path: {SAMSUM}, prompt_template: 'Summarize: {{dialogue}}', response_column: summary}}",
        f"data.eval={{path: {SAMSUM}, prompt_template: 'Summarize: {{dialogue}}', response_column: summary, limit: 16}}",
        "data.max_length=160",
        "targets.top_k_logits=8",
        "evaluation.max_new_tokens=8",
    ],
}
# Llama-3.2-1B's shape with a random init: the score step's teacher.
LLAMA_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "tie_word_embeddings": True,
}
VOCAB, ROWS, SEQUENCE = 128256, 8, 512
SCORED_LAYERS = [4, 8, 12, 16]


def _run_command(artifact_root: Path, overrides: list[str]) -> list[str]:
    words = [sys.executable, "-m", "flexkd.cli", "run", str(DEBUG), "--set", f"artifact_root={artifact_root}"]
    for pair in overrides:
        words += ["--set", pair]
    return words


def _score_config(architecture: dict[str, Any] = LLAMA_1B, vocab: int = VOCAB):
    return random_model_config(architecture, vocab_size=vocab)


def planned_score_peak(
    dtype: torch.dtype,
    architecture: dict[str, Any] = LLAMA_1B,
    vocab: int = VOCAB,
    rows: int = ROWS,
    sequence: int = SEQUENCE,
) -> float:
    """What flexkd plan's formulas give for the score step below (one rank, no checkpointing)."""
    shape = ModelShape.of(_score_config(architecture, vocab))
    return plan_score(shape, Hardware(1, 80 * GB), rows, sequence, dtype.itemsize, "generation", False).total


def score_step(
    dtype: torch.dtype,
    device: str = "cuda",
    architecture: dict[str, Any] = LLAMA_1B,
    vocab: int = VOCAB,
    rows: int = ROWS,
    sequence: int = SEQUENCE,
) -> dict[str, Any]:
    """One score step (forward, backward to the hidden states of SCORED_LAYERS, as the score
    stage does) of a random model; on a GPU, the peak memory it allocated and the plan's."""
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_score_config(architecture, vocab), dtype=dtype).eval()
    model.requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, vocab, (rows, sequence), device=device, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    layers = [layer for layer in SCORED_LAYERS if layer <= model.config.num_hidden_layers]
    started = time.perf_counter()
    logits, hidden = forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], layers)
    loss = summed_task_loss("generation", logits, batch, None)
    gradients = hidden_state_gradients(loss, [hidden[layer] for layer in layers])
    if on_gpu:
        torch.cuda.synchronize()
    result = {
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "peak_gb": torch.cuda.max_memory_allocated() / GB if on_gpu else None,
        "planned_gb": planned_score_peak(dtype, architecture, vocab, rows, sequence) / GB,
        "seconds": time.perf_counter() - started,
        "finite": bool(all(torch.isfinite(gradient).all() for gradient in gradients)),
    }
    del model, logits, hidden, gradients, loss
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def device_facts() -> dict[str, Any]:
    properties = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
    return {
        "gpu": torch.cuda.get_device_name(0),
        "memory_gb": properties.total_memory / GB,
        "bf16": torch.cuda.is_bf16_supported(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "gpus_visible": torch.cuda.device_count(),
        "python": platform.python_version(),
    }


def _step(name: str, action, results: list[dict[str, Any]]) -> Any:
    """Run one part, record its outcome and time; a failure is recorded, not raised."""
    started = time.monotonic()
    record: dict[str, Any] = {"name": name}
    try:
        value = action()
        record["status"] = "passed"
        return value
    except Exception as error:  # every part is independent: record why and go on
        record["status"] = "failed"
        record["detail"] = (
            f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        )
        return None
    finally:
        record["seconds"] = round(time.monotonic() - started, 1)
        results.append(record)
        print(f"gpu smoke: {name}: {record['status']} ({record['seconds']} s) {record.get('detail', '')}", flush=True)


def _subprocess(words: list[str], timeout_s: float) -> str:
    """Run a command; its last output line, or RuntimeError with it."""
    try:
        completed = subprocess.run(words, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout_s:.0f} s") from None
    lines = (completed.stdout + completed.stderr).strip().splitlines() or [""]
    if completed.returncode != 0:
        failure = next((line for line in reversed(lines) if line.startswith("flexkd:")), lines[-1])
        raise RuntimeError(f"exit {completed.returncode}: {failure}")
    return lines[-1]


def _test_command() -> list[str]:
    """`make test` where the Makefile's environment exists; else the command it runs, here."""
    if (REPO_ROOT / ".venv" / ".installed").is_file():
        return ["make", "test"]
    return [sys.executable, "-m", "pytest", "-q", "-x"]


def dry_run() -> int:
    print("gpu smoke, dry run: nothing runs on a GPU and nothing is written")
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in PIPELINES.items():
            artifact_root = Path(scratch) / "runs"
            words = _run_command(artifact_root, overrides)
            # Parsed as the CLI parses --set: YAML values.
            values = {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in overrides)}
            config = load_config(DEBUG, {**values, "artifact_root": str(artifact_root)})
            preflight(config)
            print(
                f"{name}: valid ({config.task.kind}, teacher {config.training.teacher}, teacher.dtype {config.teacher.dtype})"
            )
            print(f"  would run: {shlex.join(['python', *words[1:]])}")
    for dtype in (torch.float32, torch.bfloat16):
        print(
            f"score step, 1B-shaped Llama ({VOCAB} vocabulary, {ROWS} x {SEQUENCE}), {dtype}: "
            f"planned peak {planned_score_peak(dtype) / GB:.1f} GB"
        )
    print(f"would run: {shlex.join(_test_command())} (with the GPU visible)")
    return 0


def run(results_dir: Path) -> int:
    if not torch.cuda.is_available():
        print("gpu smoke: no CUDA device here; run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    started = time.monotonic()

    def left(reserve: float = 0.0) -> float:
        return max(30.0, BUDGET_S - (time.monotonic() - started) - reserve)

    steps: list[dict[str, Any]] = []
    report: dict[str, Any] = {"ran": True, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps}
    report["device"] = _step("device facts", device_facts, steps)
    with tempfile.TemporaryDirectory(prefix="flexkd-gpu-smoke-") as scratch:
        for index, (name, overrides) in enumerate(PIPELINES.items()):
            words = _run_command(Path(scratch) / f"runs{index}", overrides)
            timeout_s = min(PIPELINE_S, left(SCORE_STEPS_S))
            _step(name, lambda words=words, timeout_s=timeout_s: _subprocess(words, timeout_s), steps)
    report["score_steps"] = [
        result
        for dtype in (torch.float32, torch.bfloat16)
        if (result := _step(f"score step {dtype}", lambda dtype=dtype: score_step(dtype), steps)) is not None
    ]
    remaining = left()
    _step("test suite: " + shlex.join(_test_command()), lambda: _subprocess(_test_command(), remaining), steps)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_results(report, results_dir)
    return 0 if all(step["status"] == "passed" for step in steps) else 1


def write_results(report: dict[str, Any], results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "gpu_smoke.json").write_text(json.dumps(report, indent=1) + "\n")
    (results_dir / "gpu_smoke.md").write_text(render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    device = report.get("device") or {}
    lines = [
        "# GPU smoke",
        "",
        f"`scripts/gpu_smoke.sh` on {device.get('gpu', 'an unknown GPU')}, {report['date']}, "
        f"{report['seconds']:.0f} s in all.",
        "",
    ]
    if device:
        lines += ["| fact | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in device.items()), ""]
    lines += ["| part | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [
        f"| {step['name']} | {step['status']} | {step['seconds']} | {step.get('detail', '')} |"
        for step in report["steps"]
    ]
    if report.get("score_steps"):
        lines += [
            "",
            f"Score step of a random Llama-3.2-1B-shaped teacher ({VOCAB} vocabulary), {ROWS} x {SEQUENCE} tokens, "
            "forward and backward to the hidden states: peak memory measured (torch.cuda.max_memory_allocated) "
            "and planned (flexkd/models/capacity.py).",
            "",
            "| dtype | measured GB | planned GB | planned / measured | seconds | gradients finite |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {step['dtype']} | {step['peak_gb']:.1f} | {step['planned_gb']:.1f} | "
            f"{step['planned_gb'] / step['peak_gb']:.2f} | {step['seconds']:.2f} | {step['finite']} |"
            for step in report["score_steps"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_smoke.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: validate, print the plan, write nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where gpu_smoke.json and .md go")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline: nothing may be downloaded
    return dry_run() if args.dry_run else run(args.results)


if __name__ == "__main__":
    sys.exit(main())
