"""lerpfast.sweep against the oracle (loop over points, load_state_dict, evaluate).

float64: equal to 1e-10 relative; fp32: 1e-5. Models: MLP (+ a custom layer on the fallback path),
ResNet-20 and a VGG-style CNN with BN, nn.TransformerEncoder and LSTM classifiers, and transformers'
BERT and GPT-2 built from small configs (no download).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lerpfast
from lerpfast import Barycentric, Bilinear, Line, RandomDirections, Ray, sweep
from lerpfast.train import models as zoo

# ---------------------------------------------------------------------------------------------------------------
# Models


class Scale(nn.Module):
    """A user's custom layer owning a parameter: its parameter per point (issue 17), or the fallback if forced."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(n) * 0.1 + 1)

    def forward(self, x):
        return x * self.gain


class MLP(nn.Module):
    def __init__(self, d_in=20, classes=7):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(d_in, 33), nn.Linear(33, 33), nn.Linear(33, classes)
        self.scale = Scale(33)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        h = h + torch.tanh(self.scale(self.fc2(h)))  # residual add, functional calls on children
        return self.out(h)


class VGGish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        cfg, layers, c = [8, "M", 16, "M", 16], [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(c * 2 * 2, 24), nn.BatchNorm1d(24), nn.ReLU(),
                                        nn.Linear(24, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=31, d=16, classes=5, seq=9):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, 2, 24, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.enc(self.tok(idx) + self.pos(pos))
        return self.head(self.norm(h).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=31, d=12, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, 10, num_layers=2)  # sequence-first: the fallback must find the batch on axis 1
        self.gn = nn.GroupNorm(2, 10)
        self.head = nn.Linear(20, classes)

    def forward(self, idx):
        out, (h, c) = self.rnn(self.emb(idx).transpose(0, 1))
        return self.head(torch.cat([self.gn(out[-1]), h[-1]], 1))


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=5,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=31, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=5,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(cfg)


def _perturb(model: nn.Module, seed: int, scale=0.3) -> dict:
    """A second checkpoint: every float tensor moved (running statistics kept positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=g, dtype=v.dtype) * scale * (v.std() if v.numel() > 1 else 1.0)
            v = v.abs() * (1 + 0.3 * torch.rand(v.shape, generator=g)) if k.endswith("running_var") else v + noise
        out[k] = v.clone()
    return out


def _with_stats(model: nn.Module, seed: int) -> nn.Module:
    """Give BN layers non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(5)
    return model


def _images(n, shape, classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _tokens(n, seq, vocab, classes, seed=1, low=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n, seq), generator=g), torch.randint(0, classes, (n,), generator=g)


CASES = {
    "mlp": lambda: (MLP(), _images(23, (4, 5), 7)),
    "resnet20": lambda: (_with_stats(zoo.create("resnet20", num_classes=10, in_shape=(3, 8, 8)), 0),
                         _images(13, (3, 8, 8), 10)),
    "vgg_bn": lambda: (_with_stats(VGGish(), 0), _images(13, (3, 8, 8), 10)),
    "transformer": lambda: (TransformerClassifier(), _tokens(11, 9, 31, 5)),
    "lstm": lambda: (LSTMClassifier(), _tokens(11, 7, 31, 5)),
    "bert": lambda: (_bert(), _tokens(11, 9, 31, 5)),
    "gpt2": lambda: (_gpt2(), _tokens(11, 9, 31, 5, low=2)),
}


def _make(case: str):
    torch.manual_seed(0)
    model, data = CASES[case]()
    return model.eval(), _perturb(model, 1), data


def assert_match(res, ref, rtol: float, discrete_atol: float = 0.0):
    assert set(res.metrics) == set(ref.metrics)
    np.testing.assert_array_equal(res.coords, ref.coords)
    for name in res.metrics:
        a, b = res.metrics[name], ref.metrics[name]
        assert np.all(np.isfinite(a)), name
        if name in ("error", "top5_error", "disagreement"):
            np.testing.assert_allclose(a, b, rtol=0, atol=discrete_atol, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-3, err_msg=name)


ALPHAS = [-0.5, 0.0, 0.3, 0.5, 1.0, 1.7]


@pytest.mark.parametrize("case", list(CASES))
def test_every_model_matches_oracle_fp64_and_fp32(case):
    model, theta_b, data = _make(case)
    kw = dict(batch_size=5)
    for precision, rtol, atol in (("fp64", 1e-10, 0.0), ("fp32", 1e-5, 1.01 / len(data[1]))):
        res = sweep(model, (model, theta_b), ALPHAS, data, precision=precision, **kw)
        ref = sweep(model, (model, theta_b), ALPHAS, data, precision=precision, method="loop", **kw)
        assert_match(res, ref, rtol, atol)
    # the functional distance of the reference point (alpha = 0) to itself is 0
    assert res.metrics["distance"][1] == pytest.approx(0.0, abs=1e-6)
    assert res.loss.std() > 0  # the points are really different


@pytest.mark.parametrize("K", [1, 3, 17])
@pytest.mark.parametrize("case", ["mlp", "resnet20"])
def test_K_points(case, K):
    model, theta_b, data = _make(case)
    alphas = np.linspace(-0.25, 1.25, K)
    res = sweep(model, (model, theta_b), alphas, data, precision="fp64", batch_size=4, points_per_pass=7)
    ref = sweep(model, (model, theta_b), alphas, data, precision="fp64", batch_size=4, method="loop")
    assert_match(res, ref, 1e-10)
    assert res.meta["points_per_pass"] == min(7, K)


def _slices(model, t1, t2, t3):
    return {
        "line": Line(model, t1, "-0.5:1.5:5"),
        "bilinear": Bilinear(model, t1, t2, t3, alphas=[0, 0.4, 1], betas=[0, 1, 1.3]),
        "barycentric": Barycentric(model, t1, t2, alphas=[0, 0.5, 1], betas=[0, 0.3, 1]),
        "ray": Ray(model, t1, lambdas=[0.0, 0.5, 2.0, 5.0]),
        "random1d": RandomDirections(model, xs=[-0.5, 0, 0.5], seed=3),
        "random2d": RandomDirections(model, xs=[-0.5, 0.5], ys=[-0.2, 0, 0.2], seed=3, ignore_bias_bn=False),
    }


@pytest.mark.parametrize("kind", ["line", "bilinear", "barycentric", "ray", "random1d", "random2d"])
def test_every_slice_kind(kind):
    model, t1, data = _make("resnet20")
    t2, t3 = _perturb(model, 2), _perturb(model, 3)
    spec = _slices(model, t1, t2, t3)[kind]
    res = sweep(model, spec, None, data, precision="fp64", batch_size=6)
    ref = sweep(model, _slices(model, t1, t2, t3)[kind], None, data, precision="fp64", batch_size=6, method="loop")
    assert_match(res, ref, 1e-10)
    if res.grid_shape is not None:
        assert res.grid("loss").shape == res.grid_shape


@pytest.mark.parametrize("bn", ["interpolate", "endpoint", "endpoint:1", "recompute"])
@pytest.mark.parametrize("case", ["resnet20", "vgg_bn"])
def test_bn_policies(case, bn):
    model, theta_b, data = _make(case)
    calib = _images(17, data[0].shape[1:], 10, seed=7)
    res = sweep(model, (model, theta_b), [0.0, 0.35, 1.2], data, bn=bn, bn_data=calib, precision="fp64",
                batch_size=6)
    ref = sweep(model, (model, theta_b), [0.0, 0.35, 1.2], data, bn=bn, bn_data=calib, precision="fp64",
                batch_size=6, method="loop")
    assert_match(res, ref, 1e-10)


def test_bn_policies_differ_and_recompute_equals_manual_recalibration():
    model, theta_b, data = _make("vgg_bn")
    calib = _images(17, data[0].shape[1:], 10, seed=7)
    kw = dict(precision="fp64", batch_size=6, bn_data=calib)
    losses = {bn: sweep(model, (model, theta_b), [0.5], data, bn=bn, **kw).loss[0]
              for bn in ("interpolate", "endpoint", "recompute")}
    assert len({round(v, 8) for v in losses.values()}) == 3
    # by hand: the midpoint, BN statistics reset and recomputed as a cumulative average over calib batches
    net = VGGish().double()
    mid = {k: (torch.lerp(v.double(), theta_b[k].double(), 0.5) if v.is_floating_point() else v)
           for k, v in model.state_dict().items()}
    net.load_state_dict(mid)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    net.classifier[0].p = 0.0  # dropout must not act during calibration
    with torch.no_grad():
        for i in range(0, 17, 6):
            net(calib[0][i:i + 6].double())
        net.eval()
        loss = nn.functional.cross_entropy(net(data[0].double()), data[1]).item()
    assert losses["recompute"] == pytest.approx(loss, rel=1e-10)


def test_line_endpoints_bit_exact_and_equal_to_torch_lerp():
    model, theta_b, _ = _make("resnet20")
    alphas = np.array([0.0, 1.0, 0.1, 0.49999, 0.5, 0.75, -0.3, 1.4], dtype=np.float64)
    aff = Line(model, theta_b, alphas).resolve([model.state_dict(), theta_b], model, torch.float32)
    a, b = model.state_dict(), theta_b
    for k in range(len(alphas)):
        state = aff.state_dict(k)
        for key, v in state.items():
            if not v.is_floating_point():
                assert torch.equal(v, a[key])
                continue
            w = torch.tensor(alphas[k], dtype=torch.float32)
            # torch.lerp's CPU kernel fuses multiply and add (one rounding): interior points agree to an ulp
            torch.testing.assert_close(v, torch.lerp(a[key], b[key], w), rtol=2e-7, atol=1e-7)
    assert all(torch.equal(aff.state_dict(0)[k], a[k]) for k in a)
    assert all(torch.equal(aff.state_dict(1)[k], b[k]) for k in a if b[k].is_floating_point())


def test_plane_corners_bit_exact():
    model, t1, _ = _make("mlp")
    t2, t3 = _perturb(model, 2), _perturb(model, 3)
    s0 = model.state_dict()
    bil = Bilinear(s0, t1, t2, t3, alphas=[0, 0.5, 1], betas=[0, 1]).resolve([s0, t1, t2, t3], model, torch.float32)
    corners = {(0, 0): s0, (1, 0): t1, (0, 1): t2, (1, 1): t3}
    bar = Barycentric(s0, t1, t2, alphas=[0, 1], betas=[0, 0.5, 1]).resolve([s0, t1, t2], model, torch.float32)
    bar_corners = {(0, 0): s0, (0, 0.5): s0, (0, 1): s0, (1, 1): t1, (1, 0): t2}
    for aff, table in ((bil, corners), (bar, bar_corners)):
        for k, (ca, cb) in enumerate(aff.coords):
            if (ca, cb) in table:
                st = aff.state_dict(k)
                assert all(torch.equal(st[n], table[(ca, cb)][n]) for n in st), (aff.kind, ca, cb)


def test_random_directions_filter_normalized_and_seeded():
    model, _, _ = _make("resnet20")
    s = model.state_dict()
    spec = RandomDirections(model, xs=[0, 1], seed=11)
    (d,) = spec.directions(s, model, 1)
    params = dict(model.named_parameters())
    for key, v in d.items():
        if key in params and v.dim() >= 2:
            np.testing.assert_allclose(v.flatten(1).norm(dim=1), s[key].flatten(1).norm(dim=1), rtol=1e-5)
        else:
            assert not v.any(), key  # biases / BN parameters / buffers: zero with ignore_bias_bn
    (d2,) = RandomDirections(model, xs=[0, 1], seed=11).directions(s, model, 1)
    assert all(torch.equal(d[k], d2[k]) for k in d)
    (d3,) = RandomDirections(model, xs=[0, 1], seed=12).directions(s, model, 1)
    assert not torch.equal(d["conv.weight" if "conv.weight" in d else next(iter(d))], d3[next(iter(d))])


def test_ray_reaches_theta0_at_its_distance():
    model, theta0, _ = _make("mlp")
    s1 = model.state_dict()
    spec = Ray(s1, theta0, lambdas=[0.0, 1.0])
    aff = spec.resolve([s1, theta0], model, torch.float64)
    dist = aff.info["distance"]
    ref = np.sqrt(sum(float((theta0[k].double() - s1[k].double()).pow(2).sum()) for k, _ in model.named_parameters()))
    assert dist == pytest.approx(ref, rel=1e-12)
    spec2 = Ray(s1, theta0, lambdas=[dist])
    end = spec2.resolve([s1, theta0], model, torch.float64).state_dict(0)
    for k in theta0:
        torch.testing.assert_close(end[k].double(), theta0[k].double(), rtol=1e-10, atol=1e-12)


def test_parameter_memory_does_not_grow_with_K():
    model, theta_b, data = _make("resnet20")
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values() if v.is_floating_point())
    held, peak = {}, {}
    for K in (1, 32):
        r = sweep(model, (model, theta_b), np.linspace(0, 1, K), (data[0][:4], data[1][:4]), batch_size=4)
        held[K], peak[K] = r.meta["held_bytes"], r.meta["max_materialized_bytes"]
    assert held[1] == held[32] <= 3 * model_bytes  # two endpoints + one direction, whatever K is
    # the largest K-point tensor ever built belongs to one layer: far below K copies of the model
    assert peak[32] < 0.2 * 33 * model_bytes
    largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
    assert peak[32] == 33 * largest  # K + the reference point


