"""The fixed cost of a sweep call: what is cached between calls, when the caches are invalidated, and the
no-repeat plan (the data batch handed unrepeated to the first layer) against the repeat layout.

No timing assertions: benchmarks/bench_sweep_cpu.py --profile measures; these tests count hashes, fx traces and
engine builds, and compare results.
"""

from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lerpfast.evaluate as ev
from lerpfast import Barycentric, sweep
from lerpfast import checkpoints as ck
from lerpfast.engine import fusion
from lerpfast.engine import model as em
from lerpfast.engine.functional import ParamSlice, Points, _bank, combine, lerp_linear
from lerpfast.engine.model import MultiPointModel
from lerpfast.geometry import Line
from lerpfast.metrics import PointMetrics
from lerpfast.train import models as zoo


def _lenet(seed: int, widths=(30, 20), in_shape=(1, 6, 6), activation="relu"):
    torch.manual_seed(seed)
    return zoo.create("lenet_300_100", num_classes=10, in_shape=in_shape, widths=widths,
                      activation=activation).eval()


def _data(n=37, shape=(1, 6, 6), classes=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _counters() -> dict:
    return {"traces": fusion.TRACE_COUNT["traces"], "builds": em.ENGINE_STATS["builds"],
            "data_hashes": ev._DATA_DIGESTS.stats["hashes"], "state_hashes": ck._STATE_DIGESTS.stats["hashes"],
            "file_hashes": ck._FILE_STATS["hashes"]}


def _delta(before: dict) -> dict:
    after = _counters()
    return {k: after[k] - before[k] for k in before}


@pytest.fixture(autouse=True)
def _fresh_caches():
    ev.clear_caches()
    yield
    ev.clear_caches()


def _same(r1, r2):
    assert set(r1.metrics) == set(r2.metrics)
    for k in r1.metrics:
        np.testing.assert_array_equal(r1.metrics[k], r2.metrics[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# What a repeated call does not redo


def test_repeated_sweep_hashes_and_traces_nothing():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    r1 = sweep(a, (a, b), np.linspace(-0.5, 1.5, 5), (x, y), batch_size=10)
    assert r1.meta["engine_cache"] == "built"
    before = _counters()
    r2 = sweep(a, (a, b), np.linspace(-0.5, 1.5, 5), (x, y), batch_size=10)
    assert _delta(before) == dict.fromkeys(before, 0)  # no fx trace, no engine build, no sha256 of data or weights
    assert r2.meta["engine_cache"] == "reused"
    _same(r1, r2)
    assert r2.meta["fingerprint"] == r1.meta["fingerprint"] and r2.meta["data"] == r1.meta["data"]
    # and the fingerprints are the full hashes, as before caching
    raw = x.numpy().tobytes() + y.numpy().tobytes()
    assert r2.meta["data"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert r2.meta["checkpoints"][1]["sha256"] == ck._hash_state(b.state_dict())


def test_path_checkpoints_are_hashed_once(tmp_path, monkeypatch):
    a, b = _lenet(0), _lenet(1)
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a.state_dict(), pa)
    torch.save(b.state_dict(), pb)
    x, y = _data()
    r1 = sweep(a, (pa, pb), [0.0, 0.7], (x, y))
    before = _counters()
    sweep(a, (pa, pb), [0.0, 0.7], (x, y))
    assert _delta(before)["file_hashes"] == 2  # just written: may still change within its timestamp, not cached
    monkeypatch.setattr(ck, "_RACY_NS", -10**18)  # as if written long ago
    sweep(a, (pa, pb), [0.0, 0.7], (x, y))
    before = _counters()
    r2 = sweep(a, (pa, pb), [0.0, 0.7], (x, y))
    assert _delta(before)["file_hashes"] == 0
    assert r2.meta["checkpoints"] == r1.meta["checkpoints"]
    torch.save(a.state_dict(), pb)  # rewritten: new stat fields, new hash
    r3 = sweep(a, (pa, pb), [0.0, 0.7], (x, y))
    assert r3.meta["checkpoints"][1]["sha256"] == hashlib.sha256(pb.read_bytes()).hexdigest()
    assert r3.meta["checkpoints"][1]["sha256"] != r1.meta["checkpoints"][1]["sha256"]


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints follow the data and the weights


def test_data_modified_in_place_changes_the_fingerprint():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    fp = sweep(a, (a, b), [0.3], (x, y)).meta["data"]["sha256"]
    x.add_(1.0)  # an in-place op: the version counter moves
    r = sweep(a, (a, b), [0.3], (x, y))
    assert r.meta["data"]["sha256"] != fp
    assert r.meta["data"]["sha256"] == hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    y[0] = (y[0] + 1) % 10  # the labels too
    assert sweep(a, (a, b), [0.3], (x, y)).meta["data"]["sha256"] != r.meta["data"]["sha256"]


def test_data_written_behind_torchs_back_changes_the_fingerprint():
    a, b = _lenet(0), _lenet(1)
    x, y = _data(n=3000)
    fp = sweep(a, (a, b), [0.3], (x, y)).meta["data"]["sha256"]
    before = x._version
    x.numpy()[:] *= 2  # through numpy: torch's version counter does not see it ...
    assert x._version == before
    r = sweep(a, (a, b), [0.3], (x, y))  # ... the probe does
    assert r.meta["data"]["sha256"] != fp
    assert r.meta["data"]["sha256"] == hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    x.data[:, :, 0, 0] = 5.0  # through .data, every sample: hits probed elements
    assert sweep(a, (a, b), [0.3], (x, y)).meta["data"]["sha256"] != r.meta["data"]["sha256"]


def test_small_tensors_are_probed_by_value():
    # a tensor of <= probe size elements is probed whole (a copy, never a view of itself)
    a, b = _lenet(0), _lenet(1)
    x, y = _data(n=5)
    fp = sweep(a, (a, b), [0.3], (x, y)).meta["data"]["sha256"]
    y.numpy()[2] = (int(y[2]) + 1) % 10
    assert sweep(a, (a, b), [0.3], (x, y)).meta["data"]["sha256"] != fp


def test_checkpoint_changes_change_the_fingerprint():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    r0 = sweep(a, (a, b), [0.3, 1.0], (x, y))
    with torch.no_grad():
        b.out.bias.add_(0.5)  # optimizer-style in-place update
    r1 = sweep(a, (a, b), [0.3, 1.0], (x, y))
    assert r1.meta["checkpoints"][1]["sha256"] == ck._hash_state(b.state_dict()) != r0.meta["checkpoints"][1]["sha256"]
    assert r1.meta["fingerprint"] != r0.meta["fingerprint"]
    assert r1.loss[1] != r0.loss[1]  # and the weights used are the new ones
    b.load_state_dict(_lenet(5).state_dict())
    r2 = sweep(a, (a, b), [0.3, 1.0], (x, y))
    assert r2.meta["checkpoints"][1]["sha256"] == ck._hash_state(b.state_dict()) != r1.meta["checkpoints"][1]["sha256"]
    b.hidden[0].weight.data.mul_(2)  # through .data: no version bump, the probe sees it
    r3 = sweep(a, (a, b), [0.3, 1.0], (x, y))
    assert r3.meta["checkpoints"][1]["sha256"] == ck._hash_state(b.state_dict()) != r2.meta["checkpoints"][1]["sha256"]
    b.out.weight = nn.Parameter(b.out.weight.detach() * 3)  # a new tensor object
    r4 = sweep(a, (a, b), [0.3, 1.0], (x, y))
    assert r4.meta["checkpoints"][1]["sha256"] == ck._hash_state(b.state_dict()) != r3.meta["checkpoints"][1]["sha256"]


def test_new_objects_with_equal_values_hash_equal():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    r1 = sweep(a, (a, b), [0.3], (x, y))
    r2 = sweep(_lenet(0), (_lenet(0), _lenet(1)), [0.3], (x.clone(), y.clone()))
    assert r2.meta["fingerprint"] == r1.meta["fingerprint"]
    _same(r1, r2)


# ---------------------------------------------------------------------------------------------------------------
# The cached engine follows the model


def test_model_changes_between_calls_rebuild_the_engine():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    alphas = [-0.3, 0.4, 1.2]
    sweep(a, (a, b), alphas, (x, y), precision="fp64")
    before = _counters()
    a.activation = "tanh"  # MLP.forward branches on it: a stale trace would still apply ReLU
    res = sweep(a, (a, b), alphas, (x, y), precision="fp64")
    ref = sweep(a, (a, b), alphas, (x, y), precision="fp64", method="loop")
    assert _delta(before)["builds"] == 1 and res.meta["engine_cache"] == "built"
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10)

    def doubled(self, x):  # an instance-level forward
        return 2 * type(self).forward(self, x)

    a.forward = types.MethodType(doubled, a)
    res = sweep(a, (a, b), alphas, (x, y), precision="fp64")
    ref = sweep(a, (a, b), alphas, (x, y), precision="fp64", method="loop")
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10)
    del a.forward
    a.out = nn.Linear(20, 10)  # a replaced submodule (same shapes)
    b.out = nn.Linear(20, 10)
    res = sweep(a, (a, b), alphas, (x, y), precision="fp64")
    ref = sweep(a, (a, b), alphas, (x, y), precision="fp64", method="loop")
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10)


