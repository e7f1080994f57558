"""Curves between solutions (issue 14 part 2): the ``Bezier`` and ``PolyChain`` slices and ``fit_curve``.

Slices: every point of an engine sweep against a float64 oracle written here from Garipov et al.'s formulas (each
point's state dict built in float64, loaded into a float64 copy of the model, run), on an MLP of odd widths and a
conv net with batch norm; the endpoints (and the chain's bend) are the checkpoints bit for bit; the store, resume,
plots and ``lerpfast show`` take them like lines. Fitting: the batched gradient (T points in one forward of the
multi-point engine or of vmap, fp32) against the float64 loop (one t at a time, summed), with batch norm on batch
statistics; the engine, vmap and the one-t-per-forward loop take the same steps; training lowers the loss along the
curve; bad input names the argument.
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

import lerpfast
from lerpfast import Bezier, PolyChain, fit_curve, sweep
from lerpfast.checkpoints import CheckpointError, load_checkpoints
from lerpfast.curves import CurveObjective, curve_point
from lerpfast.geometry import curve_coefficients

sys.path.insert(0, os.path.dirname(__file__))
from test_merge_slices import _f64, _oracle, _perturbed  # noqa: E402
from test_merge_slices import _model as merge_models  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Models, checkpoints, data


def _model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """tests/test_merge_slices.py's MLP and conv net with batch norm, at odd widths and sizes."""
    return merge_models(name, rows=37, d_in=13, classes=7, hidden=(29, 17), images=23, width=7, size=(7, 5))


