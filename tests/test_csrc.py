"""The C++ extension lerpfast._C: CPU ops through torch.ops.lerpfast, against the engine's torch ops.

CI builds the extension (``python setup.py build_ext --inplace`` or the editable install) and sets
LERPFAST_REQUIRE_EXT=1, so a missing build fails there instead of skipping.
"""

import os

import pytest
import torch

from lerpfast.engine import functional as F
from lerpfast.kernels import ext

if not ext.available():
    if os.environ.get("LERPFAST_REQUIRE_EXT") == "1":
        raise RuntimeError("lerpfast._C is not built but LERPFAST_REQUIRE_EXT=1")
    pytest.skip("lerpfast._C is not built (python setup.py build_ext --inplace)", allow_module_level=True)

ops = torch.ops.lerpfast


def _slice(M, J, shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((M, *shape), generator=g, dtype=torch.float64).to(dtype)
    d = (torch.randn((J, *shape), generator=g, dtype=torch.float64) * 0.3).to(dtype) if J else None
    return a, d


def _points(K, M, J, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, M, (K,), generator=g), torch.rand((K, J), generator=g) * 3 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("K,J,M", [(1, 1, 1), (3, 2, 2), (17, 3, 2), (3, 0, 2)])
@pytest.mark.parametrize("shape", [(97,), (5, 37), (3, 5, 3, 3)])
def test_combine_cpu_bit_identical_to_engine(K, J, M, shape, dtype):
    a, d = _slice(M, J, shape, dtype, seed=K + J)
    idx, c = _points(K, M, J, seed=M)
    out = ops.combine(a, d, idx, c)
    assert out.shape == (K, *shape) and out.dtype == dtype
    assert torch.equal(out, F.combine_torch(a, d, idx, c))


def test_engine_combine_uses_the_cpu_op_where_it_may(monkeypatch):
    """On the CPU the engine's combine calls the one-pass op (same bits as combine_torch); with a gradient to record,
    J >= MATMUL_MIN_J, dtypes that differ, or LERPFAST_CPU_COMBINE=0 it keeps torch's ops."""
    calls = []
    real = F._cpu_combine_op()
    monkeypatch.setattr(F, "_cpu_combine_op", lambda: (lambda *a: calls.append(1) or real(*a)))
    a, d = _slice(2, 2, (7, 33), seed=3)
    idx, c = _points(5, 2, 2, seed=3)
    assert torch.equal(F.combine(a, d, idx, c), F.combine_torch(a, d, idx, c)) and len(calls) == 1
    dg = d.clone().requires_grad_(True)
    out = F.combine(a, dg, idx, c)
    out.sum().backward()  # autograd through torch's ops
    assert len(calls) == 1 and torch.allclose(dg.grad, c.sum(0)[:, None, None].expand_as(d))
    F.combine(a, d.double(), idx, c)
    a5, d5 = _slice(1, F.MATMUL_MIN_J, (7, 33), seed=4)
    F.combine(a5, d5, torch.zeros(3, dtype=torch.long), torch.rand(3, F.MATMUL_MIN_J))
    assert len(calls) == 1
    monkeypatch.undo()
    monkeypatch.setenv("LERPFAST_CPU_COMBINE", "0")
    assert F._cpu_combine_op() is None


def test_combine_large_tensor_parallel_chunks():
    """More elements than one 4096-element chunk, K = 1: the chunked parallel loop covers every element."""
    a, d = _slice(2, 2, (3, 5000), seed=4)
    idx, c = torch.tensor([1]), torch.tensor([[0.25, -1.5]])
    assert torch.equal(ops.combine(a, d, idx, c), F.combine_torch(a, d, idx, c))


def test_combine_endpoints_exact():
    a, d = _slice(2, 1, (37, 5), seed=5)
    out = ops.combine(a, d, torch.tensor([0, 1]), torch.zeros(2, 1))
    assert torch.equal(out[0], a[0]) and torch.equal(out[1], a[1])


def test_combine_checks_arguments():
    """The checks every kernel of combine shares (csrc/checks.h): the CUDA kernel runs the same before launching."""
    a, d = _slice(2, 1, (5,))
    with pytest.raises(RuntimeError, match=r"anchor_idx holds 2, outside \[0, 2\)"):
        ops.combine(a, d, torch.tensor([0, 2]), torch.zeros(2, 1))
    with pytest.raises(RuntimeError, match=r"anchor_idx holds -1, outside \[0, 2\)"):
        ops.combine(a, d, torch.tensor([-1, 1]), torch.zeros(2, 1))
    with pytest.raises(RuntimeError, match="int64"):
        ops.combine(a, d, torch.tensor([0], dtype=torch.int32), torch.zeros(1, 1))
    with pytest.raises(RuntimeError, match="2 coefficient columns but only 1 dirs"):
        ops.combine(a, d, torch.tensor([0]), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="must be on one device"):
        ops.combine(a.to("meta"), d.to("meta"), torch.tensor([0]), torch.zeros(1, 1, device="meta"))
    with pytest.raises(RuntimeError, match="differ in dtype"):
        ops.combine(a, d.double(), torch.tensor([0]), torch.zeros(1, 1))


def test_cuda_combine_runs_the_shared_checks():
    """The CUDA kernel cannot run here: its source must call the shared checks before any launch (an unchecked
    index is an illegal address that kills the process, not an error)."""
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "csrc" / "lerpfast_cuda.cu").read_text()
    body = src[src.index("at::Tensor combine_cuda("):src.index("<<<")]
    assert "check_points(anchors, dirs, anchor_idx, coefs);" in body and "check_index_range(anchor_idx" in body