def test_user_model_is_not_modified():
    model, theta_b, data = _make("lstm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    sweep(model, (model, theta_b), [0.5, 1.0], data)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_paths_are_reported():
    model, theta_b, data = _make("lstm")
    r = sweep(model, (model, theta_b), [0.5], data)
    assert r.meta["paths"]["rnn"] == "fallback:LSTM (loop)"
    assert r.meta["paths"]["head"] == "native:Linear" and r.meta["paths"]["gn"] == "native:GroupNorm"
    model, theta_b, data = _make("transformer")
    r = sweep(model, (model, theta_b), [0.5], data)
    assert r.meta["paths"]["enc.layers.0.self_attn"] == "native:MultiheadAttention"  # issue 17
    assert r.meta["paths"]["enc.layers.1.linear2"] == "native:Linear"
    model, theta_b, data = _make("mlp")
    r = sweep(model, (model, theta_b), [0.5], data, fallback=["fc2"])
    assert r.meta["paths"]["scale"] == "native:Scale (own tensors per point: gain)"  # issue 17: not the fallback
    assert r.meta["paths"]["fc2"] == "fallback:Linear (loop)"


def test_data_forms_and_chunking_agree():
    model, theta_b, (x, y) = _make("mlp")
    base = sweep(model, (model, theta_b), "0:1:5", (x, y), batch_size=6, precision="fp64")
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    for data in (ds, loader, iter(list(loader))):
        with pytest.warns(UserWarning) if not hasattr(data, "__len__") else _nullcontext():
            r = sweep(model, (model, theta_b), "0:1:5", data, batch_size=9, precision="fp64", points_per_pass=2)
        assert_match(r, base, 1e-10)
    assert r.meta["num_samples"] == len(y)


def test_dict_inputs_and_reference_index():
    model, theta_b, (ids, y) = _make("bert")
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    res = sweep(model, (model, theta_b), [0.0, 1.0], ({"input_ids": ids, "attention_mask": mask}, y),
                precision="fp64", reference=1)
    ref = sweep(model, (model, theta_b), [0.0, 1.0], ({"input_ids": ids, "attention_mask": mask}, y),
                precision="fp64", reference=1, method="loop")
    assert_match(res, ref, 1e-10)
    assert res.metrics["distance"][1] == 0.0 and res.metrics["distance"][0] > 0


def test_vmap_baseline_agrees():
    model, theta_b, data = _make("resnet20")
    res = sweep(model, (model, theta_b), [0.2, 0.9], data, precision="fp64", method="vmap")
    ref = sweep(model, (model, theta_b), [0.2, 0.9], data, precision="fp64", method="loop")
    assert_match(res, ref, 1e-10)


# what CUDA raises, and what torch's CPU allocator raises (a plain RuntimeError)
OOM_ERRORS = [torch.OutOfMemoryError("simulated: CUDA out of memory"),
              RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")]


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["cuda", "cpu"])
def test_out_of_memory_halves_points_per_pass(monkeypatch, error):
    import lerpfast.evaluate as sweep_mod

    model, theta_b, data = _make("mlp")
    real = sweep_mod._EngineEvaluator.evaluate

    def flaky(self, pts, ref, batches):
        if pts.K > 2:
            raise error
        return real(self, pts, ref, batches)

    base = sweep(model, (model, theta_b), "0:1:7", data, precision="fp64")
    monkeypatch.setattr(sweep_mod._EngineEvaluator, "evaluate", flaky)
    with pytest.warns(UserWarning, match="out of memory"):
        r = sweep(model, (model, theta_b), "0:1:7", data, precision="fp64")
    assert r.meta["points_per_pass"] == 1  # 7 -> 3 -> 1: halved until a pass fits
    assert_match(r, base, 1e-10)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(monkeypatch):
    import lerpfast.evaluate as sweep_mod

    model, theta_b, data = _make("mlp")

    def broken(self, pts, ref, batches):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(sweep_mod._EngineEvaluator, "evaluate", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        sweep(model, (model, theta_b), "0:1:7", data)


def test_tied_weight_read_directly_gives_clear_error():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)

        def forward(self, idx):
            return self.emb(idx).mean(1) @ self.emb.weight.T  # reads the child's weight directly

    model = Tied().eval()
    data = (torch.randint(0, 10, (5, 3)), torch.randint(0, 10, (5,)))
    with pytest.raises(AttributeError, match=r"fallback=\['emb'\]|fallback=\[''\]"):
        sweep(model, (model, _perturb(model, 1)), [0.5], data)
    res = sweep(model, (model, _perturb(model, 1)), [0.5], data, fallback=[Tied], precision="fp64")
    ref = sweep(model, (model, _perturb(model, 1)), [0.5], data, method="loop", precision="fp64")
    assert_match(res, ref, 1e-10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alphas="0:1"), "start:stop:num"),
    (dict(alphas=[0.0, float("nan")]), "finite"),
    (dict(bn="running"), "bn='running'"),
    (dict(precision="fp16"), "precision='fp16'"),
    (dict(method="fast"), "method='fast'"),
    (dict(reference=99), "reference=99"),
    (dict(bn="endpoint:5"), "endpoint:5"),
])
def test_bad_arguments(kwargs, match):
    model, theta_b, data = _make("mlp")
    kw = dict(alphas=[0.5]) | kwargs
    alphas = kw.pop("alphas")
    with pytest.raises(ValueError, match=match):
        sweep(model, (model, theta_b), alphas, data, **kw)


