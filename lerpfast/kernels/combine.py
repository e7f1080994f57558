"""Materialize K points of one tensor: ``out[k] = anchors[idx_k] + sum_j coefs[k, j] * dirs[j]`` (Triton).

The materialize-per-layer path (points' weights written once per layer, then cuBLAS bmm / cuDNN grouped
conv) needs exactly this. torch does it in 1 + 2J passes over (K, *S) (index_select, then a mul and an
add per direction); this kernel reads the M + J source tensors and writes (K, *S) once. It is compiled
without FMA contraction (``enable_fp_fusion=False``), so each term is rounded once, in order, exactly like
:func:`lerpfast.engine.functional.combine`: the fast path and the oracle build bit-identical weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lerpfast.kernels._common import points_coefs
from lerpfast.kernels.launch import Tile, kernel, launch

__all__ = ["combine", "combine_ref"]


@kernel()
def _combine_kernel(A_ptr, stride_am, D_ptr, stride_dj, IDX_ptr, C_ptr, stride_ck, Y_ptr, stride_yk, S,
                    J: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    a = tl.load(IDX_ptr + k).to(tl.int64)
    w = tl.load(A_ptr + a * stride_am + offs, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(J):
        cj = tl.load(C_ptr + k * stride_ck + j).to(tl.float32)
        w = w + cj * tl.load(D_ptr + j * stride_dj + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + k * stride_yk + offs, w.to(Y_ptr.dtype.element_ty), mask=mask)


def combine(anchors: torch.Tensor, dirs: torch.Tensor | None, anchor_idx: torch.Tensor, coefs: torch.Tensor,
            out_dtype: torch.dtype | None = None, block: int = 1024) -> torch.Tensor:
    """K points of one tensor, (K, *S), combined in fp32 (then cast to ``out_dtype``).

    Parameters
    ----------
    anchors : (M, *S) float32; dirs : (J, *S) float32 or None; anchor_idx : (K,) int64; coefs : (K, J).

    Returns
    -------
    (K, *S) in ``out_dtype`` (default float32).
    """
    if anchors.dtype != torch.float32 or (dirs is not None and dirs.dtype != torch.float32):
        raise TypeError("the Triton combine takes float32 anchors and directions (fp64 uses the torch path)")
    K = anchor_idx.shape[0]
    S = anchors[0].numel()
    J = coefs.shape[1] if dirs is not None else 0
    a2 = anchors.reshape(anchors.shape[0], S).contiguous()
    d2 = dirs.reshape(dirs.shape[0], S).contiguous() if J else a2
    c = points_coefs(coefs, J)
    out = torch.empty((K, S), dtype=out_dtype or torch.float32, device=anchors.device)
    launch(_combine_kernel, lambda b: (triton.cdiv(S, b["BLOCK"]), K),
           (a2, a2.stride(0), d2, d2.stride(0) if J else 0, anchor_idx.contiguous(), c, c.stride(0), out, out.stride(0),
            S), dict(J=J), Tile.of(4, 1, BLOCK=block))
    return out.reshape(K, *anchors.shape[1:])


def combine_ref(anchors: torch.Tensor, dirs: torch.Tensor | None, anchor_idx: torch.Tensor, coefs: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference: the oracle's formula, one rounding per term in order j = 0..J-1."""
    out = anchors.index_select(0, anchor_idx)
    if dirs is not None:
        view = (coefs.shape[0],) + (1,) * (anchors.dim() - 1)
        c = coefs.to(anchors.dtype)
        for j in range(coefs.shape[1]):
            out = out + c[:, j].reshape(view) * dirs[j]
    return out.to(out_dtype) if out_dtype is not None else out
