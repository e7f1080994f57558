"""Engine epilogue fusion (lerpfast/engine/fusion.py): conv / linear -> eval BN -> (+ residual) -> ReLU chains.

The fused model must compute the unfused model's function: sweeps with fuse=True equal fuse=False and the
per-point loop oracle (float64 to 1e-10, fp32 to 1e-5), under the BN policies that make BN an affine map; under
'recompute' nothing is fused. The pattern finder is checked on hand-written models with every spelling of
ReLU / add it accepts, and on the cases it must refuse (shared intermediates, `other += bn_out`, broadcasting
residuals, untraceable control flow). Under LERPFAST_BACKEND=triton + TRITON_INTERPRET=1 the fused Triton
kernels run inside the engine (tiny shapes: the interpreter is slow).
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (as tests/test_kernels.py does)

from lerpfast import sweep  # noqa: E402
from lerpfast.engine import dispatch  # noqa: E402
from lerpfast.engine.fusion import FusedChain, resolve_fuse  # noqa: E402
from lerpfast.engine.model import MultiPointModel  # noqa: E402
from lerpfast.geometry import as_slice  # noqa: E402
from lerpfast.train import models as zoo  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_sweep import VGGish, _images, _perturb, _with_stats, assert_match  # noqa: E402

CASES = {
    "resnet20": lambda: (_with_stats(zoo.create("resnet20", num_classes=10, in_shape=(3, 8, 8)), 0),
                         _images(9, (3, 8, 8), 10)),
    "vgg_bn": lambda: (_with_stats(VGGish(), 0), _images(9, (3, 8, 8), 10)),  # conv and Linear-BN1d-ReLU chains
    "vgg11_bn": lambda: (_with_stats(zoo.create("vgg11", num_classes=10, in_shape=(3, 8, 8), width=0.125), 0),
                         _images(9, (3, 8, 8), 10)),
}
# chains the finder must see: ResNet-20 = stem + 9 blocks x 2 + 2 projection shortcuts; VGGish 3 conv + 1 linear
N_CHAINS = {"resnet20": 21, "vgg_bn": 4, "vgg11_bn": 8}


def _make(case):
    torch.manual_seed(0)
    model, data = CASES[case]()
    return model.eval(), _perturb(model, 1), data


pytestmark = pytest.mark.usefixtures("clean_dispatch")


# ---------------------------------------------------------------------------------------------------------------
# sweeps: fused == unfused == oracle


@pytest.mark.parametrize("bn", ["interpolate", "endpoint", "endpoint:1", "recompute"])
@pytest.mark.parametrize("K", [1, 3, 17])
@pytest.mark.parametrize("case", ["resnet20", "vgg_bn"])
def test_fused_sweep_equals_unfused_and_oracle(case, K, bn):
    model, theta_b, data = _make(case)
    calib = _images(10, data[0].shape[1:], 10, seed=7)
    alphas = np.linspace(-0.25, 1.25, K) if K > 1 else [0.35]
    kw = dict(bn=bn, bn_data=calib, batch_size=5)
    for precision, rtol in (("fp64", 1e-10), ("fp32", 1e-5)):
        fused = sweep(model, (model, theta_b), alphas, data, precision=precision, fuse=True, **kw)
        plain = sweep(model, (model, theta_b), alphas, data, precision=precision, fuse=False, **kw)
        assert_match(fused, plain, rtol, discrete_atol=0 if precision == "fp64" else 1.01 / len(data[1]))
        info = fused.meta["fusion"]
        if bn == "recompute":  # batch statistics: BN is no affine map, the unfused path runs
            assert info["chains"] == 0 and info["calls"] == {"fused": 0, "partial": 0, "unfused": 0}
            assert info["mode"] is True and "recompute" in info["reason"]
        else:
            assert info["chains"] == N_CHAINS[case] and info["enabled"]
            assert info["calls"]["fused"] > 0 and info["calls"]["partial"] == info["calls"]["unfused"] == 0
        assert plain.meta["fusion"]["chains"] == 0 and plain.meta["fusion"]["enabled"] is False
    if K == 3 or bn == "recompute":  # the loop oracle, float64 (the slow part: a subset of the grid)
        oracle = sweep(model, (model, theta_b), alphas, data, precision="fp64", method="loop", **kw)
        fused64 = sweep(model, (model, theta_b), alphas, data, precision="fp64", fuse=True, **kw)
        assert_match(fused64, oracle, 1e-10)
    assert fused.loss.std() > 0 or K == 1


def test_zoo_vgg_fused_matches_oracle():
    model, theta_b, data = _make("vgg11_bn")
    alphas = [-0.3, 0.0, 0.6, 1.0]
    for bn in ("interpolate", "endpoint:1"):
        fused = sweep(model, (model, theta_b), alphas, data, precision="fp64", bn=bn, fuse=True, batch_size=5)
        oracle = sweep(model, (model, theta_b), alphas, data, precision="fp64", bn=bn, method="loop", batch_size=5)
        assert_match(fused, oracle, 1e-10)
        assert fused.meta["fusion"]["chains"] == N_CHAINS["vgg11_bn"]


def test_fused_ops_really_run(monkeypatch):
    """The fused chains call the fused dispatch ops with the BN fold, the residual and ReLU."""
    seen = []
    real = dispatch.lerp_conv_fused

    def spy(*a, **k):
        flags = (k.get("bn") is not None, k.get("residual") is not None, k.get("relu", False))
        if any(flags):  # dispatch.lerp_conv (unfused) calls lerp_conv_fused without an epilogue
            seen.append(flags)
        return real(*a, **k)

    monkeypatch.setattr(dispatch, "lerp_conv_fused", spy)
    model, theta_b, data = _make("resnet20")
    sweep(model, (model, theta_b), [0.5], data, fuse=True, batch_size=9, reference=None)
    assert seen.count((True, True, True)) == 9  # conv2 + bn2 + add + relu of each block
    assert seen.count((True, False, True)) == 10  # stem and conv1 of each block
    assert seen.count((True, False, False)) == 2  # projection shortcuts: conv + bn
    seen.clear()
    sweep(model, (model, theta_b), [0.5], data, fuse=True, bn="recompute", bn_data=data, batch_size=9, reference=None)
    assert seen == []
    sweep(model, (model, theta_b), [0.5], data, batch_size=9, reference=None)  # "auto" fuses on the CPU too
    assert len(seen) == 21
    seen.clear()
    sweep(model, (model, theta_b), [0.5], data, fuse=False, batch_size=9, reference=None)
    assert seen == []


def test_fuse_argument_validated_and_auto_is_on_for_cpu():
    model, theta_b, data = _make("vgg_bn")
    with pytest.raises(ValueError, match="fuse="):
        sweep(model, (model, theta_b), [0.5], data, fuse="yes")
    r = sweep(model, (model, theta_b), [0.5], data)
    assert r.meta["fusion"]["mode"] == "auto" and r.meta["fusion"]["enabled"] is True
    assert resolve_fuse("auto", torch.device("meta")) is False


# ---------------------------------------------------------------------------------------------------------------
# the pattern finder on hand-written models: MultiPointModel fused vs unfused vs per-point plain model


def _points_outputs(model, theta_b, x, alphas, fuse, dtype=torch.float64):
    aff = as_slice((model, theta_b), alphas).resolve([model.state_dict(), theta_b], model, dtype)
    mp = MultiPointModel(model, aff, fuse=fuse)
    mp.set_points(aff.points(np.arange(len(alphas))))
    with torch.inference_mode():
        out = mp(x.to(dtype), x.shape[0])
    return out, mp, aff


def _oracle(model, aff, x, dtype=torch.float64):
    import copy

    net = copy.deepcopy(model).to(dtype).eval()
    outs = []
    with torch.inference_mode():
        for k in range(aff.K):
            net.load_state_dict(aff.state_dict(k))
            outs.append(net(x.to(dtype)))
    return torch.stack(outs)


def _check(model, x, n_chains, alphas=(-0.2, 0.0, 0.45, 1.0, 1.3)):
    model = _with_stats(model, 0).eval()
    theta_b = _perturb(model, 1)
    fused, mp, aff = _points_outputs(model, theta_b, x, list(alphas), True)
    plain, mp0, _ = _points_outputs(model, theta_b, x, list(alphas), False)
    oracle = _oracle(model, aff, x)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, oracle, rtol=1e-10, atol=1e-12)
    f32, _, _ = _points_outputs(model, theta_b, x, list(alphas), True, torch.float32)
    p32, _, _ = _points_outputs(model, theta_b, x, list(alphas), False, torch.float32)
    torch.testing.assert_close(f32, p32, rtol=1e-5, atol=1e-5 * p32.abs().max().item())
    assert mp0.fusion_report()["chains"] == 0
    report = mp.fusion_report()
    assert report["chains"] == n_chains, report
    return report


class Spellings(nn.Module):
    """Every accepted spelling of ReLU and add, in place or not."""

    def __init__(self):
        super().__init__()
        c = 6
        self.c1, self.b1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c3, self.b3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c4, self.b4 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c5 = nn.Conv2d(c, c, 1)
        self.c6, self.b6 = nn.Conv2d(c, c, 3, stride=2, padding=1, padding_mode="reflect"), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.fc1, self.bn1d = nn.Linear(c, 8), nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu_(self.b1(self.c1(x)))  # conv+bn+relu_
        y = self.b2(self.c2(h))
        y += h  # iadd on the BN output
        h = self.relu(y)  # nn.ReLU(inplace=True)
        h = F.relu(torch.add(h, self.b3(self.c3(h))), inplace=True)  # torch.add(other, bn_out)
        h = self.b4(self.c4(h)).add(h).relu()  # Tensor.add / Tensor.relu
        h = F.relu(self.c5(h) + h)  # conv (bias) + add + relu, no BN
        h = (self.b6(self.c6(h)) + h[:, :, ::2, ::2]).relu_()  # reflect padding, stride 2: output shape computed
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc2(F.relu(self.bn1d(self.fc1(h))))  # linear+bn1d+relu


def test_every_spelling_is_fused():
    rep = _check(Spellings(), torch.randn(4, 3, 7, 7), 7)
    assert rep["calls"] == {"fused": 7, "partial": 0, "unfused": 0}  # every residual taken by the fused op
    assert rep["fused"] == ["c1+b1+relu", "c2+b2+add+relu", "c3+b3+add+relu", "c4+b4+add+relu", "c5+add+relu",
                            "c6+b6+add+relu", "fc1+bn1d+relu"]
    assert rep["untraced"] == {}


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation layer (its name and layout: the engine runs it as MPBatchNormAct)."""

    def __init__(self, c, act):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class EfficientNetLike(nn.Module):
    """timm EfficientNet's pattern: conv + BatchNormAct(SiLU), conv + BatchNormAct(ReLU), a squeeze-excite gate of 1x1
    convolutions on 1x1 maps, conv + BatchNormAct(identity) + residual; one BatchNormAct whose dropout ends nothing."""

    def __init__(self):
        super().__init__()
        c = 6
        self.c1, self.n1 = nn.Conv2d(3, c, 3, padding=1, bias=False), BatchNormAct2d(c, nn.SiLU())
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), BatchNormAct2d(c, nn.ReLU())
        self.se1, self.se2 = nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1)
        self.c3, self.n3 = nn.Conv2d(c, c, 1, bias=False), BatchNormAct2d(c, nn.Identity())
        self.c4, self.n4 = nn.Conv2d(c, c, 3, padding=1, bias=False), BatchNormAct2d(c, nn.GELU())
        self.n4.drop = nn.Dropout(0.5)  # eval: the identity, but not a known one: the chain stops before it
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        h = self.n1(self.c1(x))
        y = self.n2(self.c2(h))
        y = y * torch.sigmoid(self.se2(F.silu(self.se1(y.mean((2, 3), keepdim=True)))))
        h = self.n3(self.c3(y)) + h
        h = self.n4(self.c4(h))
        return self.head(h.mean((2, 3)))


