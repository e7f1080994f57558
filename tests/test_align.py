"""Permutation alignment (issue 14 part 1): ``lerpfast.align``, ``Line(align=...)`` and ``lerpfast align``.

The aligned theta_b must compute theta_b's function (logits to 1e-5 relative in fp32, on an MLP, a VGG with batch
norm, ResNet-20 and ResNet-50); aligning a network with itself gives identity permutations; a randomly permuted
copy is recovered exactly (bit for bit); the aligned line between two MLPs trained from different seeds on the real
digits has a lower loss barrier than the raw line; a module that cannot be permuted is named in the error.
"""

from __future__ import annotations

import pytest  # noqa: I001
import torch
import torch.nn.functional as F
from torch import nn

import lerpfast
import lerpfast.data as ld
from lerpfast.align import AlignError, _apply, permutation_groups
from lerpfast.analysis import barrier
from lerpfast.train import models


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters away from their initial values, so they take part in the checks."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _pair(name: str, **kw) -> tuple[nn.Module, dict, dict]:
    """The model and two independently initialized state dicts."""
    gen = torch.Generator().manual_seed(1)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = models.create(name, **kw)
        with torch.no_grad():
            _randomize_bn(m, gen)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    return m.eval(), states[0], states[1]


def _logits(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.functional_call(model.eval(), state, (x,))


def _random_perms(model: nn.Module, state: dict, example, seed: int = 0) -> dict:
    st = permutation_groups(model, example_input=example)
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(g.size, generator=gen) if g.frozen is None else torch.arange(g.size) for g in st.groups]
    return _apply(state, st.layouts, perms)


MODELS = [
    ("mlp", {"widths": (40, 30)}, (1, 28, 28), 100),
    ("vgg11", {"bn": True, "width": 0.25}, (3, 32, 32), 100),
    ("resnet20", {}, (3, 32, 32), 100),
    ("resnet50", {"num_classes": 10}, (3, 32, 32), 1),  # one pass: 37 groups, the largest 2048 units
]


@pytest.mark.parametrize("name,kw,shape,max_iter", MODELS, ids=[m[0] for m in MODELS])
def test_aligned_state_computes_the_same_function(name, kw, shape, max_iter):
    model, a, b = _pair(name, **kw)
    res = lerpfast.align(model, a, b, example_input=(2, *shape), max_iter=max_iter)
    assert set(res.state_dict) == set(b)
    moved = res.summary()["moved"]
    assert moved > 0, "independent initializations must be permuted"
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(3))
    ref, got = _logits(model, b, x), _logits(model, res.state_dict, x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert res.objective >= res.objective_start
    assert res.max_deviation is not None and res.max_deviation <= 1e-5
    # the logits layer is never permuted
    assert any("output" in why for why in res.frozen.values())
    # every float tensor of b has a permuted counterpart with the same multiset of values
    for k, v in b.items():
        if v.is_floating_point():
            assert torch.equal(v.flatten().sort().values, res.state_dict[k].flatten().sort().values), k


@pytest.mark.parametrize("name,kw,shape", [("mlp", {"widths": (40, 30)}, (1, 28, 28)),
                                           ("resnet20", {}, (3, 32, 32))])
def test_self_alignment_is_the_identity(name, kw, shape):
    model, a, _ = _pair(name, **kw)
    res = lerpfast.align(model, a, a, example_input=(2, *shape))
    assert res.perms and all(torch.equal(p, torch.arange(p.numel())) for p in res.perms.values())
    assert all(torch.equal(res.state_dict[k], a[k]) for k in a)
    assert res.iterations == 1


@pytest.mark.parametrize("name,kw,shape", [("mlp", {"widths": (40, 30)}, (1, 28, 28)),
                                           ("vgg11", {"bn": True, "width": 0.25}, (3, 32, 32)),
                                           ("resnet20", {}, (3, 32, 32))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_permutation_is_recovered_exactly(name, kw, shape, dtype):
    model, a, _ = _pair(name, **kw)
    model = model.to(dtype)
    a = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in a.items()}
    b = _random_perms(model, a, (2, *shape), seed=5)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    res = lerpfast.align(model, a, b, example_input=(2, *shape))
    for k in a:
        assert torch.equal(res.state_dict[k], a[k]), k


def test_activation_matching_recovers_a_permutation_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 10))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = _random_perms(model, a, (2, 1, 8, 8), seed=2)
    x, y = next(iter(ld.load("digits", "train", batch_size=400)))
    res = lerpfast.align(model, a, b, method="activations", data=(x, y))
    assert all(torch.equal(res.state_dict[k], a[k]) for k in a)
    assert res.objective > res.objective_start
    model2, a2, b2 = _pair("mlp", widths=(40, 30), in_shape=(1, 8, 8))
    res2 = lerpfast.align(model2, a2, b2, method="activations", data=(x, y), max_batches=1)
    assert (_logits(model2, res2.state_dict, x) - _logits(model2, b2, x)).abs().max() <= 1e-5 * _logits(
        model2, b2, x).abs().max()


