"""The part of the network that is the same at every point runs once on the B rows (lerpfast/engine/shared.py).

Every case is checked per point against a float64 state-dict oracle (the plain model loaded with each point's
weights), on odd batch sizes (a short last batch), in fp64 (1e-10) and fp32 (1e-5), and the report says what was
shared. Also: external reads of a tensor's dtype (transformers' ViT) get a stand-in whose use raises.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lerpfast import Line, sweep
from lerpfast.engine.layers import StandIn
from lerpfast.engine.model import MultiPointModel
from lerpfast.train import models as zoo

sys.path.insert(0, os.path.dirname(__file__))
from test_sweep import _with_stats  # noqa: E402

ALPHAS = [-0.4, 0.0, 0.35, 1.0, 1.3]


def _moved(model: nn.Module, prefixes, seed=1, scale=0.2) -> dict:
    """The model's state dict with the floating tensors under ``prefixes`` moved (a fine-tuned head / stage)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and k.startswith(tuple(prefixes)):
            v = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
            if k.endswith("running_var"):
                v = v.abs() + 0.5
        out[k] = v
    return out


def _oracle(model, theta_a, theta_b, alphas, x):
    """(K, B, C) float64 logits: the plain model loaded with each point's weights."""
    net = copy.deepcopy(model).double().eval()
    outs = []
    with torch.no_grad():
        for a in alphas:
            sd = {k: (torch.lerp(v.double(), theta_b[k].double(), a) if v.is_floating_point() else v)
                  for k, v in theta_a.items()}
            net.load_state_dict(sd)
            out = net(x.double())
            outs.append(out if torch.is_tensor(out) else out.logits)
    return torch.stack(outs)


def _engine(model, theta_a, theta_b, alphas, x, dtype, **kw):
    aff = Line(theta_a, theta_b, alphas).resolve([theta_a, theta_b], model, dtype)
    mp = MultiPointModel(model, aff, **kw)
    mp.set_points(aff.points())
    with torch.inference_mode():
        out = mp(x.to(dtype), x.shape[0])
    return out, mp


def _check(model, prefixes, x, expect_modules=None, expect_region=False, **kw):
    model = model.eval()
    theta_a = {k: v.clone() for k, v in model.state_dict().items()}
    theta_b = _moved(model, prefixes)
    want = _oracle(model, theta_a, theta_b, ALPHAS, x)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        got, mp = _engine(model, theta_a, theta_b, ALPHAS, x, dtype, **kw)
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= rtol * max(scale, 1.0), dtype
        rep = mp.shared_report()
        if expect_modules is not None:
            assert set(expect_modules) <= set(rep["modules"]), rep
        assert bool(rep["region"]) == expect_region, rep
        assert rep["calls"]["shared"] >= 1 and rep["calls"]["converted"] == 0, rep
    return mp


class Frozen(nn.Module):
    """Two inputs: ``a`` through a frozen trunk, ``b`` straight into the tuned head; a constant (T, D) table and a
    batch-sized int computed in the trunk."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12))
        self.side = nn.Linear(3, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, a, b):
        h = self.trunk(a) + self.side(b)
        return self.head(torch.tanh(h))


def test_mlp_frozen_prefix_one_region():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(35, 17), nn.ReLU(), nn.Dropout(0.1), nn.Linear(17, 9), nn.Tanh(),
                        nn.Linear(9, 7))
    mp = _check(mlp, ["6."], torch.randn(11, 5, 7), expect_modules=["1", "4"], expect_region=True)
    rep = mp.shared_report()
    assert rep["ends_before"] == ["_6"]  # per-point work starts at the tuned head


def test_frozen_module_list_shares_its_children():
    """A ModuleList whose tensors are all the same at every point (the zoo MLP's ``hidden``, e.g. a run whose hidden
    layers never moved) has no forward of its own: its layers are shared one by one, the model's loop still works."""
    torch.manual_seed(0)
    mlp = zoo.create("mlp", num_classes=7, in_shape=(1, 5, 7), widths=(13, 11), dropout=0.3)
    _check(mlp, ["out."], torch.randn(9, 1, 5, 7), expect_modules=["hidden.0", "hidden.1"], expect_region=True)


