"""Run a test body on two real gloo ranks, each in a spawned process.

Both multi-rank test files use this, so the process-group setup and teardown live in one place.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexkd import distributed as fd


def run_on_two_ranks(body: Callable[..., None], *args: Any) -> None:
    """Call ``body(*args)`` on ranks 0 and 1 of a fresh gloo group; raises if either rank fails.

    gloo and CPU tensors even where CUDA is available, so these tests check the same thing on a
    GPU machine as on a laptop (and never contend for one GPU from two ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, body, args), nprocs=2, join=True)


def _rank_main(local_rank: int, port: int, body: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    fd.init_process_group_from_env(backend="gloo")
    body(*args)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter finalization. A gloo run-loop thread may still be releasing
    # the last collective's tensors; if that happens while the interpreter is finalizing, its
    # GIL acquire aborts the process (SIGABRT after a body that passed, about one run in four
    # here; pytorch#190489). A body that raised never gets here, so mp.spawn still reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
