"""The local cluster of clusters/README.md, started and used exactly as the README says, with the
default ports of clusters/local/env.sh (tests/test_cluster.py moves every port to a free one, so
it cannot catch a default that Ray refuses)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "clusters" / "README.md"
ENV_SH = REPO_ROOT / "clusters" / "local" / "env.sh"


def readme_local_commands() -> str:
    """The bash block of the section "From zero on one machine", as a user would paste it."""
    section = README.read_text().split("## From zero on one machine", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def local_default_ports() -> dict[str, int]:
    """Every port clusters/local/env.sh uses when nothing overrides it, agents included."""
    pattern = re.compile(r"^(\w+_PORT)=\$\{\1:-(\d+)\}", re.MULTILINE)
    return {name: int(port) for name, port in pattern.findall(ENV_SH.read_text())}


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_every_default_port_is_read_from_env_sh():
    assert set(local_default_ports()) == {
        "RAY_PORT",
        "DASHBOARD_PORT",
        "CLIENT_PORT",
        "HEAD_AGENT_PORT",
        "WORKER_AGENT_PORT",
        "MLFLOW_PORT",
    }


def test_the_readme_block_starts_the_cluster_submits_and_stops():
    block = readme_local_commands()
    for step in ("start-head.sh", "start-worker.sh", "start-mlflow.sh", "flexkd submit", "stop.sh"):
        assert step in block, step


@pytest.mark.slow
def test_the_readme_commands_run_as_written_with_the_default_ports(tmp_path):
    busy = {name: port for name, port in local_default_ports().items() if _port_in_use(port)}
    if busy:
        # Not a pass: the summary line shows the skip and the ports that blocked it.
        pytest.skip(f"the README's default ports are taken on this machine: {busy}")
    # The README activates .venv; the test's own interpreter is that environment.
    script = readme_local_commands().replace(
        "source .venv/bin/activate", f"export PATH={Path(sys.executable).parent}:$PATH"
    )
    # Whatever happens, the cluster the README started is stopped the way the README stops it.
    script = f"set -e\ntrap 'clusters/local/stop.sh' EXIT\n{script}"
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO_ROOT,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"job flexkd-debug-\w+ SUCCEEDED", result.stdout + result.stderr), result.stdout[-3000:]
