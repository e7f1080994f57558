"""The CPU convolution layout (one conv per point, epilogue folded in) against float64 references."""

import pytest
import torch
import torch.nn.functional as tnf

from lerpfast.engine import dispatch
from lerpfast.engine import functional as F
from lerpfast.engine.functional import ParamSlice, Points
from lerpfast.kernels._ref import epilogue_ref

CASES = [  # nd, K, N, C, CO, spatial, kernel, stride, padding, dilation, groups
    (1, 3, 2, 4, 6, (11,), (3,), 2, 1, 1, 2),
    (2, 1, 3, 3, 5, (7, 9), (3, 3), 1, 1, 1, 1),
    (2, 17, 2, 4, 4, (5, 6), (3, 2), (2, 1), (1, 0), (1, 2), 4),
    (3, 3, 1, 2, 3, (4, 5, 3), (2, 3, 1), 1, 0, 1, 1),
    (2, 5, 3, 7, 4, (1, 1), (1, 1), 1, 0, 1, 1),  # 1x1 maps, 1x1 kernel (squeeze-excite gates): one batched GEMM
    (1, 2, 4, 5, 3, (1,), (1,), 2, "valid", 1, 1),
]


def _case(nd, K, N, C, CO, sp, ks, groups, J=2, M=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = ParamSlice(torch.randn(M, CO, C // groups, *ks, generator=g, dtype=torch.float64),
                   torch.randn(J, CO, C // groups, *ks, generator=g, dtype=torch.float64) * 0.3)
    b = ParamSlice(torch.randn(M, CO, generator=g, dtype=torch.float64),
                   torch.randn(J, CO, generator=g, dtype=torch.float64) * 0.3)
    pts = Points(torch.randint(0, M, (K,), generator=g), torch.rand(K, J, generator=g, dtype=torch.float64) * 3 - 1)
    x = torch.randn(K, N, C, *sp, generator=g, dtype=torch.float64)
    return x, w, b, pts


def _reference(x, w, b, pts, stride, padding, dilation, groups, bn=None, residual=None, relu=False):
    """float64, per point, weights built directly from the definition theta_k = a[m_k] + sum_j c_kj d_j."""
    conv = {1: tnf.conv1d, 2: tnf.conv2d, 3: tnf.conv3d}[x.dim() - 3]
    outs = []
    for k in range(x.shape[0]):
        a = int(pts.anchor_idx[k])
        wk = w.anchors[a] + (pts.coefs[k].reshape(-1, *[1] * (w.dirs.dim() - 1)) * w.dirs).sum(0)
        bk = b.anchors[a] + (pts.coefs[k][:, None] * b.dirs).sum(0)
        outs.append(conv(x[k], wk, bk, stride, padding, dilation, groups))
    return epilogue_ref(torch.stack(outs), bn, residual, relu, channel_dim=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epilogue", ["none", "bn_relu", "bn_res_relu", "res"])
def test_per_point_conv_matches_float64(case, epilogue, dtype):
    nd, K, N, C, CO, sp, ks, stride, padding, dilation, groups = case
    x, w, b, pts = _case(nd, K, N, C, CO, sp, ks, groups, seed=K + nd)
    g = torch.Generator().manual_seed(1)
    bn = (torch.rand(K, CO, generator=g, dtype=torch.float64) + 0.5,
          torch.randn(K, CO, generator=g, dtype=torch.float64)) if "bn" in epilogue else None
    ref = _reference(x, w, b, pts, stride, padding, dilation, groups)
    residual = torch.randn(ref.shape, generator=g, dtype=torch.float64) if "res" in epilogue else None
    relu = "relu" in epilogue
    ref = _reference(x, w, b, pts, stride, padding, dilation, groups, bn, residual, relu)

    def cast(t):
        return None if t is None else t.to(dtype)

    wc, bc = ParamSlice(cast(w.anchors), cast(w.dirs)), ParamSlice(cast(b.anchors), cast(b.dirs))
    pc = Points(pts.anchor_idx, cast(pts.coefs))
    bnc = None if bn is None else (cast(bn[0]), cast(bn[1]))
    got = dispatch.lerp_conv_fused(cast(x), wc, bc, pc, stride, padding, dilation, groups, bn=bnc,
                                   residual=cast(residual), relu=relu)
    assert got.shape == ref.shape and got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    err = (got.double() - ref).abs().max() / ref.abs().max().clamp_min(1)
    assert err <= tol, (epilogue, err)
    if epilogue == "none":  # the unfused entry point takes the same CPU layout
        plain = F.lerp_conv(cast(x), wc, bc, pc, stride, padding, dilation, groups)
        assert torch.equal(plain, got)
    if relu:
        assert (got >= 0).all()


@pytest.mark.parametrize("layout", ["first", "last"])
def test_gemm_form_where_it_applies(monkeypatch, layout):
    """A 1x1 conv of 1x1 maps, or at unit stride of channels-last points or of maps of at most
    GEMM_CONV_MAX_POSITIONS positions, is one batched GEMM (no convolution call), equal to the float64 reference with
    bias, residual and ReLU; padded, strided-over-a-map, grouped or 3x3 ones stay convolutions."""
    assert F.GEMM_CONV_MAX_POSITIONS == 16
    calls = []
    monkeypatch.setattr(F, "CONV", {n: (lambda *a, _f=f: calls.append(1) or _f(*a)) for n, f in F.CONV.items()})
    gemm = "last" == layout
    cases = [  # spatial, kernel, stride, padding, groups, GEMM expected
        ((1, 1), (1, 1), 2, 0, 1, True), ((1, 1), (1, 1), 1, 1, 1, False), ((1, 1), (3, 3), 1, 1, 1, False),
        ((5, 4), (1, 1), 1, 0, 1, gemm), ((5, 4), (1, 1), 1, "same", 1, gemm), ((5, 4), (1, 1), 2, 0, 1, False),
        ((5, 4), (1, 1), 1, 0, 2, False),
        ((4, 4), (1, 1), 1, 0, 1, True), ((4, 4), (1, 1), 2, 0, 1, False),  # small maps: rows copied, any layout
    ]
    for sp, ks, stride, padding, groups, expect in cases:
        calls.clear()
        x, w, b, pts = _case(2, 3, 2, 4, 6, sp, ks, groups)
        if layout == "last":
            x = x.movedim(2, -1).contiguous().movedim(-1, 2)
        ref = _reference(x, w, b, pts, stride, padding, 1, groups)
        residual = torch.randn_like(ref)
        ref = _reference(x, w, b, pts, stride, padding, 1, groups, residual=residual, relu=True)
        got = dispatch.lerp_conv_fused(x, w, b, pts, stride, padding, 1, groups, residual=residual, relu=True)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert len(calls) == (0 if expect else 3), (sp, ks, stride, padding, groups)


@pytest.mark.parametrize("epilogue", ["none", "res_relu"])
def test_channels_last_input_keeps_its_layout(epilogue):
    """Each point's block of a channels-last input (timm ConvNeXt hands its depthwise convs permuted tensors) gives a
    channels-last output block: copied into the (K, ...) result as it lies, equal to the float64 reference."""
    x, w, b, pts = _case(2, 3, 2, 6, 6, (5, 7), (3, 3), 6)
    x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # every x[k] channels-last
    assert x[0].is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ref = _reference(x, w, b, pts, 1, 1, 1, 6)
    residual = torch.randn_like(ref) if epilogue != "none" else None
    ref = _reference(x, w, b, pts, 1, 1, 1, 6, residual=residual, relu=residual is not None)
    got = dispatch.lerp_conv_fused(x, w, b, pts, 1, 1, 1, 6, residual=residual, relu=residual is not None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in got)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_linear_weights_point_by_point(monkeypatch, dtype):
    """A Linear whose one-point weight reaches CPU_POINT_WEIGHT_BYTES builds one point's weight at a time (K weight
    builds of one point each, not one of K points) and equals the float64 reference; below it, the K at once."""
    g = torch.Generator().manual_seed(3)
    K, N, n_in, n_out, M, J = 4, 5, 7, 9, 2, 2
    w = ParamSlice(torch.randn(M, n_out, n_in, generator=g, dtype=torch.float64),
                   torch.randn(J, n_out, n_in, generator=g, dtype=torch.float64) * 0.3)
    b = ParamSlice(torch.randn(M, n_out, generator=g, dtype=torch.float64),
                   torch.randn(J, n_out, generator=g, dtype=torch.float64) * 0.3)
    pts = Points(torch.tensor([0, 1, 1, 0]), torch.rand(K, J, generator=g, dtype=torch.float64) * 3 - 1)
    x = torch.randn(K, N, n_in, generator=g, dtype=torch.float64)
    ref = torch.stack([x[k] @ (w.anchors[pts.anchor_idx[k]] + (pts.coefs[k, :, None, None] * w.dirs).sum(0)).T
                       + b.anchors[pts.anchor_idx[k]] + (pts.coefs[k, :, None] * b.dirs).sum(0) for k in range(K)])
    built = []
    real = F.combine
    monkeypatch.setattr(F, "combine", lambda a, d, idx, c: built.append(len(idx)) or real(a, d, idx, c))
    cast = (lambda t: t.to(dtype))
    args = (cast(x), ParamSlice(cast(w.anchors), cast(w.dirs)), ParamSlice(cast(b.anchors), cast(b.dirs)),
            Points(pts.anchor_idx, cast(pts.coefs)))
    for limit, weight_builds in ((1, [1] * K), (1 << 30, [K])):
        monkeypatch.setattr(F, "CPU_POINT_WEIGHT_BYTES", limit)
        built.clear()
        with torch.inference_mode():
            got = F.lerp_linear(*args)
        torch.testing.assert_close(got.double(), ref, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=1e-12
                                   if dtype == torch.float64 else 2e-6)
        assert built == weight_builds + [K], built  # then the K biases at once
