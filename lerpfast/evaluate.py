"""``lerpfast.sweep``: evaluate a model at the K points of a slice of weight space.

Three evaluators share one front end (checkpoints, slice, BN policy, data, metrics, store):

* ``method="engine"`` (default): the multi-point model, ``points_per_pass`` points per forward pass;
* ``method="loop"``: the oracle and the baseline every tool uses today — for each point, ``load_state_dict``
  of the interpolated weights into one model copy, then evaluate;
* ``method="vmap"``: ``torch.func.functional_call`` + ``vmap`` over K materialized copies of the whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from lerpfast._version import __version__
from lerpfast.checkpoints import TensorDigestCache, describe
from lerpfast.engine import buffers
from lerpfast.engine.functional import ParamSlice, Points, combine
from lerpfast.engine.fusion import resolve_fuse
from lerpfast.engine.model import GraphedForward, engine_for, logits_of, precision_context, release_engine
from lerpfast.engine.oom import is_oom
from lerpfast.geometry import AffineSlice, Slice, as_slice
from lerpfast.metrics import PointMetrics
from lerpfast.pruning import load_pruned
from lerpfast.result import SweepResult

__all__ = ["sweep", "clear_caches", "BN_POLICIES", "METHODS"]

BN_POLICIES = ("interpolate", "endpoint", "recompute")
METHODS = ("engine", "loop", "vmap")


# ----------------------------------------------------------------------------------------------------------------
# Data


class _TensorBatches:
    """(X, y) as a re-iterable of batches; X a tensor or a tuple / dict of tensors with y's leading dim."""

    def __init__(self, x, y: torch.Tensor, batch_size: int):
        for leaf in tree_leaves(x):
            if leaf.shape[0] != y.shape[0]:
                raise ValueError(f"data: X has {leaf.shape[0]} samples but y has {y.shape[0]}")
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return math.ceil(self.y.shape[0] / self.batch_size)

    def __iter__(self):
        for i in range(0, self.y.shape[0], self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield tree_map(lambda t: t[sl], self.x), self.y[sl]  # noqa: B023 - used at once


def as_batches(data, batch_size: int) -> Iterable:
    """``data`` as a re-iterable of (x, y) batches: an (X, y) pair, a Dataset, or any iterable of batches."""
    if data is None:
        raise ValueError("data is required: an (X, y) pair, a Dataset, or an iterable of (x, y) batches")
    if (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[1])
            and tree_leaves(data[0]) and all(torch.is_tensor(t) for t in tree_leaves(data[0]))):
        return _TensorBatches(data[0], data[1], batch_size)
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if iter(data) is data:  # a one-shot iterator: keep its batches so every chunk of points sees the same data
        warnings.warn("data is a one-shot iterator: its batches are kept in memory so that every pass sees them; "
                      "pass a re-iterable (a DataLoader or an (X, y) pair) to avoid this", stacklevel=3)
        return list(data)
    return data


# Data fingerprints: sha256 over every byte of an (X, y) pair is 30-40 ms for 10k MNIST images on a CPU core, more
# than a whole LeNet sweep's arithmetic on a GPU. The digest is reused while the tensors are unchanged (the same
# objects, storage and version counter, and a probe of 1024 elements each: lerpfast.checkpoints.TensorDigestCache).
_DATA_DIGESTS = TensorDigestCache(probe=1024, maxsize=16)


def clear_caches() -> None:
    """Forget the cached fingerprints of data and checkpoints and the cached engines. Each is checked against what it
    was made from on every use; this frees them, or forces a rebuild after a change lerpfast cannot see (a tensor
    written through numpy or ``.data`` at none of the probed elements, a model's global helper function redefined).
    Also forgets the fallback's vmap-or-loop choices (:func:`lerpfast.engine.fallback.choices`) and the alignments
    of ``Line(align=...)``."""
    from lerpfast.checkpoints import clear_digest_cache
    from lerpfast.engine.fallback import clear_choices
    from lerpfast.engine.model import clear_engine_cache
    from lerpfast.geometry import clear_alignment_cache

    clear_alignment_cache()
    clear_choices()
    _DATA_DIGESTS.clear()
    clear_digest_cache()
    clear_engine_cache()


def _sha256_tensors(leaves: list[torch.Tensor]) -> str:
    """sha256 over the raw bytes of the tensors' contiguous CPU copies, in order (no extra copy in between)."""
    h = hashlib.sha256()
    for t in leaves:
        c = t.detach().cpu().contiguous()
        if c.numel():
            h.update(c.numpy() if c.dtype == torch.bool else c.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _describe_data(data) -> dict:
    if isinstance(data, _TensorBatches):
        leaves = [*tree_leaves(data.x), data.y]
        return {"type": "tensors", "num_samples": int(data.y.shape[0]),
                "shape": [list(t.shape[1:]) for t in tree_leaves(data.x)],
                "sha256": _DATA_DIGESTS.digest(leaves, lambda: _sha256_tensors(leaves))}
    out = {"type": type(data).__name__}
    for attr in ("name", "split", "num_samples"):
        if hasattr(data, attr):
            out[attr] = getattr(data, attr)
    try:
        out["num_batches"] = len(data)
    except TypeError:
        pass
    return out


def _to_device(x, device: torch.device, dtype: torch.dtype, channels_last: bool):
    if torch.is_tensor(x):
        x = x.to(device, non_blocking=True)
        if x.is_floating_point():
            x = x.to(dtype)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        return x
    if isinstance(x, dict):
        return {k: _to_device(v, device, dtype, channels_last) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device, dtype, channels_last) for v in x)
    return x