def _three(model: nn.Module, seed: int = 10, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """theta_a, theta_bend, theta_b: every floating tensor moved; running variances kept positive."""
    return _perturbed(model, 3, seed, scale, var_step=0.3)


# odd t's, both halves, the switch points of the anchored forms, and (MLP only) extrapolation
TS = [0.0, 0.1, 0.25, 0.3, 0.4999, 0.5, 0.6, 0.75, 0.9, 1.0]
TS_OUT = [-0.3] + TS + [1.25]


# ---------------------------------------------------------------------------------------------------------------
# Slices


def test_curve_coefficients_are_the_papers_formulas():
    t = np.array([0.0, 0.2, 0.5, 0.7, 1.0])
    bz = curve_coefficients("bezier", t)
    assert np.allclose(bz, np.stack([(1 - t) ** 2, 2 * t * (1 - t), t ** 2], 1))
    pc = curve_coefficients("polychain", t)
    assert np.allclose(pc, [[1, 0, 0], [0.6, 0.4, 0], [0, 1, 0], [0, 0.6, 0.4], [0, 0, 1]])
    assert np.allclose(bz.sum(1), 1) and np.allclose(pc.sum(1), 1)
    with pytest.raises(ValueError, match="kind='cubic'"):
        curve_coefficients("cubic", t)


@pytest.mark.parametrize("name", ["mlp", "convbn"])
@pytest.mark.parametrize("cls", [Bezier, PolyChain])
def test_curves_match_float64_oracle(name, cls):
    model, data = _model(name)
    a, bend, b = _three(model)
    ts = TS_OUT if name == "mlp" else TS  # BN: convex combinations only, so interpolated variances stay positive
    res = sweep(model, cls(a, bend, b, ts=ts), data=data, batch_size=10)
    assert res.kind == cls.kind and res.coord_names == ("t",) and np.array_equal(res.alphas, ts)
    pts = [curve_point(cls.kind, _f64(a), _f64(bend), _f64(b), t) for t in ts]
    loss, err = _oracle(model, pts, data)
    assert np.allclose(res.loss, loss, rtol=1e-5, atol=1e-5), np.abs(res.loss - loss).max()
    assert np.all(np.abs(res.error - err) <= 1.01 / len(data[1]))


@pytest.mark.parametrize("cls", [Bezier, PolyChain])
def test_curve_points_match_the_formula_per_tensor(cls):
    """Each point's every tensor (the engine's own combine) against the float64 formula."""
    model, _ = _model("convbn")
    states = _three(model)
    spec = cls(*states, ts=TS_OUT)
    aff = spec.resolve(load_checkpoints(spec.sources, model), model, torch.float32)
    for k, t in enumerate(TS_OUT):
        want = curve_point(cls.kind, *[_f64(s) for s in states], t)
        got = aff.state_dict(k)
        for key, v in want.items():
            if v.is_floating_point():
                assert torch.allclose(got[key].double(), v, rtol=1e-6, atol=1e-6), (t, key)
            else:
                assert torch.equal(got[key], v)


def test_endpoints_and_chain_bend_are_bit_exact():
    model, _ = _model("convbn")
    a, bend, b = _three(model)
    for cls, exact in ((Bezier, {0.0: a, 1.0: b}), (PolyChain, {0.0: a, 0.5: bend, 1.0: b})):
        spec = cls(a, bend, b, ts=[0.0, 0.3, 0.5, 1.0])
        aff = spec.resolve(load_checkpoints(spec.sources, model), model, torch.float32)
        for t, state in exact.items():
            got = aff.state_dict([0.0, 0.3, 0.5, 1.0].index(t))
            assert all(torch.equal(got[k], v) for k, v in state.items()), (cls.kind, t)
    # Bezier with the bend at the midpoint is the straight line
    mid = {k: (a[k] + b[k]) / 2 if v.is_floating_point() else v for k, v in a.items()}
    line = sweep(model, (a, b), "0:1:9", data=_model("convbn")[1])
    curve = sweep(model, Bezier(a, mid, b, ts="0:1:9"), data=_model("convbn")[1])
    assert np.allclose(curve.loss, line.loss, rtol=1e-5, atol=1e-6)


def test_recompute_bn_matches_the_loop():
    model, data = _model("convbn")
    a, bend, b = _three(model)
    kw = dict(data=data, bn="recompute", bn_data=[data], batch_size=10)
    eng = sweep(model, Bezier(a, bend, b, ts=TS), **kw)
    loop = sweep(model, Bezier(a, bend, b, ts=TS), method="loop", **kw)
    assert np.allclose(eng.loss, loop.loss, rtol=1e-5, atol=1e-5)


def test_curve_store_resume_show_and_plot(tmp_path, capsys):
    from lerpfast.cli import main
    from lerpfast.plot import plot_store

    model, data = _model("mlp")
    a, bend, b = _three(model)
    path = tmp_path / "c.h5"
    first = sweep(model, PolyChain(a, bend, b, ts="0:1:11"), data=data, store=path, name="chain")
    again = sweep(model, PolyChain(a, bend, b, ts="0:1:11"), data=data, store=path, name="chain")
    assert again.meta["points_computed"] == 0 and np.array_equal(first.loss, again.loss)
    sweep(model, Bezier(a, bend, b, ts="0:1:11"), data=data, store=path, name="bezier")
    sweep(model, (a, b), "0:1:11", data=data, store=path, name="line")
    back = lerpfast.ResultStore(path, "r").read("bezier")
    assert back.kind == "bezier" and back.coord_names == ("t",) and back.K == 11
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["bezier"][1] == "bezier" and rows["chain"][1] == "polychain"
    assert len(rows["bezier"]) == len(rows["line"])  # barrier and max increase shown, as for a line
    files = plot_store(path, tmp_path / "figs")
    assert (tmp_path / "figs" / "lines.png") in files


def test_bad_curve_input_names_the_argument():
    model, data = _model("mlp")
    a, bend, b = _three(model)
    with pytest.raises(ValueError, match="Bezier: no ts"):
        sweep(model, Bezier(a, bend, b), data=data)
    with pytest.raises(ValueError, match="ts"):
        Bezier(a, bend, b, ts=[0.0, float("nan")])
    wrong = {k: v for k, v in bend.items() if k != "fc2.bias"}
    with pytest.raises(CheckpointError, match="theta_bend.*fc2.bias"):
        sweep(model, PolyChain(a, wrong, b, ts="0:1:3"), data=data)


# ---------------------------------------------------------------------------------------------------------------
# Fitting


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("method", ["engine", "vmap"])
@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("name", ["tinybn", "mlp"])
def test_batched_gradient_equals_float64_loop(kind, method, name):
    """d/d bend of the mean loss over T t's: one batched fp32 forward against a float64 loop over the t's."""
    if name == "tinybn":
        model = TinyBN()
        g = torch.Generator().manual_seed(4)
        x, y = torch.randn(11, 2, 5, 3, generator=g), torch.randint(0, 4, (11,), generator=g)
    else:
        model, (x, y) = _model("mlp")
    a, bend, b = _three(model, seed=3)
    ts = torch.tensor([0.03, 0.2, 0.45, 0.5, 0.55, 0.81, 0.97, 0.3, 0.66])  # T = 9 > the 4-5 anchors + directions

    obj = CurveObjective(model, a, b, kind)
    bend32 = {n: bend[n].clone().requires_grad_(True) for n in obj.names}
    loss32 = obj.losses(bend32, ts, x, y, method)
    assert loss32.shape == (len(ts),)
    loss32.mean().backward()

    ref = CurveObjective(model.double(), _f64(a), _f64(b), kind, dtype=torch.float64)
    bend64 = {n: bend[n].double().requires_grad_(True) for n in ref.names}
    losses64 = [ref.point_loss(bend64, float(t), x.double(), y) for t in ts]
    (sum(losses64) / len(ts)).backward()
    assert torch.allclose(loss32.double(), torch.stack(losses64).detach(), rtol=1e-5, atol=1e-6)
    for n in obj.names:
        g32, g64 = bend32[n].grad.double(), bend64[n].grad
        assert g64.abs().max() > 0, n
        assert torch.allclose(g32, g64, rtol=1e-4, atol=1e-6), (n, (g32 - g64).abs().max())
    # the reference is the plain model: the loss at one t equals the model loaded with that point (batch statistics)
    net = copy.deepcopy(model).double().eval()
    net.load_state_dict(curve_point(kind, _f64(a), _f64(bend), _f64(b), 0.3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # batch statistics, running ones untouched
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    with torch.no_grad():
        assert torch.allclose(F.cross_entropy(net(x.double()), y), ref.point_loss(_f64(bend), 0.3, x.double(), y))


def test_every_method_takes_the_same_steps():
    model, (x, y) = _model("convbn")
    a, _, b = _three(model)
    kw = dict(kind="polychain", epochs=2, lr=0.1, ts_per_batch=5, batch_size=8, seed=1)
    fits = {m: fit_curve(model, a, b, (x, y), method=m, **kw) for m in ("engine", "vmap", "loop")}
    ref = fits["loop"]
    assert ref.steps == 6 and len(ref.history) == 2 and set(ref.bend) == set(model.state_dict())
    for m, fit in fits.items():
        assert fit.method == m and fit.steps == ref.steps
        assert np.allclose(fit.history, ref.history, rtol=1e-5)
        for k, v in fit.bend.items():
            assert torch.allclose(v, ref.bend[k], rtol=1e-5, atol=1e-6), (m, k)
    mid = {k: (a[k] + b[k]) / 2 for k in a if a[k].is_floating_point()}
    assert any(not torch.allclose(ref.bend[k], mid[k]) for k in mid if "running" not in k)  # it moved
    assert all(torch.equal(ref.bend[k], mid[k]) for k in mid if "running" in k)  # placeholders: the midpoint


def _two_solutions():
    """Two MLPs trained from different seeds on one random labelling (lightly memorized, not connected by a line)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 10, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    sols = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for _ in range(300):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        sols.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return net, sols, (x, y)


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_fitting_lowers_the_barrier(kind):
    from lerpfast.analysis import barrier

    net, (a, b), data = _two_solutions()
    fit = fit_curve(net, a, b, data, kind=kind, epochs=40, lr=0.05, ts_per_batch=6, batch_size=32)
    assert fit.history[-1] < fit.history[0]
    cls = Bezier if kind == "bezier" else PolyChain
    line = sweep(net, (a, b), "0:1:21", data=data)
    curve = sweep(net, cls(a, fit.bend, b, ts="0:1:21"), data=data)
    assert curve.loss[0] == line.loss[0] and curve.loss[-1] == line.loss[-1]  # the same endpoints, bit for bit
    assert barrier(line.alphas, line.loss) > 0.5
    assert barrier(curve.alphas, curve.loss) < 0.5 * barrier(line.alphas, line.loss)


def test_fit_curve_bad_input():
    model, data = _model("mlp")
    a, _, b = _three(model)
    with pytest.raises(ValueError, match="kind='cubic'"):
        fit_curve(model, a, b, data, kind="cubic")
    with pytest.raises(ValueError, match="epochs=0"):
        fit_curve(model, a, b, data, epochs=0)
    with pytest.raises(ValueError, match="ts_per_batch=2.5"):
        fit_curve(model, a, b, data, ts_per_batch=2.5)
    with pytest.raises(ValueError, match="method='jit'"):
        fit_curve(model, a, b, data, method="jit")
    with pytest.raises(ValueError, match="lr=-1"):
        fit_curve(model, a, b, data, lr=-1)
    with pytest.raises(CheckpointError, match="theta_b"):
        fit_curve(model, a, {k: v for k, v in b.items() if k != "out.bias"}, data)
    with pytest.raises(FloatingPointError, match="lower lr"):
        fit_curve(model, a, b, data, lr=1e30, epochs=3)


# ---------------------------------------------------------------------------------------------------------------
# Command line and demo


def test_cli_fits_saves_and_compares(tmp_path, capsys):
    from lerpfast.cli import main
    from lerpfast.train import models

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"s{seed}.pt"
        torch.save(models.create("lenet_300_100", 10, (1, 8, 8)).state_dict(), path)
        paths.append(str(path))
    out, store = tmp_path / "bend.pt", tmp_path / "c.h5"
    rc = main(["curve", *paths, "--model", "lenet_300_100", "--data", "digits", "--kind", "polychain", "--quick",
               "--out", str(out), "--store", str(store), "--plot", str(tmp_path / "figs"), "--points", "9"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "line" in text and "polychain" in text and "loss barrier" in text
    bend = torch.load(out, weights_only=True)
    assert set(bend) == set(torch.load(paths[0], weights_only=True))
    back = lerpfast.ResultStore(store, "r")
    assert set(back.names()) == {"line", "polychain"} and back.read("polychain").K == 9
    pc_loss = back.read("polychain").loss
    del back
    assert (tmp_path / "figs" / "curve_polychain.png").exists()
    # `lerpfast sweep bezier|polychain a bend b`: the slice from the command line, t from --alphas
    assert main(["sweep", "polychain", paths[0], str(out), paths[1], "--model", "lenet_300_100", "--data", "digits",
                 "--alphas", "0:1:5", "--store", str(store), "--name", "again", "--progress", "false"]) == 0
    again = lerpfast.ResultStore(store, "r").read("again")
    assert again.kind == "polychain" and np.allclose(again.loss, pc_loss[::2])
    capsys.readouterr()
    assert main(["curve", paths[0], "--model", "lenet_300_100"]) == 2  # one checkpoint: usage error
    assert "2 checkpoints" in capsys.readouterr().err
    assert main(["curve", *paths, "--model", "lenet_300_100", "--epochs", "0"]) == 2
    assert "--epochs 0" in capsys.readouterr().err


def test_demo_quick_curves_beat_the_line(tmp_path):
    from lerpfast.curves import run_demo

    summary = run_demo(str(tmp_path / "demo"), quick=True, log=lambda *a: None)
    paths = summary["paths"]
    assert paths["line"]["loss_barrier"] > 0.3  # two seeds: a barrier on the straight line
    for kind in ("bezier", "polychain"):
        assert paths[kind]["loss_barrier"] < 0.25 * paths["line"]["loss_barrier"], kind
        assert paths[kind]["error_ends"] == paths["line"]["error_ends"]  # the same endpoints
    assert (tmp_path / "demo" / "curves.png").exists() and (tmp_path / "demo" / "bend_bezier.pt").exists()


def test_readme_curves_block_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Curves between solutions"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README.md:Curves", "exec"), ns)
    from lerpfast.analysis import barrier

    line, curve = ns["line"], ns["curve"]
    assert curve.kind == "bezier" and curve.K == line.K == 41
    assert barrier(line.alphas, line.loss) > 0.5 and barrier(curve.alphas, curve.loss) < 0.1
    assert len(ns["fit"].history) == 30
