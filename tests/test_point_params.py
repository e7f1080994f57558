"""Modules that own tensors directly run natively (issue 17): their own tensors per point, their children native.

Every model here is checked against the float64 per-point loop (the oracle) at points inside and outside [0, 1],
and ``meta["paths"]`` must show that nothing fell back where the point of the test is that it does not.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lerpfast import sweep

ALPHAS = [-0.5, 0.0, 0.3, 1.0, 1.5]


class LayerNorm2d(nn.LayerNorm):
    """torchvision's / timm's channels-first LayerNorm: a LayerNorm subclass with its own forward."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation layer (same name and layout: recognized natively)."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.GELU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(self.drop(x))


class BNRelu(nn.BatchNorm2d):
    """A user's BatchNorm subclass with its own forward: its tensors per point."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                       self.eps))


class Block(nn.Module):
    """ConvNeXt-style: depthwise conv, LayerNorm2d, pointwise Linear, layer scale (torchvision) and gamma (timm)."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = LayerNorm2d(c)
        self.pw = nn.Linear(c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.pw(self.norm(self.dw(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.layer_scale * y.mul(self.gamma.reshape(1, -1, 1, 1))


class TinyViT(nn.Module):
    """Class token (expanded to the batch), position embedding, a raw projection used in a matmul, a relative
    bias table gathered with an index buffer."""

    def __init__(self, c=8, classes=5, norm=BNRelu):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.bn = norm(c)
        self.block = Block(c)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, c))
        self.table = nn.Parameter(torch.randn(9, 1))
        self.register_buffer("index", torch.randint(0, 9, (5,)))
        self.ln = nn.LayerNorm(c)
        self.proj = nn.Parameter(torch.randn(c, c) / c ** 0.5)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block(self.bn(self.stem(x))).flatten(2).transpose(1, 2)  # (N, 4, c)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.table[self.index]  # (5, 1) per point, broadcast over the batch and channels
        return self.head(self.ln(x)[:, 0] @ self.proj)


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name
                        else torch.randn(t.shape, generator=g) * 0.5)
    return m.eval()


def _pair(make):
    torch.manual_seed(0)
    return _randomize(make(), 1), _randomize(make(), 2)


def _data(n=6, size=4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def _check(a, b, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no automatic fallback (it warns)
        res = sweep(a, (a, b), ALPHAS, data, precision="fp64", batch_size=3, progress=False, **kw)
    ref = sweep(a, (a, b), ALPHAS, data, precision="fp64", batch_size=3, progress=False, method="loop", **kw)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10, atol=0)
    np.testing.assert_array_equal(res.error, ref.error)
    res32 = sweep(a, (a, b), ALPHAS, (data[0].float(), data[1]), batch_size=3, progress=False, **kw)
    np.testing.assert_allclose(res32.loss, ref.loss, rtol=1e-4, atol=1e-6)
    return res


@pytest.mark.parametrize("norm", [BNRelu, BatchNormAct2d], ids=["bn_subclass", "timm_bn_act"])
def test_own_tensors_per_point_children_native(norm):
    a, b = _pair(lambda: TinyViT(norm=norm))
    res = _check(a, b, _data())
    paths = res.meta["paths"]
    assert not any("fallback" in p for p in paths.values()), paths
    assert paths["<root>"] == "native:TinyViT (own tensors per point: cls_token, pos_embed, table, proj)"
    assert paths["block"] == "native:Block (own tensors per point: layer_scale, gamma)"
    assert paths["block.norm"].startswith("native:LayerNorm2d (own tensors")
    assert paths["block.pw"] == "native:Linear" and paths["stem"] == "native:Conv2d"
    assert paths["bn"] == ("native:BatchNormAct2d" if norm is BatchNormAct2d else
                           "native:BNRelu (own tensors per point: weight, bias, running_mean, running_var)")


def test_recompute_recalibrates_native_bn_inside_and_refuses_what_it_cannot():
    """bn='recompute': a native BN (here timm's BatchNormAct2d) under a module with own tensors is recalibrated
    like every native BN; a BN subclass running its own forward cannot be, and says so instead of silently using
    interpolated statistics (which the per-module fallback did before)."""
    a, b = _pair(lambda: TinyViT(norm=BatchNormAct2d))
    x, y = _data()
    kw = dict(bn="recompute", bn_data=(x, y))
    _check(a, b, (x, y), **kw)
    a, b = _pair(lambda: TinyViT(norm=BNRelu))
    with pytest.raises(RuntimeError, match=r"recompute.*cannot recalibrate.*module 'bn' \(BNRelu\).*method='loop'"):
        sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", progress=False, **kw)
    with pytest.raises(RuntimeError, match=r"cannot recalibrate"):
        sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", progress=False, fallback=["bn"], **kw)


class ReadsChild(nn.Module):
    """Owns a tensor and reads its child's weight directly: cannot run per point; the engine falls back."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return F.linear(x.flatten(1), self.fc.weight, self.fc.bias) * self.scale


class SeqFirst(nn.Module):
    """A sequence-first tensor (batch on axis 1) meeting the module's own tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.pos = nn.Parameter(torch.randn(3, 1, 4))

    def forward(self, x):  # x (N, 3, 2, 2)
        s = x.flatten(2).transpose(0, 1) + self.pos  # (3, N, 4)
        return self.fc(s.mean(0))


@pytest.mark.parametrize("make,module", [(ReadsChild, "<root>"), (SeqFirst, "<root>")])
def test_what_cannot_run_per_point_falls_back_with_a_warning_and_stays_exact(make, module):
    a, b = _pair(make)
    x, y = _data(size=2)
    with pytest.warns(UserWarning, match=r"run on the per-module fallback"):
        res = sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", batch_size=3, progress=False)
    ref = sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", batch_size=3, progress=False, method="loop")
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10, atol=0)
    assert res.meta["paths"][module].startswith("fallback:")
    # the engine is cached with the fallback decided: the next sweep neither warns nor rebuilds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", batch_size=3, progress=False)
    assert again.meta["engine_cache"] == "reused"
    np.testing.assert_allclose(again.loss, ref.loss, rtol=1e-10, atol=0)


class TiedLinear(nn.Linear):
    """A Linear subclass that keeps Linear's forward (like torch's NonDynamicallyQuantizableLinear): native."""


def test_linear_subclass_without_own_forward_is_native():
    a, b = _pair(lambda: nn.Sequential(nn.Flatten(), TiedLinear(48, 7), nn.ReLU(), nn.Linear(7, 5)))
    res = _check(a, b, _data())
    assert res.meta["paths"]["1"] == "native:TiedLinear"


class Attn(nn.Module):
    """nn.MultiheadAttention in the ways models call it: self / cross attention, batch or sequence first, causal
    and padding masks, with the attention weights used in the output."""

    def __init__(self, batch_first, cross, masks, weights):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.kv = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 5)
        self.batch_first, self.cross, self.masks, self.weights = batch_first, cross, masks, weights

    def forward(self, x):  # x (N, 3, 4, 4) -> a sequence of 16 tokens of 3 features
        tokens = x.flatten(2).transpose(1, 2)
        q = self.emb(tokens)
        kv = self.kv(tokens[:, :6]) if self.cross else q
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        kw = {}
        if self.masks:
            L, S = 16, kv.shape[0 if not self.batch_first else 1]
            kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool, device=x.device).triu(1) if not self.cross else None
            kw["key_padding_mask"] = (tokens[:, :S, 0] > 1.5)  # (N, S), a few padded keys per sample
            kw["key_padding_mask"][:, 0] = False
        out, w = self.attn(q, kv, kv, need_weights=self.weights, **kw)
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = self.head(out.mean(1))
        return y + w.sum((1, 2))[:, None] if self.weights else y


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
@pytest.mark.parametrize("weights", [False, True], ids=["sdpa", "weights"])
def test_multihead_attention_native(batch_first, cross, masks, weights):
    a, b = _pair(lambda: Attn(batch_first, cross, masks, weights))
    res = _check(a, b, _data())
    assert res.meta["paths"]["attn"] == "native:MultiheadAttention"


