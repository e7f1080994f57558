"""Parts of the network that are the same at every point, computed once per batch on its B rows.

A linear probe (every backbone tensor equal at both ends), a frozen encoder under a fine-tuned head, WiSE-FT's
zero-shot head: a subtree of the model whose tensors are all constant along the slice (``ParamSlice.constant``)
computes the same function at every point. When, in addition, its inputs are the same at every point (the data
batch repeated K times, or the output of another such subtree), its K row blocks of output are K copies of one:
:class:`SharedModule` runs the user's own module once on the B rows and repeats the result, instead of running
it on all K*B rows. For a linear probe this removes (K-1)/K of the backbone's work.

Which output tensors carry the batch axis (and must be repeated) is read off the module itself, once per input
signature: it runs on meta tensors (shapes only, no compute) with the B-row inputs and with the K*B-row ones,
and an output whose first axis grows from B to K*B is a batch output. A module that meta tensors cannot run
(data-dependent control flow) is checked with one real run on all rows instead; one whose outputs do not split
this way (or are not tensors in plain containers) runs on all K*B rows, as the plain module, every time.

:func:`plan_regions` carries the idea through the top-level graph (torch.fx): the longest run of nodes whose
inputs are the data and whose modules are constant (a ResNet's stem and stages under a new ``fc``, with the
ReLUs, pooling and flattens between them) becomes one :class:`SharedModule`, so tensor-free ops between constant
modules do not break the chain. ``MultiPointModel.shared_report()`` says where the shared part ends.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from lerpfast.engine.layers import MPBatchNorm, MultiPointLayer

__all__ = ["SharedModule", "SharedRegion", "plan_regions"]

_PLAIN_LEAVES = (int, float, bool, str, type(None))


def _meta(t):
    return torch.empty_like(t, device="meta") if torch.is_tensor(t) else t


def _signature(leaves) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device.type) if torch.is_tensor(t)
                 else (t if isinstance(t, _PLAIN_LEAVES) else type(t).__name__) for t in leaves)


class SharedModule(MultiPointLayer):
    """A subtree whose tensors are constant along the slice: the plain module on the B rows when its inputs are
    the same at every point (see the module docstring), else the plain module on all rows.

    ``inner`` is the user's module (its tensors replaced by the slice's at each call: ``functional_call``);
    ``alt`` is the same subtree converted to multi-point layers, which runs when a later slice bound to a cached
    engine makes one of its tensors vary, or while ``bn="recompute"`` recalibrates its batch norms (and after).
    """

    path = "shared"
    whole = True  # every tensor below it is its own (MultiPointModel.bind hands it all of them)
    # code outside reads its children or settings (transformers: self.embeddings.patch_embeddings): the converted
    # subtree has the same structure
    reads_through = "alt"

    def __init__(self, ctx, name, tensors, inner: nn.Module, alt: nn.Module, what: str | None = None):
        super().__init__(ctx, name, tensors, inner)
        self.inner, self.alt = inner, alt
        if what is not None:
            self.source_type = what
        self.verdicts: dict[tuple, tuple | None] = {}
        self.calls = {"shared": 0, "rows": 0, "converted": 0}

    # a parent that iterates or indexes it (``for block in self.blocks``) gets the converted children: correct at
    # every point, computed per point rather than shared
    def __iter__(self):
        return iter(self.alt)

    def __len__(self):
        return len(self.alt)

    def __getitem__(self, i):
        return self.alt[i]

    def _recalibrated(self) -> bool:
        return self.ctx.calibrate or any(isinstance(m, MPBatchNorm) and m.calibrated is not None
                                         for m in self.alt.modules())

    def _call(self, const, args, kwargs):
        """The plain module on the given rows (the slice's tensors swapped in; meta ones for a shapes-only run)."""
        if self.ctx.shared_meta:
            const = {k: _meta(v) for k, v in const.items()}
            const.update({k: _meta(v) for k, v in self.inner.named_buffers() if k not in const})
        return functional_call(self.inner, const, args, kwargs)

    def forward(self, *args, **kwargs):
        ctx = self.ctx
        const = self.constants()
        if const is None or self._recalibrated():
            self.calls["converted"] += 1
            return self.alt(*args, **kwargs)
        if ctx.rows_mode:  # inside a shared region (plan_regions): the rows given are the rows to compute
            return self._call(const, args, kwargs)
        K, B = ctx.K, ctx.batch
        leaves, spec = tree_flatten((args, kwargs))
        rows = [i for i, t in enumerate(leaves) if torch.is_tensor(t) and t.dim() >= 1
                and (t.shape[0] == K * B or ctx.is_unrepeated(t))]
        if K > 1 and rows and all(ctx.is_shared(leaves[i]) for i in rows):
            small = list(leaves)
            for i in rows:
                small[i] = leaves[i] if ctx.is_unrepeated(leaves[i]) else leaves[i][:B]
            flags = self._verdict(leaves, small, spec, const)
            if flags is not None:
                self.calls["shared"] += 1
                a, kw = tree_unflatten(small, spec)
                with _rows_mode(ctx):
                    out = self._call(const, a, kw)
                return self._repeat(out, flags)
        self.calls["rows"] += 1
        full = [t.repeat(K, *([1] * (t.dim() - 1))) if torch.is_tensor(t) and ctx.is_unrepeated(t) else t
                for t in leaves]
        a, kw = tree_unflatten(full, spec)
        with _rows_mode(ctx):
            return self._call(const, a, kw)

    def _repeat(self, out, flags):
        K, ctx = self.ctx.K, self.ctx
        leaves, spec = tree_flatten(out)
        res = []
        for t, batch in zip(leaves, flags):
            if batch:
                t = t.repeat(K, *([1] * (t.dim() - 1)))  # (K*B, ...) point-major, K equal blocks
                ctx.mark_shared(t)  # the layers after it see an input shared by the points
            res.append(t)
        return tree_unflatten(res, spec)

    def _verdict(self, leaves, small, spec, const) -> tuple | None:
        """Per output leaf: True (a batch output: repeat it), False (no batch axis: the same for all rows), or
        None for the whole call (cannot be shared). Decided once per input signature."""
        key = _signature(leaves)
        if key in self.verdicts:
            return self.verdicts[key]
        K, B = self.ctx.K, self.ctx.batch
        try:
            with _rows_mode(self.ctx, meta=True):
                big = self._call(const, *tree_unflatten([_meta(t) for t in leaves], spec))
                little = self._call(const, *tree_unflatten([_meta(t) for t in small], spec))
        except Exception:  # no meta kernel, data-dependent control flow: one real run on all rows decides
            with _rows_mode(self.ctx):
                big = self._call(const, *tree_unflatten(leaves, spec))
                little = self._call(const, *tree_unflatten(small, spec))
        flags = _split_flags(big, little, K, B)
        self.verdicts[key] = flags
        return flags


class SharedRegion(SharedModule):
    """A run of top-level graph nodes (:func:`plan_regions`): constant :class:`SharedModule` s and the tensor-free
    ops between them, computed once on the B rows when its inputs are the same at every point."""

    def __init__(self, ctx, name, region: fx.GraphModule, members: list[SharedModule]):
        super().__init__(ctx, name, {}, region, region, what=f"region of {len(members)} constant modules")
        self.members = members

    def constants(self):
        return {} if all(m.constants() is not None for m in self.members) else None

    def _recalibrated(self) -> bool:
        return any(m._recalibrated() for m in self.members)

    def _call(self, const, args, kwargs):
        return self.inner(*args, **kwargs)  # its members swap their own tensors in (rows mode)


def _split_flags(big, little, K: int, B: int) -> tuple | None:
    bl, bspec = tree_flatten(big)
    ll, lspec = tree_flatten(little)
    if bspec != lspec:
        return None
    flags = []
    for b, s in zip(bl, ll):
        if torch.is_tensor(b) != torch.is_tensor(s):
            return None
        if not torch.is_tensor(b):
            if not isinstance(b, _PLAIN_LEAVES) or b != s:  # an unknown container, or a value that depends on rows
                return None
            flags.append(False)
        elif b.shape == s.shape:
            flags.append(False)
        elif b.dim() >= 1 and b.shape[0] == K * B and s.shape[0] == B and b.shape[1:] == s.shape[1:]:
            flags.append(True)
        else:
            return None
    return tuple(flags)


@contextlib.contextmanager
def _rows_mode(ctx, meta: bool = False):
    """While set, shared modules (and the engine's layers inside a shared region) compute on the rows they get."""
    saved = (ctx.rows_mode, ctx.shared_meta)
    ctx.rows_mode, ctx.shared_meta = True, meta or ctx.shared_meta
    try:
        yield
    finally:
        ctx.rows_mode, ctx.shared_meta = saved


# ------------------------------------------------------------------------------------------- regions in a graph


def _called_module(node: fx.Node, mods: dict) -> nn.Module | None:
    return mods.get(node.target) if node.op == "call_module" else None


def plan_regions(gm: fx.GraphModule, make) -> list[str]:
    """Fold the longest run of top-level nodes that depend only on the inputs and on constant modules into one
    :class:`SharedRegion` (built by ``make(region_gm, members)``, members its shared modules); returns the folded
    nodes' names.

    A node joins when every node it reads has joined or is an input, and it is a call of a tensor-free function /
    method / module, or of a :class:`SharedModule`. The region's outputs are the values that nodes outside it
    read. ``gm`` is changed in place.
    """
    mods = dict(gm.named_modules())
    inside: list[fx.Node] = []
    member: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        reads = node.all_input_nodes
        if not all(r in member or r.op == "placeholder" for r in reads):
            continue
        if node.op == "get_attr":
            continue  # a tensor of the root: only the engine's own layers may hold the slice's tensors
        if node.op == "call_module":
            m = _called_module(node, mods)
            if not isinstance(m, SharedModule) and (isinstance(m, MultiPointLayer)
                                                   or any(True for _ in m.parameters())
                                                   or any(True for _ in m.buffers())):
                continue
        if not reads:
            continue  # a constant made from nothing (torch.arange(...)): leave it where it is
        inside.append(node)
        member.add(node)
    shared = [m for m in (_called_module(n, mods) for n in inside) if isinstance(m, SharedModule)]
    if not shared:
        return []  # nothing worth a region: the tensor-free ops alone cost little
    outputs = [n for n in inside if any(u not in member for u in n.users)]
    inputs = []
    for n in inside:
        for r in n.all_input_nodes:
            if r not in member and r not in inputs:
                inputs.append(r)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for r in inputs:
        env[r] = sub.placeholder(r.name)
    for n in inside:
        env[n] = sub.node_copy(n, lambda r: env[r])
    sub.output(tuple(env[n] for n in outputs))
    region = fx.GraphModule(gm, sub)
    new = make(region, shared)
    attr = "lerpfast_shared"
    while hasattr(gm, attr):
        attr += "_"
    gm.add_submodule(attr, new)
    first = next(n for n in gm.graph.nodes if n in member)
    with gm.graph.inserting_before(first):
        call = gm.graph.call_module(attr, tuple(inputs))
    for i, n in enumerate(outputs):
        with gm.graph.inserting_after(call):
            get = gm.graph.call_function(_getitem, (call, i))
        n.replace_all_uses_with(get, delete_user_cb=lambda u: u not in member)
    for n in reversed(inside):
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return [n.name for n in inside]


def _getitem(t, i):
    return t[i]
