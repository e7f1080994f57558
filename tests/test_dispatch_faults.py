"""The dispatcher's GPU-only decisions driven on the CPU with fake timings (issue 15 §0): NaN outputs, out of
memory during and after measurement, background compiles at interpreter exit."""

import json
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from lerpfast.engine import dispatch
from lerpfast.engine.oom import is_oom

pytestmark = pytest.mark.usefixtures("clean_dispatch")

NAN = float("nan")


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """The automatic (CUDA) logic on CPU tensors with one candidate whose kernels are ready at once and fake
    timings in which the candidate wins; a private dispatch table."""
    monkeypatch.setenv("LERPFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "_MEASURED", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_unavailable", lambda name, device: None)
    monkeypatch.setattr(dispatch, "_prepare", lambda name, fn, device: [])
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: 1.0 if getattr(fn, "fast", False) else 2.0)
    return tmp_path


def _table(tmp_path) -> dict:
    files = list(tmp_path.glob("dispatch-*.json"))
    return json.loads(files[0].read_text())["choices"] if files else {}


def _candidate(fn):
    fn.fast = True
    return fn


def _run(x, torch_fn, cand, key=("k",)):
    return dispatch._run("op", key, torch.device("cpu"), {"triton": cand}, torch_fn)


def test_close_compares_non_finite_values_exactly():
    a = torch.tensor([1.0, NAN, float("inf"), -2.0])
    assert dispatch._close(a.clone(), a)
    assert not dispatch._close(torch.tensor([1.0, 0.0, float("inf"), -2.0]), a)  # NaN turned finite: wrong
    assert not dispatch._close(torch.tensor([1.0, NAN, -float("inf"), -2.0]), a)  # other infinity
    assert not dispatch._close(torch.tensor([1.0, NAN, float("inf"), -2.1]), a)  # finite part still checked
    assert dispatch._close({"loss": torch.tensor([NAN])}, {"loss": torch.tensor([NAN])})
    assert dispatch._close(torch.full((3,), NAN), torch.full((3,), NAN))


