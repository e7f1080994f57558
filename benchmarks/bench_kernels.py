"""Micro benchmarks (pytest-benchmark): each multi-point kernel against its torch equivalent.

    pytest benchmarks/bench_kernels.py                        # on a GPU: real sizes, timed
    pytest benchmarks/bench_kernels.py --benchmark-disable    # CI: tiny sizes, each case run once

On a GPU the sizes are those of the layers that dominate the sweeps (LeNet-300-100's first layer with a
shared input, a ResNet-20 stage-1 conv, VGG-16 conv4, ResNet-50 logits); without one the Triton kernels
run under TRITON_INTERPRET=1 at tiny sizes, which only checks that every case runs.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
DEVICE = "cuda" if CUDA else "cpu"

from lerpfast.engine import functional as F  # noqa: E402
from lerpfast.kernels import ext  # noqa: E402

triton = pytest.importorskip("triton")
from lerpfast.kernels import combine as kc  # noqa: E402
from lerpfast.kernels import lerp_conv as kconv  # noqa: E402
from lerpfast.kernels import lerp_linear as klin  # noqa: E402
from lerpfast.kernels import point_metrics as km  # noqa: E402

# name: (K, J, M, N, IN, OUT, shared) at GPU size; CPU uses the tiny tuple
LINEAR = {
    "lenet_fc1_shared": ((64, 1, 2, 10_000, 784, 300, True), (3, 1, 2, 17, 37, 19, True)),
    "lenet_fc2": ((64, 1, 2, 10_000, 300, 100, False), (3, 1, 2, 17, 19, 11, False)),
}
# name: (K, J, M, N, C, CO, H, W, ks, stride)
CONV = {
    "resnet20_s1": ((32, 1, 2, 256, 16, 16, 32, 32, 3, 1), (2, 1, 2, 1, 3, 5, 6, 6, 3, 1)),
    "vgg16_conv4": ((16, 1, 2, 256, 256, 512, 8, 8, 3, 1), (2, 1, 2, 1, 4, 5, 5, 5, 3, 1)),
}
METRICS = {"resnet50_logits": ((64, 256, 1000), (3, 9, 10)), "cifar_logits": ((64, 1000, 10), (3, 9, 10))}
COMBINE = {"vgg16_conv4_w": ((64, 1, 2, (512, 256, 3, 3)), (3, 1, 2, (5, 4, 3, 3)))}


def _size(table, name):
    return table[name][0 if CUDA else 1]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn):
    def call():
        out = fn()
        _sync()
        return out

    return benchmark(call)


def _slice(M, J, shape):
    return torch.randn((M, *shape), device=DEVICE), (torch.randn((J, *shape), device=DEVICE) * 0.1 if J else None)


def _points(K, M, J):
    return torch.randint(0, M, (K,), device=DEVICE), torch.rand(K, J, device=DEVICE)


@pytest.mark.parametrize("impl", ["triton", "torch"] + (["cuda_ext"] if ext.available() else []))
@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_lerp_linear(benchmark, name, impl, dtype):
    K, J, M, N, IN, OUT, shared = _size(LINEAR, name)
    wa, wd = _slice(M, J, (OUT, IN))
    ba, bd = _slice(M, J, (OUT,))
    idx, c = _points(K, M, J)
    x = torch.randn(((N, IN) if shared else (K, N, IN)), device=DEVICE, dtype=dtype)
    w, b, pts = F.ParamSlice(wa, wd), F.ParamSlice(ba, bd), F.Points(idx, c)
    fns = {
        "triton": lambda: klin.lerp_linear(x, wa, wd, idx, c, ba, bd, shared_input=shared, relu=True),
        "torch": lambda: torch.relu(F.lerp_linear(x, w, b, pts, shared)),
        "cuda_ext": lambda: torch.relu(torch.ops.lerpfast.lerp_linear(x, wa, wd, ba, bd, idx, c, shared)),
    }
    out = _run(benchmark, fns[impl])
    assert out.shape == (K, N, OUT)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("name", list(CONV))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_lerp_conv2d(benchmark, name, impl, dtype):
    K, J, M, N, C, CO, H, W, ks, stride = _size(CONV, name)
    wa, wd = _slice(M, J, (CO, C, ks, ks))
    idx, c = _points(K, M, J)
    x = torch.randn(K * N, C, H, W, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    x = x.view(K, N, C, H, W)
    bn = (torch.rand(K, CO, device=DEVICE) + 0.5, torch.randn(K, CO, device=DEVICE))
    w, pts = F.ParamSlice(wa, wd), F.Points(idx, c)
    pad = ks // 2

    def torch_fn():  # what the engine does without fusion: grouped conv, then BN and ReLU passes
        y = F.lerp_conv(x, w, None, pts, stride, pad, 1, 1)
        return torch.relu(y * bn[0].to(y.dtype)[:, None, :, None, None] + bn[1].to(y.dtype)[:, None, :, None, None])

    fns = {"triton": lambda: kconv.lerp_conv2d(x, wa, wd, idx, c, None, None, stride, pad, bn=bn, relu=True),
           "torch": torch_fn}
    out = _run(benchmark, fns[impl])
    assert out.shape[:3] == (K, N, CO)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("name", list(METRICS))
def test_bench_point_metrics(benchmark, name, impl):
    from lerpfast.engine.dispatch import point_metrics_torch

    K, N, C = _size(METRICS, name)
    z = torch.randn(K, N, C, device=DEVICE)
    t = torch.randint(0, C, (N,), device=DEVICE)
    r = torch.randn(N, C, device=DEVICE)
    fns = {"triton": lambda: km.point_metrics(z, t, r), "torch": lambda: point_metrics_torch(z, t, r)}
    out = _run(benchmark, fns[impl])
    assert out["loss"].shape == (K,)


@pytest.mark.parametrize("impl", ["triton", "torch"] + (["cuda_ext"] if ext.available() else []))
@pytest.mark.parametrize("name", list(COMBINE))
def test_bench_combine(benchmark, name, impl):
    K, J, M, shape = _size(COMBINE, name)
    a, d = _slice(M, J, shape)
    idx, c = _points(K, M, J)
    fns = {"triton": lambda: kc.combine(a, d, idx, c), "torch": lambda: F.combine(a, d, idx, c),
           "cuda_ext": lambda: torch.ops.lerpfast.combine(a, d, idx, c)}
    out = _run(benchmark, fns[impl])
    assert out.shape == (K, *shape)
