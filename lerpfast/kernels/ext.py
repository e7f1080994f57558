"""Loader of the C++ extension ``lerpfast._C`` (csrc/), whose ops live in ``torch.ops.lerpfast``.

Ops (schemas in csrc/lerpfast_ops.cpp):

* ``torch.ops.lerpfast.combine(anchors, dirs, anchor_idx, coefs) -> (K, *S)``: CPU hand kernel, CUDA kernel
  when compiled, ATen composite elsewhere (and for Meta / fake tensors under torch.compile);
* ``torch.ops.lerpfast.lerp_linear(x, w_anchors, w_dirs, b_anchors, b_dirs, anchor_idx, coefs, shared_input)``.

The extension is optional: a source checkout without ``python setup.py build_ext --inplace`` (or an install
without torch at build time) simply has no ``lerpfast._C``, and every caller falls back to torch.
"""

from __future__ import annotations

import functools
import importlib

__all__ = ["load", "available", "has_cuda_kernels"]


@functools.lru_cache(maxsize=1)
def load():
    """Import ``lerpfast._C`` (registering ``torch.ops.lerpfast``) and return it, or None when it is not built."""
    try:
        return importlib.import_module("lerpfast._C")
    except ImportError:
        return None


def available() -> bool:
    """True when the extension is built and its ops are registered."""
    return load() is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    mod = load()
    return bool(mod is not None and mod.has_cuda_kernels())
