"""flexkd.console: without --verbose the known-harmless Ray lines and library deprecation warnings
stay off the console (the driver's and, through the runtime_env, the workers'); with it they show."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from flexkd import cli, console
from flexkd.cluster import jobs, local

ROOT = Path(__file__).resolve().parents[1]
# As Ray Train's controller printed it to the driver (ray-project/ray#53727).
HARMLESS_LINE = (
    "[2026-12-06 07:48:49,335 E 6027 6060] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '740f8d5c6369c8f38d80db9601000000' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    "will fail. See https://github.com/ray-project/ray/issues/53727 for more details."
)
RAYLET_LINE = (
    "WARNING: 8 PYTHON worker processes have been started on node: 2b0f02985976 with address: 127.0.0.1, "
    "which is 4x the maximum expected startup concurrency (2)."
)
REAL_LINE = "[2026-12-06 07:48:49,335 E 6027 6060] core_worker.cc:812: The actor died unexpectedly"


@pytest.fixture
def fresh_console(monkeypatch):
    """As a new process (conftest.loud_console) with no PYTHONWARNINGS of the user's, not a Ray job."""
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RAY_DEDUP_LOGS_SKIP_REGEX")}
    environment |= {"PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_are_hidden_unless_verbose(fresh_console, monkeypatch, tmp_path, verbose):
    from ray.util.annotations import RayDeprecationWarning

    def handler(args):  # what Ray Train and transformers do deep inside a stage
        warnings.warn("`ExecutionOptions.exclude_resources` is deprecated", RayDeprecationWarning, stacklevel=2)
        warnings.warn("`resume_download` is deprecated", FutureWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "cmd_validate", handler)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert cli.main(["--verbose", "validate", "x.yaml"] if verbose else ["validate", "x.yaml"]) == 0
    assert [type(w.message) for w in shown] == ([RayDeprecationWarning, FutureWarning] if verbose else [])
    assert ("RAY_DEDUP_LOGS_SKIP_REGEX" in os.environ) is not verbose
    assert local._forwarded_runtime_env() == (
        None if verbose else {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}}
    )


def test_quiet_again_after_ray_put_its_own_filter_ahead(fresh_console, monkeypatch):
    """Importing Ray puts a filter that shows RayDeprecationWarning; ensure_ray hides them again."""
    from ray.util.annotations import RayDeprecationWarning

    monkeypatch.setattr(local.ray, "is_initialized", lambda: True)  # no Ray started for this
    with warnings.catch_warnings(record=True) as shown:
        console.quiet()
        warnings.filterwarnings("module", category=RayDeprecationWarning)  # what `import ray` does
        local.ensure_ray()
        warnings.warn("deprecated", RayDeprecationWarning, stacklevel=2)
    assert shown == []


def test_a_ray_worker_ignores_them_through_pythonwarnings():
    """The workers get console.worker_env_vars() in their runtime_env; Ray then installs none of its own."""
    code = (
        "import warnings\n"
        "from ray.util.annotations import RayDeprecationWarning\n"
        "warnings.warn('exclude_resources is deprecated', RayDeprecationWarning)\n"
        "warnings.warn('resume_download is deprecated', FutureWarning)\n"
    )
    shown = _python(code)
    assert "RayDeprecationWarning: exclude_resources" in shown.stderr and "FutureWarning" in shown.stderr
    quiet = _python(code, PYTHONWARNINGS=console.WORKER_PYTHONWARNINGS)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_rays_log_monitor_skips_the_harmless_lines_only():
    """The CLI sets RAY_DEDUP_LOGS_SKIP_REGEX before Ray is imported (Ray reads it then); Ray's
    deduplicator then drops the harmless line a worker printed and keeps a real error."""
    code = (
        "import sys\n"
        "from flexkd import cli, console\n"
        "assert 'ray' not in sys.modules, 'importing flexkd.cli imported Ray before quiet() could run'\n"
        "console.quiet()\n"
        "from ray._private.ray_logging import stdout_deduplicator\n"
        f"batch = {{'ip': '127.0.0.1', 'pid': 1, 'lines': [{HARMLESS_LINE!r}, {REAL_LINE!r}]}}\n"
        f"raylet = {{'ip': '127.0.0.1', 'pid': 'raylet', 'lines': [{RAYLET_LINE!r}]}}\n"
        "print([line for b in (batch, raylet) for out in stdout_deduplicator.deduplicate(b) for line in out['lines']])\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr([REAL_LINE])


def test_a_submitted_job_carries_the_worker_filters(fresh_console, tmp_path):
    assert "PYTHONWARNINGS" not in jobs.build_runtime_env(tmp_path)["env_vars"]
    console.quiet()
    assert jobs.build_runtime_env(tmp_path)["env_vars"]["PYTHONWARNINGS"] == console.WORKER_PYTHONWARNINGS
    # a value of the user's own wins
    own = jobs.build_runtime_env(tmp_path, {"env_vars": {"PYTHONWARNINGS": "default"}})
    assert own["env_vars"]["PYTHONWARNINGS"] == "default"
