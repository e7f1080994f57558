"""Curves between solutions (Garipov et al., "Loss surfaces, mode connectivity, and fast ensembling of DNNs",
NeurIPS 2018): train the bend point of a quadratic Bezier curve or a polygonal chain between two trained networks
so that the loss stays low all along the curve.

The objective is the expected loss over t ~ U[0, 1] of the network at the curve's point ``phi(t)`` (their eq. 5),
estimated per batch with T sampled t's, and the T points run in ONE batched forward:

* ``method="engine"`` (default): lerpfast's multi-point engine on the curve's slice (:class:`lerpfast.Bezier` /
  :class:`lerpfast.PolyChain`, rebuilt from the current bend each step), with autograd recording: the engine's torch
  path is differentiable with respect to the anchors and directions, so the gradient reaches the bend through them.
  A layer whose input is the same for every point (the first one) multiplies the data with the 2-3 anchors and
  directions once instead of with T weight settings, in the backward pass too.
* ``method="vmap"``: ``torch.func.vmap(torch.func.functional_call)`` over the T points' parameters
  ``c_a(t) a + c_bend(t) bend + c_b(t) b`` (any model torch.func takes).
* ``method="loop"``: one forward per t, gradients accumulated: the same step up to rounding, the baseline of
  ``benchmarks/bench_curves.py``.

Training runs the model in eval mode (dropout off) with every batch norm on batch statistics, per point (the running
statistics are neither read nor updated); evaluate a trained curve with ``lerpfast.sweep(..., bn="recompute",
bn_data=...)``, which recomputes the statistics at every t, as Garipov et al. do.

>>> fit = lerpfast.fit_curve(model, theta_a, theta_b, train_data, kind="bezier", epochs=20, ts_per_batch=8)
>>> res = lerpfast.sweep(model, lerpfast.Bezier(theta_a, fit.bend, theta_b, ts="0:1:41"), data=test)

``python -m lerpfast.curves --demo [--quick]`` (or ``lerpfast curve --demo``) trains two LeNet-300-100s from
different seeds on scikit-learn's real 8x8 digits, fits a Bezier curve and a polygonal chain between them and draws
the loss and error along the curves against the straight line (README, "Curves between solutions").
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lerpfast.geometry import CURVE_KINDS, _source_labels, curve_coefficients

__all__ = ["CurveFit", "fit_curve", "curve_point", "CurveObjective", "METHODS"]


METHODS = ("engine", "vmap", "loop")


@dataclass
class CurveFit:
    """What :func:`fit_curve` returns.

    Attributes
    ----------
    kind : "bezier" or "polychain".
    bend : the trained bend point, a full state dict of the model (CPU tensors, the model's dtypes): parameters
        trained; floating buffers (batch-norm running statistics) the midpoint of the endpoints' (evaluate with
        ``bn="recompute"``); integer buffers theta_a's.
    history : mean training loss of each epoch (over its batches and sampled t's); ``history[0]`` is epoch 1.
    seconds : wall-clock seconds of each epoch.
    ts_per_batch : T, the t's sampled per batch.  method : "engine", "vmap" or "loop".  steps : SGD steps taken.
    """

    kind: str
    bend: dict[str, torch.Tensor]
    history: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    ts_per_batch: int = 0
    method: str = "engine"
    steps: int = 0


def curve_point(kind: str, theta_a: dict, theta_bend: dict, theta_b: dict, t: float) -> dict[str, torch.Tensor]:
    """The curve's point at ``t`` as a state dict: ``c_a a + c_bend bend + c_b b`` for floating entries (in their own
    dtype, weights from :func:`lerpfast.geometry.curve_coefficients`), theta_a's value for the others. The plain
    formula, for references and for loading one point into a model (the slices keep the endpoints bit-exact)."""
    ca, cm, cb = (float(c) for c in curve_coefficients(kind, [t])[0])
    return {k: (ca * v + cm * theta_bend[k] + cb * theta_b[k]) if v.is_floating_point() else v.clone()
            for k, v in theta_a.items()}


class CurveObjective:
    """The curve-fitting loss of one model between two fixed endpoints, as a function of the bend's parameters.

    Parameters
    ----------
    model : the network (not modified: a copy runs, in eval mode, its batch norms on batch statistics).
    state_a, state_b : the endpoints' state dicts (matched to the model, e.g. by
        :func:`lerpfast.checkpoints.load_checkpoints`).
    kind : "bezier" or "polychain".
    loss_fn : ``loss_fn(logits, y) -> scalar``, default the mean cross-entropy.
    device, dtype : where and in which floating dtype the copy, the endpoints and the bend live.

    Attributes
    ----------
    names : the model's parameter names (what the bend trains).
    a, b : the endpoints' tensors, dict name -> tensor (parameters and the buffers left after the batch norms' running
        statistics are dropped).
    """

    def __init__(self, model: nn.Module, state_a: dict, state_b: dict, kind: str = "bezier",
                 loss_fn: Callable | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if kind not in CURVE_KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {CURVE_KINDS}")
        self.kind = kind
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        net = copy.deepcopy(model).to(device=self.device, dtype=dtype)
        net.load_state_dict(dict(state_a))
        torch.func.replace_all_batch_norm_modules_(net)  # batch statistics, running ones neither read nor written
        self.net = net.eval()  # dropout off; the batch norms use batch statistics in any mode now
        self.names = [n for n, _ in net.named_parameters()]
        keys = list(net.state_dict())

        def own(state):
            return {k: state[k].to(self.device, dtype) if state[k].is_floating_point() else state[k].to(self.device)
                    for k in keys}

        self.a, self.b = own(state_a), own(state_b)
        pnames = set(self.names)
        # other floating buffers follow the curve with a fixed bend at the midpoint; integer ones are theta_a's
        self.fixed = {k: (self.a[k] + self.b[k]) / 2 if self.a[k].is_floating_point() else self.a[k]
                      for k in keys if k not in pnames}
        self.dtype = dtype
        self._engine = None

    def midpoint(self) -> dict[str, torch.Tensor]:
        """``(a + b) / 2`` for every parameter: the initial bend (a Bezier curve is then the straight line)."""
        return {n: (self.a[n] + self.b[n]) / 2 for n in self.names}

    def coefficients(self, ts) -> torch.Tensor:
        """(T, 3) weights of a, bend, b at each t, in the objective's dtype."""
        ts = ts.detach().cpu().double().numpy() if torch.is_tensor(ts) else np.asarray(ts, np.float64)
        return torch.from_numpy(curve_coefficients(self.kind, ts)).to(self.device, self.dtype)

    def point_params(self, bend: dict[str, torch.Tensor], ts) -> dict[str, torch.Tensor]:
        """Each tensor at the T points, (T, *S), differentiable with respect to ``bend``."""
        c = self.coefficients(ts)  # (T, 3)
        full = {**self.fixed, **bend}
        out = {}
        for n, a in self.a.items():
            if not a.is_floating_point():
                continue
            ca, cm, cb = c.reshape((c.shape[0], 3) + (1,) * a.dim()).unbind(1)  # each (T, 1, ...)
            out[n] = ca * a + cm * full[n] + cb * self.b[n]  # (T, *S)
        return out

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y) if self.loss_fn is None else self.loss_fn(logits, y)

    def _forward(self, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
        from lerpfast.engine.model import logits_of

        return self._loss(logits_of(torch.func.functional_call(self.net, params, (x,))), y)

    def losses(self, bend: dict[str, torch.Tensor], ts, x, y, method: str = "engine") -> torch.Tensor:
        """(T,) loss at each of the T points, in one batched forward (``method`` "engine" or "vmap")."""
        if method == "vmap":
            params = self.point_params(bend, ts)
            return torch.func.vmap(self._forward, in_dims=(0, None, None))(params, x, y)
        if method != "engine":
            raise ValueError(f"method={method!r}: expected 'engine' or 'vmap' for a batched forward")
        return self._engine_losses(bend, ts, x, y)

    def _engine_losses(self, bend, ts, x, y) -> torch.Tensor:
        from lerpfast.engine.model import MultiPointModel, logits_of
        from lerpfast.geometry import Bezier, PolyChain

        ts = ts.detach().cpu().double().numpy() if torch.is_tensor(ts) else np.asarray(ts, np.float64)
        spec = (Bezier if self.kind == "bezier" else PolyChain)(None, None, None, ts=ts)
        full = {**self.fixed, **bend}
        aff = spec.resolve([self.a, {k: full[k] for k in self.a}, self.b], self.net, self.dtype)  # differentiable
        if self._engine is None:
            self._engine = MultiPointModel(self.net, aff, fuse=False)  # BN on batch statistics: nothing to fold
        else:
            self._engine.bind(aff)
        self._engine.set_points(aff.points())
        logits = logits_of(self._engine(x, y.shape[0]))  # (T, B, C)
        T = logits.shape[0]
        if self.loss_fn is None:
            flat = F.cross_entropy(logits.reshape(T * y.shape[0], -1), y.repeat(T), reduction="none")
            return flat.reshape(T, -1).mean(1)
        return torch.stack([self.loss_fn(logits[k], y) for k in range(T)])

    def point_loss(self, bend: dict[str, torch.Tensor], t: float, x, y) -> torch.Tensor:
        """The loss at one t, one ordinary forward of the model loaded with that point."""
        params = {n: p[0] for n, p in self.point_params(bend, [t]).items()}
        return self._forward(params, x, y)


def _epoch_batches(data, batch_size: int, gen: torch.Generator) -> Iterable:
    """One epoch of (x, y) batches: an (X, y) pair is shuffled (seeded) and cut into batches; anything else is
    iterated as it is (e.g. ``lerpfast.data.load(..., train=True)``, which shuffles itself)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]) and torch.is_tensor(data[1]):
        x, y = data
        order = torch.randperm(y.shape[0], generator=gen)
        for i in range(0, y.shape[0], batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
        return
    yield from data


def fit_curve(model: nn.Module, theta_a, theta_b, data, *, kind: str = "bezier", epochs: int = 10, lr: float = 0.05,
              momentum: float = 0.9, weight_decay: float = 0.0, ts_per_batch: int = 8, batch_size: int = 128,
              method: str = "engine", init=None, seed: int = 0, loss_fn: Callable | None = None,
              device: str | torch.device = "cpu", progress: bool = False) -> CurveFit:
    """Train the bend point of a curve between two solutions by SGD on the loss at t sampled uniformly in [0, 1].

    Parameters
    ----------
    model : the network (an ``nn.Module``; not modified).
    theta_a, theta_b : the endpoints (modules, state dicts or paths, like ``sweep``'s checkpoints); held fixed.
    data : the training data: an ``(X, y)`` pair (shuffled each epoch with ``seed``, cut into ``batch_size`` rows)
        or any re-iterable of ``(x, y)`` batches (e.g. ``lerpfast.data.load(name, "train", train=True)``).
    kind : ``"bezier"`` (quadratic Bezier, :class:`lerpfast.Bezier`) or ``"polychain"`` (:class:`lerpfast.PolyChain`).
    epochs : passes over ``data``.
    lr, momentum, weight_decay : SGD's (``torch.optim.SGD`` on the bend's parameters, one step per batch).
    ts_per_batch : T, the t's drawn uniformly in [0, 1] for each batch; the batch's loss is the mean over them.
    batch_size : rows per batch of an ``(X, y)`` pair.
    method : ``"engine"`` (default) or ``"vmap"``: the T points of a batch in one forward (see the module's
        docstring); ``"loop"``: one forward per t, gradients accumulated (the same step up to rounding). On one CPU
        thread (benchmarks/results/curves_cpu.json) the engine is 1.35x the loop's speed for LeNet-300-100 at T = 8
        (2.31x at T = 16) and 0.87x for ResNet-20, whose per-point convolutions are the loop's arithmetic plus copies.
    init : the initial bend (a checkpoint); default the midpoint ``(theta_a + theta_b) / 2``, where a Bezier curve
        is the straight line.
    seed : seeds the t's and the order of an ``(X, y)`` pair.
    loss_fn : ``loss_fn(logits, y) -> scalar`` (default: mean cross-entropy).
    device : where to train.
    progress : print the loss of every epoch.

    Returns
    -------
    CurveFit
        ``.bend`` (a state dict for :class:`lerpfast.Bezier` / :class:`lerpfast.PolyChain` and ``lerpfast.sweep``),
        ``.history`` (mean training loss per epoch), ``.seconds`` (per epoch).

    Notes
    -----
    The model runs in eval mode (dropout off) with batch norm on each point's batch statistics; the bend's running
    statistics are the endpoints' midpoint, a placeholder: evaluate with ``bn="recompute"``. Parameters only are
    trained. The gradient reaches the bend through ``c_bend(t) = 2t(1-t)`` (Bezier) or the chain's hat function, so
    the step is the mean over the T sampled t's of ``c_bend(t) * dL/dtheta(t)``.
    """
    from lerpfast.checkpoints import load_checkpoints

    if kind not in CURVE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {CURVE_KINDS}")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    for name, value in (("epochs", epochs), ("ts_per_batch", ts_per_batch), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r}: expected a positive number")
    sources = [theta_a, theta_b] + ([] if init is None else [init])
    labels = _source_labels(sources, ["theta_a", "theta_b", "init"][:len(sources)])
    states = load_checkpoints(sources, model, labels)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    obj = CurveObjective(model, states[0], states[1], kind, loss_fn, device, dtype)
    start = obj.midpoint() if init is None else {n: states[2][n].to(obj.device, dtype) for n in obj.names}
    bend = {n: v.detach().clone().requires_grad_(True) for n, v in start.items()}
    opt = torch.optim.SGD(list(bend.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    fit = CurveFit(kind, {}, ts_per_batch=int(ts_per_batch), method=method)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, n_batches = 0.0, 0
        for x, y in _epoch_batches(data, batch_size, gen):
            x, y = x.to(obj.device), y.to(obj.device)
            if x.is_floating_point():
                x = x.to(dtype)
            ts = torch.rand(ts_per_batch, generator=gen, dtype=torch.float64)
            opt.zero_grad(set_to_none=True)
            if method == "loop":
                value = 0.0
                for t in ts.tolist():
                    loss_t = obj.point_loss(bend, t, x, y) / ts_per_batch
                    loss_t.backward()
                    value += float(loss_t.detach())
            else:
                loss = obj.losses(bend, ts, x, y, method).mean()
                loss.backward()
                value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"fit_curve: the loss became {value} in epoch {epoch + 1} (batch "
                                         f"{n_batches + 1}); lower lr (now {lr})")
            opt.step()
            fit.steps += 1
            total += value
            n_batches += 1
        if n_batches == 0:
            raise ValueError("fit_curve: data yielded no batches")
        fit.history.append(total / n_batches)
        fit.seconds.append(time.perf_counter() - t0)
        if progress:
            print(f"fit_curve {kind}: epoch {epoch + 1}/{epochs}  loss {fit.history[-1]:.4f}  "
                  f"({fit.seconds[-1]:.2f} s)", flush=True)
    fit.bend = _bend_state(states[0], states[1], bend)
    return fit


def _bend_state(state_a: dict, state_b: dict, bend: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict: trained parameters, floating buffers at the endpoints' midpoint, integer ones theta_a's."""
    out = {}
    for k, v in state_a.items():
        if k in bend:
            out[k] = bend[k].detach().to("cpu", v.dtype).clone()
        elif v.is_floating_point():
            out[k] = (v + state_b[k]) / 2
        else:
            out[k] = v.clone()
    return out


# ----------------------------------------------------------------------------------------------------------------
# `lerpfast curve` and the demo


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def compare_paths(model: nn.Module, theta_a, theta_b, bends: dict, test, *, points: int = 41, store=None,
                  bn_data=None, device="cpu") -> dict:
    """Sweep the straight line and each fitted curve between ``theta_a`` and ``theta_b`` on ``test`` and summarize.

    Parameters
    ----------
    bends : ``{"bezier": bend, "polychain": bend}`` (any subset), the trained bend points.
    test : evaluation data (anything ``lerpfast.sweep`` takes).
    points : t's per path, evenly spaced in [0, 1].
    store : HDF5 file the sweeps go into (names ``line``, ``bezier``, ``polychain``), or None.
    bn_data : data for ``bn="recompute"`` (used when the model has batch norm: every point recalibrated).

    Returns
    -------
    dict
        ``{"results": {name: SweepResult}, "summary": {name: {"loss_barrier", "error_barrier", "max_loss",
        "max_error", "loss_mid", "error_mid"}}}``; barriers are :func:`lerpfast.analysis.barrier` (height above the
        chord between the endpoints).
    """
    from lerpfast.analysis import barrier
    from lerpfast.evaluate import sweep
    from lerpfast.geometry import Bezier, Line, PolyChain

    ts = f"0:1:{points}"
    bn = dict(bn="recompute", bn_data=bn_data) if _has_bn(model) and bn_data is not None else {}
    specs = {"line": Line(theta_a, theta_b, ts)}
    for kind, bend in bends.items():
        specs[kind] = (Bezier if kind == "bezier" else PolyChain)(theta_a, bend, theta_b, ts=ts)
    results, summary = {}, {}
    for name, spec in specs.items():
        res = sweep(model, spec, data=test, store=store, name=None if store is None else name, device=device,
                    progress=False, **bn)
        results[name] = res
        mid = int(np.argmin(np.abs(res.alphas - 0.5)))
        summary[name] = {"loss_barrier": barrier(res.alphas, res.loss), "error_barrier": barrier(res.alphas, res.error),
                         "max_loss": float(np.nanmax(res.loss)), "max_error": float(np.nanmax(res.error)),
                         "loss_mid": float(res.loss[mid]), "error_mid": float(res.error[mid]),
                         "loss_ends": [float(res.loss[0]), float(res.loss[-1])],
                         "error_ends": [float(res.error[0]), float(res.error[-1])]}
    return {"results": results, "summary": summary}


def format_summary(summary: dict) -> str:
    """The table :func:`compare_paths` summarizes, one row per path."""
    lines = [f"{'path':<10} {'loss barrier':>12} {'error barrier':>13} {'max loss':>9} {'max error':>9} "
             f"{'error at t=0 / 1':>17}"]
    for name, s in summary.items():
        lines.append(f"{name:<10} {s['loss_barrier']:>12.4f} {s['error_barrier']:>13.4f} {s['max_loss']:>9.4f} "
                     f"{s['max_error']:>9.4f} {s['error_ends'][0]:>8.4f} {s['error_ends'][1]:.4f}")
    return "\n".join(lines)


def plot_paths(results: dict, title: str | None = None):
    """Loss and error along the line and the curves (``lerpfast.plot.plot_lines`` against t)."""
    from lerpfast.plot import plot_lines

    labels = {"line": "straight line", "bezier": "Bezier curve (trained)", "polychain": "polygonal chain (trained)"}
    curves = {labels.get(k, k): v for k, v in results.items()}
    return plot_lines(curves, xlabel="t (alpha for the line)", title=title, cmap="plasma")


def run_demo(out: str = "lerpfast-curves", *, quick: bool = False, epochs: int | None = None,
             model_name: str = "lenet_300_100", device: str = "cpu", log=print) -> dict:
    """Two networks from different seeds on scikit-learn's real 8x8 digits; a Bezier curve and a polygonal chain
    fitted between them; loss and error along both curves and the straight line on the test split.

    Trains ``model_name`` (default LeNet-300-100; ``resnet20`` works too, its batch norms recomputed at every
    point of the comparison sweeps) with ``lerpfast.train`` (seeds 0 and 1, the model's default optimizer, batch 128,
    40 epochs; ``quick``: 20), fits each curve for ``epochs`` epochs (default 30, ``quick`` 10; T = 8 t's per batch,
    SGD lr 0.05, momentum 0.9) and writes ``<out>/curves.h5`` (sweeps ``line``, ``bezier``, ``polychain``, 41 points
    each), ``curves.png``, ``bend_bezier.pt``, ``bend_polychain.pt`` and ``summary.json``. Returns the summary.
    """
    import json
    from pathlib import Path

    import lerpfast.data as ld
    from lerpfast.plot import save
    from lerpfast.train import TrainConfig, list_checkpoints, load_model, train

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run = train(TrainConfig(model=model_name, dataset="digits", steps="20ep" if quick else "40ep", replicates=2,
                            batch_size=128, checkpoints="none", evaluate="end", out_dir=str(out_dir / "runs"),
                            device=device), progress=False)
    ends = [list_checkpoints(run, r) for r in (0, 1)]
    theta_a, theta_b = (c[max(c)] for c in ends)
    model = load_model(run).eval()
    t_train = time.perf_counter() - t_start
    train_data = ld.load("digits", "train", train=True, batch_size=128, device=device)
    test = ld.load("digits", "test", batch_size=1000, device=device)
    n_epochs = epochs or (10 if quick else 30)
    bends, fits = {}, {}
    for kind in CURVE_KINDS:
        fit = fit_curve(model, theta_a, theta_b, train_data, kind=kind, epochs=n_epochs, lr=0.05, ts_per_batch=8,
                        device=device)
        torch.save(fit.bend, out_dir / f"bend_{kind}.pt")
        bends[kind], fits[kind] = fit.bend, fit
        log(f"fitted {kind}: {n_epochs} epochs, {sum(fit.seconds):.1f} s, train loss {fit.history[0]:.4f} -> "
            f"{fit.history[-1]:.4f}")
    store = out_dir / "curves.h5"
    if store.exists():
        store.unlink()  # new bends each run: their sweeps are new
    bn_data = ld.load("digits", "train", batch_size=1000, device=device)  # batch-norm statistics at every t
    cmp = compare_paths(model, theta_a, theta_b, bends, test, store=store, bn_data=bn_data, device=device)
    pretty = {"lenet_300_100": "LeNet-300-100", "resnet20": "ResNet-20"}.get(model_name, model_name)
    fig = plot_paths(cmp["results"], title=f"{pretty}, two seeds, digits test split")
    figure = save(fig, out_dir / "curves.png")[0]
    summary = {"model": model_name, "data": "digits (scikit-learn, 1437 train / 360 test)", "seeds": [0, 1],
               "train_seconds": t_train, "curve_epochs": n_epochs, "ts_per_batch": 8,
               "fit_seconds": {k: sum(f.seconds) for k, f in fits.items()},
               "fit_history": {k: f.history for k, f in fits.items()}, "paths": cmp["summary"],
               "seconds": time.perf_counter() - t_start, "figure": str(figure), "quick": quick}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(format_summary(cmp["summary"]))
    log(f"wrote {store}, {figure}, {out_dir / 'summary.json'} ({summary['seconds']:.1f} s)")
    return summary


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``lerpfast curve`` (wired by :mod:`lerpfast.cli`)."""
    p = sub.add_parser("curve", help="fit a Bezier curve / polygonal chain between two solutions (Garipov et al.)",
                       description="Train the bend point of a curve between two checkpoints of one model by SGD on the "
                                   "loss at t sampled uniformly (T t's per batch in one batched forward), save it, "
                                   "and compare the loss and error along the curve with the straight line on the "
                                   "test split.",
                       epilog="examples:\n  lerpfast curve A.pt B.pt --model lenet_300_100 --data digits --epochs 30 "
                              "--out bend.pt\n  lerpfast curve --demo --quick      # two LeNets on digits, well "
                              "under a minute",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run_cli)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="theta_a theta_b (.pt / .safetensors)")
    p.add_argument("--demo", action="store_true", help="the demo: two LeNet-300-100s on digits (README figure)")
    p.add_argument("--quick", action="store_true", help="fewer epochs (demo: 20 training, 10 fitting; fit: 3)")
    p.add_argument("--model", default=None, help="model name, e.g. lenet_300_100, resnet20 (demo: lenet_300_100)")
    p.add_argument("--model-options", default="", help="model keyword options, e.g. 'width=2,bn=False'")
    p.add_argument("--data", default="digits", help="data set: fit on its train split, compare on its test split")
    p.add_argument("--data-root", default=None, help="data root (default $LERPFAST_DATA)")
    p.add_argument("--kind", default="bezier", choices=CURVE_KINDS, help="curve (default: bezier)")
    p.add_argument("--epochs", type=int, default=None, help="fitting epochs (default 20; --quick 3; demo 30)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05, momentum 0.9)")
    p.add_argument("--ts-per-batch", type=int, default=8, help="t's sampled per batch, one forward (default 8)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--method", default="engine", choices=METHODS, help="batched forward: engine | vmap | loop")
    p.add_argument("--points", type=int, default=41, help="t's of the comparison sweeps (default 41)")
    p.add_argument("--out", default=None, help="where the bend state dict goes (default bend_<kind>.pt; demo: a "
                                               "folder, default ./lerpfast-curves)")
    p.add_argument("--store", default="curves.h5", help="HDF5 file of the comparison sweeps (default curves.h5)")
    p.add_argument("--plot", default=None, help="also write the figure into this folder")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the t's and the data order")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``lerpfast curve``."""
    from pathlib import Path

    from lerpfast.cli import CLIError, check_positive

    for flag in ("epochs", "ts_per_batch", "batch_size", "points", "threads"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        if args.checkpoints:
            raise CLIError("--demo trains its own checkpoints: give no CHECKPOINT")
        run_demo(args.out or "lerpfast-curves", quick=args.quick, epochs=args.epochs,
                 model_name=args.model or "lenet_300_100", device=args.device)
        return 0
    if len(args.checkpoints) != 2:
        raise CLIError(f"curve takes 2 checkpoints (theta_a theta_b), got {len(args.checkpoints)}; or --demo")
    if args.model is None:
        raise CLIError("which model? give --model NAME (e.g. lenet_300_100)")
    import lerpfast.data as ld
    from lerpfast.train import models
    from lerpfast.train.config import parse_options

    if args.data not in ld.REGISTRY:
        raise CLIError(f"--data {args.data!r}: unknown data set (known: {', '.join(ld.REGISTRY)})")
    out = Path(args.out or f"bend_{args.kind}.pt")
    if not out.parent.exists():
        raise CLIError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist", 3)
    train_data = ld.load(args.data, "train", root=args.data_root, train=True, batch_size=args.batch_size,
                         seed=args.seed, device=args.device)
    test = ld.load(args.data, "test", root=args.data_root, batch_size=1000, device=args.device)
    try:
        model = models.create(args.model, int(test.num_classes), tuple(int(s) for s in test.input_shape),
                              **parse_options(args.model_options))
    except TypeError as e:
        raise CLIError(f"model {args.model!r}: bad --model-options ({e})") from None
    model = model.to(args.device).eval()
    a, b = args.checkpoints
    epochs = args.epochs or (3 if args.quick else 20)
    fit = fit_curve(model, a, b, train_data, kind=args.kind, epochs=epochs, lr=args.lr, ts_per_batch=args.ts_per_batch,
                    method=args.method, seed=args.seed, device=args.device, progress=True)
    torch.save(fit.bend, out)
    print(f"wrote {out} ({args.kind} bend, {epochs} epochs, {sum(fit.seconds):.1f} s)")
    cmp = compare_paths(model, a, b, {args.kind: fit.bend}, test, points=args.points, store=args.store,
                        bn_data=train_data, device=args.device)
    print(format_summary(cmp["summary"]))
    print(f"sweeps 'line' and {args.kind!r} in {args.store}")
    if args.plot:
        from lerpfast.plot import save

        for f in save(plot_paths(cmp["results"]), Path(args.plot) / f"curve_{args.kind}.png"):
            print(f"  wrote {f}")
    return 0


def main(argv=None) -> int:
    """``python -m lerpfast.curves [--demo] ...``: the same as ``lerpfast curve``."""
    from lerpfast.cli import main as cli_main

    return cli_main(["curve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