class _Shifted(nn.Module):
    """Reads a non-persistent buffer: the engine's copy carries its value."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("shift", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.fc(x) + self.shift


def test_non_persistent_buffer_change_rebuilds_the_engine():
    torch.manual_seed(0)
    m = _Shifted().eval()
    theta_b = {k: v + 0.1 for k, v in m.state_dict().items()}
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    r1 = sweep(m, (m, theta_b), [0.5], (x, y), precision="fp64")
    m.shift.add_(torch.tensor([3.0, 0.0, 0.0], dtype=m.shift.dtype))
    r2 = sweep(m, (m, theta_b), [0.5], (x, y), precision="fp64")
    ref = sweep(m, (m, theta_b), [0.5], (x, y), precision="fp64", method="loop")
    assert r2.meta["engine_cache"] == "built" and r2.loss[0] != r1.loss[0]
    np.testing.assert_allclose(r2.loss, ref.loss, rtol=1e-10)


def test_cached_engine_serves_other_slices_and_K_and_holds_nothing_after():
    a, b, c = _lenet(0), _lenet(1), _lenet(2)
    x, y = _data()
    model_bytes = sum(v.numel() * v.element_size() for v in a.state_dict().values())
    held = {}
    for K in (2, 40):
        r = sweep(a, (a, b), np.linspace(0, 1, K), (x, y), precision="fp64")
        held[K] = r.meta["held_bytes"]
    assert held[2] == held[40] == 3 * 2 * model_bytes  # fp64: two endpoints and one direction, whatever K is
    plane = Barycentric(a, b, c, alphas="0:1:3", betas="0:1:3")
    res = sweep(a, plane, data=(x, y), precision="fp64")
    ref = sweep(a, plane, data=(x, y), precision="fp64", method="loop")
    assert res.meta["engine_cache"] == "reused"  # same structure, same tensors: only the slice is bound anew
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10)
    for entry in em._ENGINES.values():  # between sweeps the cached engines hold no weights
        assert entry.engine.held_bytes() == 0 and entry.engine.ctx.pts is None
        assert all(not m.slices for m in entry.engine.layers())


@pytest.mark.parametrize("case,force,path", [("lstm", (), "fallback"),
                                             ("transformer", ["enc.layers.0.self_attn"], "fallback"),
                                             ("mlp", ["scale"], "fallback"), ("mlp", (), "own tensors per point")])
def test_cached_fallback_engines_hold_no_weights_and_stay_exact(case, force, path):
    import test_sweep as sw

    model, theta_b, data = sw._make(case)
    for attempt in range(2):
        res = sweep(model, (model, theta_b), [0.0, 0.4, 1.3], data, precision="fp64", fallback=force)
        assert res.meta["engine_cache"] == ("built", "reused")[attempt]
        ref = sweep(model, (model, theta_b), [0.0, 0.4, 1.3], data, precision="fp64", method="loop")
        sw.assert_match(res, ref, 1e-10)
    assert any(path in p for p in res.meta["paths"].values())
    for entry in em._ENGINES.values():  # the fallback modules' copies of the weights were dropped
        held = [t for t in (*entry.engine.parameters(), *entry.engine.buffers())
                if t.is_floating_point() and t.device.type != "meta"]
        assert sum(t.numel() for t in held) == 0


def test_failed_sweep_drops_its_engine(monkeypatch):
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    sweep(a, (a, b), [0.5], (x, y))

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as mp:
        mp.setattr(ev._EngineEvaluator, "evaluate", broken)
        with pytest.raises(RuntimeError, match="boom"):
            sweep(a, (a, b), [0.5], (x, y))
    assert sweep(a, (a, b), [0.5], (x, y)).meta["engine_cache"] == "built"


def test_compile_builds_its_own_engine():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    sweep(a, (a, b), [0.5], (x, y))
    r = sweep(a, (a, b), [0.5], (x, y), compile="eager")
    assert r.meta["engine_cache"] == "off"
    assert sweep(a, (a, b), [0.5], (x, y)).meta["engine_cache"] == "reused"


# ---------------------------------------------------------------------------------------------------------------
# No-repeat plan


class _MethodFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc1, self.fc2 = nn.Linear(20, 9), nn.Linear(9, 4)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(self.drop(x.flatten(1)))))  # no fusable chain at the first layer


class _ReadsInput(nn.Module):
    """The input also feeds a residual: every row block must be there, the repeat stays."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(x) + x


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(4, 3)

    def forward(self, u, v):
        return self.a(u) * torch.tanh(self.b(v)) + v.sum(1, keepdim=True)


