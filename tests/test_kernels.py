"""Triton kernels vs float64 references: err(kernel) <= 2 * err(torch at the same precision) + atol.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before triton is
imported), on tiny odd shapes and one config each: the whole file takes well under a minute on one core.
With a GPU the same tests run compiled kernels on CUDA tensors.
"""

import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

_MODULES = ["_common", "lerp_linear", "lerp_conv", "point_metrics", "combine"]
_common = sys.modules.get("lerpfast.kernels._common")
if DEVICE == "cpu" and _common is not None and not _common.INTERPRET:
    # Imported earlier without the interpreter: those kernels would try to compile for a GPU. Re-decorate.
    for _name in _MODULES:
        if f"lerpfast.kernels.{_name}" in sys.modules:
            importlib.reload(sys.modules[f"lerpfast.kernels.{_name}"])

from lerpfast.engine import functional as F  # noqa: E402
from lerpfast.kernels import combine as kc  # noqa: E402
from lerpfast.kernels import lerp_conv as kconv  # noqa: E402
from lerpfast.kernels import lerp_linear as klin  # noqa: E402
from lerpfast.kernels import point_metrics as km  # noqa: E402
from lerpfast.kernels._ref import bn_fold  # noqa: E402

# atol as a fraction of max |reference|; the interpreter computes "tf32" in full fp32.
ATOL = {"fp32": 1e-5, "tf32": 2e-3, "bf16": 4e-3}
TORCH_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _assert_within(out, same_prec, ref, precision):
    """The flash-attention criterion: the kernel is at most twice as far from float64 as torch is."""
    atol = ATOL[precision] * ref.abs().max().item()
    e_k, e_t = _err(out, ref), _err(same_prec, ref)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert e_k <= 2 * e_t + atol, f"kernel err {e_k:.3e} vs torch {e_t:.3e} (+atol {atol:.1e})"


def _slice(M, J, shape, seed, dir_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((M, *shape), generator=g)
    d = torch.randn((J, *shape), generator=g) * dir_scale if J else None
    return a.to(DEVICE), (d.to(DEVICE) if d is not None else None)


def _points(K, M, J, seed):
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, M, (K,), generator=g)
    c = torch.rand((K, J), generator=g) * 3 - 1  # inside and beyond [0, 1]: extrapolation included
    return idx.to(DEVICE), c.to(DEVICE)


def _with_tf32(precision):
    class _Ctx:
        def __enter__(self):
            self.old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")

        def __exit__(self, *exc):
            torch.set_float32_matmul_precision(self.old)

    return _Ctx()


# ------------------------------------------------------------------------------------------ linear

