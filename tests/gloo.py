"""Two gloo processes on CPU for the multi-process tests: each runs a worker on its rank, and what the
workers return comes back to the test, one dict per rank."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslab import distributed

WORLD = 2

Worker = Callable[[int, torch.device, Path], dict]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Worker, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    device = distributed.init(torch.device("cpu"))
    results = worker(rank, device, Path(out))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(worker: Worker, out: Path) -> list[dict[str, Any]]:
    """`worker(rank, device, out)` in WORLD processes (a module-level function: it is pickled to them)."""
    mp.spawn(_entry, args=(worker, free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