def test_bad_data_and_ckpts():
    model, theta_b, (x, y) = _make("mlp")
    with pytest.raises(ValueError, match="X has 23 samples but y has 22"):
        sweep(model, (model, theta_b), [0.5], (x, y[:-1]))
    with pytest.raises(TypeError, match="pair"):
        sweep(model, (model, theta_b, theta_b), [0.5], (x, y))
    bad = dict(theta_b)
    bad["fc2.weight"] = bad["fc2.weight"].clone()
    bad["fc2.weight"][0, 0] = float("nan")
    with pytest.raises(lerpfast.CheckpointError, match="fc2.weight"):
        sweep(model, (model, bad), [0.5], (x, y))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_extrapolated_bn_variance_warns_where_it_turns_negative():
    """bn='interpolate' beyond the segment can make running_var negative: NaN there, and a warning naming it."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()
    b = copy.deepcopy(a)
    a[1].running_var.fill_(1.0)
    b[1].running_var.fill_(9.0)  # var(alpha) = 1 + 8 alpha < 0 for alpha < -1/8
    x, y = torch.randn(11, 6), torch.randint(0, 3, (11,))
    with pytest.warns(RuntimeWarning, match=r"'1.running_var'\) at 2 of 5 points, coordinates \(-0.5\), \(-0.25\)"):
        r = sweep(a, (a, b), [-0.5, -0.25, 0.0, 0.5, 1.5], (x, y))
    assert np.isnan(r.loss[:2]).all() and np.isfinite(r.loss[2:]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the segment, or with recalibrated statistics: no warning
        sweep(a, (a, b), [0.0, 0.5, 1.0], (x, y))
        r = sweep(a, (a, b), [-0.5, 1.5], (x, y), bn="recompute", bn_data=(x, y))
    assert np.isfinite(r.loss).all()


def test_fallback_keeps_the_faster_of_vmap_and_loop(monkeypatch):
    """Issue 17: a fallback module times vmap against the loop over its points (two calls each, alternating) and
    keeps the faster for its input shape; every call, timed or not, gives the oracle's numbers."""
    from lerpfast.engine import fallback

    model, theta_b, (x, y) = _make("mlp")
    x, y = x[:20], y[:20]  # five full batches of 4: one input shape
    record = fallback.FallbackModule._record
    seen = []

    def fake(key, mode, seconds):  # vmap made to look 20 % slower than the loop: two rounds
        seen.append(mode)
        record(key, mode, 1.2 if mode == "vmap" else 1.0)

    monkeypatch.setattr(fallback.FallbackModule, "_record", staticmethod(fake))
    alphas = [-0.5, 0.3, 1.2]
    ref = sweep(model, (model, theta_b), alphas, (x, y), batch_size=4, precision="fp64", method="loop")
    res = sweep(model, (model, theta_b), alphas, (x, y), batch_size=4, precision="fp64", fallback=["scale"])
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-12)
    assert seen == ["loop", "vmap", "loop", "vmap"]
    assert res.meta["paths"]["scale"] == "fallback:Scale (loop)"
    assert set(fallback.choices().values()) == {"loop"}
    # a clear loser (2x) is settled after one call of each; here vmap wins
    fallback.clear_choices()
    seen.clear()
    monkeypatch.setattr(fallback.FallbackModule, "_record", staticmethod(
        lambda key, mode, s: (seen.append(mode), record(key, mode, 1.0 if mode == "vmap" else 2.0))))
    res = sweep(model, (model, theta_b), alphas, (x, y), batch_size=4, precision="fp64", fallback=["scale"])
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-12)
    assert seen == ["loop", "vmap"] and res.meta["paths"]["scale"] == "fallback:Scale (vmap)"
    # a forced mode skips the timing
    fallback.clear_choices()
    seen.clear()
    monkeypatch.setenv("LERPFAST_FALLBACK", "vmap")
    res = sweep(model, (model, theta_b), alphas, (x, y), batch_size=4, precision="fp64", fallback=["scale"])
    assert seen == [] and res.meta["paths"]["scale"] == "fallback:Scale (vmap)"
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-12)
