"""Permutation alignment: permute theta_b's hidden units to match theta_a without changing its function.

Two networks trained from different seeds compute similar functions with their hidden units in different orders,
and the straight line between them crosses a loss barrier that largely disappears once the units are put in
correspondence (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023; Entezari et al., ICLR 2022). This module
finds the correspondence and applies it::

    >>> res = lerpfast.align(model, theta_a, theta_b)                 # weight matching
    >>> res = lerpfast.align(model, theta_a, theta_b, method="activations", data=train)
    >>> lerpfast.sweep(model, (theta_a, res.state_dict), "0:1:21", test)

The permutation structure is derived from the model with torch.fx, never written by hand:

* every Linear / Conv / Embedding output starts a *permutation group* of its output units; BatchNorm, LayerNorm,
  GroupNorm (within its channel groups), elementwise activations, dropout, pooling, softmax and depthwise convs
  carry a group through; a residual add ties its inputs' groups into one (union-find); a flatten or view after a
  conv repeats the channel permutation over the spatial positions;
* the network's inputs and outputs are never permuted: a group that reaches the output (the logits) is held at
  the identity, and so is a group added to a tensor that is not permuted (e.g. the input) and a grouped conv's;
  :attr:`Alignment.frozen` says which and why;
* a module or op that could mix the units of a permuted tensor in a way the analysis does not know (attention,
  ``cat`` along the permuted axis, a custom channel mixing) is an :class:`AlignError` naming it, never skipped.

After permuting, the aligned state dict is run against theta_b on an example input (``check=True``): the two
must give the same outputs (to float32 rounding), a last guard against a permutation that is not exact.
"""

from __future__ import annotations

import copy
import math
import operator
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["align", "Alignment", "AlignError", "PermGroup", "PermStructure", "permutation_groups", "METHODS"]

METHODS = ("weights", "activations")


class AlignError(ValueError):
    """The model's permutation structure cannot be derived (the message names the module or op), or bad input."""


# ----------------------------------------------------------------------------------------------------------------
# The permutation structure


@dataclass
class PermGroup:
    """One permutation group: ``size`` units permuted together in every tensor listed in ``tensors``.

    Attributes
    ----------
    name : the first module whose output starts the group (e.g. ``"blocks.0.conv1"``).
    size : the number of units permuted.
    sources : every module whose output units belong to the group (several where residual adds tie them).
    tensors : ``(state-dict key, axis)`` of every tensor axis the permutation applies to.
    frozen : why the group is held at the identity (None: it is permuted).
    blocks : how many classes the units are confined to (1: free; GroupNorm confines them to its groups).
    """

    name: str
    size: int
    sources: list[str] = field(default_factory=list)
    tensors: list[tuple[str, int]] = field(default_factory=list)
    frozen: str | None = None
    blocks: int = 1


