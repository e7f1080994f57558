"""Pruned models (torch.nn.utils.prune, issue 18 §3) against a float64 oracle built from torch's own pruning hooks.

The oracle never goes through lerpfast: for every point it builds a fresh float64 model, prunes it with
``prune.custom_from_mask`` and the expected mask, loads the interpolated ``weight_orig`` tensors (torch.lerp in
float64) and runs it, so the pruned module itself computes ``weight_orig * weight_mask``.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils import prune

from lerpfast import RandomDirections, sweep
from lerpfast.checkpoints import CheckpointError

ALPHAS = [-0.5, 0.0, 0.25, 0.5, 1.0, 1.5]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def convnet():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5))


def _data(make, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=g) if make is mlp else torch.randn(n, 3, 5, 5, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


def _layers(net):
    return [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]


def _trained(make, seed):
    """A network with BN statistics that are not the defaults (so that interpolating them matters)."""
    torch.manual_seed(seed)
    net = make()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _prune_like(net, masks):
    for m, mask in zip(_layers(net), masks):
        if mask is not None:
            prune.custom_from_mask(m, "weight", mask)
    return net


def _masks(net):
    return [getattr(m, "weight_mask", None) for m in _layers(net)]


def _orig_state(net):
    """The state a pruned net interpolates: weight_orig under its own key, masks dropped."""
    return {k: v.detach().double() for k, v in net.state_dict().items() if not k.endswith("_mask")}


def oracle(make, states, masks, alphas, data):
    """Mean cross-entropy and error at each alpha of the line between two (orig) states, in float64."""
    x, y = data
    losses, errors = [], []
    for a in alphas:
        net = _prune_like(make().double().eval(), masks)
        point = {k: (torch.lerp(states[0][k], states[1][k], a) if states[0][k].is_floating_point() else states[0][k])
                 for k in states[0]}
        point.update({k: v for k, v in net.state_dict().items() if k.endswith("_mask")})  # the expected masks
        net.load_state_dict(point)  # strict: every tensor of the pruned net is given
        with torch.no_grad():
            logits = net(x.double())
        losses.append(float(F.cross_entropy(logits, y)))
        errors.append(float((logits.argmax(1) != y).double().mean()))
    return np.array(losses), np.array(errors)


def _as_orig(state, masks_by_key):
    """A dense state in the pruned net's key layout (weight -> weight_orig)."""
    out = {}
    for k, v in state.items():
        base = k.rsplit(".", 1)[0]
        out[f"{base}.weight_orig" if k.endswith(".weight") and base in masks_by_key else k] = v
    return out


def _pair(make, how):
    """Two pruned networks with the same mask (the lottery-ticket setting)."""
    a, b = _trained(make, 0), _trained(make, 1)
    if how == "l1":  # per-layer magnitude pruning of a, the mask copied to b
        for m in _layers(a):
            prune.l1_unstructured(m, "weight", amount=0.6)
    elif how == "global":
        prune.global_unstructured([(m, "weight") for m in _layers(a)], prune.L1Unstructured, amount=0.5)
    elif how == "iterative":  # two rounds: a PruningContainer, structured then unstructured
        for m in _layers(a):
            prune.ln_structured(m, "weight", amount=0.25, n=2, dim=0)
            prune.l1_unstructured(m, "weight", amount=0.3)
    _prune_like(b, _masks(a))
    return a, b


