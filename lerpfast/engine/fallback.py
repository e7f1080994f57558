"""Per-module fallback: any module without a multi-point layer runs on materialized copies of itself only.

The K copies of the module's own tensors go through ``torch.func.functional_call`` under ``torch.func.vmap``.
Where an op has no batching rule (``aten::lstm`` has none), the module runs point by point instead — still
only this module's tensors are materialized, and the rest of the model stays batched.

The point axis is folded into the module's batch axis. Inputs: the axis of size K*B (axis 1 for
``batch_first=False`` RNNs and attention). Outputs: the axis of size B in each point's output (axis 1 for
RNN hidden states). :func:`register_batch_axes` overrides this for a module type.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lerpfast.engine.layers import MultiPointLayer, external_read_error

__all__ = ["FallbackModule", "register_batch_axes"]

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

    def __init__(self, ctx, name, tensors, source: nn.Module):
        super().__init__(ctx, name, tensors, source)
        self.inner = source  # the template: its own tensors are replaced point by point
        self.mode: str | None = None  # "vmap" or "loop", decided on the first call

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            pass
        inner = nn.Module.__getattr__(self, "inner")
        value = getattr(inner, name)
        if torch.is_tensor(value) and name in self.slices:
            raise external_read_error(self.name, self.source_type, name) from None
        return value  # configuration (batch_first, num_heads, ...) reads through to the wrapped module

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

    def forward(self, *args, **kwargs):
        K, B = self.ctx.K, self.ctx.batch
        n = K * B
        params = {k: self.build(k) for k in self.slices}  # (K, *S) each: this module's tensors only
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

        if self.mode != "loop":
            try:
                dims = tuple(a for a in axes)
                with warnings.catch_warnings():  # ops vmap runs through its slow per-sample fallback
                    warnings.filterwarnings("ignore", message=".*performance drop.*batching rule")
                    outs = vmap(run_one, in_dims=(0, *dims), out_dims=0)(params, *split)  # each (K, *per_point)
                self.mode = "vmap"
            except RuntimeError as e:
                if "atching rule" not in str(e) and "vmap" not in str(e):
                    raise
                self.mode = "loop"
        if self.mode == "loop":
            per_point = []
            for k in range(K):
                ts = [t if a is None else t.select(a, k) for t, a in zip(split, axes)]
                per_point.append(run_one({name: v[k] for name, v in params.items()}, *ts))
            outs = tuple(torch.stack([pp[j] for pp in per_point]) for j in range(len(per_point[0])))
        merged = []
        for j, o in enumerate(outs):  # o: (K, *per_point) -> point axis folded into the batch axis
            a = self._out_axis(j, o[0], B)
            o = o.movedim(0, a)
            merged.append(o.reshape(*o.shape[:a], K * o.shape[a + 1], *o.shape[a + 2:]))
        ospec, consts = out_spec
        it = iter(merged)
        flat = [next(it) if c is _TENSOR else c for c in consts]
        return tree_unflatten(flat, ospec)
