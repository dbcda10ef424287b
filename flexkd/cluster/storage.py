"""Where artifacts live, and a check that every node of the cluster sees the same place.

Stages hand each other directories under ``artifact_root``: the driver reads what a Ray Train
worker on another node wrote (score sums, distill checkpoints). On one machine any path works;
on a multi-node cluster ``artifact_root`` must be storage every node mounts at the same path
(NFS, EFS, Filestore, a bucket mounted with mountpoint-s3 or gcsfuse). A node-local path there
does not fail at once: each node writes into its own private copy and a later stage cannot find
its inputs. So before any stage runs, the driver writes a probe file under ``artifact_root``
and a Ray task pinned to each alive node reads it back; one node that cannot is refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flexkd.config.schema import ConfigError
from flexkd.errors import StageError

log = logging.getLogger("flexkd")

PROBE_TIMEOUT_S = 120  # a node may first have to unpack the job's working_dir
PROBE_SETTLE_S = 5.0  # mounted buckets (gcsfuse, mountpoint-s3) may show a new file a moment late


class StorageError(StageError):
    """artifact_root cannot serve this cluster; the message is one line naming artifact_root."""


def is_uri(location: str) -> bool:
    return "://" in location


def refuse_uri(artifact_root: str) -> None:
    """The stages read and write with local file I/O (pathlib, torch.distributed.checkpoint,
    save_pretrained), so a bucket URI would silently become a local folder named ``s3:``."""
    if is_uri(artifact_root):
        raise StorageError(
            f"artifact_root {artifact_root}: the stages write through the filesystem, not a URI; "
            "mount the bucket or share at the same path on every node (NFS, EFS, mountpoint-s3, gcsfuse) "
            "and give that path"
        )


def check_artifact_root(artifact_root: str) -> None:
    """Refuse an artifact_root that some alive node of the Ray cluster cannot see.

    Needs a connected Ray. Passes at once on a single-node cluster. What it proves: every alive
    node reads, at the same path, the file this driver just wrote. It does not prove the nodes
    can write there, nor that nodes joining later will see it.
    """

    refuse_uri(artifact_root)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    root = Path(artifact_root)
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = root / f".flexkd-storage-probe-{token}"
    probe.write_text(token)
    try:
        answers = _read_probe_on_each_node(nodes, str(probe))
    finally:
        probe.unlink(missing_ok=True)
    blind = [node for node, seen in zip(nodes, answers) if seen != token]
    if blind:
        names = ", ".join(_node_name(node) for node in blind)
        raise StorageError(
            f"artifact_root {artifact_root} is node-local: {len(blind)} of {len(nodes)} nodes cannot see it "
            f"[{names}]; on a multi-node cluster use a path every node mounts (NFS, EFS, a mounted bucket)"
        )
    log.info("artifact_root %s: the same storage on all %d nodes", artifact_root, len(nodes))


def _read_probe_on_each_node(nodes: list[dict], probe: str) -> list[str | None]:

    # num_cpus=0: the check must run even when the pipeline's workers already hold every CPU.
    read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
    refs = [
        read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(probe)
        for node in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    if len(ready) < len(refs):
        silent = [_node_name(node) for node, ref in zip(nodes, refs) if ref not in ready]
        raise StorageError(
            f"artifact_root {Path(probe).parent}: nodes {', '.join(silent)} did not answer "
            f"the storage check within {PROBE_TIMEOUT_S} s"
        )
    return ray.get(refs)


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"  # the id tells apart nodes on one machine


def _read_probe(path: str) -> str | None:
    deadline = time.monotonic() + PROBE_SETTLE_S
    while True:
        try:
            return Path(path).read_text()
        except OSError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


def check_local_folder(artifact_root: str) -> None:
    """Refuse, before anything runs, an artifact_root that cannot become a writable folder here:
    a URI, a path under a file, or under a folder this user cannot write to."""
    refuse_uri(artifact_root)
    root = Path(artifact_root)
    existing = next(path for path in [root, *root.parents] if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"artifact_root {artifact_root}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"artifact_root {artifact_root}: {existing} is not writable by this user")
