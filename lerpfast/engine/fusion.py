"""Epilogue fusion: Conv / Linear -> eval BN -> (+ residual) -> ReLU chains as one multi-point op.

The multi-point model (:class:`lerpfast.engine.model.MultiPointModel`) is traced with ``torch.fx``, its
multi-point layers (and the torch.nn modules fx treats as leaves) kept as opaque calls. A chain

    layer (MPConv / MPLinear) -> [MPBatchNorm | MPBatchNormAct] -> [add(other) | iadd(other)] -> [ReLU]

(at least one of the three after the layer; ReLU as ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``relu_``,
``Tensor.relu(_)``, in place or not; the add as ``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``) whose
intermediate values have no other user is replaced by one :class:`FusedChain` call, which runs
``dispatch.lerp_conv_fused / lerp_linear_fused(..., bn=bn_fold(...), residual=..., relu=...)``: on a GPU one
Triton kernel instead of the conv and the separate BN / add / ReLU passes. timm's ``BatchNormAct2d`` (batch norm,
then its ``drop`` and ``act``) folds like a batch norm: with no activation the chain goes on, a ReLU joins the fused
op, and another activation (EfficientNet's SiLU) runs on the fused op's output and ends the chain.

BN is fused only while it is a per-point affine map (eval mode on running statistics that follow the slice:
BN policies ``interpolate`` and ``endpoint``); under ``recompute`` (batch statistics) the chain runs unfused,
and :func:`lerpfast.sweep` does not fuse at all. Any runtime condition the fused op does not cover (an input
without the batch axis, a broadcasting residual, a residual of another dtype, BN on a Linear's 3-d output)
makes the chain run its original ops, so the fused model computes the same function as the unfused one, to
rounding.

A module whose forward fx cannot trace (data-dependent control flow, e.g. transformers' models) is kept as it
is and its children are tried instead; :func:`fuse` reports what was fused and what could not be traced.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lerpfast.engine.dispatch import _autocast_dtype
from lerpfast.engine.layers import MPBatchNorm, MPBatchNormAct, MPConv, MPLinear, MultiPointLayer, PointContext

__all__ = ["FUSE_MODES", "FusedChain", "fuse", "resolve_fuse"]

FUSE_MODES = ("auto", True, False)

_ADD_FUNCS = {operator.add: "add", torch.add: "add", operator.iadd: "iadd"}
_ADD_METHODS = {"add": "add", "add_": "iadd"}
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


def resolve_fuse(fuse, device: torch.device) -> bool:
    """``fuse`` ("auto" | True | False) for a model on ``device``: "auto" fuses on CUDA (one Triton kernel per
    chain) and on the CPU (per-point convolutions with BN folded into the weights and the add / ReLU written
    into the result: ResNet-20 1.9x faster than unfused, benchmarks/results/sweep_cpu.json), not elsewhere."""
    if not (fuse is True or fuse is False or (isinstance(fuse, str) and fuse == "auto")):
        raise ValueError(f"fuse={fuse!r}: expected 'auto', True or False")
    if fuse == "auto":
        return torch.device(device).type in ("cuda", "cpu")
    return bool(fuse)


class FusedChain(nn.Module):
    """One fused chain: ``relu(bn(layer(x)) + residual)`` with the optional parts absent.

    Holds the original multi-point layer and BN as children (they keep their names in the model's path
    report) and runs them unfused whenever the fused op does not apply to a call.
    """

    def __init__(self, ctx: PointContext, name: str, layer: MPConv | MPLinear, bn: MPBatchNorm | None,
                 add: str | None, relu: bool):
        super().__init__()
        self.ctx, self.name = ctx, name
        self.layer, self.bn = layer, bn
        self.add, self.relu = add, relu  # add: None, "add" (out of place) or "iadd" (in place on the BN output)
        # timm's BatchNormAct: its ReLU joins the fused op, another activation runs on the fused op's output
        tail = bn.tail() if isinstance(bn, MPBatchNormAct) else "identity"
        self.bn_relu, self.post = tail == "relu", bn.post if tail == "other" else None
        self.enabled = True
        self.calls = {"fused": 0, "partial": 0, "unfused": 0}  # partial: fused up to BN, the add / ReLU after
        self.constant_calls = 0  # calls with every tensor of the chain the same at every point: plain ops

    def extra_repr(self) -> str:
        return f"name={self.name!r}, add={self.add}, relu={self.relu}"

    def forward(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        ctx = self.ctx
        if not (self.enabled and ctx.pts is not None and torch.is_tensor(x) and x.dim() >= 2
                and (x.shape[0] == ctx.K * ctx.batch or ctx.is_unrepeated(x)) and x.is_floating_point()):
            return self._unfused(x, residual)
        if self.layer.constants() is not None and (self.bn is None or self.bn.constant_path()):
            # the same tensors at every point (a frozen layer): the plain ops, once on the B rows when the input is
            # the same for every point, and no per-point weights or folds at all
            self.constant_calls += 1
            y = self.layer(x)
            return self._tail(y if self.bn is None else self.bn(y), residual)
        bn = None
        if self.bn is not None:
            if not self.bn.foldable() or (isinstance(self.layer, MPLinear) and x.dim() != 2):
                return self._unfused(x, residual)
            bn = self.bn.fold()
        if self.add is None or self._residual_ok(x, residual):
            self.calls["fused"] += 1
            y = self.layer.run(x, bn=bn, residual=residual if self.add else None, relu=self.relu or self.bn_relu)
            return y if self.post is None else self.post(y)
        # a residual the fused op cannot take (broadcasting, another dtype): fuse up to BN, then the rest as written
        self.calls["partial"] += 1
        return self._tail(self.layer.run(x, bn=bn), residual)

    def _residual_ok(self, x: torch.Tensor, r) -> bool:
        rows = self.ctx.rows(x)  # K*B, also for the unrepeated data batch (B rows standing for K*B)
        if not torch.is_tensor(r) or tuple(r.shape) != tuple(self.layer.out_shape((rows, *x.shape[1:]))):
            return False
        ac = _autocast_dtype(x.device)
        out_dtype = ac if (ac is not None and x.dtype in (torch.float32, ac)) else x.dtype
        return r.dtype == out_dtype

    def _tail(self, y: torch.Tensor, r) -> torch.Tensor:
        if self.add == "iadd":
            y = operator.iadd(y, r)
        elif self.add == "add":
            y = y + r
        return torch.relu(y) if self.relu else y

    def _unfused(self, x, residual):
        self.calls["unfused"] += 1
        y = self.layer(x)
        if self.bn is not None:
            y = self.bn(y)
        return self._tail(y, residual)


# ---------------------------------------------------------------------------------------------- tracing


class _Proxy(fx.Proxy):
    """fx's Proxy without ``__iadd__`` records ``a += b`` as ``a + b``: the GraphModule would then no longer
    mutate ``a`` (nor whatever aliases it). Record augmented assignments as the in-place operators they are."""


def _inplace(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
              "ilshift", "irshift"):
    setattr(_Proxy, f"__{_name}__", _inplace(getattr(operator, _name)))


class _Tracer(fx.Tracer):
    """Multi-point layers (and fallback modules) are leaves: their forward depends on the pass's points."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MultiPointLayer) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _chains(gm: fx.GraphModule) -> list[tuple]:
    """(layer node, bn node | None, add node | None, add kind, position of the other operand, relu node | None)
    for each fusable chain, in graph order; a node belongs to one chain at most."""
    mods = dict(gm.named_modules())

    def module(node):
        return mods.get(node.target) if node.op == "call_module" else None

    found, claimed = [], set()

    def _single_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 and users[0] not in claimed else None

    for node in gm.graph.nodes:
        layer = module(node)
        if type(layer) not in (MPConv, MPLinear) or len(node.args) != 1 or node.kwargs:
            continue
        last, bn_node, add_node, kind, other, relu_node = node, None, None, None, None, None
        nxt = _single_user(last)
        m = module(nxt) if nxt is not None else None
        if (type(m) in (MPBatchNorm, MPBatchNormAct) and nxt.args == (last,) and not nxt.kwargs
                and m.num_features == layer.out_channels):
            bn_node = last = nxt
            # timm's norm + activation: an activation after the affine map ends the chain (an add after it is not
            # the add-then-ReLU the fused op computes); an identity one lets it go on like a plain batch norm
            nxt = _single_user(last) if type(m) is MPBatchNorm or m.tail() == "identity" else None
        if nxt is not None:
            kind, other = _as_add(nxt, last)
            if kind is not None:
                add_node = last = nxt
                nxt = _single_user(last)
        if nxt is not None and _is_relu(nxt, last, mods):
            relu_node = last = nxt
        if last is not node:
            found.append((node, bn_node, add_node, kind, other, relu_node))
            claimed.update(n for n in (bn_node, add_node, relu_node) if n is not None)
    return found