@dataclass(frozen=True)
class _Ax:
    """A permuted tensor axis: its length is ``outer * n * inner`` and unit ``u`` of the group occupies the
    positions ``(o * n + u) * inner + r`` (a flatten after a conv: ``outer = 1, inner = H * W``)."""

    gid: int
    outer: int
    n: int
    inner: int

    def same_layout(self, other: _Ax) -> bool:
        return (self.outer, self.n, self.inner) == (other.outer, other.n, other.inner)


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold, nn.LogSigmoid, nn.Softmax,
    nn.LogSoftmax, nn.Softmin,
)
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
}
# elementwise (with broadcasting) or applied to each element / along one axis equivariantly (softmax)
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    operator.isub, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp,
    torch.relu, torch.sigmoid, torch.tanh, torch.maximum, torch.minimum, torch.clamp, torch.where,
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid,
    F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.softmax, F.log_softmax, F.softmin, F.logsigmoid, F.threshold,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "relu", "relu_", "sigmoid",
    "tanh", "clamp", "clamp_", "clamp_min", "clamp_max", "softmax", "log_softmax", "contiguous", "clone", "float",
    "double", "half", "bfloat16", "to", "type_as", "detach", "sigmoid_", "tanh_", "pow", "sqrt", "rsqrt",
}
# by name, for libraries' functions (torchvision.ops.stochastic_depth: drops whole samples, identity in eval)
_ELEMENTWISE_BY_NAME = {"stochastic_depth"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_INFO_METHODS = {"size", "dim", "numel"}


def _where(node: fx.Node) -> str:
    """The module a node runs in, for error messages (``"blocks.0 (_BasicBlock)"``)."""
    if node.op == "call_module":
        return repr(str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = getattr(cls, "__name__", str(cls))
        return f"{path!r} ({cls_name})" if path else f"the top-level module ({cls_name})"
    return "the top-level module"


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    return getattr(t, "__name__", str(t))


class _Analysis:
    """Walks the traced graph once; assigns each tensor value the permuted axes it carries."""

    def __init__(self, gm: fx.GraphModule, state_keys: set[str]):
        self.gm, self.keys = gm, state_keys
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.names: list[str] = []
        self.frozen: dict[int, str] = {}
        self.labels: dict[int, list[np.ndarray]] = {}  # gid -> per-unit labels the permutation must preserve
        self.terms: dict[tuple[str, int], _Ax] = {}  # (key, axis) -> the permuted layout of that tensor axis
        self.points: dict[tuple[str, int], _Ax] = {}  # (node name, axis) -> layout: activations entering a mixer
        self.plain_params: set[str] = set()  # get_attr tensors read by ops that need them unpermuted
        self.env: dict[fx.Node, dict[int, _Ax] | None] = {}

    # -- union-find -------------------------------------------------------------------------------------------
    def new(self, n: int, name: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(n)
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the earliest group names the union
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if rb in self.labels:
            self.labels.setdefault(ra, []).extend(self.labels.pop(rb))

    def freeze(self, g: int, reason: str) -> None:
        self.frozen.setdefault(self.find(g), reason)

    def merge(self, axes: Sequence[_Ax], reason: str) -> _Ax:
        """One layout for several operands' layouts of one axis (elementwise ops): same layout -> one group."""
        first = axes[0]
        for ax in axes[1:]:
            if ax.same_layout(first):
                self.union(first.gid, ax.gid)
            else:
                self.freeze(first.gid, reason)
                self.freeze(ax.gid, reason)
        return first

    def register(self, key: str, axis: int, ax: _Ax) -> None:
        if key not in self.keys:
            return
        old = self.terms.get((key, axis))
        if old is None:
            self.terms[(key, axis)] = ax
        elif old.same_layout(ax):
            self.union(old.gid, ax.gid)
        else:
            why = f"{key!r} axis {axis} is permuted by two groups with different layouts"
            self.freeze(old.gid, why)
            self.freeze(ax.gid, why)

    # -- helpers ------------------------------------------------------------------------------------------------
    def shape(self, node: Any) -> tuple[int, ...] | None:
        if isinstance(node, fx.Node):
            if node.op == "get_attr":
                t = _get_attr(self.gm, str(node.target))
                return tuple(t.shape) if torch.is_tensor(t) else None
            meta = node.meta.get("tensor_meta")
            return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if torch.is_tensor(node):
            return tuple(node.shape)
        return None

    def ann(self, node: Any) -> dict[int, _Ax]:
        if isinstance(node, fx.Node):
            return self.env.get(node) or {}
        return {}

    def fail(self, node: fx.Node, what: str) -> AlignError:
        if node.op == "call_module":
            desc = f"module {str(node.target)!r} ({type(self.modules[str(node.target)]).__name__})"
        else:
            desc = f"{_op_name(node)} in {_where(node)}"
        return AlignError(f"align: cannot derive the permutation structure: {desc} "
                          f"{what}. Permutation alignment supports Linear / Conv / BatchNorm / LayerNorm / GroupNorm, "
                          "elementwise activations, pooling, dropout, residual adds and flatten / view; give the "
                          "model without that module, or align a model whose hidden path avoids it")

    def point(self, node: Any, axis: int, ax: _Ax) -> None:
        if isinstance(node, fx.Node):
            self.points.setdefault((node.name, axis), ax)

    # -- the walk -------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = {}
            elif node.op == "get_attr":
                self.env[node] = {} if torch.is_tensor(_get_attr(self.gm, str(node.target))) else None
            elif node.op == "output":
                for arg in _tensor_args(node.args):
                    for ax in self.ann(arg).values():
                        self.freeze(ax.gid, "reaches the model's output")
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            else:
                self.env[node] = self.call_function(node)
        for key in self.plain_params:
            for (k, _), ax in self.terms.items():
                if k == key:
                    self.freeze(ax.gid, f"{key!r} is also read unpermuted")

    def _inputs_annotated(self, node: fx.Node) -> bool:
        return any(self.ann(a) for a in _tensor_args((node.args, node.kwargs)))

    def _mark_plain(self, node: fx.Node) -> None:
        for a in _tensor_args((node.args, node.kwargs)):
            if isinstance(a, fx.Node) and a.op == "get_attr":
                self.plain_params.add(str(a.target))

    def call_module(self, node: fx.Node) -> dict[int, _Ax] | None:
        name = str(node.target)
        m = self.modules[name]
        x = node.args[0] if node.args else None
        xin = self.ann(x)
        shape_in = self.shape(x)
        out: dict[int, _Ax] = {}
        if isinstance(m, nn.Linear):
            last = len(shape_in) - 1
            for a, ax in xin.items():
                if a == last:
                    self.register(f"{name}.weight", 1, ax)
                    self.point(x, a, ax)
                else:
                    out[a] = ax
            g = self.new(m.out_features, name)
            ax = _Ax(g, 1, m.out_features, 1)
            self.register(f"{name}.weight", 0, ax)
            self.register(f"{name}.bias", 0, ax)
            out[last] = ax
            return out
        if isinstance(m, nn.Embedding):
            if xin:
                raise self.fail(node, "receives a permuted tensor as indices")
            g = self.new(m.embedding_dim, name)
            ax = _Ax(g, 1, m.embedding_dim, 1)
            self.register(f"{name}.weight", 1, ax)
            return {len(self.shape(node)) - 1: ax}
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d)):
            nd = len(m.kernel_size)
            chan = len(shape_in) - nd - 1
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            w_in, w_out = (0, 1) if transposed else (1, 0)
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels and not transposed
            for a, ax in xin.items():
                if a > chan:
                    raise self.fail(node, f"convolves over axis {a}, which carries a permutation")
                if a < chan:
                    out[a] = ax
            cin = xin.get(chan)
            if depthwise and cin is not None and cin.outer == 1 and cin.inner == 1:
                self.register(f"{name}.weight", 0, cin)
                self.register(f"{name}.bias", 0, cin)
                out[chan] = cin
                return out
            g = self.new(m.out_channels, name)
            ax = _Ax(g, 1, m.out_channels, 1)
            if m.groups > 1:  # a permutation would have to respect the groups: held at the identity (exact)
                why = f"grouped convolution {name!r} (groups={m.groups})"
                self.freeze(g, why)
                if cin is not None:
                    self.freeze(cin.gid, why)
            elif cin is not None:
                self.register(f"{name}.weight", w_in, cin)
                self.point(x, chan, cin)
            self.register(f"{name}.weight", w_out, ax)
            self.register(f"{name}.bias", 0, ax)
            out[chan] = ax
            return out
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            nd = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(m))
            chan = 1 if nd is None else len(shape_in) - nd - 1
            cin = xin.get(chan)
            if cin is not None:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    self.register(f"{name}.{p}", 0, cin)
            return dict(xin)
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            first = len(shape_in) - k
            for a, ax in xin.items():
                if a >= first:
                    self.register(f"{name}.weight", a - first, ax)
                    self.register(f"{name}.bias", a - first, ax)
            return dict(xin)
        if isinstance(m, nn.GroupNorm):
            cin = xin.get(1)
            if cin is not None:
                self.register(f"{name}.weight", 0, cin)
                self.register(f"{name}.bias", 0, cin)
                if 1 < m.num_groups < m.num_channels:  # the permutation must map each group onto itself
                    per = m.num_channels // m.num_groups
                    chans = np.arange(cin.outer * cin.n * cin.inner).reshape(cin.outer, cin.n, cin.inner)
                    sig = (chans // per).transpose(1, 0, 2).reshape(cin.n, -1)  # (n, outer*inner) group ids
                    _, labels = np.unique(sig, axis=0, return_inverse=True)
                    self.labels.setdefault(self.find(cin.gid), []).append(labels.reshape(-1))
            return dict(xin)
        if isinstance(m, nn.PReLU):
            cin = xin.get(1)
            if m.num_parameters > 1 and cin is not None:
                self.register(f"{name}.weight", 0, cin)
            return dict(xin)
        if isinstance(m, _PASS_MODULES):
            return dict(xin)
        if type(m) in _POOL_MODULES:
            if getattr(m, "return_indices", False) and xin:
                raise self.fail(node, "returns indices of a permuted tensor")
            return self.pool(node, xin, shape_in, _POOL_MODULES[type(m)])
        if isinstance(m, nn.Flatten):
            return self.reshape(node, xin, shape_in)
        if isinstance(m, nn.Unflatten):
            return self.reshape(node, xin, shape_in)
        # any other module: exact only where nothing it reads is permuted (its output is then the same in both)
        if self._inputs_annotated(node):
            raise self.fail(node, "receives permuted activations and is not known to be permutation-equivariant")
        return {} if self.shape(node) is not None else None

    def pool(self, node, xin, shape_in, nd) -> dict[int, _Ax]:
        first_spatial = len(shape_in) - nd
        out = {}
        for a, ax in xin.items():
            if a >= first_spatial:
                raise self.fail(node, f"pools over axis {a}, which carries a permutation")
            out[a] = ax
        return out

    def reshape(self, node: fx.Node, xin: dict[int, _Ax], shape_in) -> dict[int, _Ax]:
        """flatten / view / reshape / unflatten / squeeze: the layout of each permuted axis in the new shape."""
        shape_out = self.shape(node)
        if shape_out is None or shape_in is None:
            raise self.fail(node, "reshapes a permuted tensor into something that is not a tensor")
        out: dict[int, _Ax] = {}
        for a in list(xin):
            ax = xin[a]
            placed = _place(ax, a, shape_in, shape_out, out)
            if placed is None:
                # units of k consecutive units that move together: maxout's (N, w * pieces) -> (N, w, pieces)
                for k in range(2, ax.n + 1):
                    if ax.n % k == 0 and _place(_Ax(ax.gid, ax.outer, ax.n // k, ax.inner * k), a, shape_in,
                                                shape_out, out) is not None:
                        self.coarsen(ax.gid, k)
                        placed = _place(xin[a], a, shape_in, shape_out, out)
                        break
            if placed is None:
                raise self.fail(node, f"reshapes {tuple(shape_in)} -> {tuple(shape_out)} so that the permuted axis "
                                      f"{a} ({ax.n} units) no longer lies within one axis")
            out[placed[0]] = placed[1]
        return out

    def coarsen(self, gid: int, k: int) -> None:
        """Make every k consecutive units of a group one unit (a block permutation is still a permutation)."""
        root = self.find(gid)

        def fix(ax: _Ax) -> _Ax:
            return _Ax(ax.gid, ax.outer, ax.n // k, ax.inner * k) if self.find(ax.gid) == root else ax

        self.terms = {key: fix(ax) for key, ax in self.terms.items()}
        self.points = {key: fix(ax) for key, ax in self.points.items()}
        for d in self.env.values():
            for a in list(d or ()):
                d[a] = fix(d[a])
        for g in range(len(self.parent)):
            if self.find(g) == root:
                self.size[g] //= k
        if root in self.labels:
            self.labels[root] = [np.unique(lab.reshape(-1, k), axis=0, return_inverse=True)[1].reshape(-1)
                                 for lab in self.labels[root]]

    def call_function(self, node: fx.Node) -> dict[int, _Ax] | None:
        t = node.target
        method = t if node.op == "call_method" else None
        shape_out = self.shape(node)
        args = list(node.args)
        x = args[0] if args else None
        xin = self.ann(x)
        if node.op == "call_function" and t is getattr:
            if xin and args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
                raise self.fail(node, f"reads the attribute {args[1]!r} of a permuted tensor")
            return None
        if method in _INFO_METHODS or (node.op == "call_function" and t in (torch.numel, len)):
            return None
        if shape_out is None:  # a result that is not one tensor (a tuple, a number)
            if self._inputs_annotated(node):
                raise self.fail(node, "returns something other than one tensor from a permuted tensor")
            return None
        if not self._inputs_annotated(node):
            if node.op == "call_function" and t is operator.getitem:
                return {}
            if not (t in _ELEMENTWISE_FUNCTIONS or method in _ELEMENTWISE_METHODS):
                self._mark_plain(node)
            return {}
        if t in _ELEMENTWISE_FUNCTIONS or method in _ELEMENTWISE_METHODS or _by_name(t) in _ELEMENTWISE_BY_NAME:
            return self.broadcast(node, shape_out)
        if t is F.layer_norm:  # ConvNeXt's LayerNorm2d: the functional form with the module's own tensors
            return self.layer_norm(node, xin, self.shape(x))
        if t in _RESHAPE_FUNCTIONS or method in _RESHAPE_METHODS:
            return self.reshape(node, xin, self.shape(x))
        if t in _POOL_FUNCTIONS:
            if node.kwargs.get("return_indices"):
                raise self.fail(node, "returns indices of a permuted tensor")
            return self.pool(node, xin, self.shape(x), _POOL_FUNCTIONS[t])
        if t in _REDUCE_FUNCTIONS or method in _REDUCE_METHODS:
            return self.reduce(node, xin, self.shape(x))
        if method in ("permute", "transpose") or t in (torch.permute, torch.transpose):
            nd = len(self.shape(x))
            dims = [d for d in args[1:]] if method == "permute" else None
            if t is torch.permute or (method == "permute" and len(dims) == 1 and isinstance(dims[0], (tuple, list))):
                dims = list(args[1] if t is torch.permute else dims[0])
            if dims is None:  # transpose(d0, d1)
                d0, d1 = (int(args[1]) % nd, int(args[2]) % nd)
                dims = list(range(nd))
                dims[d0], dims[d1] = dims[d1], dims[d0]
            dims = [int(d) % nd for d in dims]
            return {i: xin[d] for i, d in enumerate(dims) if d in xin}
        if t is operator.getitem:
            return self.getitem(node, xin, self.shape(x))
        raise self.fail(node, "receives permuted activations and is not known to be permutation-equivariant")

    def broadcast(self, node: fx.Node, shape_out: tuple[int, ...]) -> dict[int, _Ax]:
        nd = len(shape_out)
        operands = [a for a in _tensor_args((node.args, node.kwargs)) if self.shape(a) is not None]
        per_axis: dict[int, list[_Ax]] = {}
        for a in operands:
            off = nd - len(self.shape(a))
            for axis, ax in self.ann(a).items():
                per_axis.setdefault(axis + off, []).append(ax)
        out = {}
        for j, axes in per_axis.items():
            ax = self.merge(axes, f"{_op_name(node)} in {_where(node)} combines different layouts")
            out[j] = ax
            for a in operands:
                shp = self.shape(a)
                off = nd - len(shp)
                k = j - off
                if k < 0 or shp[k] == 1 or k in self.ann(a):
                    continue
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    self.register(str(a.target), k, ax)
                else:
                    self.freeze(ax.gid, f"{_op_name(node)} in {_where(node)} combines it with a tensor that is not "
                                        "permuted")
        return out

    def layer_norm(self, node: fx.Node, xin, shape_in) -> dict[int, _Ax]:
        names = ("input", "normalized_shape", "weight", "bias")
        args = {**dict(zip(names, node.args)), **node.kwargs}
        first = len(shape_in) - len(args["normalized_shape"])
        for a, ax in xin.items():
            if a < first:
                continue
            for p in ("weight", "bias"):
                t = args.get(p)
                if isinstance(t, fx.Node) and t.op == "get_attr":
                    self.register(str(t.target), a - first, ax)
                elif t is not None:
                    raise self.fail(node, f"takes a {p} that is not a parameter of the model")
        return dict(xin)

    def reduce(self, node: fx.Node, xin, shape_in) -> dict[int, _Ax]:
        nd = len(shape_in)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        dims = set(range(nd)) if dim is None else {int(d) % nd for d in (dim if isinstance(dim, (tuple, list))
                                                                         else (dim,))}
        out = {}
        for a, ax in xin.items():
            if a in dims:
                continue  # a sum over the permuted axis does not depend on the order of its units
            out[a if keep else a - sum(1 for d in dims if d < a)] = ax
        return out

    def getitem(self, node: fx.Node, xin, shape_in) -> dict[int, _Ax]:
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            e = idx.index(Ellipsis)
            used = sum(1 for i in idx if i is not None and i is not Ellipsis)
            idx = idx[:e] + (slice(None),) * (len(shape_in) - used) + idx[e + 1:]
        out, a_in, a_out = {}, 0, 0
        for i in idx:
            if i is None:
                a_out += 1
                continue
            if isinstance(i, slice):
                if a_in in xin:
                    if i != slice(None):
                        raise self.fail(node, f"slices the permuted axis {a_in}")
                    out[a_out] = xin[a_in]
                a_in, a_out = a_in + 1, a_out + 1
            elif isinstance(i, int):
                if a_in in xin:
                    raise self.fail(node, f"indexes the permuted axis {a_in}")
                a_in += 1
            else:
                raise self.fail(node, "indexes a permuted tensor with a tensor")
        for a in range(a_in, len(shape_in)):
            if a in xin:
                out[a_out + a - a_in] = xin[a]
        return out


def _place(ax: _Ax, a: int, shape_in, shape_out, taken) -> tuple[int, _Ax] | None:
    """Where the permuted axis ``a`` of ``shape_in`` lies after a reshape to ``shape_out``, or None if it straddles."""
    outer_flat = math.prod(shape_in[:a]) * ax.outer
    inner_flat = ax.inner * math.prod(shape_in[a + 1:])
    for j, size in enumerate(shape_out):
        stride = math.prod(shape_out[j + 1:])
        if inner_flat % stride == 0 and size % (ax.n * (inner_flat // stride)) == 0:
            inner_j = inner_flat // stride
            outer_j = size // (ax.n * inner_j)
            if math.prod(shape_out[:j]) * outer_j == outer_flat and j not in taken:
                return j, _Ax(ax.gid, outer_j, ax.n, inner_j)
    return None


def _by_name(target: Any) -> str | None:
    return getattr(target, "__name__", None) if callable(target) else None


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_args(args: Any) -> list:
    out: list = []

    def visit(a):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # name the innermost module that fx cannot trace
        culprit = type(model).__name__
        for name, sub in model.named_modules():
            if not name or isinstance(sub, (nn.ModuleList, nn.ModuleDict)):
                continue
            try:
                fx.symbolic_trace(sub)
            except Exception:
                culprit = f"{name!r} ({type(sub).__name__})"
        raise AlignError(f"align: torch.fx cannot trace {type(model).__name__}; the innermost module it fails on is "
                         f"{culprit}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Permutation "
                         "alignment derives the permutation structure from the traced graph; make the module "
                         "traceable (no data-dependent Python control flow) or align a model without it") from None


def _guess_inputs(model: nn.Module, gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """Input shapes to try for the shape propagation when no example input is given."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.Linear):
            return [(2, m.in_features)]
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = len(m.kernel_size)
            return [(2, m.in_channels) + (s,) * nd for s in (32, 28, 224, 8, 64, 16)]
        if m is not None and any(True for _ in m.parameters()):
            return []
    return []


def _example(model: nn.Module, gm: fx.GraphModule, example_input: Any, data: Any) -> tuple:
    """The example input as a tuple of positional arguments, and the graph shapes propagated with it."""
    from torch.fx.passes.shape_prop import ShapeProp

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    candidates: list[tuple] = []
    if example_input is not None:
        if isinstance(example_input, (tuple, list)) and all(isinstance(s, int) for s in example_input):
            candidates = [(torch.randn(tuple(example_input), dtype=dtype, device=device),)]
        elif torch.is_tensor(example_input):
            candidates = [(example_input,)]
        elif isinstance(example_input, tuple):
            candidates = [example_input]
        else:
            raise AlignError(f"align: example_input must be a tensor, a tuple of tensors or a shape, got "
                             f"{type(example_input).__name__}")
    elif data is not None:
        x = _first_inputs(data)
        candidates = [(x[:2] if torch.is_tensor(x) else x,)]
    else:
        gen = torch.Generator().manual_seed(0)
        candidates = [(torch.randn(s, generator=gen, dtype=dtype).to(device),) for s in _guess_inputs(model, gm)]
    errors = []
    was = model.training
    model.eval()
    try:
        for args in candidates:
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(*args)
                return args
            except Exception as e:  # noqa: PERF203 - the next guess
                errors.append(f"{tuple(args[0].shape) if torch.is_tensor(args[0]) else '?'}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}")
    finally:
        model.train(was)
    tried = "; ".join(errors[:3]) if errors else "no input shape could be guessed"
    raise AlignError(f"align: cannot run {type(model).__name__} on an example input to find its tensor shapes "
                     f"({tried}); pass example_input= (a batch, or its shape, e.g. (2, 3, 32, 32)) or data=")


def _first_inputs(data: Any) -> Any:
    from lerpfast.evaluate import as_batches

    for batch in as_batches(data, 256):
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    raise AlignError("align: data has no batches")


@dataclass
class PermStructure:
    """A model's permutation structure (:func:`permutation_groups`): its groups, and how each touches the tensors."""

    groups: list[PermGroup]  # permutable groups first, then frozen ones
    layouts: dict[str, list[tuple[int, int, int, int]]]  # key -> [(axis, group index, outer, inner)]
    points: dict[int, list[tuple[str, int, int, int]]]  # group index -> [(node name, axis, outer, inner)]
    labels: dict[int, np.ndarray]  # group index -> unit labels a permutation must preserve
    gm: fx.GraphModule
    example: tuple


def permutation_groups(model: nn.Module, example_input: Any = None, data: Any = None) -> PermStructure:
    """Derive the model's permutation groups (see :func:`align`) without matching anything.

    Returns
    -------
    PermStructure
        ``groups``: every :class:`PermGroup` (permutable ones first); ``layouts``: state-dict key -> the permuted axes
        ``(axis, group index, outer, inner)``; ``points``: group index -> the activations activation matching reads.
    """
    gm = _trace(model)
    example = _example(model, gm, example_input, data)
    keys = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    an = _Analysis(gm, keys)
    an.run()
    roots: dict[int, int] = {}
    groups: list[PermGroup] = []
    order = sorted({an.find(ax.gid) for ax in an.terms.values()},
                   key=lambda r: (r in an.frozen or an.size[r] < 2, r))
    for r in order:
        roots[r] = len(groups)
        frozen = an.frozen.get(r)
        if frozen is None and an.size[r] < 2:
            frozen = "a single unit"
        groups.append(PermGroup(an.names[r], an.size[r], frozen=frozen))
    for g in range(len(an.parent)):
        r = an.find(g)
        if r in roots and an.names[g] not in groups[roots[r]].sources:
            groups[roots[r]].sources.append(an.names[g])
    layouts: dict[str, list] = {}
    for (key, axis), ax in an.terms.items():
        gi = roots[an.find(ax.gid)]
        groups[gi].tensors.append((key, axis))
        if groups[gi].frozen is None:
            layouts.setdefault(key, []).append((axis, gi, ax.outer, ax.inner))
    points: dict[int, list] = {}
    for (name, axis), ax in an.points.items():
        gi = roots.get(an.find(ax.gid))
        if gi is not None and groups[gi].frozen is None:
            points.setdefault(gi, []).append((name, axis, ax.outer, ax.inner))
    labels = {}
    for r, lab in an.labels.items():
        r = an.find(r)
        if r in roots and groups[roots[r]].frozen is None:
            combined = np.unique(np.stack(lab, axis=1), axis=0, return_inverse=True)[1].reshape(-1)
            labels[roots[r]] = combined
            groups[roots[r]].blocks = int(combined.max()) + 1
    return PermStructure(groups, layouts, points, labels, gm, example)


# ----------------------------------------------------------------------------------------------------------------
# Permuting and matching


def _permute_axis(t: torch.Tensor, axis: int, outer: int, inner: int, perm: torch.Tensor) -> torch.Tensor:
    n = perm.numel()
    return t.unflatten(axis, (outer, n, inner)).index_select(axis + 1, perm.to(t.device)).flatten(axis, axis + 2)


def _apply(state: Mapping[str, torch.Tensor], layouts, perms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every permuted axis permuted; other entries as they are (not copied)."""
    out = {}
    for key, t in state.items():
        for axis, gi, outer, inner in layouts.get(key, ()):
            t = _permute_axis(t, axis, outer, inner, perms[gi])
        out[key] = t
    return out


def _units(t: torch.Tensor, axis: int, outer: int, n: int, inner: int) -> torch.Tensor:
    """(n, rest): the tensor's entries grouped by unit of the permuted axis."""
    return t.unflatten(axis, (outer, n, inner)).movedim(axis + 1, 0).reshape(n, -1)


def _assign(cost: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """The permutation maximizing ``sum_i cost[i, perm[i]]`` (within each label class where labels are given)."""
    from scipy.optimize import linear_sum_assignment

    n = cost.shape[0]
    if labels is None:
        _, cols = linear_sum_assignment(cost, maximize=True)
        return cols
    perm = np.arange(n)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        _, cols = linear_sum_assignment(cost[np.ix_(idx, idx)], maximize=True)
        perm[idx] = idx[cols]
    return perm


def _weight_matching(st: PermStructure, a: dict, b: dict, seed: int, max_iter: int):
    groups = [i for i, g in enumerate(st.groups) if g.frozen is None]
    perms = [torch.arange(g.size) for g in st.groups]
    terms: dict[int, list] = {i: [] for i in groups}
    for key, lay in st.layouts.items():
        for axis, gi, outer, inner in lay:
            terms[gi].append((key, axis, outer, inner))
    rng = np.random.default_rng(seed)
    history: list[float] = []
    # b with every group's current permutation applied; a step reorders its cost matrix's columns instead of
    # permuting b's other axes again (ResNet-50: 4.0 s -> 2.6 s per pass, most of it the index_selects)
    bp = dict(b)
    # a group whose cost matrix cannot have changed (no group sharing a tensor with it moved since its last step)
    # would get the same assignment again: skipped (ResNet-50's later passes move a few groups)
    neighbors: dict[int, list[int]] = {}
    for gi in groups:
        near: list[int] = []
        for key, axis, _, _ in terms[gi]:
            near += [g2 for ax2, g2, _, _ in st.layouts[key] if ax2 != axis]
        neighbors[gi] = sorted(set(near))
    version = dict.fromkeys(groups, 0)
    seen: dict[int, tuple] = {}
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(groups) if groups else []:
            gi = int(gi)
            state = tuple(version[g2] for g2 in neighbors[gi])
            if seen.get(gi) == state:
                continue
            seen[gi] = state
            n = st.groups[gi].size
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axis, outer, inner in terms[gi]:
                cost += _units(a[key], axis, outer, n, inner) @ _units(bp[key], axis, outer, n, inner).T
            inv = torch.empty_like(perms[gi])
            inv[perms[gi]] = torch.arange(n)
            c = cost[:, inv].numpy()  # (n, n): a's unit i against b's unit j
            old = float(c[np.arange(n), perms[gi].numpy()].sum())
            new_perm = _assign(c, st.labels.get(gi))
            new = float(c[np.arange(n), new_perm].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                rel = inv[torch.from_numpy(new_perm).long()]  # bp's units in the new order
                for key, axis, outer, inner in terms[gi]:
                    bp[key] = _permute_axis(bp[key], axis, outer, inner, rel)
                perms[gi] = torch.from_numpy(new_perm).long()
                version[gi] += 1
                improved = True
        history.append(_objective(a, bp))
        if not improved:
            break
    return perms, len(history), history


def _objective(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``sum_k <a_k, b_k>`` over the floating tensors: what weight matching maximizes."""
    return float(sum(float((a[k] * b[k]).sum()) for k in a if a[k].is_floating_point()))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.seen[n.name] = out
        return out


def _activation_matching(st: PermStructure, a: dict, b: dict, data: Any, max_batches: int | None):
    from lerpfast.evaluate import as_batches

    wanted = {name for pts in st.points.values() for name, *_ in pts}
    stats: dict[tuple[str, int], list] = {}
    nets = []
    for state in (a, b):
        net = copy.deepcopy(st.gm)
        net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False)
        nets.append(net.eval())
    batches = 0
    device = next((t.device for t in st.gm.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for batch in as_batches(data, 256):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = tuple(t.to(device) if torch.is_tensor(t) else t for t in (x if isinstance(x, tuple) else (x,)))
            seen = []
            for net in nets:
                rec = _Recorder(net, wanted)
                rec.run(*x)
                seen.append(rec.seen)
            for gi, pts in st.points.items():
                n = st.groups[gi].size
                for name, axis, outer, inner in pts:
                    xa = seen[0][name].unflatten(axis, (outer, n, inner)).movedim(axis + 1, -1).reshape(-1, n).double()
                    xb = seen[1][name].unflatten(axis, (outer, n, inner)).movedim(axis + 1, -1).reshape(-1, n).double()
                    s = stats.setdefault((name, axis), [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                    s[0] += xa.shape[0]
                    s[1] = s[1] + xa.sum(0)
                    s[2] = s[2] + xb.sum(0)
                    s[3] = s[3] + (xa * xa).sum(0)
                    s[4] = s[4] + (xb * xb).sum(0)
                    s[5] = s[5] + xa.T @ xb
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    if batches == 0:
        raise AlignError("align: method='activations' got data without batches")
    perms = [torch.arange(g.size) for g in st.groups]
    total, start = 0.0, 0.0
    for gi, pts in st.points.items():
        n = st.groups[gi].size
        corr = torch.zeros(n, n, dtype=torch.float64)
        for name, axis, *_ in pts:
            cnt, sa, sb, saa, sbb, sab = (t.cpu() if torch.is_tensor(t) else t for t in stats[(name, axis)])
            ma, mb = sa / cnt, sb / cnt
            cov = sab / cnt - ma[:, None] * mb[None, :]
            sd_a = (saa / cnt - ma * ma).clamp_min(0).sqrt()
            sd_b = (sbb / cnt - mb * mb).clamp_min(0).sqrt()
            corr += cov / (sd_a[:, None] * sd_b[None, :] + 1e-12)
        c = corr.numpy()
        perm = _assign(c, st.labels.get(gi))
        perms[gi] = torch.from_numpy(perm).long()
        total += float(c[np.arange(n), perm].sum())
        start += float(np.trace(c))
    return perms, total, start


# ----------------------------------------------------------------------------------------------------------------
# The result and the entry point


@dataclass
class Alignment:
    """The result of :func:`align`.

    Attributes
    ----------
    state_dict : theta_b with its hidden units permuted (same keys, dtypes and devices as the loaded theta_b).
    perms : group name -> LongTensor (n,): unit ``i`` of the aligned network is unit ``perms[name][i]`` of theta_b.
    groups : group name -> :class:`PermGroup` (every group found, permuted or frozen).
    frozen : group name -> why it is held at the identity (e.g. the logits: "reaches the model's output").
    method : "weights" or "activations".
    iterations : passes over all groups (weight matching; 1 for activation matching).
    objective, objective_start : weight matching: ``sum <theta_a, P theta_b>`` after and before (identity);
        activation matching: the summed correlation of matched units after and before.
    history : the weight-matching objective after each pass.
    seconds : time taken.
    max_deviation : the largest output difference between theta_b and the aligned state dict on the example input,
        relative to the largest output (``check=True``; None without the check).
    """

    state_dict: dict[str, torch.Tensor]
    perms: dict[str, torch.Tensor]
    groups: dict[str, PermGroup]
    frozen: dict[str, str]
    method: str
    iterations: int
    objective: float
    objective_start: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    max_deviation: float | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers: groups permuted / frozen, iterations, objectives, seconds (e.g. for a slice's info)."""
        return {"method": self.method, "groups": len(self.perms), "frozen": dict(self.frozen),
                "units": int(sum(p.numel() for p in self.perms.values())), "iterations": self.iterations,
                "objective": self.objective, "objective_start": self.objective_start,
                "seconds": round(self.seconds, 4), "max_deviation": self.max_deviation,
                "moved": int(sum(int((p != torch.arange(p.numel())).sum()) for p in self.perms.values()))}


def _check(model: nn.Module, example: tuple, before: dict, after: dict) -> float:
    def run(state):
        params = {k: v.to(next(iter(example)).device) if torch.is_tensor(v) else v for k, v in state.items()}
        with torch.no_grad():
            return torch.func.functional_call(model, params, example)

    was = model.training
    model.eval()
    try:
        ya, yb = run(before), run(after)
    finally:
        model.train(was)
    la = [t for t in torch.utils._pytree.tree_leaves(ya) if torch.is_tensor(t) and t.is_floating_point()]
    lb = [t for t in torch.utils._pytree.tree_leaves(yb) if torch.is_tensor(t) and t.is_floating_point()]
    worst = 0.0
    for u, v in zip(la, lb):
        scale = float(u.abs().max()) if u.numel() else 1.0
        worst = max(worst, float((u - v).abs().max()) / max(scale, 1e-30) if u.numel() else 0.0)
    return worst


def align(model: nn.Module, theta_a: Any, theta_b: Any, method: str = "weights", data: Any = None, *,
          seed: int = 0, max_iter: int = 100, example_input: Any = None, max_batches: int | None = None,
          check: bool = True) -> Alignment:
    """Permute theta_b's hidden units to match theta_a's; the result computes exactly theta_b's function.

    Parameters
    ----------
    model : nn.Module
        The architecture (its own weights are not read or changed). Its permutation structure is derived with
        torch.fx (see :mod:`lerpfast.align`); a module that cannot be permuted safely raises, naming it.
    theta_a, theta_b : checkpoint
        Modules, state dicts or paths (as :func:`lerpfast.sweep` takes them). theta_a is the reference; theta_b is
        permuted.
    method : {"weights", "activations"}
        ``"weights"``: Git Re-Basin's weight matching (Ainsworth et al. 2023, algorithm 1): coordinate descent over
        the permutation groups in a random order (``seed``), each step an exact linear assignment
        (``scipy.optimize.linear_sum_assignment``) of the summed products ``<a, P b>`` of every tensor the group
        permutes (both sides of every layer, biases, norm scales and running statistics), until a pass over all
        groups improves none (at most ``max_iter`` passes). ``"activations"``: each group's units matched by the
        correlation of the two networks' activations over ``data`` where they enter the next layer (one linear
        assignment per group).
    data : optional
        Batches ``(x, y)`` as :func:`lerpfast.sweep` takes them (an ``(X, y)`` pair, a loader): required for
        ``"activations"`` (the first ``max_batches`` batches are used, all by default); otherwise its first batch
        serves as the example input.
    seed : int
        Order of the groups in weight matching.
    max_iter : int
        Most passes of weight matching.
    example_input : Tensor, tuple of tensors or shape, optional
        An input the model can run on (shapes of the traced graph; the final check). Default: ``data``'s first
        batch, else a guess from the first layer (Linear: ``(2, in_features)``; Conv2d: 32, 28, 224 ... pixels).
    check : bool
        Run theta_b and the aligned state dict on the example input (eval mode) and raise if their outputs differ
        by more than 1e-4 of the largest output (float32 reordering gives about 1e-7).

    Returns
    -------
    Alignment
        ``.state_dict`` (theta_b permuted), ``.perms``, ``.groups``, ``.frozen``, ``.iterations``, ``.objective``.

    Notes
    -----
    BatchNorm running statistics are permuted with their units, so the aligned state dict is exactly theta_b's
    function. The interpolated statistics in between are not those of the interpolated network (Jordan et al.,
    "REPAIR", ICLR 2023): evaluate the aligned line with ``lerpfast.sweep(..., bn="recompute", bn_data=train)`` to
    reset them at every point.

    Raises
    ------
    AlignError
        torch.fx cannot trace the model, a module or op in the hidden path cannot be permuted (named), no example
        input can be found, or the aligned network's outputs differ from theta_b's.
    lerpfast.CheckpointError
        theta_a or theta_b does not fit the model.
    """
    from lerpfast.checkpoints import load_checkpoints

    if method not in METHODS:
        raise AlignError(f"align: method={method!r}: expected one of {METHODS}")
    if method == "activations" and data is None:
        raise AlignError("align: method='activations' needs data= (batches of inputs, e.g. the training set)")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise AlignError(f"align: max_iter={max_iter!r}: expected a positive integer")
    t0 = time.perf_counter()
    a, b = load_checkpoints([theta_a, theta_b], model, ["theta_a", "theta_b"], copy=False)
    st = permutation_groups(model, example_input, data)
    floats = {k for k in a if a[k].is_floating_point()}
    a64 = {k: a[k].detach().double().cpu() for k in st.layouts}
    b64 = {k: b[k].detach().double().cpu() for k in st.layouts}
    start = _objective(a64, b64)
    if method == "weights":
        perms, iterations, history = _weight_matching(st, a64, b64, seed, max_iter)
        objective = history[-1] if history else start
    else:
        perms, objective, start = _activation_matching(st, a, b, data, max_batches)
        iterations, history = 1, []
    aligned = _apply({k: v for k, v in b.items()}, st.layouts, perms)
    aligned = {k: (v.clone() if k not in floats or k not in st.layouts else v.contiguous()) for k, v in aligned.items()}
    deviation = None
    if check:
        deviation = _check(model, st.example, b, aligned)
        if not deviation <= 1e-4:
            raise AlignError(f"align: the permuted theta_b computes a different function (largest output difference "
                             f"{deviation:.3g} of the largest output) on the example input: the permutation structure "
                             f"derived for {type(model).__name__} is wrong; please report it with the model")
    names, seen = [], set()
    for g in st.groups:  # unique names (a module called twice could start two groups)
        name, i = g.name, 1
        while name in seen:
            i += 1
            name = f"{g.name}#{i}"
        seen.add(name)
        names.append(name)
    return Alignment(
        state_dict=aligned,
        perms={names[i]: perms[i] for i, g in enumerate(st.groups) if g.frozen is None},
        groups={names[i]: g for i, g in enumerate(st.groups)},
        frozen={names[i]: g.frozen for i, g in enumerate(st.groups) if g.frozen is not None},
        method=method, iterations=iterations, objective=objective, objective_start=start, history=history,
        seconds=time.perf_counter() - t0, max_deviation=deviation)


# ``lerpfast.align`` is the function; importing this module as ``lerpfast.align`` (``from lerpfast.align import
# Alignment``) would otherwise make the package attribute the module. The module is callable for that case.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Alignment:
        return align(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
