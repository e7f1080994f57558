"""Points sharded across torch.distributed ranks (gloo on the CPU) give the single-process result."""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lerpfast


def _setup():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
    b = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
    g = torch.Generator().manual_seed(1)
    return a, b.state_dict(), (torch.randn(19, 6, generator=g), torch.randint(0, 4, (19,), generator=g))


@contextlib.contextmanager
def _gloo_group(rank: int, world: int, port: int):
    """This spawned process as ``rank`` of a gloo group on localhost, destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out_dir: str):
    with _gloo_group(rank, world, port):
        a, b, data = _setup()
        r = lerpfast.sweep(a, (a, b), "-0.5:1.5:7", data, precision="fp64", points_per_pass=2, batch_size=5)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **r.metrics, world=r.meta["world_size"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(worker, tmp_path):
    """Run ``worker`` on 2 gloo ranks; returns the single-process result and each rank's saved arrays."""
    mp.spawn(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b, data = _setup()
    single = lerpfast.sweep(a, (a, b), "-0.5:1.5:7", data, precision="fp64", batch_size=5)
    return single, [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]


def test_points_sharded_over_two_ranks(tmp_path):
    single, ranks = _two_ranks(_worker, tmp_path)
    for rank, got in enumerate(ranks):
        assert int(got["world"]) == 2
        for k, v in single.metrics.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-12, err_msg=f"rank {rank} {k}")


def test_distributed_true_without_process_group_is_an_error():
    a, b, data = _setup()
    with pytest.raises(RuntimeError, match="torchrun"):
        lerpfast.sweep(a, (a, b), [0.5], data, distributed=True)


def test_rank_environment_without_rendezvous_address_names_what_is_missing(monkeypatch):
    from lerpfast.distributed import init_from_env

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR not"):
        init_from_env("gloo")
    assert not dist.is_initialized()


def _worker_store(rank: int, world: int, port: int, out_dir: str):
    with _gloo_group(rank, world, port):
        a, b, data = _setup()
        kw = dict(precision="fp64", points_per_pass=2, batch_size=5, store=os.path.join(out_dir, "s.h5"), name="l")
        first = lerpfast.sweep(a, (a, b), "-0.5:1.5:7", data, **kw)
        again = lerpfast.sweep(a, (a, b), "-0.5:1.5:7", data, **kw)  # complete in the store: nothing computed
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), computed=again.meta["points_computed"],
                 **{f"first_{k}": v for k, v in first.metrics.items()},
                 **{f"again_{k}": v for k, v in again.metrics.items()})


def test_every_rank_returns_the_stored_result_on_a_rerun(tmp_path):
    """Rank 0 reads the store (earlier runs' points included) before it broadcasts: every rank gets all points."""
    single, ranks = _two_ranks(_worker_store, tmp_path)
    for rank, got in enumerate(ranks):
        assert int(got["computed"]) == 0
        for k, v in single.metrics.items():
            np.testing.assert_allclose(got[f"first_{k}"], v, rtol=1e-12, err_msg=f"rank {rank} {k}")
            np.testing.assert_allclose(got[f"again_{k}"], v, rtol=1e-12, err_msg=f"rank {rank} {k} (re-run)")


def _worker_fails(rank: int, world: int, port: int, out_dir: str):
    """Rank 1 raises in its second round; rank 0 must not wait for it until the process group's timeout."""
    from lerpfast import evaluate

    real, calls = evaluate._EngineEvaluator.evaluate, []

    def evaluate_or_fail(self, pts, ref, data):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ValueError("injected failure on rank 1")
        return real(self, pts, ref, data)

    evaluate._EngineEvaluator.evaluate = evaluate_or_fail
    with _gloo_group(rank, world, port):
        a, b, data = _setup()
        try:
            lerpfast.sweep(a, (a, b), "-0.5:1.5:7", data, precision="fp64", points_per_pass=2, batch_size=5,
                           store=os.path.join(out_dir, "s.h5"), name="l")
            msg = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
            msg = f"{type(e).__name__}: {e}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(msg)


def test_a_failing_rank_fails_every_rank_at_once(tmp_path):
    """An exception on one rank reaches the others at the next gather (they raise naming it) instead of leaving
    them in a collective until the 30-minute timeout; the rounds gathered before stay in the store."""
    import time

    from lerpfast.store import ResultStore

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker_fails, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120 - (time.perf_counter() - t0))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank was still waiting for the failed one"
    seen = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert seen[1] == "ValueError: injected failure on rank 1"
    assert seen[0].startswith("RuntimeError: rank 1 of 2 failed evaluating points") and "injected failure" in seen[0]
    with ResultStore(tmp_path / "s.h5", mode="r") as store:
        assert store.progress("l") == (4, 7)  # the first round (2 points per rank) was written


def test_object_collectives_use_the_sweeps_gpu_under_nccl(monkeypatch):
    """With NCCL the object collectives stage through torch.cuda.current_device(): they are pinned to the sweep's
    device (a group the user initialized leaves every rank on cuda:0 otherwise)."""
    from lerpfast import evaluate

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(str(self.device))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * len(out)))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: None)
    parts = evaluate._all_gather(([1, 2], {}, False, None), 2, torch.device("cuda", 3))
    assert len(parts) == 2 and evaluate._broadcast("x", torch.device("cuda", 3)) == "x"
    evaluate._broadcast("x", torch.device("cpu"))
    assert entered == ["cuda:3", "cuda:3"]


def test_init_from_env_under_nccl_pins_the_local_gpu(monkeypatch):
    """The NCCL branch of init_from_env, with torch.cuda and the process-group call faked: NCCL is chosen when each
    process has a GPU, the process is pinned to cuda:LOCAL_RANK before the group exists, and the timeout is passed."""
    from lerpfast import distributed as ldist

    calls = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(ldist, "_attempt_store", lambda rank, world, timeout: "store")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("init", (backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr("atexit.register", lambda fn: None)
    assert ldist.init_from_env(timeout_s=60) == (3, 4)
    backend, kw = calls["init"]
    assert backend == "nccl" and calls["set_device"] == 1
    assert kw["rank"] == 3 and kw["world_size"] == 4 and kw["store"] == "store" and kw["timeout"].total_seconds() == 60
    assert ldist.local_device("cuda") == "cuda:1" and ldist.local_device("auto") == "cuda:1"
