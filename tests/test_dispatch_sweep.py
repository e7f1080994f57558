"""What a whole sweep does when the dispatcher's GPU-only steps misbehave, driven on the CPU (issue 15 §1): the
automatic CUDA logic runs on CPU tensors with fake timings, and the compile step is replaced by one that never
finishes or whose kernel raises at launch. A sweep never blocks, never loses the torch result, warns once."""

import concurrent.futures as cf
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lerpfast
from lerpfast.engine import dispatch

pytestmark = pytest.mark.usefixtures("clean_dispatch")


def _problem():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 5)) for _ in range(2))
    g = torch.Generator().manual_seed(1)
    return a, b, (torch.randn(40, 9, generator=g), torch.randint(0, 5, (40,), generator=g))


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv("LERPFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "_MEASURED", ("cuda", "cpu"))
    real = dispatch._unavailable
    monkeypatch.setattr(dispatch, "_unavailable", lambda name, device: None if name == "triton" else "off")
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: 1.0)
    monkeypatch.setattr(dispatch, "_WARNED", set())  # "once" is per process: a fresh process for each test
    return real


def _sweep(a, b, data):
    return lerpfast.sweep(a, (a, b), "-0.5:1.5:6", data, batch_size=10, fuse=False)


def test_a_compile_that_never_finishes_never_blocks_the_sweep(monkeypatch, fake_cuda):
    never = cf.Future()  # a background compile that hangs
    monkeypatch.setattr(dispatch, "_prepare", lambda name, fn, device: [never] if name == "triton" else [])
    a, b, data = _problem()
    want = _sweep(a, b, data)  # the ordinary CPU path
    dispatch.reset()
    got = _sweep(a, b, data)
    assert dispatch.pending() > 0  # still "compiling"
    assert "lerp_linear" in dispatch.report()
    assert all(set(v) == {"torch"} for v in dispatch.report().values())
    for k, v in want.metrics.items():
        np.testing.assert_array_equal(got.metrics[k], v, err_msg=k)


def _kernels_compiled_but_failing(monkeypatch, message: str) -> None:
    """Triton's kernels "compiled" at once; launching the fused Linear or metrics kernel raises ``message``."""
    done = cf.Future()
    done.set_result(None)
    monkeypatch.setattr(dispatch, "_prepare", lambda name, fn, device: [done] if name == "triton" else [])
    import lerpfast.kernels.lerp_linear as kl
    import lerpfast.kernels.point_metrics as kpm

    def launch_fails(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(kl, "lerp_linear", launch_fails)
    monkeypatch.setattr(kpm, "point_metrics", launch_fails)


def test_a_kernel_that_raises_at_launch_warns_once_and_keeps_torchs_result(monkeypatch, fake_cuda):
    _kernels_compiled_but_failing(monkeypatch, "Triton Error [CUDA]: invalid argument")
    a, b, data = _problem()
    dispatch.reset()
    want = _sweep(a, b, data)  # measured once per shape: the candidate fails, torch is kept
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = _sweep(a, b, data)  # cached choice: nothing measured, nothing warned again
    assert not [r for r in rec if "failed" in str(r.message)]
    assert all(set(v) == {"torch"} for v in dispatch.report().values())
    assert set(dispatch._CACHE.values()) == {"torch"}
    for k, v in want.metrics.items():
        np.testing.assert_array_equal(got.metrics[k], v, err_msg=k)


def test_the_failing_launch_is_reported_once_per_op(monkeypatch, fake_cuda):
    _kernels_compiled_but_failing(monkeypatch, "launch failed")
    a, b, data = _problem()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _sweep(a, b, data)
    msgs = [str(r.message) for r in rec if "lerp_linear on triton failed" in str(r.message)]
    assert len(msgs) == 1 and "launch failed" in msgs[0]