def test_timm_batchnorm_act_is_fused():
    """BatchNormAct folds into its conv: SiLU after the fused op, ReLU inside it, an identity act lets the residual
    join; a non-identity drop keeps the act outside (still folded). The SE gate's 1x1 convs run as GEMMs."""
    rep = _check(EfficientNetLike(), torch.randn(4, 3, 6, 5), 4)
    assert rep["fused"] == ["c1+n1", "c2+n2", "c3+n3+add", "c4+n4"]
    assert rep["calls"] == {"fused": 4, "partial": 0, "unfused": 0}
    model = _with_stats(EfficientNetLike(), 0).eval()
    _, mp, _ = _points_outputs(model, _perturb(model, 1), torch.randn(2, 3, 6, 5), [0.3, 0.8], True)
    chains = {c.name: (c.bn_relu, c.post is not None) for c in mp.net.modules() if isinstance(c, FusedChain)}
    assert chains == {"c1+n1": (False, True), "c2+n2": (True, False), "c3+n3+add": (False, False),
                      "c4+n4": (False, True)}


class Refused(nn.Module):
    """Chains that must stop early: shared intermediates, `other += bn_out`, a broadcasting residual,
    BatchNorm1d on a Linear's 3-d output (runtime: unfused), relu on a value used twice."""

    def __init__(self):
        super().__init__()
        c = 4
        self.c1, self.b1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c3, self.b3 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c4, self.b4 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc, self.bn = nn.Linear(5, c), nn.BatchNorm1d(c)
        self.head = nn.Linear(c * c, 3)

    def forward(self, x):
        a = self.c1(x)
        h = torch.relu(self.b1(a)) + a  # conv output used twice: nothing fused after c1
        y = self.b2(self.c2(h))
        s = h * 1.0
        s += y  # the residual is mutated, not the BN output: c2+b2 only
        h = torch.relu(s)
        z = self.b3(self.c3(h))
        h = torch.relu(z) * z  # BN output used twice: c3+b3 only
        w = self.b4(self.c4(h))
        h = F.relu(w + h.mean((2, 3), keepdim=True))  # broadcasting residual: fused to BN, then add + relu
        h = self.bn(self.fc(h.flatten(2)[..., :5]))  # (N, 4, 5): BN1d over a Linear's 3-d output
        return self.head(F.relu(h).flatten(1))


