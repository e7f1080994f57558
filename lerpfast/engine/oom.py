"""Out-of-memory errors, recognised the same way everywhere (sweep chunk halving, dispatch, CUDA graphs).

torch raises ``torch.OutOfMemoryError`` for its caching allocator, but an allocation failure inside a library or a
kernel launch reaches Python as a plain ``RuntimeError`` whose text is all there is to go by: cuBLAS's
``CUBLAS_STATUS_ALLOC_FAILED``, cuDNN's ``CUDNN_STATUS_ALLOC_FAILED`` / ``NOT_ENOUGH_WORKSPACE``, the CUDA runtime's
``CUDA error: out of memory`` (e.g. from a Triton launch or a graph capture), and the CPU allocator's
``DefaultCPUAllocator: can't allocate memory`` / ``not enough memory``.
"""

from __future__ import annotations

import torch

__all__ = ["is_oom", "OOM_MARKERS"]

OOM_MARKERS = (
    "out of memory",  # CUDA's caching allocator and the runtime's "CUDA error: out of memory"
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "can't allocate memory",  # torch's CPU allocator
    "not enough memory",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` reports an allocation failure (GPU or CPU) that a smaller batch of points could avoid."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(m in text for m in OOM_MARKERS)