@pytest.mark.parametrize("fuse", [True, False])
def test_resnet_tuned_last_block_region_ends_inside_the_block(fuse):
    torch.manual_seed(0)
    net = _with_stats(zoo.create("resnet20", num_classes=10, in_shape=(3, 12, 12)), 0)
    # the last block's second half and the head are tuned: the region ends after blocks.8.conv1, and its output
    # (K copies of one block) and the residual from blocks.7 feed per-point layers
    mp = _check(net, ["blocks.8.bn1", "blocks.8.conv2", "blocks.8.bn2", "fc."], torch.randn(7, 3, 12, 12),
                expect_modules=["conv", "bn", "blocks.0", "blocks.7", "blocks.8.conv1"], expect_region=True, fuse=fuse)
    assert "blocks.8.bn2" not in mp.shared_report()["modules"]


def test_constant_bn_after_a_tuned_conv_stays_fusable():
    """A frozen BN whose input comes from a tuned conv never sees a shared input: it stays converted, and the
    conv -> BN -> ReLU chain is fused as before."""
    torch.manual_seed(0)
    net = _with_stats(zoo.create("resnet20", num_classes=10, in_shape=(3, 8, 8)), 0)
    convs = [k.rsplit(".", 1)[0] + "." for k, v in net.state_dict().items() if k.endswith("weight") and v.dim() == 4]
    theta_a = net.state_dict()
    theta_b = _moved(net, convs + ["fc."])
    _, mp = _engine(net, theta_a, theta_b, ALPHAS, torch.randn(5, 3, 8, 8), torch.float32, fuse=True)
    assert mp.shared_report()["modules"] == []
    assert mp.fusion_report()["chains"] == 21  # as with every tensor tuned (tests/test_fusion.py's N_CHAINS)


def test_two_inputs_and_non_batch_outputs():
    torch.manual_seed(0)
    m = Frozen()
    x = (torch.randn(9, 6), torch.randn(9, 3))
    theta_a = {k: v.clone() for k, v in m.state_dict().items()}
    theta_b = _moved(m, ["side.", "head."])
    net = copy.deepcopy(m).double()
    want = []
    with torch.no_grad():
        for a in ALPHAS:
            net.load_state_dict({k: torch.lerp(v.double(), theta_b[k].double(), a) for k, v in theta_a.items()})
            want.append(net(*(t.double() for t in x)))
    want = torch.stack(want)
    aff = Line(theta_a, theta_b, ALPHAS).resolve([theta_a, theta_b], m, torch.float64)
    mp = MultiPointModel(m, aff)
    mp.set_points(aff.points())
    with torch.inference_mode():
        got = mp(tuple(t.double() for t in x), 9)
    assert (got - want).abs().max().item() < 1e-10
    assert mp.shared_report()["modules"] == ["trunk"] and mp.shared_report()["calls"]["shared"] == 1