def _conv_first():
    return zoo.create("resnet20", num_classes=10, in_shape=(3, 8, 8))


CASES = {  # model, input, the inputs planned unrepeated, how many inputs are still repeated
    "lenet": (lambda: _lenet(0), lambda: torch.randn(6, 1, 6, 6), {0, "x"}, 0),
    "method_flatten": (_MethodFlatten, lambda: torch.randn(6, 4, 5), {0, "x"}, 0),
    "resnet20": (_conv_first, lambda: torch.randn(5, 3, 8, 8), {0, "x"}, 0),
    "reads_input": (_ReadsInput, lambda: torch.randn(6, 5), set(), 1),
    "two_inputs": (_TwoInputs, lambda: (torch.randn(6, 5), torch.randn(6, 4)), {0, "u"}, 1),  # v is read by .sum
}


def _outputs(case, fuse, dtype):
    make, inputs, plan, repeated = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    theta_b = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    for k in theta_b:
        if k.endswith("running_var"):
            theta_b[k] = theta_b[k].abs() + 0.5
    aff = Line(model, theta_b, [-0.4, 0.0, 0.3, 0.6, 1.0, 1.3]).resolve([model.state_dict(), theta_b], model, dtype)
    torch.manual_seed(2)
    x = inputs()
    x = tuple(t.to(dtype) for t in x) if isinstance(x, tuple) else x.to(dtype)
    B = (x[0] if isinstance(x, tuple) else x).shape[0]
    outs = {}
    for no_repeat in (True, False):
        mp = MultiPointModel(model, aff, fuse=fuse, no_repeat=no_repeat)
        mp.set_points(aff.points())
        with torch.inference_mode():
            outs[no_repeat] = mp(x, B)
        if no_repeat:
            assert set(mp.unrepeated_inputs) == plan
            assert mp.repeated_inputs == repeated  # a planned input is never repeated
    return outs, plan


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_repeat_is_bit_identical_to_the_repeat_layout(case, fuse, dtype):
    outs, _ = _outputs(case, fuse, dtype)
    assert torch.equal(outs[True], outs[False])


