"""Per-module fallback: any module without a multi-point layer runs on materialized copies of itself only.

The K copies of the module's own tensors go through ``torch.func.functional_call`` under ``torch.func.vmap``.
Where an op has no batching rule (``aten::lstm`` has none), the module runs point by point instead — still
only this module's tensors are materialized, and the rest of the model stays batched.

Where vmap runs but is slower than a loop over the points (vmap's per-op overhead on a large module, ops it runs
through its slow per-sample path; a whole ViT-B/16 is 4-18x slower under vmap on a CPU), the loop is used: the
first calls of each module and input shape alternate the two, loop first, and time them (two calls each, one each
when they differ by 1.5x); the faster is kept for that shape for the rest of the process (:func:`choices`), so
the fallback is never much slower than looping the module itself. The module's K weight settings are built once
per chunk of points, not per batch. ``LERPFAST_FALLBACK=vmap`` or
``loop`` forces one (for benchmarks and debugging).

The point axis is folded into the module's batch axis. Inputs: the axis of size K*B (axis 1 for
``batch_first=False`` RNNs and attention). Outputs: the axis of size B in each point's output (axis 1 for
RNN hidden states). :func:`register_batch_axes` overrides this for a module type.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lerpfast.engine.layers import MultiPointLayer, check_calibration

__all__ = ["FallbackModule", "register_batch_axes", "choices", "clear_choices"]

# (module type, name, input shapes / dtypes, K, device) -> "vmap" | "loop", once both were timed
_CHOICES: dict[tuple, str] = {}
# the same keys while they are being timed -> {"vmap": [seconds, ...], "loop": [...]}
_SAMPLES: dict[tuple, dict[str, list[float]]] = {}
_ROUNDS = 2  # timed calls per mode; the faster best-of-two wins
_CLEAR = 1.5  # ... unless the first call of each already differs by this factor


def choices() -> dict[tuple, str]:
    """The vmap-or-loop choice made for each fallback module and input shape so far (a copy)."""
    return dict(_CHOICES)


def clear_choices() -> None:
    _CHOICES.clear()
    _SAMPLES.clear()

_TENSOR = object()  # marks where a tensor stood among a module's flattened outputs

# module type -> (fn(module, leaf_index, tensor, N) -> input axis, fn(module, leaf_index, tensor, B) -> output axis)
_AXES: dict[type, tuple] = {}


def register_batch_axes(module_type: type, in_axis, out_axis) -> None:
    """Tell the fallback where the batch axis of ``module_type``'s inputs / outputs is.

    ``in_axis(module, i, tensor, n)`` and ``out_axis(module, i, tensor, b)`` get the index of the tensor among
    the flattened inputs / outputs and return an axis, or None for a tensor that is not batched.
    """
    _AXES[module_type] = (in_axis, out_axis)


def _first_axis(t: torch.Tensor, size: int) -> int | None:
    for a, s in enumerate(t.shape):
        if s == size:
            return a
    return None


def _seq_first(m: nn.Module) -> bool:
    return not getattr(m, "batch_first", True)


def _rnn_in(m, i, t, n):
    return (1 if _seq_first(m) else 0) if i == 0 else (1 if t.dim() == 3 else None)


def _rnn_out(m, i, t, b):
    return (1 if _seq_first(m) else 0) if i == 0 else 1  # h_n, c_n: (layers*dirs, B, H)


def _mha_in(m, i, t, n):
    if i < 3:  # query, key, value
        return 1 if _seq_first(m) else 0
    return 0 if t.dim() >= 1 and t.shape[0] == n else None


def _mha_out(m, i, t, b):
    return (1 if _seq_first(m) else 0) if i == 0 else 0


register_batch_axes(nn.RNNBase, _rnn_in, _rnn_out)
register_batch_axes(nn.MultiheadAttention, _mha_in, _mha_out)


def _rules(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in _AXES:
            return _AXES[cls]
    return None


class FallbackModule(MultiPointLayer):
    path = "fallback"
    reads_through = "inner"  # configuration (batch_first, num_heads, ...) reads through to the wrapped module

    def __init__(self, ctx, name, tensors, source: nn.Module):
        super().__init__(ctx, name, tensors, source)
        self.inner = source  # the template: its own tensors are replaced point by point
        self.mode: str | None = None  # "vmap" or "loop": what the last call ran
        self.vmap_fails = False  # an op without a batching rule: loop always
        self.timing = False  # the last call was one of the timed calls that choose between vmap and the loop

    def _in_axis(self, i: int, t: torch.Tensor, n: int) -> int | None:
        rules = _rules(self.inner)
        if rules is not None:
            return rules[0](self.inner, i, t, n)
        if t.dim() == 0:
            return None
        return 0 if t.shape[0] == n else _first_axis(t, n)

    def _out_axis(self, i: int, t: torch.Tensor, b: int) -> int:
        rules = _rules(self.inner)
        axis = rules[1](self.inner, i, t, b) if rules is not None else (
            0 if t.dim() and t.shape[0] == b else _first_axis(t, b))
        if axis is None:
            raise RuntimeError(
                f"lerpfast fallback for {self.name!r} ({self.source_type}): output {i} of shape {tuple(t.shape)} "
                f"has no batch axis of size {b}; tell lerpfast where it is with "
                f"lerpfast.engine.register_batch_axes({self.source_type}, in_axis, out_axis)")
        return axis

    def _mode(self, key: tuple) -> tuple[str, bool]:
        """(the mode of this call, whether to time it)."""
        if self.vmap_fails:
            return "loop", False
        forced = os.environ.get("LERPFAST_FALLBACK", "auto")
        if forced in ("vmap", "loop"):
            return forced, False
        if forced != "auto":
            raise ValueError(f"LERPFAST_FALLBACK={forced!r}: expected auto, vmap or loop")
        choice = _CHOICES.get(key)
        if choice is not None:
            return choice, False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "vmap", False  # no host timing inside a CUDA graph capture (graphs wait for pending() == 0)
        samples = _SAMPLES.setdefault(key, {"loop": [], "vmap": []})
        # the loop first: it is the bound, and vmap, when it loses, can lose by 10x (a whole ViT)
        return ("loop" if len(samples["loop"]) <= len(samples["vmap"]) else "vmap"), True

    @staticmethod
    def _clock(timed: bool) -> float:
        if timed and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter() if timed else 0.0

    @staticmethod
    def _record(key: tuple, mode: str, seconds: float) -> None:
        samples = _SAMPLES.get(key)
        if samples is None:
            return
        samples[mode].append(seconds)
        n = min(len(v) for v in samples.values())
        if n == 0:
            return
        best = {m: min(v) for m, v in samples.items()}
        clear = max(best.values()) > _CLEAR * min(best.values())  # one round settles a clear loser
        if n >= _ROUNDS or clear:
            _CHOICES[key] = min(best, key=best.get)
            del _SAMPLES[key]

    def forward(self, *args, **kwargs):
        check_calibration(self)
        const = self.constants()
        if const is not None:  # the same tensors at every point: the module itself over all K*B rows
            return functional_call(self.inner, const, args, kwargs)
        K, B = self.ctx.K, self.ctx.batch
        n = K * B
        # (K, *S) each: this module's tensors only, built once per chunk of points and kept for its batches (in
        # the Points' cache, which lives as long as the chunk): rebuilding them on every batch cost as much as the
        # module itself for a whole ViT on the fallback
        params = self.ctx.pts._cache.get(("fallback", id(self)))
        if params is None or params.keys() != self.slices.keys():
            params = {k: self.build(k) for k in self.slices}
            self.ctx.pts._cache[("fallback", id(self))] = params
        leaves, spec = tree_flatten((args, kwargs))
        pos = [i for i, v in enumerate(leaves) if torch.is_tensor(v)]
        axes = [self._in_axis(j, leaves[i], n) for j, i in enumerate(pos)]
        split = []
        for i, a in zip(pos, axes):
            t = leaves[i]
            split.append(t if a is None else t.reshape(*t.shape[:a], K, t.shape[a] // K, *t.shape[a + 1:]))
        out_spec: list = []

        def run_one(p, *tensors):
            vals = list(leaves)
            for i, t in zip(pos, tensors):
                vals[i] = t
            a, kw = tree_unflatten(vals, spec)
            out = functional_call(self.inner, p, tuple(a), kw)
            flat, ospec = tree_flatten(out)
            out_spec[:] = [ospec, [_TENSOR if torch.is_tensor(v) else v for v in flat]]
            return tuple(v for v in flat if torch.is_tensor(v))

        key = (self.source_type, self.name, K, str(leaves[pos[0]].device) if pos else "",
               tuple((tuple(t.shape), t.dtype) for t in split))
        mode, timed = self._mode(key)
        start = self._clock(timed)
        outs = None
        if mode == "vmap":
            try:
                dims = tuple(a for a in axes)
                with warnings.catch_warnings():  # ops vmap runs through its slow per-sample fallback
                    warnings.filterwarnings("ignore", message=".*performance drop.*batching rule")
                    outs = vmap(run_one, in_dims=(0, *dims), out_dims=0)(params, *split)  # each (K, *per_point)
            except RuntimeError as e:
                if "atching rule" not in str(e) and "vmap" not in str(e):
                    raise
                self.vmap_fails, mode, timed = True, "loop", False
                _SAMPLES.pop(key, None)
        if mode == "loop":
            per_point = []
            for k in range(K):
                ts = [t if a is None else t.select(a, k) for t, a in zip(split, axes)]
                per_point.append(run_one({name: v[k] for name, v in params.items()}, *ts))
            outs = tuple(torch.stack([pp[j] for pp in per_point]) for j in range(len(per_point[0])))
        if timed:
            self._record(key, mode, self._clock(timed) - start)
        self.mode, self.timing = mode, timed
        merged = []
        for j, o in enumerate(outs):  # o: (K, *per_point) -> point axis folded into the batch axis
            a = self._out_axis(j, o[0], B)
            o = o.movedim(0, a)
            merged.append(o.reshape(*o.shape[:a], K * o.shape[a + 1], *o.shape[a + 2:]))
        ospec, consts = out_spec
        it = iter(merged)
        flat = [next(it) if c is _TENSOR else c for c in consts]
        return tree_unflatten(flat, ospec)