def test_combine_meta_shapes():
    a, d = _slice(2, 2, (5, 7))
    out = ops.combine(a.to("meta"), d.to("meta"), torch.zeros(4, dtype=torch.long, device="meta"),
                      torch.zeros(4, 2, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 5, 7)


@pytest.mark.parametrize("K,J,M,N,IN,OUT", [(1, 1, 1, 5, 37, 97), (3, 2, 2, 37, 97, 5), (17, 3, 2, 5, 37, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lerp_linear_cpu(K, J, M, N, IN, OUT, with_bias):
    wa, wd = _slice(M, J, (OUT, IN), seed=K)
    ba, bd = _slice(M, J, (OUT,), seed=K + 1) if with_bias else (None, None)
    idx, c = _points(K, M, J, seed=N)
    w, b, pts = F.ParamSlice(wa, wd), (F.ParamSlice(ba, bd) if with_bias else None), F.Points(idx, c)
    x = torch.randn(K, N, IN)
    assert torch.equal(ops.lerp_linear(x, wa, wd, ba, bd, idx, c, False), F.lerp_linear(x, w, b, pts))
    xs = torch.randn(N, IN)
    ref64 = F.lerp_linear(xs.double(), F.ParamSlice(wa.double(), wd.double()),
                          F.ParamSlice(ba.double(), bd.double()) if with_bias else None, F.Points(idx, c.double()),
                          shared_input=True)
    out = ops.lerp_linear(xs, wa, wd, ba, bd, idx, c, True)
    torch.testing.assert_close(out.double(), ref64, rtol=1e-5, atol=1e-5)


def test_ops_compose_with_torch_compile():
    """Dynamo + AOT tracing see the custom ops (fake tensors from the composite kernel), fullgraph."""
    wa, wd = _slice(2, 2, (7, 5), seed=9)
    ba, bd = _slice(2, 2, (7,), seed=10)
    idx, c = _points(3, 2, 2)

    def layer(x):
        return torch.relu(ops.lerp_linear(x, wa, wd, ba, bd, idx, c, False)) * 2

    x = torch.randn(3, 4, 5)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_combine_cuda_bit_identical():
    if not ext.has_cuda_kernels():
        pytest.skip("lerpfast._C built without CUDA kernels")
    a, d = _slice(2, 3, (64, 129), seed=3)
    idx, c = _points(17, 2, 3)
    a, d, idx, c = a.cuda(), d.cuda(), idx.cuda(), c.cuda()
    assert torch.equal(ops.combine(a, d, idx, c), F.combine_torch(a, d, idx, c))