class Probe(nn.Module):
    """A frozen backbone (conv + BN, an LSTM on the fallback, a module with its own class token) and a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.tok = TokenMix(8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # (N, 16, 8)
        h = self.tok(self.rnn(h)[0])
        return self.head(torch.relu(self.body(h[:, 0])))


class TokenMix(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, c))

    def forward(self, h):
        return torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)


def test_tensors_equal_at_every_point_cost_no_per_point_work(monkeypatch):
    """Issue 20 part 2: a head-only fine-tune (every backbone tensor equal at both ends): the backbone's layers run
    as the plain ops (no per-point weights built, no vmap), the numbers equal the loop's."""
    from lerpfast.engine import functional

    torch.manual_seed(0)
    a = _randomize(Probe(), 1)
    b = _randomize(Probe(), 1)
    with torch.no_grad():
        b.head.weight.add_(torch.randn_like(b.head.weight))
        b.body.bias.add_(1.0)  # body: constant weight, changing bias -> the per-point path
    built = []
    combine = functional.combine
    monkeypatch.setattr(functional, "combine", lambda an, *r, **k: (built.append(tuple(an.shape[1:])),
                                                                   combine(an, *r, **k))[1])
    res = _check(a, b, _data(), fallback=["rnn"])
    assert res.meta["paths"]["rnn"].startswith("fallback:LSTM")
    assert res.meta["paths"]["tok"].startswith("native:TokenMix (own tensors")
    # only head and body were built per point (their weight and bias shapes), never the frozen backbone's
    assert set(built) <= {(5, 8), (5,), (8, 8), (8,)} and (5, 8) in built, set(built)


