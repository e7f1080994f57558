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
