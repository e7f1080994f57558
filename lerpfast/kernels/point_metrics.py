"""Fused per-point reductions of logits: loss sum, top-1 / top-5 errors, softmax distance, disagreement.

One pass over (K, N, C) logits replaces ~8 torch kernels (log_softmax, gather, topk, argmax x2, softmax x2,
sub/pow/sum), each of which re-reads the K*N*C logits: at ResNet-50 sizes (K = 64, N = 256, C = 1000,
bf16) that is 33 MB per pass. Each program reduces BLOCK_N rows of one point and writes five fp32 partial
sums; the partials are summed in float64 on the host side of the kernel, so the result is exact for the
counts and accumulates the loss in float64 across blocks.

Definitions (shared with :func:`point_metrics_ref`):

* loss: cross-entropy sum, ``logsumexp(z) - z[target]``;
* rank of the target: ``#{c: z_c > z_t} + #{c < t: z_c == z_t}`` (ties broken towards the lower index, as
  ``argmax`` does); top-1 error = rank >= 1, top-5 error = rank >= 5;
* distance: ``||softmax(z) - softmax(z_ref)||^2`` summed over rows (Im et al. 2016, eq. 4.1, before mean/sqrt);
* disagreement: ``argmax(z) != argmax(z_ref)`` (first index among ties).

Non-finite logits (the rule of :mod:`lerpfast.metrics`): a row holding a NaN or a +inf counts as a top-1 and
top-5 error, its loss is NaN and, against a reference, its distance is NaN and it disagrees (likewise a
reference row holding a NaN or +inf). Tested explicitly because ``tl.max`` may drop NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lerpfast.kernels._common import INTERPRET
from lerpfast.kernels.launch import Tile, kernel, launch

__all__ = ["point_metrics", "point_metrics_ref", "METRIC_NAMES"]

METRIC_NAMES = ("loss", "error", "top5_error", "distance", "disagreement")
_MAX_CLASSES = 8192  # one row per register tile; above this the dispatcher uses the torch path


@triton.jit
def _first_argmax(z, cols, BLOCK_C: tl.constexpr):
    """Index of the first maximum of each row (explicit so the tie rule does not depend on tl.argmax)."""
    zmax = tl.max(z, axis=1)
    cand = tl.where(z == zmax[:, None], cols[None, :], BLOCK_C)
    return tl.min(cand, axis=1), zmax


@kernel("N", "stride_zk", "stride_ok")  # batch-dependent sizes: one compile for every batch size
def _point_metrics_kernel(
    Z_ptr, stride_zk, stride_zn, stride_zc,
    T_ptr,
    R_ptr, stride_rn, stride_rc,
    OUT_ptr, stride_ok, stride_ob,
    N, C,
    HAS_REF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    rn = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    mask_n = rn < N
    mask_c = cols < C
    mask = mask_n[:, None] & mask_c[None, :]
    z = tl.load(Z_ptr + k * stride_zk + rn[:, None] * stride_zn + cols[None, :] * stride_zc, mask=mask,
                other=-float("inf")).to(tl.float32)
    z = tl.where(mask_n[:, None], z, 0.0)  # padded rows: finite, masked out of every sum below
    t = tl.load(T_ptr + rn, mask=mask_n, other=0).to(tl.int64)
    bad_z = tl.max(((z != z) | (z == float("inf"))).to(tl.int32), axis=1) > 0  # NaN / +inf row (docstring)

    zmax = tl.max(z, axis=1)
    ez = tl.exp(z - zmax[:, None])
    sz = tl.sum(ez, axis=1)
    lse = zmax + tl.log(sz)
    zt = tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
    loss = tl.where(mask_n, tl.where(bad_z, float("nan"), lse - zt), 0.0)
    above = (z > zt[:, None]) | ((z == zt[:, None]) & (cols[None, :] < t[:, None]))
    rank = tl.sum(above.to(tl.int32), axis=1)
    err1 = tl.where(mask_n & ((rank >= 1) | bad_z), 1.0, 0.0)
    err5 = tl.where(mask_n & ((rank >= 5) | bad_z), 1.0, 0.0)

    o = OUT_ptr + k * stride_ok + pid_b * stride_ob
    tl.store(o + 0, tl.sum(loss, axis=0))
    tl.store(o + 1, tl.sum(err1, axis=0))
    tl.store(o + 2, tl.sum(err5, axis=0))
    if HAS_REF:
        r = tl.load(R_ptr + rn[:, None] * stride_rn + cols[None, :] * stride_rc, mask=mask,
                    other=-float("inf")).to(tl.float32)
        r = tl.where(mask_n[:, None], r, 0.0)
        bad = bad_z | (tl.max(((r != r) | (r == float("inf"))).to(tl.int32), axis=1) > 0)
        am_z, _ = _first_argmax(z, cols, BLOCK_C)
        am_r, rmax = _first_argmax(r, cols, BLOCK_C)
        er = tl.exp(r - rmax[:, None])
        p = ez / sz[:, None]
        q = er / tl.sum(er, axis=1)[:, None]
        d = tl.where(mask, (p - q) * (p - q), 0.0)
        dist = tl.where(mask_n, tl.where(bad, float("nan"), tl.sum(d, axis=1)), 0.0)
        dis = tl.where(mask_n & ((am_z != am_r) | bad), 1.0, 0.0)
        tl.store(o + 3, tl.sum(dist, axis=0))
        tl.store(o + 4, tl.sum(dis, axis=0))
    else:
        tl.store(o + 3, 0.0)
        tl.store(o + 4, 0.0)


def point_metrics(logits: torch.Tensor, target: torch.Tensor, ref_logits: torch.Tensor | None = None,
                  block_n: int | None = None) -> dict[str, torch.Tensor]:
    """Per-point sums over the N rows of one batch (Triton).

    Parameters
    ----------
    logits : (K, N, C), any float dtype (reduced in fp32).
    target : (N,) int class indices in [0, C).
    ref_logits : (N, C) logits of the reference point, or None (distance / disagreement are then 0).

    Returns
    -------
    dict of float64 (K,) tensors: ``loss`` (sum), ``error``, ``top5_error``, ``distance``, ``disagreement``
    (counts / sums over the batch; divide by the number of rows seen for means).
    """
    K, N, C = logits.shape
    if C > _MAX_CLASSES:
        raise ValueError(f"fused metrics take at most {_MAX_CLASSES} classes, got {C}")
    BLOCK_C = max(16, triton.next_power_of_2(C))
    if block_n is None:
        # ~4k fp32 logits per tile (x2 with a reference) keeps registers in bounds: 4 rows at C = 1000 (8 rows
        # spilled 8 B at 255 registers for sm_90; 4 rows: 133, no spill; tests/test_kernel_quality.py).
        block_n = 4 if INTERPRET else max(1, min(64, 4096 // BLOCK_C))
    nb = triton.cdiv(N, block_n)
    partial = torch.empty((K, nb, 5), dtype=torch.float32, device=logits.device)
    target = target.contiguous()
    ref = ref_logits if ref_logits is not None else logits[0]
    launch(_point_metrics_kernel, lambda b: (nb, K),
           (logits, *logits.stride(), target, ref, ref.stride(0), ref.stride(1), partial, partial.stride(0),
            partial.stride(1), N, C), dict(HAS_REF=ref_logits is not None),
           Tile.of(4, 1, BLOCK_N=block_n, BLOCK_C=BLOCK_C))
    sums = partial.to(torch.float64).sum(1)  # (K, 5)
    return {name: sums[:, i] for i, name in enumerate(METRIC_NAMES)}


def point_metrics_ref(logits: torch.Tensor, target: torch.Tensor, ref_logits: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Torch reference of :func:`point_metrics` (float64 by default)."""
    z = logits.to(dtype)
    K, N, C = z.shape
    t = target.long()
    logp = torch.log_softmax(z, dim=-1)
    loss = -logp.gather(2, t.view(1, N, 1).expand(K, N, 1)).squeeze(2).sum(1)
    zt = z.gather(2, t.view(1, N, 1).expand(K, N, 1))
    cols = torch.arange(C, device=z.device)
    above = (z > zt) | ((z == zt) & (cols.view(1, 1, C) < t.view(1, N, 1)))
    rank = above.sum(2)
    bad = (torch.isnan(z) | torch.isposinf(z)).any(-1)  # (K, N): NaN / +inf rows (module docstring)
    loss = loss + torch.where(bad, float("nan"), 0.0).sum(1)
    out = {"loss": loss, "error": ((rank >= 1) | bad).sum(1).to(dtype),
           "top5_error": ((rank >= 5) | bad).sum(1).to(dtype)}
    if ref_logits is not None:
        r = ref_logits.to(dtype)
        bad = bad | (torch.isnan(r) | torch.isposinf(r)).any(-1)[None]
        p, q = torch.softmax(z, -1), torch.softmax(r, -1)
        out["distance"] = torch.where(bad, float("nan"), ((p - q[None]) ** 2).sum(2)).sum(1)
        out["disagreement"] = ((z.argmax(-1) != r.argmax(-1)[None]) | bad).sum(1).to(dtype)
    else:
        out["distance"] = torch.zeros(K, dtype=dtype, device=z.device)
        out["disagreement"] = torch.zeros(K, dtype=dtype, device=z.device)
    return out