def _train_mlp(seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> dict:
    torch.manual_seed(seed)
    net = models.create("mlp", 10, (1, 8, 8), widths=(64, 64))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_aligned_line_has_a_lower_barrier_than_the_raw_line():
    x, y = next(iter(ld.load("digits", "train", batch_size=10_000)))
    test = ld.load("digits", "test")
    a, b = _train_mlp(0, x, y), _train_mlp(1, x, y)
    model = models.create("mlp", 10, (1, 8, 8), widths=(64, 64)).eval()
    raw = lerpfast.sweep(model, lerpfast.Line(a, b), "0:1:11", test)
    line = lerpfast.Line(a, b, align="weights")
    aligned = lerpfast.sweep(model, line, "0:1:11", test)
    b_raw, b_aligned = barrier(raw.alphas, raw.loss), barrier(aligned.alphas, aligned.loss)
    assert b_aligned < 0.7 * b_raw, (b_raw, b_aligned)
    # the endpoints are the same functions: alpha = 1 of the aligned line is theta_b's loss
    assert abs(aligned.loss[-1] - raw.loss[-1]) <= 1e-5 * abs(raw.loss[-1])
    assert aligned.loss[0] == raw.loss[0]
    assert aligned.meta["slice"]["align"]["method"] == "weights" and "align" not in raw.meta["slice"]
    assert aligned.meta["slice_info"]["align"]["groups"] == 2
    assert line.alignment is not None and line.alignment.iterations >= 1
    # the same line through an aligned checkpoint: the same numbers
    again = lerpfast.sweep(model, lerpfast.Line(a, lerpfast.align(model, a, b).state_dict), "0:1:11", test)
    assert (again.loss == aligned.loss).all()


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (B, T, 6)
        h = torch.relu(self.embed(x))
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


class _Shuffle(nn.Module):
    """A custom channel mixing that fx traces into: a roll of the channels."""

    def forward(self, x):
        return torch.roll(x, 1, dims=1)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.mix = _Shuffle()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.mix(torch.relu(self.conv(x))).mean((2, 3)))


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(4, 6), nn.Linear(11, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = _Dynamic()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


class _Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


@pytest.mark.parametrize("model,shape,named", [
    (_Attention(), (2, 5, 6), "'attn' (MultiheadAttention)"),
    (_Custom(), (2, 3, 8, 8), "roll in 'mix' (_Shuffle)"),
    (_Cat(), (2, 4), "cat in the top-level module"),
    (_Branchy(), (2, 4), "'body' (_Dynamic)"),
], ids=["attention", "custom", "cat", "untraceable"])
def test_unpermutable_modules_are_named(model, shape, named):
    state = model.state_dict()
    with pytest.raises(AlignError) as info:
        lerpfast.align(model, state, state, example_input=shape)
    assert named in str(info.value)


def test_groupnorm_permutes_within_groups_and_input_adds_freeze():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
            self.gn = nn.GroupNorm(3, 12)
            self.conv2 = nn.Conv2d(12, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 4 * 4, 5)

        def forward(self, x):  # (B, 3, 4, 4); conv2's output is added to the input: it cannot be permuted
            h = x + self.conv2(F.relu(self.gn(self.conv1(x))))
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    model = Net().eval()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v.clone() for k, v in Net().state_dict().items()}
    res = lerpfast.align(model, a, b, example_input=(2, 3, 4, 4))
    assert res.groups["conv1"].blocks == 3 and "conv2" in res.frozen and "not permuted" in res.frozen["conv2"]
    perm = res.perms["conv1"]
    assert torch.equal(perm // 4, torch.arange(12) // 4)  # each of GroupNorm's groups onto itself
    x = torch.randn(4, 3, 4, 4)
    assert torch.allclose(_logits(model, res.state_dict, x), _logits(model, b, x), rtol=0, atol=1e-5)


def test_flatten_after_conv_and_frozen_group_reporting():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.manual_seed(0)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = _random_perms(model, a, (2, 1, 8, 8), seed=1)
    res = lerpfast.align(model, a, b, example_input=(2, 1, 8, 8))
    assert all(torch.equal(res.state_dict[k], a[k]) for k in a)
    assert set(res.perms) == {"0", "5"} and set(res.frozen) == {"7"}
    assert ("5.weight", 1) in res.groups["0"].tensors  # the flattened conv channels


def test_bad_input():
    model, a, b = _pair("mlp", widths=(8,))
    with pytest.raises(AlignError, match="method='cosine'"):
        lerpfast.align(model, a, b, method="cosine")
    with pytest.raises(AlignError, match="needs data="):
        lerpfast.align(model, a, b, method="activations")
    with pytest.raises(AlignError, match="max_iter=0"):
        lerpfast.align(model, a, b, max_iter=0)
    bad = dict(b)
    bad["out.weight"] = bad["out.weight"][:, :3]
    with pytest.raises(lerpfast.CheckpointError, match="theta_b"):
        lerpfast.align(model, a, bad)
    with pytest.raises(ValueError, match="align='cosine'"):
        lerpfast.Line(a, b, align="cosine")
    with pytest.raises(AlignError, match="example_input="):
        lerpfast.align(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 7 * 7, 3)),
                       *[nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 7 * 7, 3))] * 2)


