"""Torch-only reference pieces shared by the kernels and the dispatcher (importable without triton)."""

from __future__ import annotations

import torch

__all__ = ["combine_ref_dtype", "bn_fold", "epilogue_ref"]


def combine_ref_dtype(anchors: torch.Tensor, dirs: torch.Tensor | None, anchor_idx: torch.Tensor,
                      coefs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``anchors[idx] + sum_j coefs[:, j] * dirs[j]`` computed in ``dtype`` (float64 for the oracle)."""
    out = anchors.to(dtype).index_select(0, anchor_idx)
    if dirs is None:
        return out
    view = (coefs.shape[0],) + (1,) * (anchors.dim() - 1)
    for j in range(coefs.shape[1]):
        out = out + coefs[:, j].to(dtype).reshape(view) * dirs[j].to(dtype)
    return out


def bn_fold(weight, bias, running_mean, running_var, eps: float, anchor_idx: torch.Tensor, coefs: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point eval-mode batch norm as an affine map: ``bn(y) = y * scale[k] + shift[k]``.

    Each argument is an ``(anchors (M, C), dirs (J, C) | None)`` pair (``weight`` / ``bias`` may be None for
    ``affine=False``); the statistics follow the slice like the weights (BN policy ``interpolate``; pass a
    pair without directions for ``endpoint``). Folding it into a conv is ``W' = scale * W``,
    ``b' = scale * b + shift``; the kernels apply it to the accumulator instead (one multiply per output, not
    per weight element, same result to rounding). Cost O(K*C), negligible beside the conv.

    Returns
    -------
    scale, shift : (K, C) each, in ``dtype``.
    """
    mean = combine_ref_dtype(*running_mean, anchor_idx, coefs, dtype)
    var = combine_ref_dtype(*running_var, anchor_idx, coefs, dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * combine_ref_dtype(*weight, anchor_idx, coefs, dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + combine_ref_dtype(*bias, anchor_idx, coefs, dtype)
    return scale, shift


def epilogue_ref(y: torch.Tensor, bn, residual, relu: bool, channel_dim: int = -1,
                 inplace: bool = False) -> torch.Tensor:
    """Reference epilogue on (K, N, ...) outputs: per-point per-channel BN affine, + residual, then ReLU.
    ``inplace``: the same operations, rounded the same way, written over ``y``."""
    if bn is not None:
        scale, shift = bn
        shape = [1] * y.dim()
        shape[0] = scale.shape[0]
        shape[channel_dim] = scale.shape[1]
        scale, shift = scale.to(y.dtype).reshape(shape), shift.to(y.dtype).reshape(shape)
        y = y.mul_(scale).add_(shift) if inplace else y * scale + shift
    if residual is not None:
        y = y.add_(residual.to(y.dtype)) if inplace else y + residual.to(y.dtype)
    if relu:
        y = torch.relu_(y) if inplace else torch.relu(y)
    return y
