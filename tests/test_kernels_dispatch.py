"""lerpfast.engine.dispatch: CPU always on torch, LERPFAST_BACKEND forcing, choice by measurement."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the forced-triton test runs the interpreter

from lerpfast.engine import dispatch  # noqa: E402
from lerpfast.engine import functional as F  # noqa: E402
from lerpfast.kernels import ext  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_dispatch")


def _layer(K=3, J=2, M=2, N=5, IN=37, OUT=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = F.ParamSlice(torch.randn(M, OUT, IN, generator=g), torch.randn(J, OUT, IN, generator=g))
    b = F.ParamSlice(torch.randn(M, OUT, generator=g), torch.randn(J, OUT, generator=g))
    pts = F.Points(torch.randint(0, M, (K,), generator=g), torch.rand(K, J, generator=g))
    return torch.randn(K, N, IN, generator=g), w, b, pts


def test_cpu_automatic_is_the_functional_path():
    x, w, b, pts = _layer()
    assert torch.equal(dispatch.lerp_linear(x, w, b, pts), F.lerp_linear(x, w, b, pts))
    xs = x[0]
    assert torch.equal(dispatch.lerp_linear(xs, w, b, pts, True), F.lerp_linear(xs, w, b, pts, True))
    xc = torch.randn(3, 2, 4, 6, 6)
    wc = F.ParamSlice(torch.randn(2, 5, 4, 3, 3), torch.randn(2, 5, 4, 3, 3))
    ref = F.lerp_conv(xc, wc, None, pts, 1, 1, 1, 1)
    assert torch.equal(dispatch.lerp_conv(xc, wc, None, pts, 1, 1, 1, 1), ref)
    assert dispatch.report() == {"lerp_linear": {"torch": 2}, "lerp_conv": {"torch": 1}}


def test_fused_epilogue_torch_path():
    x, w, b, pts = _layer()
    bn = (torch.rand(3, 17) + 0.5, torch.randn(3, 17))
    res = torch.randn(3, 5, 17)
    out = dispatch.lerp_linear_fused(x, w, b, pts, bn=bn, residual=res, relu=True)
    ref = torch.relu(F.lerp_linear(x, w, b, pts) * bn[0][:, None] + bn[1][:, None] + res)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_point_metrics_torch_path():
    z = torch.randn(4, 9, 6)
    t = torch.randint(0, 6, (9,))
    r = torch.randn(9, 6)
    out = dispatch.point_metrics(z, t, r)
    loss = torch.nn.functional.cross_entropy(z.double().reshape(-1, 6), t.repeat(4), reduction="none")
    torch.testing.assert_close(out["loss"], loss.view(4, 9).sum(1))
    assert torch.equal(out["error"], (z.argmax(-1) != t).sum(1).double())
    assert torch.equal(out["disagreement"], (z.argmax(-1) != r.argmax(-1)).sum(1).double())
    assert set(out) == {"loss", "error", "top5_error", "distance", "disagreement"}


def test_forced_backend_validation(monkeypatch):
    x, w, b, pts = _layer()
    monkeypatch.setenv("LERPFAST_BACKEND", "cublas")
    with pytest.raises(ValueError, match="LERPFAST_BACKEND"):
        dispatch.lerp_linear(x, w, b, pts)
    monkeypatch.setenv("LERPFAST_BACKEND", "torch")
    assert torch.equal(dispatch.lerp_linear(x, w, b, pts), F.lerp_linear(x, w, b, pts))


def test_forced_triton_raises_without_gpu_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU makes triton available")
    x, w, b, pts = _layer()
    monkeypatch.setenv("LERPFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendUnavailable, match="triton"):
        dispatch.lerp_linear(x, w, b, pts)


@pytest.mark.skipif(not ext.available(), reason="lerpfast._C is not built")
def test_forced_cuda_backend_uses_the_extension_on_cpu(monkeypatch):
    x, w, b, pts = _layer()
    monkeypatch.setenv("LERPFAST_BACKEND", "cuda")
    assert torch.equal(dispatch.lerp_linear(x, w, b, pts), F.lerp_linear(x, w, b, pts))
    xc = torch.randn(3, 2, 4, 6, 6)
    wc = F.ParamSlice(torch.randn(2, 5, 4, 3, 3), None)
    dispatch.lerp_conv(xc, wc, None, pts, 1, 1, 1, 1)  # no csrc conv: runs on torch, counted as such
    assert dispatch.report() == {"lerp_linear": {"cuda": 1}, "lerp_conv": {"torch": 1}}


def test_forced_triton_under_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 a forced triton backend runs the fused kernels on CPU tensors."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the interpreter to be on before triton was imported (tests/test_kernels.py sets it)")
    from lerpfast.kernels import _common

    if not _common.INTERPRET:
        pytest.skip("kernels were imported in compiled mode")
    monkeypatch.setenv("LERPFAST_BACKEND", "triton")
    x, w, b, pts = _layer(K=3, N=5, IN=37, OUT=17)
    torch.testing.assert_close(dispatch.lerp_linear(x, w, b, pts), F.lerp_linear(x, w, b, pts), rtol=1e-5, atol=1e-4)
    xc = torch.randn(3, 1, 2, 5, 5)
    wc = F.ParamSlice(torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3))
    torch.testing.assert_close(dispatch.lerp_conv(xc, wc, None, pts, 1, "same", 1, 1),
                               F.lerp_conv(xc, wc, None, pts, 1, "same", 1, 1), rtol=1e-5, atol=1e-4)
    wg = F.ParamSlice(torch.randn(2, 4, 1, 3, 3), None)  # groups = 2: not a triton shape, runs on torch
    dispatch.lerp_conv(xc, wg, None, pts, 1, 1, 1, 2)
    assert dispatch.report()["lerp_conv"] == {"triton": 1, "torch": 1}


def test_measure_drops_wrong_and_failing_candidates(monkeypatch):
    """The choice logic without a GPU: timings are faked, correctness and failures are real."""
    x, w, b, pts = _layer()
    ref = F.lerp_linear(x, w, b, pts)
    times = {"torch": 3.0, "good": 2.0, "wrong": 1.0, "broken": 0.5}
    cands = {"good": lambda: ref.clone(), "wrong": lambda: ref + 1.0, "broken": lambda: 1 / 0, "absent": None}
    fn_name = {id(v): k for k, v in cands.items() if v is not None}
    torch_fn = lambda: ref  # noqa: E731
    fn_name[id(torch_fn)] = "torch"
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: times[fn_name[id(fn)]])
    monkeypatch.setattr(dispatch, "_unavailable", lambda name, device: None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        choice, conclusive = dispatch._measure("lerp_linear", x.device, cands, torch_fn)
    assert choice == "good" and conclusive
    msgs = " ".join(str(r.message) for r in rec)
    assert "disagrees" in msgs and "failed" in msgs


@pytest.mark.gpu
def test_gpu_automatic_choice_is_cached_and_correct():
    x, w, b, pts = _layer(K=17, N=64, IN=97, OUT=37)
    to = lambda p: F.ParamSlice(p.anchors.cuda(), p.dirs.cuda())  # noqa: E731
    x, w, b, pts = x.cuda(), to(w), to(b), pts.to("cuda")
    torch.set_float32_matmul_precision("highest")
    out = dispatch.lerp_linear(x, w, b, pts)  # torch while the triton candidate compiles in the background
    torch.testing.assert_close(out, F.lerp_linear(x, w, b, pts), rtol=1e-4, atol=1e-4)
    assert dispatch.wait(timeout=600)
    out = dispatch.lerp_linear(x, w, b, pts)  # measures, then runs the choice
    torch.testing.assert_close(out, F.lerp_linear(x, w, b, pts), rtol=1e-4, atol=1e-4)
    dispatch.lerp_linear(x, w, b, pts)
    assert sum(dispatch.report()["lerp_linear"].values()) == 3
    assert len(dispatch._CACHE) == 1 and dispatch.pending() == 0


# ------------------------------------------------------------------------------------------ cold start (issue 9)


@pytest.fixture
def measured_cpu(monkeypatch, tmp_path):
    """The automatic CUDA logic on CPU tensors: triton (interpreter) and torch only, a private dispatch table,
    no compile futures from other tests."""
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("needs the interpreter (CPU only)")
    monkeypatch.setenv("LERPFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "_MEASURED", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_COMPILING", {})
    real = dispatch._unavailable
    monkeypatch.setattr(dispatch, "_unavailable", lambda name, device: "off" if name == "cuda" else real(name, device))
    return tmp_path


@pytest.mark.filterwarnings("ignore:lerpfast. backend cuda unavailable")
def test_first_calls_run_torch_while_triton_compiles(monkeypatch, measured_cpu):
    """No call waits on a compile: torch runs until the triton candidate's kernels are compiled (in background
    threads), then the choice is measured once, stored per device, and a new process reuses it unmeasured."""
    import threading

    gate, compiled = threading.Event(), []

    def compile_variant(ln, device):
        assert gate.wait(30)
        compiled.append(ln)

    monkeypatch.setattr(dispatch, "_compile_variant", compile_variant)
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: (fn(), 3.0 if fn.__name__ == "torch_fn" else 1.0)[1])
    x, w, b, pts = _layer(K=3, N=5, IN=37, OUT=17)
    ref = F.lerp_linear(x, w, b, pts)
    for _ in range(2):
        assert torch.equal(dispatch.lerp_linear(x, w, b, pts), ref)  # torch, bit for bit
    assert dispatch.report() == {"lerp_linear": {"torch": 2}} and dispatch.pending() == 1
    gate.set()
    assert dispatch.wait(timeout=30)
    assert len(compiled) == 1 and compiled[0].name == "_lerp_linear_fwd_kernel"
    torch.testing.assert_close(dispatch.lerp_linear(x, w, b, pts), ref, rtol=1e-5, atol=1e-4)
    assert dispatch.report() == {"lerp_linear": {"torch": 2, "triton": 1}} and dispatch.pending() == 0
    table = json.loads(next(measured_cpu.glob("dispatch-*.json")).read_text())
    assert list(table["choices"].values()) == ["triton"]

    dispatch.reset()  # a new process: the stored choice, nothing measured
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: pytest.fail("measured again"))
    dispatch.lerp_linear(x, w, b, pts)  # (the kernel variant is compiled already: ready at once)
    assert dispatch.report() == {"lerp_linear": {"triton": 1}}


@pytest.mark.filterwarnings("ignore:lerpfast. backend cuda unavailable")
def test_failed_compile_drops_the_candidate(monkeypatch, measured_cpu):
    def compile_variant(ln, device):
        raise RuntimeError("ptxas: out of registers")

    monkeypatch.setattr(dispatch, "_compile_variant", compile_variant)
    monkeypatch.setattr(dispatch, "_bench", lambda fn, reps=1: 1.0)
    xc = torch.randn(3, 1, 2, 5, 5)
    wc = F.ParamSlice(torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3))
    _, _, _, pts = _layer()
    ref = F.lerp_conv(xc, wc, None, pts, 1, 1, 1, 1)
    dispatch.lerp_conv(xc, wc, None, pts, 1, 1, 1, 1)
    assert dispatch.wait(timeout=30)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.testing.assert_close(dispatch.lerp_conv(xc, wc, None, pts, 1, 1, 1, 1), ref)
    assert any("compiling lerp_conv on triton failed" in str(r.message) for r in rec)
    assert dispatch.report() == {"lerp_conv": {"torch": 2}}
    assert list(dispatch._CACHE.values()) == ["torch"]


def test_planning_records_without_running(monkeypatch):
    """Planning mode: ops on meta tensors take the CUDA path (the triton candidate), described and not run."""
    from lerpfast.kernels import launch

    x, w, b, pts = _layer(K=3, N=5, IN=37, OUT=17)
    meta = lambda t: t.to("meta")  # noqa: E731
    wm, bm = F.ParamSlice(meta(w.anchors), meta(w.dirs)), F.ParamSlice(meta(b.anchors), meta(b.dirs))
    with dispatch.planning(torch.bfloat16), launch.recording(dry=True) as rec:
        out = dispatch.lerp_linear_fused(meta(x), wm, bm, F.Points(meta(pts.anchor_idx), meta(pts.coefs)), relu=True)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16  # autocast's dtype, as on the GPU
    assert [ln.name for ln in rec.launches] == ["_lerp_linear_fwd_kernel"]
    assert dict(rec.launches[0].constexprs)["DOT"] == 2 and dispatch.report() == {}


def test_sweep_metrics_through_the_fused_kernel(monkeypatch):
    """PointMetrics sends fp32 logits to the dispatched point_metrics kernel (here forced, under the interpreter):
    a whole sweep's loss, errors, distance and disagreement equal the float64 torch path's."""
    pytest.importorskip("triton")
    from lerpfast.kernels import _common

    if torch.cuda.is_available() or not _common.INTERPRET:
        pytest.skip("needs the interpreter (CPU)")
    import lerpfast

    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.ReLU(), torch.nn.Linear(11, 6)) for _ in range(2))
    data = (torch.randn(53, 7), torch.randint(0, 6, (53,)))
    kw = dict(batch_size=20, fuse=False)
    want = lerpfast.sweep(a, (a, b), "-0.5:1.5:5", data, **kw)
    monkeypatch.setenv("LERPFAST_BACKEND", "triton")
    dispatch.reset()
    got = lerpfast.sweep(a, (a, b), "-0.5:1.5:5", data, **kw)
    assert dispatch.report()["point_metrics"] == {"triton": 3}  # 3 batches, one kernel launch each
    assert sorted(got.metrics) == sorted(want.metrics)
    for k, v in want.metrics.items():
        np.testing.assert_allclose(got.metrics[k], v, rtol=2e-6, atol=1e-7, err_msg=k)