def test_identical_nan_keeps_the_candidate_and_writes_nothing(fake_cuda):
    """A NaN point (both paths NaN) neither drops the kernel nor writes "torch" to the table for later processes;
    the first batch of finite outputs settles and stores the choice."""
    x = torch.tensor([1.0, NAN, 3.0])
    torch_fn = lambda: x * 2  # noqa: E731
    cand = _candidate(lambda: x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "disagrees with torch" warning
        out = _run(x, torch_fn, cand)
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    assert dispatch.report() == {"op": {"triton": 1}}
    assert _table(fake_cuda) == {} and dispatch._CACHE == {}  # not settled: measured again next call
    x.copy_(torch.tensor([1.0, 2.0, 3.0]))
    _run(x, torch_fn, cand)
    assert list(_table(fake_cuda).values()) == ["triton"] and list(dispatch._CACHE.values()) == ["triton"]


def test_persistent_nan_settles_for_this_process_only(fake_cuda):
    x = torch.tensor([NAN, 1.0])
    cand = _candidate(lambda: x + 1)
    for _ in range(4):
        _run(x, lambda: x + 1, cand)
    assert list(dispatch._CACHE.values()) == ["triton"] and _table(fake_cuda) == {}


def test_oom_while_measuring_propagates_and_is_not_a_choice(fake_cuda):
    """Out of memory inside the candidate during measurement reaches the sweep (which halves its points per
    pass); the candidate stays, and the next call measures again."""
    x = torch.ones(4)
    boom = {"on": True}

    def cand():
        if boom["on"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x + 1

    cand = _candidate(cand)
    with pytest.raises(torch.OutOfMemoryError):
        _run(x, lambda: x + 1, cand)
    assert dispatch._CACHE == {} and _table(fake_cuda) == {} and dispatch.pending() == 1
    boom["on"] = False
    _run(x, lambda: x + 1, cand)
    assert list(dispatch._CACHE.values()) == ["triton"] and list(_table(fake_cuda).values()) == ["triton"]


@pytest.mark.parametrize("message", ["CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
                                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])
def test_oom_after_the_choice_keeps_the_choice(fake_cuda, message):
    """An allocation failure of the chosen kernel later in the sweep is an out-of-memory error for the sweep,
    not a reason to run torch for that shape for the rest of the process."""
    x = torch.ones(4)
    fail = {"on": False}

    def cand():
        if fail["on"]:
            raise RuntimeError(message)
        return x + 1

    cand = _candidate(cand)
    _run(x, lambda: x + 1, cand)
    fail["on"] = True
    with pytest.raises(RuntimeError) as info:
        _run(x, lambda: x + 1, cand)
    assert is_oom(info.value)
    assert list(dispatch._CACHE.values()) == ["triton"]


def test_is_oom_recognises_the_allocators_messages():
    for msg in ("CUDA out of memory. Tried to allocate 20.00 MiB", "CUDA error: out of memory",
                "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"):
        assert is_oom(RuntimeError(msg)), msg
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(MemoryError())
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(ValueError("out of memory"))  # only allocator errors


def test_sweep_halves_on_a_cuda_runtime_oom(monkeypatch):
    """The sweep's chunk halving recognises the CUDA runtime's plain RuntimeError too."""
    import numpy as np

    import lerpfast
    from lerpfast import evaluate

    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)) for _ in range(2))
    data = (torch.randn(12, 5), torch.randint(0, 3, (12,)))
    want = lerpfast.sweep(a, (a, b), "0:1:8", data, method="loop")
    real = evaluate._LoopEvaluator.evaluate

    def evaluate_small(self, pts, ref, d):
        if len(pts.anchor_idx) > 2:
            raise RuntimeError("CUDA error: out of memory")
        return real(self, pts, ref, d)

    monkeypatch.setattr(evaluate._LoopEvaluator, "evaluate", evaluate_small)
    with pytest.warns(UserWarning, match="out of memory"):
        got = lerpfast.sweep(a, (a, b), "0:1:8", data, method="loop")
    assert got.meta["points_per_pass"] == 2
    np.testing.assert_array_equal(got.loss, want.loss)


def test_exit_does_not_wait_for_background_compiles(tmp_path):
    """A process whose sweep is over exits at once although kernel compiles are still queued and running."""
    script = textwrap.dedent("""
        import time
        from lerpfast.engine import dispatch
        for _ in range(4):
            dispatch._executor().submit(time.sleep, 60)
        time.sleep(0.2)
        print("done", flush=True)
    """)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50,
                          env={"LERPFAST_COMPILE_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert time.perf_counter() - t0 < 30


def test_measurement_interleaves_candidates(monkeypatch):
    """Each candidate is warmed up once, then timed in rounds whose order rotates (torch is not always first)."""
    order = []
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: order.append(fn.__name__) or 1.0)
    monkeypatch.setattr(dispatch, "_unavailable", lambda name, device: None)
    x = torch.ones(3)

    def torch_fn():
        return x + 1

    def triton_fn():
        return x + 1

    def cuda_fn():
        return x + 1

    dispatch._measure("op", x.device, {"triton": triton_fn, "cuda": cuda_fn}, torch_fn)
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 5 and all(sorted(r) == ["cuda_fn", "torch_fn", "triton_fn"] for r in rounds)
    assert {r[0] for r in rounds} == {"torch_fn", "triton_fn", "cuda_fn"}


def test_metrics_outputs_compared_per_quantity():
    """The metrics kernel's loss sums are held to 1e-5, not to the 2e-2 of bf16 matmuls; counts may move by a tie."""
    ref = {"loss": torch.tensor([100.0], dtype=torch.float64), "error": torch.tensor([500.0], dtype=torch.float64)}
    assert dispatch._close({"loss": ref["loss"] * (1 + 5e-6), "error": ref["error"] + 1}, ref)
    assert not dispatch._close({"loss": ref["loss"] * (1 + 1e-3), "error": ref["error"]}, ref)
    assert not dispatch._close({"loss": ref["loss"], "error": ref["error"] + 5}, ref)
    assert not dispatch._close({"loss": ref["loss"]}, ref)
