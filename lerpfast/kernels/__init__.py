"""Triton kernels of the multi-point engine, each with a torch reference (``*_ref``) beside it.

Modules (imported on demand: importing ``lerpfast.kernels`` itself never imports triton):

* ``lerp_linear``: fused multi-point linear (grouped GEMM, weights built in registers), shared-input form,
  BN-fold / residual / ReLU epilogue, and ``lerp_mix`` (per-point mixing of shared basis products);
* ``lerp_conv``: fused multi-point conv2d, implicit GEMM on channels-last activations, same epilogue;
* ``point_metrics``: fused per-point loss / top-1 / top-5 / distance / disagreement reductions;
* ``combine``: one-pass materialization of K points of a tensor (for the materialize + cuBLAS path).

On a CPU-only machine they run under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import functools
import importlib.util

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton is installed (it may still lack a GPU; the interpreter then needs TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