def _as_add(node: fx.Node, prev: fx.Node) -> tuple[str | None, int | None]:
    """("add" | "iadd", position of the other operand in the args) when ``node`` adds a tensor node to ``prev``,
    else (None, None)."""
    if node.kwargs or len(node.args) != 2:
        return None, None
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        kind = _ADD_FUNCS[node.target]
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        kind = _ADD_METHODS[node.target]
    else:
        return None, None
    a, b = node.args
    if kind == "iadd" and a is not prev:
        return None, None  # `other += bn_out` mutates other: leave it alone
    pos = 1 if a is prev else 0
    other = node.args[pos]
    if (a is not prev and b is not prev) or not isinstance(other, fx.Node) or other is prev:
        return None, None
    return kind, pos


def _is_relu(node: fx.Node, prev: fx.Node, mods: dict) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(node.target), nn.ReLU) and node.args == (prev,) and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        extra = node.args[1:]
        return (bool(node.args) and node.args[0] is prev and all(isinstance(a, bool) for a in extra)
                and len(extra) <= 1 and set(node.kwargs) <= {"inplace"})
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return node.args == (prev,) and not node.kwargs
    return False


#: fx traces run (a cached engine runs none: engine.model's template cache; the tests count them)
TRACE_COUNT = {"traces": 0}