LINEAR_CASES = [  # K, J, M, N, IN, OUT
    (1, 1, 1, 5, 37, 97),
    (3, 2, 2, 37, 97, 5),
    (17, 3, 2, 5, 37, 17),
    (3, 1, 2, 97, 5, 37),
]


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("K,J,M,N,IN,OUT", LINEAR_CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_lerp_linear(K, J, M, N, IN, OUT, precision, shared):
    if precision == "tf32" and DEVICE == "cpu" and (shared or K != 3):
        pytest.skip("tf32 = fp32 under the interpreter: two cases suffice on CPU")
    wa, wd = _slice(M, J, (OUT, IN), seed=K * 100 + J)
    ba, bd = _slice(M, J, (OUT,), seed=K * 100 + J + 7)
    idx, c = _points(K, M, J, seed=N)
    x = torch.randn(((N, IN) if shared else (K, N, IN)), device=DEVICE)
    with _with_tf32(precision):
        out = klin.lerp_linear(x, wa, wd, idx, c, ba, bd, shared_input=shared, precision=precision)
        same = klin.lerp_linear_ref(x.to(TORCH_DTYPE[precision]), wa, wd, idx, c, ba, bd, shared_input=shared)
    ref = klin.lerp_linear_ref(x.double(), wa, wd, idx, c, ba, bd, shared_input=shared, dtype=torch.float64)
    assert out.dtype == x.dtype
    _assert_within(out, same, ref, precision)


@pytest.mark.parametrize("shared", [False, True])
def test_lerp_linear_epilogue(shared):
    K, J, M, N, IN, OUT = 5, 2, 2, 13, 37, 23
    wa, wd = _slice(M, J, (OUT, IN), seed=3)
    ba, bd = _slice(M, J, (OUT,), seed=4)
    idx, c = _points(K, M, J, seed=5)
    x = torch.randn(((N, IN) if shared else (K, N, IN)), device=DEVICE)
    bn = (torch.rand(K, OUT, device=DEVICE) + 0.5, torch.randn(K, OUT, device=DEVICE))
    res = torch.randn(K, N, OUT, device=DEVICE)
    kw = dict(shared_input=shared, bn=bn, residual=res, relu=True)
    out = klin.lerp_linear(x, wa, wd, idx, c, ba, bd, precision="fp32", **kw)
    same = klin.lerp_linear_ref(x, wa, wd, idx, c, ba, bd, **kw)
    ref = klin.lerp_linear_ref(x.double(), wa, wd, idx, c, ba, bd, dtype=torch.float64, **kw)
    assert (out >= 0).all()
    _assert_within(out, same, ref, "fp32")


@pytest.mark.parametrize("shared", [False, True])
def test_lerp_linear_epilogue_keeps_nan(shared):
    """An extrapolated BN point whose running variance goes negative folds to a NaN scale; PyTorch's BN + ReLU
    then gives NaN, and so must the fused epilogue (tl.maximum drops NaN unless told to propagate it)."""
    K, J, M, N, IN, OUT = 3, 1, 2, 5, 7, 6
    wa, wd = _slice(M, J, (OUT, IN), seed=3)
    idx, c = _points(K, M, J, seed=5)
    x = torch.randn(((N, IN) if shared else (K, N, IN)), device=DEVICE)
    scale = torch.rand(K, OUT, device=DEVICE) + 0.5
    scale[1, 2] = float("nan")  # rsqrt(var + eps) of a negative variance
    bn = (scale, torch.randn(K, OUT, device=DEVICE))
    kw = dict(shared_input=shared, bn=bn, residual=None, relu=True)
    out = klin.lerp_linear(x, wa, wd, idx, c, None, None, precision="fp32", **kw)
    ref = klin.lerp_linear_ref(x.double(), wa, wd, idx, c, None, None, dtype=torch.float64, **kw)
    assert torch.isnan(ref[1, :, 2]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_lerp_conv2d_epilogue_keeps_nan():
    """As for linear: a negative extrapolated running variance gives NaN through BN + ReLU, like PyTorch."""
    K, J, M, N, C, CO, H, W = 3, 1, 2, 2, 3, 4, 5, 5
    wa, wd = _slice(M, J, (CO, C, 3, 3), seed=31)
    idx = torch.zeros(K, dtype=torch.long, device=DEVICE)
    c = torch.tensor([[0.0], [1.0], [2.0]], device=DEVICE)
    x = torch.randn(K, N, C, H, W, device=DEVICE)
    var = (torch.full((M, CO), 0.5, device=DEVICE), torch.full((J, CO), -0.4, device=DEVICE))  # 0.5 - 0.8 < 0 at c=2
    bn = bn_fold(None, None, (torch.zeros(M, CO, device=DEVICE), None), var, 1e-5, idx, c)
    kw = dict(bn=bn, residual=None, relu=True)
    out = kconv.lerp_conv2d(x, wa, wd, idx, c, None, None, 1, 1, precision="fp32", **kw)
    ref = kconv.lerp_conv2d_ref(x.double(), wa, wd, idx, c, None, None, 1, 1, dtype=torch.float64, **kw)
    assert torch.isnan(ref[2]).all() and not torch.isnan(ref[:2]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_lerp_linear_bf16_activations():
    K, J, M, N, IN, OUT = 3, 2, 2, 37, 97, 5
    wa, wd = _slice(M, J, (OUT, IN), seed=11)
    idx, c = _points(K, M, J, seed=12)
    x = torch.randn(K, N, IN, device=DEVICE).bfloat16()
    out = klin.lerp_linear(x, wa, wd, idx, c, relu=True)
    assert out.dtype == torch.bfloat16
    same = klin.lerp_linear_ref(x, wa, wd, idx, c, relu=True)
    ref = klin.lerp_linear_ref(x.double(), wa, wd, idx, c, relu=True, dtype=torch.float64)
    _assert_within(out, same, ref, "bf16")


def test_lerp_linear_endpoints_exact():
    """Zero coefficients give the anchor's weights bit for bit (a = 0 and a = 1 of a line are anchors)."""
    K, J, M, N, IN, OUT = 2, 2, 2, 5, 37, 17
    wa, wd = _slice(M, J, (OUT, IN), seed=21)
    x = torch.randn(K, N, IN, device=DEVICE)
    idx = torch.tensor([0, 1], device=DEVICE)
    out = klin.lerp_linear(x, wa, wd, idx, torch.zeros(K, J, device=DEVICE), precision="fp32")
    plain = klin.lerp_linear(x, wa, None, idx, torch.zeros(K, 0, device=DEVICE), precision="fp32")
    assert torch.equal(out, plain)


def test_lerp_linear_rejects_many_dirs():
    wa, wd = _slice(1, 4, (5, 5), seed=0)
    with pytest.raises(ValueError, match="J <= 3"):
        klin.lerp_linear(torch.randn(2, 3, 5, device=DEVICE), wa, wd, torch.zeros(2, dtype=torch.long, device=DEVICE),
                         torch.ones(2, 4, device=DEVICE))


def test_lerp_mix_matches_reference():
    T, R, OUT, K = 4, 37, 17, 5
    basis = torch.randn(T, R, OUT, device=DEVICE)
    idx = torch.tensor([0, 1, 1, 0, 1], device=DEVICE)
    pos = idx.clone()
    c = torch.randn(K, 2, device=DEVICE)
    ba, bd = _slice(2, 2, (OUT,), seed=9)
    out = klin.lerp_mix(basis, pos, 2, idx, c, ba, bd, relu=True)
    ref = klin.lerp_mix_ref(basis, pos, 2, idx, c, ba, bd, relu=True, dtype=torch.float64)
    same = klin.lerp_mix_ref(basis, pos, 2, idx, c, ba, bd, relu=True)
    _assert_within(out, same, ref, "fp32")


# ------------------------------------------------------------------------------------------ conv

CONV_CASES = [  # K, J, M, N, C, CO, H, W, ksize, stride, padding, dilation
    (1, 1, 1, 2, 5, 17, 7, 7, 3, 1, 1, 1),
    (3, 2, 2, 1, 3, 5, 9, 6, 3, 2, 1, 1),
    (17, 3, 2, 1, 3, 5, 5, 5, 1, 1, 0, 1),
    (3, 1, 2, 1, 4, 7, 8, 7, 3, (2, 1), (0, 2), 2),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("K,J,M,N,C,CO,H,W,ks,stride,padding,dilation", CONV_CASES)
def test_lerp_conv2d(K, J, M, N, C, CO, H, W, ks, stride, padding, dilation, precision):
    wa, wd = _slice(M, J, (CO, C, ks, ks), seed=K + J)
    ba, bd = _slice(M, J, (CO,), seed=K + J + 5)
    idx, c = _points(K, M, J, seed=C)
    x = torch.randn(K, N, C, H, W, device=DEVICE)
    args = (stride, padding, dilation)
    out = kconv.lerp_conv2d(x, wa, wd, idx, c, ba, bd, *args, precision=precision)
    same = kconv.lerp_conv2d_ref(x.to(TORCH_DTYPE[precision]), wa, wd, idx, c, ba, bd, *args)
    ref = kconv.lerp_conv2d_ref(x.double(), wa, wd, idx, c, ba, bd, *args, dtype=torch.float64)
    _assert_within(out, same, ref, precision)


def test_lerp_conv2d_channels_last_epilogue():
    """ResNet block tail: conv -> BN (folded, per point) -> + residual -> ReLU, NHWC in and out."""
    K, J, M, N, C, CO, H, W = 3, 2, 2, 2, 5, 6, 6, 5
    wa, wd = _slice(M, J, (CO, C, 3, 3), seed=31)
    idx, c = _points(K, M, J, seed=32)
    x = torch.randn(K * N, C, H, W, device=DEVICE).to(memory_format=torch.channels_last).view(K, N, C, H, W)
    gamma, beta = _slice(M, J, (CO,), seed=33)
    mean, _ = _slice(M, 0, (CO,), seed=34)
    var = (torch.rand(M, CO, device=DEVICE) + 0.5, None)
    bn = bn_fold((gamma, beta), None, (mean, None), var, 1e-5, idx, c)
    res = torch.randn(K, N, CO, H, W, device=DEVICE)
    kw = dict(bn=bn, residual=res, relu=True)
    out = kconv.lerp_conv2d(x, wa, wd, idx, c, None, None, 1, 1, precision="fp32", **kw)
    assert out.is_contiguous(memory_format=torch.channels_last) or out.permute(0, 1, 3, 4, 2).is_contiguous()
    same = kconv.lerp_conv2d_ref(x, wa, wd, idx, c, None, None, 1, 1, **kw)
    ref = kconv.lerp_conv2d_ref(x.double(), wa, wd, idx, c, None, None, 1, 1, dtype=torch.float64, **kw)
    _assert_within(out, same, ref, "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lerp_conv2d_shared_input(precision):
    K, J, M, N, C, CO, H, W = 5, 2, 2, 2, 3, 7, 6, 5
    wa, wd = _slice(M, J, (CO, C, 3, 3), seed=41)
    ba, bd = _slice(M, J, (CO,), seed=42)
    idx, c = _points(K, M, J, seed=43)
    x = torch.randn(N, C, H, W, device=DEVICE)
    kw = dict(shared_input=True, relu=True)
    out = kconv.lerp_conv2d(x, wa, wd, idx, c, ba, bd, 1, 1, precision=precision, **kw)
    same = kconv.lerp_conv2d_ref(x.to(TORCH_DTYPE[precision]), wa, wd, idx, c, ba, bd, 1, 1, **kw)
    ref = kconv.lerp_conv2d_ref(x.double(), wa, wd, idx, c, ba, bd, 1, 1, dtype=torch.float64, **kw)
    _assert_within(out, same, ref, precision)


def test_lerp_conv2d_matches_functional():
    """Same contract as lerpfast.engine.functional.lerp_conv (the engine's torch path)."""
    K, J, M = 3, 1, 2
    wa, wd = _slice(M, J, (4, 3, 3, 3), seed=51)
    ba, bd = _slice(M, J, (4,), seed=52)
    idx, c = _points(K, M, J, seed=53)
    x = torch.randn(K, 2, 3, 6, 6, device=DEVICE)
    out = kconv.lerp_conv2d(x, wa, wd, idx, c, ba, bd, 1, 1, precision="fp32")
    ref = F.lerp_conv(x, F.ParamSlice(wa, wd), F.ParamSlice(ba, bd), F.Points(idx, c), 1, 1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("K,N,C,with_ref,dtype", [
    (1, 5, 10, True, torch.float32),
    (3, 37, 17, False, torch.float32),
    (17, 13, 5, True, torch.bfloat16),
    (3, 37, 97, True, torch.float32),
])
def test_point_metrics(K, N, C, with_ref, dtype):
    g = torch.Generator().manual_seed(K * N)
    z = (torch.randn(K, N, C, generator=g) * 3).to(dtype)
    z[0, 0] = 1.0  # a row of ties: rank and argmax must break them towards the lower index
    t = torch.randint(0, C, (N,), generator=g)
    r = torch.randn(N, C, generator=g).to(dtype) if with_ref else None
    z, t = z.to(DEVICE), t.to(DEVICE)
    r = r.to(DEVICE) if r is not None else None
    out = km.point_metrics(z, t, r)
    ref = km.point_metrics_ref(z, t, r)
    same = km.point_metrics_ref(z.float(), t, r.float() if r is not None else None, dtype=torch.float32)
    for name in km.METRIC_NAMES:
        assert out[name].dtype == torch.float64 and out[name].shape == (K,)
        if name in ("error", "top5_error", "disagreement"):
            assert torch.equal(out[name], ref[name]), name  # counts are exact
        else:
            _assert_within(out[name], same[name].double(), ref[name], "fp32")
    if not with_ref:
        assert (out["distance"] == 0).all() and (out["disagreement"] == 0).all()


@pytest.mark.parametrize("with_ref", [False, True])
def test_point_metrics_nonfinite_rows(with_ref):
    """The rule of lerpfast.metrics on NaN / +inf logits (issue 15 section 0): such a row is a top-1 and top-5
    error with NaN loss and distance and disagrees with the reference; -inf logits score normally. The kernel,
    its torch reference and the fp64 torch path of PointMetrics agree on every quantity."""
    from lerpfast.metrics import PointMetrics

    K, N, C = 3, 7, 11
    z = torch.zeros(K, N, C)
    z[:, :, 2] = 4.0
    t = torch.full((N,), 2, dtype=torch.long)
    z[1, 0, 5] = float("nan")  # NaN outside the target: tl.max / argmax may pick the target anyway
    z[1, 3, 2] = float("inf")  # +inf in the target class
    z[2, 4, 7] = float("-inf")  # legitimate: probability 0
    z[2, 6, :] = float("nan")
    r = torch.zeros(N, C)
    r[:, 2] = 4.0
    r[5, 0] = float("nan") if with_ref else 0.0
    r = r if with_ref else None
    out = km.point_metrics(z.to(DEVICE), t.to(DEVICE), None if r is None else r.to(DEVICE))
    ref = km.point_metrics_ref(z, t, r)
    pm = PointMetrics(K, reference=with_ref)
    pm.update(z.double(), t, None if r is None else r.double())
    oracle = {k: v.cpu() for k, v in pm.sums.items()}
    assert oracle["error"].tolist() == [0, 2, 1] and oracle["top5_error"].tolist() == [0, 2, 1]
    for name in km.METRIC_NAMES if with_ref else ("loss", "error", "top5_error"):
        for got in (out[name].cpu(), ref[name].cpu()):
            assert torch.equal(torch.isnan(got), torch.isnan(oracle[name])), (name, got, oracle[name])
            fin = ~torch.isnan(got)
            torch.testing.assert_close(got[fin], oracle[name][fin], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.isnan(oracle["loss"][1:]).all() and not torch.isnan(oracle["loss"][0])
    if with_ref:
        assert oracle["disagreement"].tolist() == [1, 3, 2] and torch.isnan(oracle["distance"]).all()


# ------------------------------------------------------------------------------------------ combine


@pytest.mark.parametrize("K,J,M", [(1, 1, 1), (3, 2, 2), (17, 3, 2), (3, 0, 2)])
def test_combine_bit_exact(K, J, M):
    """One rounding per term in order: identical to the engine's (and the oracle's) combine."""
    a, d = _slice(M, J, (5, 37), seed=K)
    idx, c = _points(K, M, max(J, 1), seed=J)
    c = c[:, :J]
    out = kc.combine(a, d, idx, c, block=64)
    assert torch.equal(out, F.combine_torch(a, d, idx, c))
    assert torch.equal(out, kc.combine_ref(a, d, idx, c))


def test_bn_fold_matches_batchnorm():
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    one = lambda t: (t.detach()[None], None)  # noqa: E731
    idx = torch.zeros(1, dtype=torch.long)
    scale, shift = bn_fold(one(bn.weight), one(bn.bias), one(bn.running_mean), one(bn.running_var), bn.eps, idx,
                           torch.zeros(1, 0))
    y = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(y * scale[0, :, None, None] + shift[0, :, None, None], bn(y), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ tiles


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_small_tiles_cover_many_blocks(monkeypatch, precision):
    """The launch tiles are a shape heuristic (lerpfast.kernels.tiles), the same under the interpreter: force 16-wide
    tiles so that rows, output channels and input channels (37 = 3 blocks) each span several blocks, 1x1 and 3x3
    filters, stride 2, the full epilogue."""
    from lerpfast.kernels import tiles
    from lerpfast.kernels.launch import Tile

    small = tiles.Choice("t", "small", Tile.of(4, 2, BLOCK_M=16, BLOCK_O=16, BLOCK_C=16))
    monkeypatch.setattr(tiles, "conv2d", lambda *a: small)
    monkeypatch.setattr(tiles, "linear", lambda *a: tiles.Choice("t", "s", Tile.of(4, 2, BLOCK_N=16, BLOCK_O=16,
                                                                                    BLOCK_I=16)))
    K, J, M, N, C, CO, H = 3, 2, 2, 2, 37, 33, 7
    idx, c = _points(K, M, J, seed=61)
    for ks, stride in ((3, 2), (1, 1)):
        wa, wd = _slice(M, J, (CO, C, ks, ks), seed=62 + ks)
        ba, bd = _slice(M, J, (CO,), seed=64)
        x = torch.randn(K, N, C, H, H, device=DEVICE)
        OH = (H + 2 * (ks // 2) - ks) // stride + 1
        kw = dict(bn=(torch.rand(K, CO, device=DEVICE) + 0.5, torch.randn(K, CO, device=DEVICE)),
                  residual=torch.randn(K, N, CO, OH, OH, device=DEVICE), relu=True)
        args = (stride, ks // 2, 1)
        out = kconv.lerp_conv2d(x, wa, wd, idx, c, ba, bd, *args, precision=precision, **kw)
        same = kconv.lerp_conv2d_ref(x.to(TORCH_DTYPE[precision]), wa, wd, idx, c, ba, bd, *args,
                                     **{**kw, "residual": kw["residual"].to(TORCH_DTYPE[precision])})
        ref = kconv.lerp_conv2d_ref(x.double(), wa, wd, idx, c, ba, bd, *args, dtype=torch.float64, **kw)
        _assert_within(out, same, ref, precision)
    wa, wd = _slice(M, J, (CO, C), seed=70)
    x = torch.randn(K, 37, C, device=DEVICE)
    out = klin.lerp_linear(x, wa, wd, idx, c, precision=precision, relu=True)
    ref = klin.lerp_linear_ref(x.double(), wa, wd, idx, c, relu=True, dtype=torch.float64)
    same = klin.lerp_linear_ref(x.to(TORCH_DTYPE[precision]), wa, wd, idx, c, relu=True)
    _assert_within(out, same, ref, precision)


def test_conv_weights_and_inputs_in_any_layout():
    """NCHW inputs and residuals are read as channels-last copies, weights once as a (.., KH, KW, C) copy: same
    result as channels-last inputs."""
    K, J, M, N, C, CO = 3, 1, 2, 2, 5, 6
    wa, wd = _slice(M, J, (CO, C, 3, 3), seed=81)
    idx, c = _points(K, M, J, seed=82)
    x = torch.randn(K, N, C, 6, 6, device=DEVICE)
    res = torch.randn(K, N, CO, 6, 6, device=DEVICE)
    a = kconv.lerp_conv2d(x, wa, wd, idx, c, None, None, 1, 1, residual=res, precision="fp32")
    xl = x.reshape(K * N, C, 6, 6).to(memory_format=torch.channels_last).view(K, N, C, 6, 6)
    b = kconv.lerp_conv2d(xl, wa, wd, idx, c, None, None, 1, 1, residual=res, precision="fp32")
    assert torch.equal(a, b)
    assert kconv._channels_last_weights(wa) is kconv._channels_last_weights(wa)  # cached per weight tensor


def test_conv_shared_input_with_unused_anchors_in_inference_mode():
    """Points that use some anchors only (a bilinear slice's chunk): the used anchors' weights are selected in
    channels-last order; weights made under inference_mode (no version counter) are not cached."""
    K, J, M, N, C, CO = 5, 1, 3, 2, 3, 7
    idx = torch.tensor([2, 2, 0, 2, 0], device=DEVICE)
    c = torch.rand(K, J, device=DEVICE)
    x = torch.randn(N, C, 6, 5, device=DEVICE)
    with torch.inference_mode():
        wa, wd = _slice(M, J, (CO, C, 3, 3), seed=91)
        out = kconv.lerp_conv2d(x, wa, wd, idx, c, None, None, 1, 1, shared_input=True, relu=True, precision="fp32")
        same = kconv.lerp_conv2d_ref(x, wa, wd, idx, c, None, None, 1, 1, shared_input=True, relu=True)
        ref = kconv.lerp_conv2d_ref(x.double(), wa, wd, idx, c, None, None, 1, 1, shared_input=True, relu=True,
                                    dtype=torch.float64)
    _assert_within(out, same, ref, "fp32")