def test_transformers_conv1d_native():
    """transformers' Conv1D (GPT-2's projections, weight (in, out)) runs natively: a shared input (the first layer)
    and a per-point input, and a frozen (constant) one, against the fp64 loop."""
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = Conv1D(16, 48), Conv1D(16, 16), Conv1D(5, 16)

        def forward(self, x):
            return self.c3(torch.relu(self.c2(torch.relu(self.c1(x.flatten(1))))))

    a, b = _pair(Net)
    b.c2.load_state_dict(a.c2.state_dict())  # c2 frozen: the plain op
    res = _check(a, b, _data())
    assert {res.meta["paths"][k] for k in ("c1", "c2", "c3")} == {"native:Conv1D"}


class ShiftedWindowAttention(nn.Module):
    """A window attention in the manner of torchvision's Swin (the engine knows it by name): its forward hands its
    children's weights to a function and works on windows, a multiple of the batch's rows. Also gathers from its own
    tables with index buffers, one of them with a multiple of K*B entries (a constant, never split by point)."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn(7, heads))
        self.register_buffer("index", torch.randint(0, 7, (16,)))
        self.table2 = nn.Parameter(torch.randn(5))
        self.register_buffer("index2", torch.randint(0, 5, (24,)))  # 24 = 2 x (K*B) in the test
        self.heads = heads

    def forward(self, x):  # (N, 4, 4, C): 2x2 windows of 2x2 tokens
        bias = self.table[self.index].reshape(4, 4, -1).permute(2, 0, 1) * self.table2[self.index2].mean()
        return window_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, bias,
                                self.heads)


def window_attention(x, wq, bq, wp, bp, bias, heads):
    n, h, w, c = x.shape
    win = x.reshape(n, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n * 4, 4, c)  # (N*windows, tokens, C)
    q, k, v = F.linear(win, wq, bq).reshape(n * 4, 4, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5 + bias.unsqueeze(0)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n * 4, 4, c)
    out = F.linear(out, wp, bp)
    return out.reshape(n, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


class SwinToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.attn = ShiftedWindowAttention()
        self.head = nn.Linear(8, 5)

    def forward(self, x):  # (N, 3, 4, 4)
        h = self.embed(x).permute(0, 2, 3, 1)
        return self.head((h + self.attn(h)).mean((1, 2)))


def test_window_attention_runs_whole_with_its_tensors_per_point():
    a, b = _pair(SwinToy)
    x, y = _data(n=4, size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # K = 5 points + the reference = 6, batches of 2: K*B = 12, and index2 has 24 entries
        res = sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", batch_size=2, progress=False)
    ref = sweep(a, (a, b), ALPHAS, (x, y), precision="fp64", batch_size=2, progress=False, method="loop")
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10, atol=0)
    assert res.meta["paths"]["attn"] == "native:ShiftedWindowAttention (its tensors per point)"


@pytest.mark.gpu
def test_point_params_gpu_paths_match_the_loop():
    """The GPU session's check of this file's paths on CUDA (PointTensors, native MultiheadAttention, whole-module
    window attention, BatchNormAct2d, constant layers): the engine against the loop, both on the GPU, fp32 (TF32
    off) to 1e-4, and bf16 finite and within 5e-2."""
    models = {"vit": lambda: TinyViT(norm=BatchNormAct2d), "attn": lambda: Attn(False, True, True, True),
              "swin": SwinToy, "probe": Probe}
    for name, make in models.items():
        a, b = (m.cuda() for m in _pair(make))
        if name == "probe":
            b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("head")}, strict=False)
        x, y = _data(n=6, size=4)
        data = (x.float().cuda(), y.cuda())
        kw = dict(batch_size=3, progress=False)
        ref = sweep(a, (a, b), ALPHAS, data, method="loop", **kw)
        res = sweep(a, (a, b), ALPHAS, data, **kw)
        np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-4, atol=1e-6, err_msg=name)
        assert not any(p.startswith("fallback") for m, p in res.meta["paths"].items() if m != "rnn"), name
        bf = sweep(a, (a, b), ALPHAS, data, precision="bf16", **kw)
        assert np.all(np.isfinite(bf.loss)) and np.allclose(bf.loss, ref.loss, rtol=5e-2, atol=5e-2), name