@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "convnet"])
@pytest.mark.parametrize("how", ["l1", "global", "iterative"])
@pytest.mark.parametrize("method", ["engine", "loop", "vmap"])
def test_pruned_line_matches_fp64_oracle(make, how, method):
    a, b = _pair(make, how)
    data = _data(make)
    want_loss, want_err = oracle(make, [_orig_state(a), _orig_state(b)], _masks(a), ALPHAS, data)
    res = sweep(a, (a, b), ALPHAS, data, batch_size=10, method=method, progress=False)
    np.testing.assert_allclose(res.loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(res.error, want_err)
    if method == "engine":
        exact = sweep(a, (a, b), ALPHAS, data, batch_size=10, precision="fp64", progress=False)
        np.testing.assert_allclose(exact.loss, want_loss, rtol=1e-11, atol=0)
        assert set(exact.meta["pruning"]) == {f"{i}.weight" for i, m in enumerate(a) if isinstance(m, (nn.Linear,
                                                                                                        nn.Conv2d))}
        # the masks' sparsity is reported (l1 0.6; global 0.5 overall; iterative at least 0.3 per layer)
        assert all(0.25 <= v["sparsity"] < 1 for v in exact.meta["pruning"].values())


def test_user_model_untouched_and_engine_reused():
    a, b = _pair(mlp, "l1")
    hooks = {n: list(m._forward_pre_hooks.values()) for n, m in a.named_modules()}
    before = {k: v.clone() for k, v in a.state_dict().items()}
    r1 = sweep(a, (a, b), ALPHAS, _data(mlp), progress=False)
    r2 = sweep(a, (a, b), ALPHAS, _data(mlp), progress=False)
    assert r2.meta["engine_cache"] == "reused"
    np.testing.assert_array_equal(r1.loss, r2.loss)
    assert {n: list(m._forward_pre_hooks.values()) for n, m in a.named_modules()} == hooks
    after = a.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # the model still prunes: its weight is orig * mask
    assert torch.equal(a[1].weight, a[1].weight_orig * a[1].weight_mask)


def test_different_masks_name_the_module_and_mask_from_picks_one():
    a, b = _trained(mlp, 0), _trained(mlp, 1)
    for net in (a, b):
        prune.l1_unstructured(net[3], "weight", amount=0.5)  # each keeps its own largest weights: masks differ
    data = _data(mlp)
    with pytest.raises(CheckpointError, match=r"module '3'.*'3\.weight'.*differ.*mask_from="):
        sweep(a, (a, b), ALPHAS, data, progress=False)
    for pick, masks in ((1, _masks(b)), ("model", _masks(a)), (0, _masks(a))):
        res = sweep(a, (a, b), ALPHAS, data, mask_from=pick, progress=False)
        want, _ = oracle(mlp, [_orig_state(a), _orig_state(b)], masks, ALPHAS, data)
        np.testing.assert_allclose(res.loss, want, rtol=2e-5, atol=1e-6)
    assert res.meta["pruning"]["3.weight"]["mask_from"] == "model[0]"


def test_dense_init_to_sparse_final():
    """Frankle & Carbin's rewinding line: a dense checkpoint (the init, saved before pruning) to a pruned one."""
    init = _trained(convnet, 0)
    final = _trained(convnet, 1)
    for m in _layers(final):
        prune.l1_unstructured(m, "weight", amount=0.5)
    masks = _masks(final)
    data = _data(convnet)
    dense = init.state_dict()
    res = sweep(final, (dense, final), ALPHAS, data, progress=False)
    want, _ = oracle(convnet, [_as_orig({k: v.double() for k, v in dense.items()},
                                        {str(i) for i, m in enumerate(final) if isinstance(m, (nn.Linear, nn.Conv2d))}),
                               _orig_state(final)], masks, ALPHAS, data)
    np.testing.assert_allclose(res.loss, want, rtol=2e-5, atol=1e-6)
    assert all(v["mask_from"] == "model[1]" for v in res.meta["pruning"].values())


def test_pruned_checkpoints_into_a_dense_model():
    """Checkpoints saved from pruned networks (weight_orig / weight_mask keys) evaluated with the plain model."""
    a, b = _pair(mlp, "global")
    res = sweep(mlp(), (a.state_dict(), b.state_dict()), ALPHAS, _data(mlp), progress=False)
    want, _ = oracle(mlp, [_orig_state(a), _orig_state(b)], _masks(a), ALPHAS, _data(mlp))
    np.testing.assert_allclose(res.loss, want, rtol=2e-5, atol=1e-6)


def test_random_directions_stay_in_the_mask():
    """A random plane around a sparse solution: every point is the pruned network at center + x d1 + y d2."""
    from lerpfast.pruning import load_pruned

    a, _ = _pair(mlp, "l1")
    x, y = _data(mlp)
    spec = RandomDirections(a, xs=[-1.0, 0.5], ys=[0.0, 1.0], seed=3)
    res = sweep(a, spec, None, (x, y), precision="fp64", progress=False)
    net, states, _ = load_pruned([a], a)
    aff = spec.resolve(states, net, torch.float64)  # the (dense) directions, before the masks are applied
    masks = {k: v for k, v in a.state_dict().items() if k.endswith("_mask")}
    for k in range(aff.K):
        pruned = _prune_like(mlp().double().eval(), _masks(a))
        point = aff.state_dict(k)
        pruned.load_state_dict({**{(f"{n}_orig" if f"{n}_mask" in masks else n): v for n, v in point.items()},
                                **{n: m.double() for n, m in masks.items()}})
        with torch.no_grad():
            want = float(F.cross_entropy(pruned(x.double()), y))
        assert res.loss[k] == pytest.approx(want, rel=1e-11)
    assert any(float(p.dirs.abs().sum()) > 0 for p in aff.params.values())


def test_bad_masks_and_mask_from():
    a, b = _pair(mlp, "l1")
    state = b.state_dict()
    state["1.weight_mask"] = state["1.weight_mask"] * 0.5
    with pytest.raises(CheckpointError, match=r"1\.weight_mask of checkpoint\[1\].*only 0 and 1"):
        sweep(a, (a, state), ALPHAS, _data(mlp), labels=None, progress=False)
    with pytest.raises(ValueError, match=r"mask_from=5: expected the index of a checkpoint \(0\.\.1\)"):
        sweep(a, (a, b), ALPHAS, _data(mlp), mask_from=5, progress=False)
    with pytest.raises(ValueError, match="neither the model nor the checkpoints are pruned"):
        sweep(mlp(), (mlp(), mlp()), ALPHAS, _data(mlp), mask_from=0, progress=False)
    dense = _trained(mlp, 2).state_dict()
    with pytest.raises(CheckpointError, match=r"mask_from=0: checkpoint 'checkpoint\[0\]' carries no pruning mask"):
        sweep(a, (dense, b), ALPHAS, _data(mlp), mask_from=0, progress=False)


def test_store_resume_and_mask_choice_in_fingerprint(tmp_path):
    a, b = _trained(mlp, 0), _trained(mlp, 1)
    for net in (a, b):
        prune.l1_unstructured(net[1], "weight", amount=0.5)
    path = tmp_path / "r.h5"
    first = sweep(a, (a, b), ALPHAS, _data(mlp), mask_from=0, store=path, name="s", progress=False)
    again = sweep(a, (a, b), ALPHAS, _data(mlp), mask_from=0, store=path, name="s", progress=False)
    assert again.meta["points_computed"] == 0
    np.testing.assert_array_equal(again.loss, first.loss)
    from lerpfast.store import SweepMismatchError

    with pytest.raises(SweepMismatchError, match="fingerprint|different|mismatch"):
        sweep(a, (a, b), ALPHAS, _data(mlp), mask_from=1, store=path, name="s", progress=False)


def test_cli_mask_from(tmp_path, capsys):
    import lerpfast.data as ld
    from lerpfast.cli import EXIT_DATA, EXIT_USAGE, main
    from lerpfast.train import models

    data = ld.load("digits", "test", limit=60)
    nets = [models.create("mlp", int(data.num_classes), tuple(data.input_shape)) for _ in range(2)]
    for net in nets:
        prune.l1_unstructured(net.hidden[0], "weight", amount=0.5)
    paths = [str(tmp_path / f"{n}.pt") for n in "ab"]
    for net, path in zip(nets, paths):
        torch.save(net.state_dict(), path)
    common = ["--model", "mlp", "--data", "digits", "--limit", "60", "--store", str(tmp_path / "r.h5"),
              "--alphas", "0:1:3", "--device", "cpu"]
    assert main(["sweep", "line", *paths, *common, "--mask-from", "x"]) == EXIT_USAGE
    assert "--mask-from 'x'" in capsys.readouterr().err
    assert main(["sweep", "line", *paths, *common]) == EXIT_DATA  # the masks differ: named, with the advice
    err = capsys.readouterr().err
    assert "differ" in err and "--mask-from" in err
    assert main(["sweep", "line", *paths, *common, "--mask-from", "1"]) == 0
