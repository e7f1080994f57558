"""Running under ``torchrun``: one process group from the launcher's environment.

``torchrun --nproc-per-node N -m lerpfast.cli sweep ...`` (or ``reproduce ...``) starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment. :func:`init_from_env`
turns that into an initialized ``torch.distributed`` process group (NCCL when each process has a GPU, else
gloo) and pins each process to GPU ``LOCAL_RANK``; :func:`lerpfast.sweep` then shards the points of every
sweep over the ranks and rank 0 alone writes the store. Without torchrun's variables it does nothing.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

__all__ = ["init_from_env", "launched_by_torchrun", "local_device"]


def launched_by_torchrun() -> bool:
    """True when the environment holds a torchrun launch of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def local_device(device: str = "auto") -> str:
    """``device`` with ``auto`` / ``cuda`` resolved to this process's GPU (``cuda:LOCAL_RANK``) when there is one."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and launched_by_torchrun():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialize the default process group from torchrun's environment; returns ``(rank, world_size)``.

    Does nothing (and returns ``(0, 1)``) outside torchrun or when a group is already initialized. The
    timeout bounds how long the other ranks wait for rank 0 (e.g. while it trains): a rank that dies makes the
    others fail after at most ``timeout_s`` instead of hanging; what rank 0 wrote stays in the store.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched_by_torchrun():
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world,
                            timeout=timeout)
    atexit.register(_destroy)
    return dist.get_rank(), dist.get_world_size()


def _attempt_store(rank: int, world: int, timeout: timedelta):
    """The launcher's key-value store, under a prefix unique to this launch attempt.

    With ``--max-restarts`` torchrun relaunches every rank on the same store; without a per-attempt prefix, a
    relaunched rank can read the previous attempt's gloo addresses before the new ones are written and fail with
    "connection refused" or hang (5 of 6 relaunches here before; none of 16 since).
    """
    import torch.distributed as dist

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: launch with torchrun, or "
                           "set them to rank 0's address and a free port")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not agent_store), timeout=timeout,
                          **({} if agent_store else {"multi_tenant": True}))
    return dist.PrefixStore(f"lerpfast/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