def test_refused_patterns_keep_semantics():
    rep = _check(Refused(), torch.randn(4, 3, 5, 5), 4)
    assert rep["fused"] == ["c2+b2", "c3+b3", "c4+b4+add+relu", "fc+bn+relu"]


def test_runtime_fallbacks_are_counted():
    model = _with_stats(Refused(), 0).eval()
    theta_b = _perturb(model, 1)
    x = torch.randn(4, 3, 5, 5)
    _, mp, _ = _points_outputs(model, theta_b, x, [0.3, 0.8], True)
    chains = {c.name: c.calls for c in mp.net.modules() if isinstance(c, FusedChain)}
    assert chains["fc+bn+relu"] == {"fused": 0, "partial": 0, "unfused": 1}  # 3-d input: BN1d not over the last axis
    assert chains["c4+b4+add+relu"] == {"fused": 0, "partial": 1, "unfused": 0}  # fused up to BN, broadcast add after
    assert chains["c2+b2"] == {"fused": 1, "partial": 0, "unfused": 0}


class Dynamic(nn.Module):
    """Data-dependent control flow at the root: fx cannot trace it; its children are fused instead."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        if h.mean() > -100:  # always true; fx cannot know
            h = h * 2
        return self.head(h.mean((2, 3)))


def test_untraceable_root_keeps_children_fused():
    rep = _check(Dynamic(), torch.randn(4, 3, 5, 5), 1)
    assert rep["fused"] == ["body.0+body.1+relu"]
    assert "<root>" in rep["untraced"]


def test_transformer_models_unchanged_when_untraceable():
    import test_sweep as sw

    torch.manual_seed(0)
    model = sw.TransformerClassifier().eval()
    theta_b = _perturb(model, 1)
    x, y = sw._tokens(7, 9, 31, 5)
    a = sweep(model, (model, theta_b), [0.0, 0.5], (x, y), precision="fp64", fuse=True)
    b = sweep(model, (model, theta_b), [0.0, 0.5], (x, y), precision="fp64", fuse=False)
    assert_match(a, b, 1e-12)
    assert a.meta["fusion"]["chains"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Triton: the fused kernels inside the engine (interpreter on the CPU)


def _triton_modules():
    pytest.importorskip("triton")
    mods = ["_common", "lerp_linear", "lerp_conv", "point_metrics", "combine"]
    common = sys.modules.get("lerpfast.kernels._common")
    if not torch.cuda.is_available() and common is not None and not common.INTERPRET:
        for name in mods:  # imported earlier without the interpreter: re-decorate for it
            if f"lerpfast.kernels.{name}" in sys.modules:
                importlib.reload(sys.modules[f"lerpfast.kernels.{name}"])


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc, self.bn1d = nn.Linear(4 * 9, 6), nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        h = F.relu(self.bn1d(self.fc(h.flatten(1))))
        return self.out(h)


@pytest.mark.parametrize("bn", ["interpolate", "endpoint"])
def test_triton_fused_engine_matches_float64(monkeypatch, bn):
    _triton_modules()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = _with_stats(TinyBlock(), 0).eval()
    theta_b = _perturb(model, 1)
    data = _images(5, (3, 3, 3), 3)
    alphas = [0.0, 0.4, 1.3]
    kw = dict(bn=bn, batch_size=5, device=device)
    ref = sweep(model, (model, theta_b), alphas, data, precision="fp64", method="loop", **kw)
    monkeypatch.setenv("LERPFAST_BACKEND", "triton")
    dispatch.reset()
    fused = sweep(model, (model, theta_b), alphas, data, precision="fp32", fuse=True, **kw)
    used = dispatch.report()
    assert used["lerp_conv"] == {"triton": 2} and used["lerp_linear"] == {"triton": 2}
    assert fused.meta["fusion"]["chains"] == 3 and fused.meta["fusion"]["calls"]["fused"] == 3
    dispatch.reset()
    plain = sweep(model, (model, theta_b), alphas, data, precision="fp32", fuse=False, **kw)
    assert_match(fused, ref, 1e-5, discrete_atol=1.01 / 5)
    assert_match(fused, plain, 1e-5, discrete_atol=1.01 / 5)


# ---------------------------------------------------------------------------------------------------------------
# compile: torch.compile of the batched forward (CPU: aot_eager) and CUDA graphs (GPU only)


def test_compile_equals_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, theta_b, data = _make("vgg_bn")
    alphas = [-0.2, 0.5, 1.0]
    for precision, rtol in (("fp64", 1e-10), ("fp32", 1e-5)):
        eager = sweep(model, (model, theta_b), alphas, data, precision=precision, fuse=True, batch_size=5)
        comp = sweep(model, (model, theta_b), alphas, data, precision=precision, fuse=True, batch_size=5,
                     compile="aot_eager", points_per_pass=2)
        assert_match(comp, eager, rtol)
        assert comp.meta["compile"] == "aot_eager" and comp.meta["fusion"]["calls"]["fused"] > 0
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really compiled parts of the forward
    torch._dynamo.reset()


def test_compile_argument_validated():
    model, theta_b, data = _make("vgg_bn")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cudagraphs"):
            sweep(model, (model, theta_b), [0.5], data, compile="cudagraphs")
    with pytest.raises(ValueError, match="compile="):
        sweep(model, (model, theta_b), [0.5], data, compile=3)
    with pytest.raises(ValueError, match="engine"):
        sweep(model, (model, theta_b), [0.5], data, compile=True, method="loop")


@pytest.mark.gpu
@pytest.mark.parametrize("bn", ["interpolate", "recompute"])
def test_cudagraphs_equal_eager_on_gpu(bn):
    model, theta_b, data = _make("resnet20")
    calib = _images(10, data[0].shape[1:], 10, seed=7)
    alphas = np.linspace(-0.25, 1.25, 7)
    kw = dict(bn=bn, bn_data=calib, batch_size=4, device="cuda", precision="fp32", points_per_pass=3)
    eager = sweep(model, (model, theta_b), alphas, data, **kw)
    graphed = sweep(model, (model, theta_b), alphas, data, compile="cudagraphs", **kw)
    assert graphed.meta["cudagraphs"] == "replayed"
    assert_match(graphed, eager, 1e-5, discrete_atol=1.01 / len(data[1]))
    oracle = sweep(model, (model, theta_b), alphas, data, method="loop", **{**kw, "precision": "fp64"})
    assert_match(graphed, oracle, 1e-4, discrete_atol=1.01 / len(data[1]))