def _call(model: nn.Module, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


# ----------------------------------------------------------------------------------------------------------------
# Slice preparation


def _bn_keys(model: nn.Module) -> list[str]:
    keys = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            p = name + "." if name else ""
            keys += [p + "running_mean", p + "running_var"]
    return keys


def _parse_bn(bn: str) -> tuple[str, int]:
    policy, _, idx = bn.partition(":")
    if policy not in BN_POLICIES:
        raise ValueError(f"bn={bn!r}: expected one of {BN_POLICIES} ('endpoint:i' keeps checkpoint i's statistics)")
    if idx and policy != "endpoint":
        raise ValueError(f"bn={bn!r}: only 'endpoint' takes an index")
    return policy, int(idx or 0)


def _apply_bn_policy(aff: AffineSlice, states: list[dict], model: nn.Module, policy: str, source: int) -> None:
    if policy != "endpoint":
        return
    if not 0 <= source < len(states):
        raise ValueError(f"bn='endpoint:{source}': the slice has {len(states)} checkpoints")
    for key in _bn_keys(model):
        if key in aff.params:
            ps = aff.params[key]
            fixed = states[source][key].to(ps.anchors.dtype)
            aff.params[key] = ParamSlice(fixed.unsqueeze(0).expand_as(ps.anchors).clone(), None)  # a copy: M >= 1


def _warn_negative_variance(aff: AffineSlice, model: nn.Module) -> None:
    """Under bn='interpolate', extrapolated running variances can turn negative: BN then yields NaN. Say where."""
    bad: dict[str, np.ndarray] = {}
    for key in _bn_keys(model):
        ps = aff.params.get(key)
        if key.endswith("running_var") and ps is not None and ps.dirs is not None:
            var = combine(ps.anchors, ps.dirs, aff.anchor_idx, aff.coefs)  # (K, C): small
            neg = (var.reshape(aff.K, -1) < 0).any(dim=1).cpu().numpy()
            if neg.any():
                bad[key] = neg
    if not bad:
        return
    points = np.flatnonzero(np.any(list(bad.values()), axis=0))
    where = ", ".join("(" + ", ".join(f"{v:g}" for v in aff.coords[i]) + ")" for i in points[:4])
    more = f" and {len(points) - 4} more" if len(points) > 4 else ""
    warnings.warn(f"bn='interpolate': the interpolated running variance is negative in {len(bad)} batch-norm "
                  f"layer(s) (first: {next(iter(bad))!r}) at {len(points)} of {aff.K} points, coordinates {where}"
                  f"{more}: batch norm returns NaN there. Use bn='recompute' (with bn_data) or bn='endpoint' to "
                  "evaluate outside the segment.", RuntimeWarning, stacklevel=3)


def _reference_points(aff: AffineSlice, reference) -> Points | None:
    """The point functional distance and disagreement are measured against: first checkpoint by default."""
    if reference is None or reference is False:
        return None
    if reference == "first":
        return Points(torch.zeros(1, dtype=torch.long), torch.zeros(1, aff.J, dtype=aff.coefs.dtype))
    if isinstance(reference, int):
        if not -aff.K <= reference < aff.K:
            raise ValueError(f"reference={reference}: the sweep has {aff.K} points")
        return aff.points([reference % aff.K])
    raise ValueError(f"reference={reference!r}: expected 'first', a point index, or None")


# ----------------------------------------------------------------------------------------------------------------
# Evaluators: each turns a chunk of Points (+ the reference) into per-point metrics


class _Evaluator:
    def __init__(self, model, aff, *, device, precision, policy, bn_data, loss_fn, channels_last, progress_cb,
                 output=None):
        self.model, self.aff, self.device, self.precision = model, aff, device, precision
        self.output = output
        self.policy, self.bn_data, self.loss_fn = policy, bn_data, loss_fn
        self.channels_last, self.tick = channels_last, progress_cb
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        self.num_samples = 0
        # seconds spent per part of the batch loop (host time: on a GPU the kernels run asynchronously)
        self.timings = {"data": 0.0, "forward": 0.0, "metrics": 0.0}

    def close(self, failed: bool = False) -> None:
        """The sweep is over: release what outlives it."""

    def batches(self, data):
        for x, y in data:
            yield _to_device(x, self.device, self.dtype, self.channels_last), y.to(self.device, non_blocking=True)


class _EngineEvaluator(_Evaluator):
    def __init__(self, model, aff, *, fallback=(), fuse="auto", compile=False, **kw):  # noqa: A002
        super().__init__(model, aff, **kw)
        # BN under "recompute" normalizes with batch statistics, not a per-point affine map: never fused
        eff = False if self.policy == "recompute" else fuse
        # the converted engine is cached per model structure (engine.model.engine_for); torch.compile wraps it in
        # place, so a compiled sweep builds its own
        self.mp, self.token = engine_for(model, aff.to(self.device), fallback=fallback, fuse=eff, device=self.device,
                                         channels_last=self.channels_last, cache=compile is False)
        self.mp.output = self.output  # the engine is cached per model structure: set per sweep
        self.mp.fusion["mode"] = fuse
        self.mp.fusion.pop("reason", None)
        if eff is not fuse:
            self.mp.fusion["reason"] = "bn='recompute' uses batch statistics"
        self.graphed = None
        if compile == "cudagraphs":
            self.graphed = GraphedForward(self.mp)
        elif compile:
            self.mp.net = torch.compile(self.mp.net, backend="inductor" if compile is True else compile, dynamic=False)

    def evaluate(self, pts: Points, ref: Points | None, data) -> dict[str, np.ndarray]:
        K = pts.K
        allp = pts if ref is None else Points(torch.cat([pts.anchor_idx, ref.anchor_idx]),
                                              torch.cat([pts.coefs, ref.coefs]))
        allp = allp.to(self.device)
        n_batches = _len_or_none(data)
        if n_batches is not None:  # lets the CPU layers keep the points' weights across batches when it pays
            allp._cache["batches"] = n_batches
        self.mp.set_points(allp)
        forward = self.mp
        if self.graphed is not None:
            self.graphed.reset()  # new points (and, below, new BN statistics): capture again
            forward = self.graphed
        metrics = PointMetrics(K, loss_fn=self.loss_fn, reference=ref is not None)
        tm, clock = self.timings, time.perf_counter
        with torch.inference_mode(), precision_context(self.precision, self.device):
            if self.policy == "recompute":
                self.mp.ctx.calibrate = True
                try:
                    for x, y in self.batches(self.bn_data):
                        self.mp(x, y.shape[0])
                finally:
                    self.mp.ctx.calibrate = False
            n = 0
            t0 = clock()
            for x, y in self.batches(data):
                t1 = clock()
                logits = forward(x, y.shape[0])  # (K+1, B, C)
                t2 = clock()
                metrics.update(logits[:K], y, None if ref is None else logits[K])  # on the device: no host sync
                t3 = clock()
                n += y.shape[0]
                self.tick(1)
                tm["data"] += t1 - t0
                tm["forward"] += t2 - t1
                tm["metrics"] += t3 - t2
                t0 = clock()
        self.num_samples = n
        return metrics.compute()  # the one host sync of the chunk

    def close(self, failed: bool = False) -> None:
        release_engine(self.token, failed)


def _recalibrate(model: nn.Module, data, batches) -> None:
    """Reset every BN's running statistics and recompute them as a cumulative average (momentum=None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x, _ in batches(data):
        _call(model, x)
    for m in bns:
        m.eval()


class _LoopEvaluator(_Evaluator):
    """The oracle: for each point, load_state_dict of the interpolated weights, then evaluate."""

    def __init__(self, model, aff, **kw):
        super().__init__(model, aff, **kw)
        import copy

        self.net = copy.deepcopy(model).to(self.device).eval()
        if self.dtype == torch.float64:
            self.net.to(torch.float64)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ref_cache: list[torch.Tensor] | None = None

    def _run(self, state: dict[str, torch.Tensor], data):
        self.net.load_state_dict(state)
        if self.policy == "recompute":
            _recalibrate(self.net, self.bn_data, self.batches)
        for x, y in self.batches(data):
            yield logits_of(_call(self.net, x), self.output), y

    def _state(self, pts: Points, k: int) -> dict[str, torch.Tensor]:
        idx, c = pts.anchor_idx[k:k + 1], pts.coefs[k:k + 1]
        state = {name: combine(p.anchors, p.dirs, idx, c)[0] for name, p in self.aff.params.items()}
        state.update(self.aff.carried)
        return state

    def evaluate(self, pts: Points, ref: Points | None, data) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        with torch.inference_mode(), precision_context(self.precision, self.device):
            if ref is not None and self.ref_cache is None:
                self.ref_cache = [z for z, _ in self._run(self._state(ref, 0), data)]
            for k in range(pts.K):
                m = PointMetrics(1, loss_fn=self.loss_fn, reference=ref is not None)
                n = 0
                for i, (z, y) in enumerate(self._run(self._state(pts, k), data)):
                    m.update(z[None], y, None if ref is None else self.ref_cache[i])
                    n += y.shape[0]
                    self.tick(1 / pts.K)
                for name, v in m.compute().items():
                    out.setdefault(name, []).append(v[0])
                self.num_samples = n
        return {k: np.asarray(v) for k, v in out.items()}


class _VmapEvaluator(_Evaluator):
    """Baseline: torch.func.functional_call + vmap over K materialized copies of the whole model."""

    def __init__(self, model, aff, **kw):
        super().__init__(model, aff, **kw)
        import copy

        if self.policy == "recompute":
            raise ValueError("method='vmap' does not support bn='recompute' (use 'engine' or 'loop')")
        self.net = copy.deepcopy(model).to(self.device).eval()
        if self.dtype == torch.float64:
            self.net.to(torch.float64)
        self.aff = aff.to(self.device)

    def evaluate(self, pts: Points, ref: Points | None, data) -> dict[str, np.ndarray]:
        from torch.func import functional_call, vmap

        K = pts.K
        allp = pts if ref is None else Points(torch.cat([pts.anchor_idx, ref.anchor_idx]),
                                              torch.cat([pts.coefs, ref.coefs]))
        allp = allp.to(self.device)
        params = {n: combine(p.anchors, p.dirs, allp.anchor_idx, allp.coefs) for n, p in self.aff.params.items()}
        params.update({n: v.expand(allp.K, *v.shape) for n, v in self.aff.carried.items()})
        metrics = PointMetrics(K, loss_fn=self.loss_fn, reference=ref is not None)
        fn = vmap(lambda p, x: logits_of(_call_functional(functional_call, self.net, p, x), self.output),
                  in_dims=(0, None))
        with torch.inference_mode(), precision_context(self.precision, self.device):
            n = 0
            for x, y in self.batches(data):
                logits = fn(params, x)
                metrics.update(logits[:K], y, None if ref is None else logits[K])
                n += y.shape[0]
                self.tick(1)
        self.num_samples = n
        return metrics.compute()


def _call_functional(functional_call, net, params, x):
    if isinstance(x, dict):
        return functional_call(net, params, (), x)
    if isinstance(x, (tuple, list)):
        return functional_call(net, params, tuple(x))
    return functional_call(net, params, (x,))


# ----------------------------------------------------------------------------------------------------------------
# The public entry point


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sweep(
    model: nn.Module,
    ckpts,
    alphas=None,
    data=None,
    *,
    bn: str = "interpolate",
    bn_data=None,
    precision: str = "fp32",
    batch_size: int = 1000,
    points_per_pass: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    reference="first",
    method: str = "engine",
    store=None,
    name: str | None = None,
    fallback: Sequence[str | type] = (),
    channels_last: bool = False,
    labels: Sequence[str] | None = None,
    distributed: bool | None = None,
    fuse: bool | str = "auto",
    compile: bool | str = False,  # noqa: A002 - torch's name for it
    repair: bool = False,
    output: Callable | str | int | None = None,
    mask_from: int | str | None = None,
) -> SweepResult:
    """Evaluate ``model`` at every point of a slice of weight space.

    Parameters
    ----------
    model : the network (an ``nn.Module``; never modified). Its logits are taken from its output by one rule on
        every method (:func:`lerpfast.engine.model.logits_of`): a tensor as is, else ``out.logits``, else
        ``out["logits"]``, else, for a tuple or list, the same rule applied to ``out[0]``. A forward returning
        ``(features, logits)`` is therefore scored on the features: pass ``output=`` (below).
    ckpts : a pair ``(theta_a, theta_b)`` for a line, or a slice (``Line``, ``Bilinear``, ``Barycentric``,
        ``Ray``, ``RandomDirections``, ``TaskVectors``, ``Soup``). Checkpoints may be modules, state dicts or
        paths (.pt/.pth/.safetensors).
    alphas : the line's coordinates (list, array, tensor or ``"start:stop:num"``); values outside [0, 1]
        extrapolate. Slices may carry their own coordinates.
    data : an ``(X, y)`` pair, a ``Dataset``, or any re-iterable of ``(x, y)`` batches (DataLoader, FFCV loader,
        ``lerpfast.data.load(...)``); x may be a tensor or a tuple / dict of tensors. Or a dict name -> data set
        (WiSE-FT's in-distribution and shifted test sets, say): every set is evaluated at every point, and the call
        returns a dict name -> SweepResult. The sets run one after another, each one read once for all the points,
        and each is its own sweep, stored as ``"{name}.{set}"`` (``name`` defaults to ``"sweep"``) with its own
        fingerprint and resume; the converted engine and the checkpoints' fingerprints are reused from one set to
        the next, the points' weights are built again for each set.
    bn : ``"interpolate"`` (running statistics follow the slice), ``"endpoint"`` / ``"endpoint:i"`` (checkpoint
        i's statistics), ``"recompute"`` (reset and recalibrate every point on ``bn_data``, then evaluate).
    bn_data : calibration data for ``bn="recompute"`` (training data; defaults to ``data`` with a warning).
    precision : ``"fp32"`` (exact fp32, no TF32), ``"tf32"``, ``"bf16"`` (autocast), or ``"fp64"`` (reference).
        Weights are always combined in fp32 (fp64 for ``"fp64"``); metrics are reduced in float64.
    batch_size : batch size used when ``data`` is an (X, y) pair or a Dataset.
    points_per_pass : points evaluated per forward pass (default: all; halved automatically on out-of-memory).
    device : where to run (default: the model's device).
    progress : show a tqdm bar (default: when the sweep is long and stderr is a terminal).
    loss_fn : the per-sample loss (default: cross-entropy; the ``loss`` metric is its mean over the data set).
        Called once per batch as ``loss_fn(logits, target)`` with ``logits`` a float64 tensor (R, C), the rows of
        all points evaluated in the pass stacked point by point (R = points x samples of the batch; for sequence
        outputs (B, T, C) every position is a row, R = points x B x T), and ``target`` the (R,) targets of those
        rows (the batch's labels flattened and repeated for each point). It must return the R per-row losses,
        shape (R,) (or (R, 1)), without reducing them: ``F.cross_entropy(logits, target, reduction="none")``.
        Any other shape (a mean, a per-sequence loss) is a ``ValueError`` naming ``loss_fn``. It is also called
        once on the first batch for the store's resume probe. Sequence targets: with next-token labels
        (``lerpfast.data.next_token_pairs``) the default loss is the mean token cross-entropy (``exp(loss)`` the
        perplexity) and the error the next-token error; positions labelled -100 (``lerpfast.metrics.IGNORE_INDEX``:
        padding, prompts) leave every metric, and ``loss_fn`` never sees them.
    reference : point for functional distance and disagreement: ``"first"`` (the first checkpoint), a point
        index, or None to skip them.
    method : ``"engine"`` (batched), ``"loop"`` (the per-point oracle) or ``"vmap"`` (torch.func baseline).
    store, name : an HDF5 file (path or ``lerpfast.store.ResultStore``) and sweep name: results are written
        chunk by chunk and a re-run computes only the missing points. Stored values carry checksums: a store whose
        values were damaged raises ``lerpfast.store.DamagedPointsError`` naming the sweeps and points.
    output : which part of the model's output holds the logits, where the default rule (``model``) picks the wrong
        one: a callable ``output(out) -> logits``, a key or attribute name (``"logits"``), or an index (``1`` for a
        ``(features, logits)`` tuple). Recorded in ``meta["output"]`` and in the sweep's fingerprint.
    mask_from : for pruned models or checkpoints (``torch.nn.utils.prune``: ``weight_orig`` + ``weight_mask``),
        whose masks to use where the checkpoints' masks differ: a checkpoint's index, or ``"model"``. A mask is
        never interpolated: every point's weight is ``mask * (interpolated weight_orig)``, as the pruned module
        computes it; dense checkpoints get the mask too. Default: the checkpoints' masks (an error naming the module
        when they differ), the model's own where no checkpoint has one (:mod:`lerpfast.pruning`).
        ``meta["pruning"]`` lists each pruned tensor's mask source and sparsity.
    repair : with ``store`` a path: first mark the store's damaged points as not computed
        (``ResultStore.repair``, with a warning listing them), so this run recomputes exactly those.
    fallback : module names or types to force onto the per-module fallback path.
    channels_last : run 4-d activations in channels_last memory format.
    labels : names of the checkpoints for error messages and metadata.
    distributed : shard the points across the ranks of the initialized ``torch.distributed`` process group
        (default: when one is initialized with more than one rank). Every rank returns the full result; only
        rank 0 opens the store. Launch with ``torchrun``; each rank evaluates on its own ``device``.
    fuse : epilogue fusion of conv / linear -> eval BN -> (+ residual) -> ReLU chains into one op (one Triton
        kernel on a GPU, per-point convs with BN folded in on a CPU; ``lerpfast.engine.fusion``): ``"auto"``
        (on CUDA and CPU), True or False. Never under ``bn="recompute"``. ``meta["fusion"]`` lists the chains.
    compile : launch-overhead reduction of the engine's batched forward: ``"cudagraphs"`` (CUDA only: the
        forward of each batch shape is captured once per chunk of points and replayed), True
        (``torch.compile`` with inductor) or a ``torch.compile`` backend name (e.g. ``"aot_eager"``); False
        (default) runs eagerly. torch.compile is experimental here: the dispatch layer breaks its graphs.

    Returns
    -------
    SweepResult with ``.coords`` (K x D), ``.alphas``, ``.loss``, ``.error``, ``.metrics`` and ``.meta`` (a dict
    data set name -> SweepResult when ``data`` is a dict).
    ``meta["timings"]`` has the seconds of each phase of the call (checkpoints, slice, fingerprints, store, engine,
    evaluation split into data / forward / metrics, finish).

    Notes
    -----
    Repeated calls skip work the previous call did: the sha256 fingerprints of the data and of in-memory or file
    checkpoints are reused while the tensors (object, storage, version counter, a probe of their values) or files
    (stat fields) are unchanged, and the converted engine (deep copy, rewrite, fx traces) is reused while the
    model's structure is (:func:`lerpfast.engine.model.engine_for`); it holds no weights between calls.
    :func:`clear_caches` forgets all of them. An input that reaches only the first Linear / Conv (through flatten,
    dropout, identity) is handed to it as the B-row batch, never repeated K times. A part of the network whose
    tensors are the same at every point (a linear probe's backbone, a frozen encoder, a zero-shot head) and whose
    input is too runs once on the B rows, not on K*B (:mod:`lerpfast.engine.shared`; ``LERPFAST_SHARED=0`` turns it
    off): ``meta["shared"]`` names those modules, the top-level nodes folded into one shared region, the nodes where
    per-point work starts (``ends_before``), and how many calls ran shared.
    """
    if isinstance(data, Mapping):  # several data sets: one sweep each, under "{name}.{set}"
        rest = {k: v for k, v in locals().items() if k not in ("model", "ckpts", "alphas", "data", "name")}
        return {d: sweep(model, ckpts, alphas, sub, name=f"{name or 'sweep'}.{d}", **rest)
                for d, sub in _named_data(data).items()}
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    policy, bn_source = _parse_bn(bn)
    if precision not in ("fp32", "tf32", "bf16", "fp64"):
        raise ValueError(f"precision={precision!r}: expected 'fp32', 'tf32', 'bf16' or 'fp64'")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    resolve_fuse(fuse, device)  # validates
    if compile is not False and not (compile is True or isinstance(compile, str)):
        raise ValueError(f"compile={compile!r}: expected False, True, 'cudagraphs' or a torch.compile backend name")
    if compile is not False and method != "engine":
        raise ValueError(f"compile={compile!r} applies to method='engine' only")
    if compile == "cudagraphs" and device.type != "cuda":
        raise ValueError(f"compile='cudagraphs' needs a CUDA device; the sweep runs on {device}")
    clock = time.perf_counter
    t_start = clock()
    timings: dict[str, float] = {}  # seconds per phase of the call: meta["timings"]
    spec: Slice = as_slice(ckpts, alphas)
    combine_dtype = torch.float64 if precision == "fp64" else torch.float32
    # copy=False: the slice copies what it keeps (torch.stack in geometry._build), the states are only read
    # a pruned model or pruned checkpoints: the model without its pruning hooks, the masks folded into the states
    model, states, pruning = load_pruned(spec.sources, model, labels if labels is not None else spec.labels(),
                                         copy=False, mask_from=mask_from)
    timings["checkpoints"] = clock() - t_start
    if pruning and getattr(spec, "align", None) is not None:
        raise ValueError("Line(align=...) with pruned checkpoints: the masks are in theta_b's unit order, not the "
                         "aligned one; align the dense checkpoints, or sweep the line without align")
    t = clock()
    aff = spec.resolve(states, model, combine_dtype)
    pruning.apply(aff)
    _apply_bn_policy(aff, states, model, policy, bn_source)
    if policy == "interpolate":
        _warn_negative_variance(aff, model)
    del states
    batches = as_batches(data, batch_size)
    if policy == "recompute":
        if bn_data is None:
            warnings.warn("bn='recompute' without bn_data: recalibrating on the evaluation data; pass bn_data= "
                          "(training data) to follow the usual protocol", stacklevel=2)
            bn_calib = batches
        else:
            bn_calib = as_batches(bn_data, batch_size)
    else:
        bn_calib = None
    ref = _reference_points(aff, reference)
    K = aff.K
    timings["slice"] = clock() - t

    t = clock()
    checkpoints = [describe(s) for s in spec.sources]
    timings["describe_checkpoints"] = clock() - t
    t = clock()
    data_desc = _describe_data(batches)
    timings["describe_data"] = clock() - t
    meta = {
        "slice": spec.describe(), "K": K, "J": aff.J, "bn": bn, "precision": precision, "method": method,
        "checkpoints": checkpoints, "model": type(model).__name__,
        "model_params": int(sum(p.numel() for p in model.parameters())),
        "data": data_desc, "batch_size": batch_size,
        "loss_fn": getattr(loss_fn, "__name__", type(loss_fn).__name__) if loss_fn else "cross_entropy",
        "reference": reference if reference is None or isinstance(reference, (int, str)) else str(reference),
        "lerpfast_version": __version__, "torch_version": torch.__version__, "device": str(device),
        "slice_info": aff.info, "fuse": fuse, "compile": compile,
    }
    parts = {k: meta[k] for k in ("slice", "bn", "precision", "checkpoints", "model", "model_params", "data",
                                  "loss_fn", "reference")}
    if pruning:  # (absent without pruning: stores written before pruning support still resume)
        meta["pruning"] = pruning.describe()
        parts["pruning"] = meta["pruning"]
    if output is not None:  # (absent from the default's fingerprint: stores written before output= still resume)
        meta["output"] = output if isinstance(output, (int, str)) else getattr(output, "__qualname__", repr(output))
        parts["output"] = meta["output"]
    fingerprint = _fingerprint(parts)
    meta["fingerprint"] = fingerprint

    metrics: dict[str, np.ndarray] = {}
    todo = np.arange(K)
    handle = None
    t = clock()
    rank, world = _dist_info(distributed)
    if store is not None and rank == 0:
        from lerpfast import store as store_mod

        if repair:
            if isinstance(store, store_mod.ResultStore):
                raise ValueError("repair=True needs the store's path (an open ResultStore cannot be repaired)")
            if os.path.exists(store):
                fixed = store_mod.ResultStore.repair(store)
                if fixed:
                    warnings.warn(f"{store}: damaged points marked for recomputation: " + "; ".join(
                        f"{n}: {store_mod._ranges_text(v)}" for n, v in fixed.items()), stacklevel=2)
        from lerpfast import probe as probe_mod

        dtype = torch.float64 if precision == "fp64" else torch.float32
        meta["probe"] = probe_mod.compute(
            model, aff, batches, loss_fn, device, dtype,
            lambda net, x: logits_of(_call(net, _to_device(x, device, dtype, False)), output))
        rs = store if isinstance(store, store_mod.ResultStore) else store_mod.ResultStore(store, mode="a")
        handle = rs.open_sweep(name or "sweep", coords=aff.coords, coord_names=aff.coord_names,
                               metric_names=_metric_names(ref is not None, loss_fn), attrs=meta,
                               grid_shape=aff.grid_shape)
        todo = np.asarray(handle.missing(), dtype=np.int64)
    if world > 1:
        todo = _broadcast(todo, device)
    timings["store"] = clock() - t

    P = max(1, min(int(points_per_pass or K), K))
    n_batches = _len_or_none(batches)
    total = None if n_batches is None else n_batches * math.ceil(len(todo) / P)
    bar = _progress_bar(progress, total, f"sweep {spec.kind} K={K}")
    kw = dict(device=device, precision=precision, policy=policy, bn_data=bn_calib, loss_fn=loss_fn, output=output,
              channels_last=channels_last, progress_cb=(bar.update if bar is not None else (lambda n: None)))
    t0 = clock()
    ev, failed = None, True
    try:
        if method == "engine":
            ev = _EngineEvaluator(model, aff, fallback=fallback, fuse=fuse, compile=compile, **kw)
        elif method == "loop":
            ev = _LoopEvaluator(model, aff, **kw)
        else:
            ev = _VmapEvaluator(model, aff, **kw)
        t_setup = clock() - t0
        timings["engine"] = t_setup
        t = clock()
        with buffers.pooled() as pool:  # large CPU activations recycled across layers and batches
            P = _run_chunks(ev, aff, ref, batches, todo, P, rank, world, metrics, handle, device)
            if pool is not None and pool.buffers:
                meta["cpu_buffers"] = {"reused": pool.hits, "allocated": pool.misses, "bytes": pool.held_bytes()}
        timings["evaluate"] = clock() - t
        elapsed = clock() - t0
        t = clock()
        if handle is not None:  # the store holds earlier runs' points too
            stored = rs.read(name or "sweep")
            metrics = {k: np.asarray(v, dtype=np.float64) for k, v in stored.metrics.items()
                       if not np.all(np.isnan(v))}  # e.g. top5_error of a model with < 5 classes
        if world > 1 and store is not None:
            metrics = _broadcast(metrics if rank == 0 else None, device)  # rank 0 read the store: every rank returns it
        n = ev.num_samples
        meta.update({
            "num_samples": int(n), "points_per_pass": P, "points_computed": int(len(todo)), "world_size": world,
            "seconds": elapsed, "setup_seconds": t_setup,
            "image_points_per_second": (len(todo) * n / (elapsed - t_setup)) if elapsed > t_setup and n else None,
        })
        if method == "engine":
            meta["paths"] = ev.mp.report()
            meta["held_bytes"] = ev.mp.held_bytes()
            meta["max_materialized_bytes"] = ev.mp.ctx.max_materialized
            meta["fusion"] = ev.mp.fusion_report()
            meta["shared"] = ev.mp.shared_report()
            meta["compile"] = compile
            meta["engine_cache"] = ev.mp.cache_state
            meta["unrepeated_inputs"] = sorted(str(i) for i in ev.mp.unrepeated_inputs if isinstance(i, str))
            if ev.graphed is not None:
                meta["cudagraphs"] = "failed: ran eagerly" if ev.graphed.failed else "replayed"
                meta["cudagraph_stats"] = dict(ev.graphed.stats)  # captures, replays, eager calls while compiling
        failed = False
    finally:
        if ev is not None:
            ev.close(failed)
        if bar is not None:
            bar.close()
        if handle is not None and not isinstance(store, store_mod.ResultStore):
            rs.close()  # releases the writer lock even when the sweep fails
    timings["finish"] = clock() - t
    timings.update({f"evaluate.{k}": v for k, v in ev.timings.items()})
    timings["total"] = clock() - t_start
    meta["timings"] = timings
    return SweepResult(aff.kind, aff.coords, aff.coord_names, metrics, meta, aff.grid_shape)


def _named_data(data: Mapping) -> dict:
    """``sweep``'s ``data`` dict checked: at least one set, names usable in a store (non-empty, no '/')."""
    if not data:
        raise ValueError("data: an empty dict; give at least one data set, {name: (X, y) or a loader, ...}")
    for d, sub in data.items():
        if not isinstance(d, str) or not d or "/" in d:
            raise ValueError(f"data: data set names must be non-empty strings without '/' (they name the sweeps in "
                             f"the store), got {d!r}")
        if sub is None:
            raise ValueError(f"data[{d!r}] is None: expected an (X, y) pair, a Dataset or a loader")
    return dict(data)


def _run_chunks(ev, aff: AffineSlice, ref, batches, todo: np.ndarray, P: int, rank: int, world: int,
                metrics: dict, handle, device: torch.device) -> int:
    """Evaluate ``todo`` in rounds of P points per rank; write each finished chunk. Returns the final P."""
    K = aff.K
    done = 0
    while done < len(todo):
        round_ = todo[done:done + P * world]  # each rank takes P points of the round
        mine = round_[rank * P:(rank + 1) * P]
        vals, oom, err = {}, False, None
        try:
            if len(mine):
                vals = ev.evaluate(aff.points(mine), ref, batches)
        except Exception as exc:
            if P > 1 and is_oom(exc):
                oom = True
            elif world == 1:
                raise
            else:  # the other ranks are (or will be) waiting in the gather below: tell them, then fail together
                err = exc
        if world == 1:
            parts = [(mine, vals, oom)]
        else:
            parts = _all_gather((mine, vals, oom, None if err is None else f"{type(err).__name__}: {err}"),
                                world, device)
            _raise_failed_rank(parts, rank, err)
        if any(p[2] for p in parts):  # out of memory anywhere: every rank halves and redoes the round
            P = max(1, P // 2)
            warnings.warn(f"out of memory with {len(mine)} points per pass: retrying with {P}", stacklevel=3)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for idx, v, *_ in parts:
            for key, arr in v.items():
                metrics.setdefault(key, np.full(K, np.nan))[idx] = arr
            if handle is not None and len(idx):
                handle.write(idx, v)
        done += len(round_)
    return P


def _dist_info(distributed: bool | None) -> tuple[int, int]:
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized()
    if distributed and not active:
        raise RuntimeError("distributed=True but no torch.distributed process group is initialized "
                           "(launch with torchrun and call torch.distributed.init_process_group)")
    if not active or distributed is False:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _raise_failed_rank(parts: list, rank: int, err: BaseException | None) -> None:
    """After a round's gather: when any rank failed, every rank raises (none is left waiting for the others)."""
    failed = [(r, p[3]) for r, p in enumerate(parts) if p[3] is not None]
    if not failed:
        return
    if err is not None:
        raise err
    r, msg = failed[0]
    raise RuntimeError(f"rank {r} of {len(parts)} failed evaluating points {np.asarray(parts[r][0]).tolist()}: {msg}. "
                       f"Rounds finished before it are in the store; run the same command again to resume.")


def _collective_device(device: torch.device | None):
    """Where torch.distributed's object collectives stage their bytes: NCCL uses ``torch.cuda.current_device()``,
    which only :func:`lerpfast.distributed.init_from_env` sets; for a group the user made, every rank would go
    through cuda:0. Pin it to the sweep's device for the duration of the collective."""
    import contextlib

    import torch.distributed as dist

    if device is not None and device.type == "cuda" and dist.get_backend() == "nccl":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _all_gather(part: tuple, world: int, device: torch.device | None = None) -> list:
    import torch.distributed as dist

    out = [None] * world
    with _collective_device(device):
        dist.all_gather_object(out, (np.asarray(part[0]),) + tuple(part[1:]))
    return out


def _broadcast(obj, device: torch.device | None = None):
    import torch.distributed as dist

    box = [obj]
    with _collective_device(device):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _metric_names(reference: bool, loss_fn) -> list[str]:
    names = ["loss", "error", "top5_error"]
    return names + (["distance", "disagreement"] if reference else [])


def _len_or_none(x) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def _progress_bar(progress: bool | None, total: int | None, desc: str):
    import sys

    if progress is None:
        progress = sys.stderr.isatty() and (total or 0) > 20
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)
