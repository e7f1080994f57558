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

import copy
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
        docstring); ``"loop"``: one forward per t, gradients accumulated (the same step up to rounding).
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