class TableTrunk(nn.Module):
    """Returns the features and a learned (T, D) table with no batch axis."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.table = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        return self.proj(x), self.table * 2


class UsesTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = TableTrunk()
        self.head = nn.Linear(8, 3)
        self.mix = nn.Linear(8, 3)

    def forward(self, x):
        h, table = self.trunk(x)
        return self.head(h + table.mean(0)) + self.mix(table).mean(-2)  # the table leaves the shared region


def test_outputs_without_batch_axis_are_not_repeated():
    """The shared region hands out the (T, D) table as it is (it has no batch axis) and the features repeated."""
    torch.manual_seed(0)
    m = UsesTable()
    x = torch.randn(6, 4)
    theta_a = {k: v.clone() for k, v in m.state_dict().items()}
    theta_b = _moved(m, ["head.", "mix."])
    want = _oracle(m, theta_a, theta_b, ALPHAS, x)
    got, mp = _engine(m, theta_a, theta_b, ALPHAS, x, torch.float64, fuse=False)
    assert (got - want).abs().max().item() < 1e-10
    rep = mp.shared_report()
    assert rep["modules"] == ["trunk"] and rep["region"] and rep["calls"]["shared"] == 1


def test_split_flags():
    """Which outputs carry the batch axis, from the shapes of a run on K*B rows and one on B rows."""
    from lerpfast.engine.shared import _split_flags

    K, B = 3, 2
    big = (torch.empty(6, 5), torch.empty(4, 5), None, {"n": 7})
    little = (torch.empty(2, 5), torch.empty(4, 5), None, {"n": 7})
    assert _split_flags(big, little, K, B) == (True, False, False, False)
    assert _split_flags((torch.empty(6), 6), (torch.empty(2), 2), K, B) is None  # the row count as a value
    assert _split_flags(torch.empty(6, 5), torch.empty(3, 5), K, B) is None  # rows that are not B
    assert _split_flags([torch.empty(6)], (torch.empty(2),), K, B) is None  # another structure
    assert _split_flags(object(), object(), K, B) is None  # an unknown container


def test_everything_constant_runs_once_and_repeats():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(5, 4)
    got, mp = _engine(m, m.state_dict(), m.state_dict(), ALPHAS, x, torch.float64)
    with torch.no_grad():
        want = m.double()(x.double())
    assert torch.equal(got, want.expand(len(ALPHAS), *want.shape))
    assert mp.shared_report()["modules"] == [""]


def test_sweep_meta_cache_and_recompute():
    """Through sweep: the same numbers with the shared part off; a cached engine is not reused for a slice where
    other tensors are constant; bn='recompute' recalibrates frozen BNs per point as the loop does."""
    torch.manual_seed(0)
    net = _with_stats(zoo.create("resnet20", num_classes=10, in_shape=(3, 8, 8)), 0).eval()
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(13, 3, 8, 8, generator=g), torch.randint(0, 10, (13,), generator=g))
    probe = _moved(net, ["fc."])
    full = _moved(net, [""])
    kw = dict(batch_size=5, progress=False, precision="fp64")
    r = sweep(net, (net, probe), ALPHAS, data, **kw)
    assert r.meta["shared"]["ends_before"] == ["fc"] and r.meta["shared"]["calls"]["shared"] == 3
    os.environ["LERPFAST_SHARED"] = "0"
    try:
        off = sweep(net, (net, probe), ALPHAS, data, **kw)
    finally:
        del os.environ["LERPFAST_SHARED"]
    assert off.meta["shared"]["modules"] == []
    np.testing.assert_allclose(r.loss, off.loss, rtol=1e-10)
    r_full = sweep(net, (net, full), ALPHAS, data, **kw)  # every tensor tuned: nothing shared, a new engine
    assert r_full.meta["shared"]["modules"] == [] and r_full.meta["engine_cache"] == "built"
    loop_full = sweep(net, (net, full), ALPHAS, data, method="loop", **kw)
    np.testing.assert_allclose(r_full.loss, loop_full.loss, rtol=1e-9)
    calib = (torch.randn(10, 3, 8, 8, generator=g), torch.zeros(10, dtype=torch.long))
    rc = sweep(net, (net, probe), ALPHAS, data, bn="recompute", bn_data=calib, **kw)
    lc = sweep(net, (net, probe), ALPHAS, data, bn="recompute", bn_data=calib, method="loop", **kw)
    np.testing.assert_allclose(rc.loss, lc.loss, rtol=1e-9)
    calls = rc.meta["shared"]["calls"]  # the stem conv (no BN) still shares; the recalibrated BNs run per point
    assert calls["converted"] > 0 and calls["shared"] == 3


def test_transformers_vit_linear_probe_and_full_fine_tune():
    """transformers' ViT reads ``embeddings.patch_embeddings.projection.weight.dtype`` from outside the module:
    with the whole backbone shared (a linear probe) and with every tensor tuned (a stand-in answers the read)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                 image_size=16, patch_size=8, num_labels=6)
    vit = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(5, 3, 16, 16)
    _check(vit, ["classifier."], x, expect_modules=["vit"], expect_region=False)
    theta_a = {k: v.clone() for k, v in vit.state_dict().items()}
    theta_b = _moved(vit, [""], scale=0.05)
    want = _oracle(vit, theta_a, theta_b, ALPHAS, x)
    got, mp = _engine(vit, theta_a, theta_b, ALPHAS, x, torch.float64)
    assert (got - want).abs().max().item() < 1e-10
    assert not [p for p in mp.report().values() if p.startswith("fallback")]