def test_module_import_keeps_lerpfast_align_callable():
    import lerpfast.align as mod

    model, a, b = _pair("mlp", widths=(8,))
    assert callable(lerpfast.align) and isinstance(mod.Alignment, type)
    assert lerpfast.align(model, a, b).perms.keys() == {"hidden.0"}


def test_cli_align_writes_the_aligned_checkpoint(tmp_path, capsys):
    from lerpfast.cli import main

    model, a, b = _pair("mlp", widths=(16,), in_shape=(1, 8, 8))
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    out = tmp_path / "b_aligned.pt"
    rc = main(["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "mlp", "--model-options",
               "widths=(16,)", "--data", "digits", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1 groups" in text and "wrote" in text
    got = torch.load(out, weights_only=True)
    want = lerpfast.align(model, a, b).state_dict
    assert all(torch.equal(got[k], want[k]) for k in want)
    rc = main(["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "mlp", "--model-options",
               "widths=(16,)", "--data", "digits", "--method", "activations", "--limit", "300",
               "--out", str(tmp_path / "act.safetensors")])
    assert rc == 0 and (tmp_path / "act.safetensors").is_file()
    assert main(["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "mlp"]) == 2
    assert "--out" in capsys.readouterr().err
    rc = main(["sweep", "line", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "mlp", "--model-options",
               "widths=(16,)", "--data", "digits", "--alphas", "0:1:5", "--align", "weights", "--store",
               str(tmp_path / "r.h5"), "--progress", "false"])
    assert rc == 0
    assert main(["sweep", "ray", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "mlp", "--data",
                 "digits", "--align", "weights"]) == 2


def test_readme_block_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Permutation alignment"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README.md:Permutation alignment", "exec"), ns)
    raw, aligned, res = ns["raw"], ns["aligned"], ns["res"]
    assert barrier(aligned.alphas, aligned.loss) < 0.5 * barrier(raw.alphas, raw.loss)
    assert set(res.frozen) == {"out"} and set(ns["act"].perms) == {"hidden.0", "hidden.1"}


def test_maxout_units_move_as_blocks():
    torch.manual_seed(0)
    model = models.create("mlp", 10, (1, 8, 8), widths=(12, 6), activation="maxout", pieces=3).eval()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = _random_perms(model, a, (2, 1, 8, 8), seed=1)
    res = lerpfast.align(model, a, b)
    assert res.groups["hidden.0"].size == 12 and res.groups["hidden.1"].size == 6  # units, not 36 / 18 pieces
    assert all(torch.equal(res.state_dict[k], a[k]) for k in a)
    torch.manual_seed(1)
    other = models.create("mlp", 10, (1, 8, 8), widths=(12, 6), activation="maxout", pieces=3).state_dict()
    x = torch.randn(5, 1, 8, 8)
    got, ref = _logits(model, lerpfast.align(model, a, other).state_dict, x), _logits(model, other, x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_aligned_line_reads_the_aligned_bn_statistics():
    model, a, b = _pair("vgg11", bn=True, width=0.125, in_shape=(3, 8, 8))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    aligned = lerpfast.align(model, a, b).state_dict
    for bn in ("endpoint:1", "interpolate"):
        got = lerpfast.sweep(model, lerpfast.Line(a, b, align="weights"), "0:1:5", (x, y), bn=bn)
        want = lerpfast.sweep(model, lerpfast.Line(a, aligned), "0:1:5", (x, y), bn=bn)
        assert (got.loss == want.loss).all(), bn


@pytest.mark.parametrize("name", [n for n in models.available() if n != "resnet50"])  # resnet50: above
def test_every_zoo_model_aligns_without_a_spec(name):
    kw = {"width": 0.125} if name.startswith("vgg") else {"width": 4} if name == "deep_linear" else {}
    shape = (1,) if name == "deep_linear" else (1, 8, 8) if name in ("mlp", "lenet_300_100") else (3, 8, 8)
    model, a, b = _pair(name, in_shape=shape, **kw)
    res = lerpfast.align(model, a, b, max_iter=2)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    got, ref = _logits(model, res.state_dict, x), _logits(model, b, x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert res.perms and len(res.frozen) == 1  # only the logits' group


def test_line_alignments_are_cached(monkeypatch):
    """A second sweep of the same aligned line (a resume, another alpha grid) reuses the alignment; other endpoint
    values, another method and clear_caches() align again."""
    import lerpfast.align as align_mod

    torch.manual_seed(0)
    model = models.create("mlp", 10, (1, 8, 8), widths=(16,)).eval()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    data = (torch.randn(9, 1, 8, 8), torch.randint(0, 10, (9,)))
    calls = []
    real = align_mod.align

    def counting(*args, **kw):
        calls.append(kw.get("method", args[3] if len(args) > 3 else None))
        return real(*args, **kw)

    monkeypatch.setattr(align_mod, "align", counting)
    lerpfast.clear_caches()
    first = lerpfast.sweep(model, lerpfast.Line(a, b, align="weights"), "0:1:5", data)
    second = lerpfast.sweep(model, lerpfast.Line(a, b, align="weights"), "0:1:9", data)
    assert len(calls) == 1 and second.loss[0] == first.loss[0] and second.loss[-1] == first.loss[-1]
    b2 = {k: v + 0.01 for k, v in b.items()}
    lerpfast.sweep(model, lerpfast.Line(a, b2, align="weights"), "0:1:5", data)
    assert len(calls) == 2
    lerpfast.clear_caches()
    lerpfast.sweep(model, lerpfast.Line(a, b, align="weights"), "0:1:5", data)
    assert len(calls) == 3
