"""Reused activation buffers for the CPU engine.

On a CPU the engine's K-point activations are large (ResNet-20 at K = 33 and 64 images: 132 MB per layer output
in the first stage). glibc serves allocations that large with a fresh ``mmap`` and returns them with ``munmap``, so
every layer of every batch pays a page fault per 4 kB page on first write: 520 k faults, about a third of a
ResNet-20 sweep's time here (`resource.getrusage` around one sweep: 520 k minor faults for the engine, 1.6 k for
the per-point loop, whose per-point tensors stay below glibc's mmap threshold and are recycled by malloc).

Inside :func:`pooled` (one sweep), :func:`empty` hands out views of buffers it keeps; a buffer is handed out again
once nothing but the pool references its storage (``torch._C._storage_Use_Count``: every view, slice or numpy
array of it holds the storage), so reuse can never alias a live tensor. A request takes the smallest idle buffer of
at least its size and at most twice it, whatever its shape. Small requests (below :data:`MIN_BYTES`, where malloc
recycles memory itself), non-CPU devices, and ``LERPFAST_CPU_BUFFERS=0`` get plain ``torch.empty``. The pool
is dropped when the sweep ends: nothing is held between sweeps.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import sys

import torch

__all__ = ["pooled", "empty", "heap_kept", "MIN_BYTES"]

MIN_BYTES = 4 << 20  # below this malloc's own free lists recycle memory without page faults
_POOL: contextvars.ContextVar[_Pool | None] = contextvars.ContextVar("lerpfast_cpu_buffers", default=None)
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it there is no pooling


def _enabled() -> bool:
    return _use_count is not None and os.environ.get("LERPFAST_CPU_BUFFERS", "1") != "0"


class _Pool:
    def __init__(self):
        self.buffers: list[torch.Tensor] = []  # flat uint8 tensors; the pool's reference is their only one when idle
        self.hits = self.misses = 0

    @staticmethod
    def _idle(buf: torch.Tensor) -> bool:
        # 2 = the pool's tensor + the storage object made here to ask
        return _use_count(buf.untyped_storage()._cdata) == 2

    def take(self, nbytes: int) -> torch.Tensor | None:
        best = None
        for buf in self.buffers:
            size = buf.numel()
            if nbytes <= size <= 2 * nbytes and (best is None or size < best.numel()) and self._idle(buf):
                best = buf
        return best

    def new(self, nbytes: int) -> torch.Tensor:
        try:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        except RuntimeError:  # out of memory: give back what is idle, then try once more
            self.buffers = [b for b in self.buffers if not self._idle(b)]
            buf = torch.empty(nbytes, dtype=torch.uint8)
        self.buffers.append(buf)
        return buf

    def held_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


@contextlib.contextmanager
def pooled():
    """Reuse large CPU activation buffers inside this block (a sweep); yields the pool (``hits``, ``misses``,
    ``held_bytes()``) or None when pooling is off. Nested blocks share the outer pool. The block also keeps freed
    memory in the process's heap (:func:`heap_kept`)."""
    if _POOL.get() is not None or not _enabled():
        yield _POOL.get()
        return
    pool = _Pool()
    token = _POOL.set(pool)
    try:
        with heap_kept():
            yield pool
    finally:
        _POOL.reset(token)
        pool.buffers.clear()


# glibc's mallopt parameters and their defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX, _MMAP_THRESHOLD_MAX = 65536, 32 << 20  # 64-bit glibc
_MAX_INT = 2**31 - 1


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def heap_kept():
    """Inside this block glibc serves large allocations from its heap and keeps what is freed there, instead of a
    fresh ``mmap`` per allocation that every first write pays for in page faults.

    The engine's elementwise results (a GELU over K points' activations, a LayerNorm's output) are tensors of tens
    of megabytes, made and freed per layer and batch; glibc maps each one afresh and unmaps it on free (a ConvNeXt
    sweep, K = 5: 50,000 minor page faults against the loop's 600, 10 % of its time). With ``mmap`` off and the
    heap's top kept (``mallopt``), a freed block serves the next layer's. On exit ``mmap`` is back (from 32 MB up,
    glibc's own ceiling for the threshold it adapts) and ``malloc_trim`` returns the freed heap to the system, so
    nothing is held after the sweep. Glibc only; off with ``LERPFAST_CPU_MALLOC=0``.
    """
    global _HEAP_DEPTH
    libc = None if _HEAP_DEPTH or os.environ.get("LERPFAST_CPU_MALLOC", "1") == "0" else _glibc()
    if libc is None:
        yield
        return
    _HEAP_DEPTH += 1
    libc.mallopt(_M_TRIM_THRESHOLD, _MAX_INT)
    libc.mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        _HEAP_DEPTH -= 1
        # mallopt ends glibc's own adjustment of the thresholds for good: leave them where that adjustment takes any
        # process that has freed a large tensor (mmap from 32 MB up, trim above twice that)
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


_HEAP_DEPTH = 0


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, from the pool where one is active (see the module)."""
    pool = _POOL.get()
    if pool is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = pool.take(nbytes)
    if buf is None:
        pool.misses += 1
        buf = pool.new(nbytes)
    else:
        pool.hits += 1
    return buf[:nbytes].view(dtype).view(tuple(shape))  # a new view: it marks the buffer busy while it lives
