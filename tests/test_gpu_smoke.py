"""scripts/gpu_smoke.sh without a GPU: its dry run validates every pipeline variant it would run
and writes nothing; its report renders; the committed page says plainly when it has not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_smoke
from flexkd.config.schema import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gpu_smoke.sh"


def test_the_dry_run_validates_every_variant_through_the_script_and_writes_nothing(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        [str(SCRIPT), "--dry-run", "--results", str(results)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in gpu_smoke.PIPELINES:
        assert f"{name}: valid" in done.stdout
    assert "generation, top-K cache: valid (generation, teacher cache, teacher.dtype bf16)" in done.stdout
    assert "torch.bfloat16: planned peak" in done.stdout and "(with the GPU visible)" in done.stdout
    assert not results.exists()


def test_a_bad_override_fails_the_dry_run(monkeypatch):
    monkeypatch.setitem(gpu_smoke.PIPELINES, "broken", ["training.precison=bf16"])
    with pytest.raises(ConfigError, match="training.precison: unknown key"):
        gpu_smoke.dry_run()


def test_without_a_gpu_the_real_run_refuses_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_smoke.torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main(["--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("run with --dry-run on a machine without a GPU")
    assert list(tmp_path.iterdir()) == []


def test_a_report_renders_measured_next_to_planned(tmp_path):
    report = {
        "ran": True,
        "date": "2026-01-01 00:00:00",
        "seconds": 412.0,
        "device": {"gpu": "NVIDIA H100 80GB HBM3", "bf16": True, "nccl": "2.27.3"},
        "steps": [{"name": "device facts", "status": "passed", "seconds": 0.4}],
        "score_steps": [
            {"dtype": "bfloat16", "peak_gb": 16.0, "planned_gb": 17.6, "seconds": 0.3, "finite": True, "parameters": 1}
        ],
    }
    gpu_smoke.write_results(report, tmp_path)
    page = (tmp_path / "gpu_smoke.md").read_text()
    assert "on NVIDIA H100 80GB HBM3" in page and "| bfloat16 | 16.0 | 17.6 | 1.10 |" in page
    assert json.loads((tmp_path / "gpu_smoke.json").read_text())["ran"] is True


def test_the_committed_page_says_plainly_whether_it_ran():
    report = json.loads((gpu_smoke.RESULTS / "gpu_smoke.json").read_text())
    page = (gpu_smoke.RESULTS / "gpu_smoke.md").read_text()
    if report["ran"]:
        assert page == gpu_smoke.render_markdown(report)
    else:
        assert "**It has not run.**" in page


def test_the_script_parses_and_is_executable():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert SCRIPT.stat().st_mode & 0o111


def test_the_score_step_runs_as_the_score_stage_does_and_is_planned():
    """On the CPU at a tiny size: the GPU run's code path, up to the memory counters."""
    tiny = {**gpu_smoke.LLAMA_1B, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "head_dim": 16}
    for dtype in (gpu_smoke.torch.float32, gpu_smoke.torch.bfloat16):
        result = gpu_smoke.score_step(dtype, device="cpu", architecture=tiny, vocab=512, rows=2, sequence=16)
        assert result["finite"] and result["peak_gb"] is None and result["planned_gb"] > 0
        assert result["dtype"] == str(dtype).removeprefix("torch.")