def test_stand_in_gives_dtype_and_shape_but_no_values():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    aff = Line(m.state_dict(), _moved(m, [""]), ALPHAS).resolve([m.state_dict(), _moved(m, [""])], m, torch.float32)
    mp = MultiPointModel(m, aff)
    w = mp.net.get_submodule("0").weight
    assert isinstance(w, StandIn) and w.dtype == torch.float32 and w.shape == (3, 4) and w.device.type == "cpu"
    with pytest.raises(AttributeError, match=r"module '0' \(Linear\) is evaluated at K points.*'weight'"):
        F.linear(torch.randn(2, 4), w)
    with pytest.raises(AttributeError, match="evaluated at K points"):
        w.sum()


@pytest.mark.parametrize("fuse", [True, False])
def test_frozen_layers_after_a_tuned_one_run_as_plain_ops(fuse):
    """Only the first block's first conv is tuned: every frozen conv / BN / chain after it sees per-point inputs,
    and runs its plain op over all rows (no per-point weights, no folds) — the stem before it is shared."""
    torch.manual_seed(0)
    net = _with_stats(zoo.create("resnet20", num_classes=10, in_shape=(3, 8, 8)), 0)
    mp = _check(net, ["blocks.0.conv1."], torch.randn(7, 3, 8, 8), expect_modules=["conv", "bn"],
                expect_region=True, fuse=fuse)
    if fuse:
        rep = mp.fusion_report()
        assert rep["constant_calls"] > 0 and rep["calls"]["fused"] >= 1  # the tuned conv's chain stays fused
    assert mp.ctx.max_materialized <= 16 * 3 * 3 * 16 * 8 * len(ALPHAS)  # only the tuned conv's K weights


def test_transformers_clip_vision_tower_native():
    """transformers' CLIP vision tower with its projection (a CLIP image encoder): every module native, equal to
    the per-point float64 loop, scored on ``image_embeds`` through ``output=``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=16, patch_size=8, projection_dim=12)
    m = transformers.CLIPVisionModelWithProjection(cfg).eval()
    theta_b = _moved(m, [""], scale=0.05)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 12, (5,), generator=g))
    kw = dict(batch_size=3, progress=False, output=lambda o: o.image_embeds, precision="fp64")
    r = sweep(m, (m, theta_b), ALPHAS, data, **kw)
    ref = sweep(m, (m, theta_b), ALPHAS, data, method="loop", **kw)
    np.testing.assert_allclose(r.loss, ref.loss, rtol=1e-10)
    assert not [p for p in r.meta["paths"].values() if p.startswith("fallback")]


class ReadsAndIterates(nn.Module):
    """A parent whose forward iterates a frozen Sequential, reads a frozen child's settings and indexes a frozen
    ParameterList: none of them may break when their tensors are constant."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(8)), nn.Parameter(torch.full((8,), 0.5))])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.stem:
            x = layer(x)
        assert self.stem[0].in_features == 5 and len(self.stem) == 3
        return self.head(x * self.scales[1] + self.stem[2].bias.shape[0])


def test_frozen_children_iterated_indexed_and_read_by_their_parent():
    torch.manual_seed(0)
    m = ReadsAndIterates()
    x = torch.randn(6, 5)
    theta_a = {k: v.clone() for k, v in m.state_dict().items()}
    theta_b = _moved(m, ["head."])
    want = _oracle(m, theta_a, theta_b, ALPHAS, x)
    for fuse in (True, False):
        got, mp = _engine(m, theta_a, theta_b, ALPHAS, x, torch.float64, fuse=fuse)
        assert (got - want).abs().max().item() < 1e-10