def trace(module: nn.Module) -> fx.GraphModule:
    """``module`` (a converted multi-point network or part of one) as a GraphModule whose multi-point layers are
    leaves; raises when fx cannot trace it.

    A copy that shares the multi-point layers (the slice tensors are not copied) is traced: a failed trace may
    leave proxies behind in the modules it ran through, and only the copy sees them.
    """
    TRACE_COUNT["traces"] += 1
    if "forward" in module.__dict__:  # fx traces type(module).forward: an instance's own forward would be lost
        raise TypeError(f"{type(module).__name__} has an instance-level forward; fx traces the class's")
    work = copy.deepcopy(module, {id(m): m for m in module.modules() if isinstance(m, MultiPointLayer)})
    graph = _Tracer().trace(work)
    return fx.GraphModule(work, graph, class_name=type(module).__name__)


def _fuse_traced(module: nn.Module, ctx: PointContext, report: dict) -> nn.Module | None:
    """The GraphModule of ``module`` with its chains fused, or None when it has none; raises if untraceable."""
    gm = trace(module)
    chains = _chains(gm)
    if not chains:
        report.setdefault("traced", {})[id(module)] = gm  # the trace, for engine.model's no-repeat plan
        return None
    mods = dict(gm.named_modules())
    fused = []
    for i, (node, bn_node, add_node, kind, pos, relu_node) in enumerate(chains):
        layer = mods[node.target]
        bn = mods[bn_node.target] if bn_node is not None else None
        desc = "+".join([layer.name] + ([bn.name] if bn is not None else []) + (["add"] if add_node else [])
                        + (["relu"] if relu_node else []))
        attr = f"fused_{i}"
        while hasattr(gm, attr):
            attr += "_"
        gm.add_submodule(attr, FusedChain(ctx, desc, layer, bn, kind, relu_node is not None))
        nodes = [n for n in (node, bn_node, add_node, relu_node) if n is not None]
        last = nodes[-1]
        with gm.graph.inserting_before(last):
            # args read now: an earlier rewrite may have replaced the input or the residual by its fused node
            new = gm.graph.call_module(attr, (node.args[0],) + ((add_node.args[pos],) if add_node is not None else ()))
        last.replace_all_uses_with(new)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
        fused.append(desc)
    gm.graph.lint()
    gm.recompile()
    report["fused"] += fused
    return gm


def _has_layers(module: nn.Module) -> bool:
    return any(type(m) in (MPConv, MPLinear) for m in module.modules())


def _fuse(module: nn.Module, ctx: PointContext, prefix: str, report: dict) -> nn.Module:
    if isinstance(module, MultiPointLayer) or not _has_layers(module):
        return module
    if type(module).forward is not nn.Module.forward:  # not a container without forward (ModuleList, ModuleDict)
        try:
            fused = _fuse_traced(module, ctx, report)
            return module if fused is None else fused
        except Exception as exc:  # fx cannot trace this module: keep it, try its children
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            report["untraced"][prefix or "<root>"] = f"{type(exc).__name__}: {msg}"
    for cname, child in list(module._modules.items()):
        if child is not None:
            module._modules[cname] = _fuse(child, ctx, f"{prefix}.{cname}" if prefix else cname, report)
    return module


def fuse(net: nn.Module, ctx: PointContext) -> tuple[nn.Module, dict]:
    """Fuse the chains of ``net`` (a converted multi-point network).

    Returns
    -------
    (the network to run — ``net`` itself, parts of it replaced, or a ``torch.fx.GraphModule``; a report dict
    ``{"fused": [chain descriptions such as "blocks.0.conv2+blocks.0.bn2+add+relu"], "untraced": {module: why}}``)
    """
    report: dict = {"fused": [], "untraced": {}}
    return _fuse(net, ctx, "", report), report
