"""Recycled CPU activation buffers (lerpfast.engine.buffers) and the in-place torch epilogue: never an alias of a
live tensor, results bit-identical to fresh allocations, nothing held after the sweep."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import lerpfast
from lerpfast.engine import buffers
from lerpfast.kernels._ref import epilogue_ref
from lerpfast.train import models

BIG = (buffers.MIN_BYTES // 4) * 2  # fp32 elements: twice the pooling threshold


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_buffer_is_reused_only_when_nothing_references_it():
    with buffers.pooled() as pool:
        a = buffers.empty((BIG,), torch.float32, torch.device("cpu"))
        a.fill_(1.0)
        b = buffers.empty((BIG,), torch.float32, torch.device("cpu"))  # a is alive: a second buffer
        assert _ptr(a) != _ptr(b)
        keep = a[10:20]  # a view keeps the storage alive after the tensor handed out is gone
        del a
        c = buffers.empty((BIG,), torch.float32, torch.device("cpu"))
        assert _ptr(c) not in (_ptr(keep), _ptr(b))
        assert torch.all(keep == 1.0)
        arr = b.numpy()  # so does a numpy array of it
        del b, c
        d = buffers.empty((BIG,), torch.float32, torch.device("cpu"))  # c's buffer is the only idle one
        assert _ptr(d) not in (_ptr(keep), arr.__array_interface__["data"][0])
        del keep, arr, d
        e = buffers.empty((BIG // 2 + 8,), torch.float32, torch.device("cpu"))  # another shape, half the bytes
        assert pool.hits == 2 and pool.misses == 3
        assert e.shape == (BIG // 2 + 8,) and e.is_contiguous()
    assert buffers._POOL.get() is None and pool.buffers == []


def test_small_requests_other_devices_and_no_pool_get_plain_tensors():
    t = buffers.empty((BIG,), torch.float32, torch.device("cpu"))  # no pool active
    assert t.untyped_storage().nbytes() == BIG * 4
    with buffers.pooled() as pool:
        small = buffers.empty((16, 16), torch.float64, torch.device("cpu"))
        meta = buffers.empty((BIG,), torch.float32, torch.device("meta"))
        assert small.shape == (16, 16) and meta.device.type == "meta"
        assert pool.hits == pool.misses == 0


def test_pooling_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LERPFAST_CPU_BUFFERS", "0")
    with buffers.pooled() as pool:
        assert pool is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_epilogue_is_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    K, N, C, H, W = 3, 5, 7, 4, 3
    y = torch.randn(K, N, C, H, W, generator=g, dtype=dtype)
    bn = (torch.randn(K, C, generator=g, dtype=dtype), torch.randn(K, C, generator=g, dtype=dtype))
    res = torch.randn(K, N, C, H, W, generator=g, dtype=dtype)
    y[0, 0, 0, 0, 0] = float("nan")
    for args in [(bn, res, True), (bn, None, False), (None, res, True), (None, None, True), (bn, None, True)]:
        ref = epilogue_ref(y, *args, channel_dim=2)
        got = epilogue_ref(y.clone(), *args, channel_dim=2, inplace=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_sweep_with_recycled_buffers_equals_fresh_allocations(monkeypatch):
    """ResNet-20, K = 5 + reference, three batches of 32: the first two stages' outputs (12.6 and 6.3 MB) are
    recycled across layers and batches; the metrics equal those of a sweep that allocates every output afresh,
    bit for bit."""
    torch.manual_seed(0)
    shape = (3, 32, 32)
    a = models.create("resnet20", in_shape=shape).eval()
    b = models.create("resnet20", in_shape=shape).eval()
    x, y = torch.randn(96, *shape), torch.randint(0, 10, (96,))
    kw = dict(batch_size=32, progress=False, precision="fp32")
    got = lerpfast.sweep(a, (a, b), np.linspace(-0.5, 1.5, 5), (x, y), **kw)
    stats = got.meta["cpu_buffers"]
    assert stats["allocated"] >= 1 and stats["reused"] > stats["allocated"]
    monkeypatch.setenv("LERPFAST_CPU_BUFFERS", "0")
    fresh = lerpfast.sweep(a, (a, b), np.linspace(-0.5, 1.5, 5), (x, y), **kw)
    assert "cpu_buffers" not in fresh.meta
    for k in fresh.metrics:
        np.testing.assert_array_equal(got.metrics[k], fresh.metrics[k], err_msg=k)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc holds in mmap'd blocks (mallinfo2's hblkhd)."""
    libc = buffers._glibc()
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


BLOCK = 40 << 20  # above the largest mmap threshold glibc adapts to (32 MB): always a fresh mapping by default


@pytest.mark.skipif(buffers._glibc() is None, reason="glibc's mallopt (Linux)")
def test_heap_kept_serves_large_blocks_from_the_heap_and_gives_memory_back(monkeypatch):
    """Inside heap_kept a 40 MB tensor comes from the heap (no new mapping, whose pages every first write faults in)
    and a freed one serves the next; after the block what it kept went back to the system. Nested blocks are one;
    LERPFAST_CPU_MALLOC=0 leaves malloc alone."""
    with buffers.heap_kept():
        with buffers.heap_kept():  # nested: the outer block's settings stay
            assert buffers._HEAP_DEPTH == 1
        mapped = _mapped_bytes()
        for _ in range(3):
            y = torch.ones(BLOCK // 4)
            assert _mapped_bytes() < mapped + BLOCK, "a large block was mmap'd inside heap_kept"
            del y
        kept = _rss()
    assert kept - _rss() >= BLOCK // 2, (kept, _rss())  # malloc_trim returned the freed blocks
    assert buffers._HEAP_DEPTH == 0
    monkeypatch.setattr(buffers, "_glibc", lambda: pytest.fail("mallopt with LERPFAST_CPU_MALLOC=0"))
    monkeypatch.setenv("LERPFAST_CPU_MALLOC", "0")
    with buffers.heap_kept():
        assert buffers._HEAP_DEPTH == 0