def test_no_repeat_sweep_matches_the_oracle():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    res = sweep(a, (a, b), [-0.5, 0.2, 1.0, 1.5], (x, y), precision="fp64", batch_size=8)
    ref = sweep(a, (a, b), [-0.5, 0.2, 1.0, 1.5], (x, y), precision="fp64", batch_size=8, method="loop")
    assert res.meta["unrepeated_inputs"] == ["x"]
    for k in res.metrics:
        np.testing.assert_allclose(res.metrics[k], ref.metrics[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_no_repeat_with_recompute_bn_and_partial_points():
    torch.manual_seed(0)
    model = _conv_first().eval()
    g = torch.Generator().manual_seed(1)
    theta_b = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    theta_b = {k: (v.abs() + 0.5) if k.endswith("running_var") else v for k, v in theta_b.items()}
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 10, (10,))
    for bn in ("interpolate", "recompute"):
        kw = dict(bn=bn, precision="fp64", batch_size=4, points_per_pass=2)
        if bn == "recompute":
            kw["bn_data"] = (x, y)
        res = sweep(model, (model, theta_b), [0.0, 0.4, 1.0], (x, y), **kw)
        ref = sweep(model, (model, theta_b), [0.0, 0.4, 1.0], (x, y), method="loop", **kw)
        assert res.meta["unrepeated_inputs"] == ["x"]
        np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Per-batch work: the shared-input bank and the metrics


def test_bank_is_the_slice_storage_when_every_anchor_is_used():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    aff = Line({"w": a}, {"w": b}, [-0.2, 0.3, 0.9]).resolve([{"w": a}, {"w": b}], nn.Module(), torch.float64)
    w = aff.params["w"]
    pts = aff.points().to("cpu")
    bank, mix = _bank(w, pts)
    assert bank.data_ptr() == w.anchors.data_ptr() and bank.shape == (3, 7, 5)  # no copy
    assert _bank(w, pts)[1] is mix  # the mixing matrix is made once per Points
    one = aff.points([0, 1])  # only anchor 0 used: a bank of that anchor and the direction
    bank1, _ = _bank(w, one)
    assert bank1.shape == (2, 7, 5) and bank1.data_ptr() != w.anchors.data_ptr()
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for p in (pts, one):
        out = lerp_linear(x, w, None, p, shared_input=True)
        ref = torch.einsum("ni,koi->kno", x, combine(w.anchors, w.dirs, p.anchor_idx, p.coefs))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    separate = ParamSlice(w.anchors.clone(), w.dirs.clone())  # not one storage: the concatenated bank
    assert separate.joint() is None
    torch.testing.assert_close(lerp_linear(x, separate, None, pts, shared_input=True),
                               lerp_linear(x, w, None, pts, shared_input=True), rtol=0, atol=0)


def test_points_moved_to_a_device_carry_their_used_anchors():
    p = Points(torch.tensor([1, 0, 1]), torch.zeros(3, 1))
    q = p.to("cpu")
    used, pos = q._cache["used"]
    assert used.tolist() == [0, 1] and pos.tolist() == [1, 0, 1]


def _metrics_reference(z, t, r):
    """The definitions as torch's own ops compute them (float64)."""
    K, N, C = z.shape
    z, r = z.double(), r.double()
    loss = F.cross_entropy(z.reshape(-1, C), t.repeat(K), reduction="none").reshape(K, N).mean(1)
    pred = z.argmax(-1)
    top5 = (~(z.topk(min(5, C), -1).indices == t[None, :, None]).any(-1)).double().mean(1)
    dist = ((torch.softmax(z, -1) - torch.softmax(r, -1)[None]) ** 2).sum(-1).mean(1).sqrt()
    return {"loss": loss, "error": (pred != t).double().mean(1), "top5_error": top5, "distance": dist,
            "disagreement": (pred != r.argmax(-1)[None]).double().mean(1)}


@pytest.mark.parametrize("C", [3, 10, 37])
def test_metrics_equal_torchs_definitions(C):
    g = torch.Generator().manual_seed(C)
    K, N = 5, 123
    z, t = torch.randn(K, N, C, generator=g) * 4, torch.randint(0, C, (N,), generator=g)
    r = torch.randn(N, C, generator=g)
    m = PointMetrics(K)
    m.update(z[:, :60], t[:60], r[:60])
    m.update(z[:, 60:], t[60:], r[60:])
    out, ref = m.compute(), _metrics_reference(z, t, r)
    assert set(out) == ({"loss", "error", "distance", "disagreement"} | ({"top5_error"} if C >= 5 else set()))
    for k in out:
        np.testing.assert_allclose(out[k], ref[k].numpy(), rtol=1e-13, atol=1e-15, err_msg=k)
    custom = PointMetrics(K, loss_fn=lambda zz, tt: F.cross_entropy(zz, tt, reduction="none"))
    custom.update(z, t, r)
    np.testing.assert_allclose(custom.compute()["loss"], ref["loss"].numpy(), rtol=1e-13)


def test_metrics_of_a_regression_loss():
    z, t = torch.randn(3, 20, 1, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    m = PointMetrics(3, loss_fn=lambda out, tt: (out.reshape(-1) - tt) ** 2, reference=False)
    m.update(z, t)
    np.testing.assert_allclose(m.compute()["loss"], ((z[..., 0] - t) ** 2).mean(1).numpy(), rtol=1e-14)
    with pytest.raises(ValueError, match="class indices"):
        PointMetrics(3).update(z, t)


def test_metrics_with_nan_logits_stay_consistent():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 50, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (50,), generator=g)
    z[0, :10, 3] = float("nan")
    z[1, 5] = float("nan")
    m = PointMetrics(2, reference=False)
    m.update(z, t)
    out = m.compute()
    assert np.all(out["top5_error"] <= out["error"])
    bad = torch.isnan(z).any(-1)  # a sample with a NaN logit is wrong (lerpfast.metrics' rule), whatever argmax says
    np.testing.assert_array_equal(out["error"], ((z.argmax(-1) != t) | bad).double().mean(1).numpy())
    assert np.isnan(out["loss"]).all()


def test_meta_timings_cover_the_call():
    a, b = _lenet(0), _lenet(1)
    x, y = _data()
    r = sweep(a, (a, b), [0.5], (x, y))
    tm = r.meta["timings"]
    parts = ("checkpoints", "slice", "describe_checkpoints", "describe_data", "store", "engine", "evaluate", "finish")
    assert all(tm[k] >= 0 for k in parts) and sum(tm[k] for k in parts) <= tm["total"]
    assert tm["evaluate.forward"] + tm["evaluate.metrics"] <= tm["evaluate"]
    json.dumps(r.meta)


def test_data_fingerprint_of_more_than_2_pow_24_elements():
    """60k MNIST-size images (47 M floats): the probe indexes stay in range and see a write to the last element."""
    from lerpfast.checkpoints import _probe

    t = torch.zeros(60_000 * 784)
    before = _probe(t, 1024)
    t[-1] = 1.0
    assert not torch.equal(before, _probe(t, 1024))


def test_cpu_weights_built_once_per_chunk_not_per_batch(monkeypatch):
    """Issue 17: on the CPU the K points' conv / linear weights (BN folded in) are built once per chunk of points
    and reused for its batches when it has enough of them, within the LERPFAST_CPU_WEIGHT_CACHE budget; the
    numbers are the same bits."""
    import test_sweep as sw

    from lerpfast.engine import functional

    model, theta_b, (x, y) = sw._make("resnet20")
    calls = []
    combine = functional.combine

    def counting(anchors, *a, **k):
        if anchors.dim() >= 3:  # a weight, not a bias or BN vector
            calls.append(1)
        return combine(anchors, *a, **k)

    monkeypatch.setattr(functional, "combine", counting)
    kw = dict(batch_size=2, precision="fp64", reference=None)
    n_batches = -(-len(x) // 2)
    assert n_batches >= functional.CACHE_MIN_BATCHES
    res = sweep(model, (model, theta_b), [0.0, 0.4, 1.3], (x, y), **kw)
    cached = len(calls)
    calls.clear()
    monkeypatch.setattr(functional, "CPU_WEIGHT_CACHE", 0)  # no budget: rebuilt on every batch, as before
    again = sweep(model, (model, theta_b), [0.0, 0.4, 1.3], (x, y), **kw)
    np.testing.assert_array_equal(res.loss, again.loss)
    assert len(calls) >= (n_batches - 1) * cached > 0
