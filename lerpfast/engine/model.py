"""The multi-point model: a rewritten copy of the user's model that evaluates K points per forward."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lerpfast.engine.dispatch import _autocast_dtype
from lerpfast.engine.fallback import FallbackModule
from lerpfast.engine.fallback import _rules as fallback_rules
from lerpfast.engine.functional import Points
from lerpfast.engine.fusion import FusedChain, resolve_fuse, trace
from lerpfast.engine.fusion import fuse as fuse_net
from lerpfast.engine.layers import (
    NATIVE_BY_NAME,
    NATIVE_LAYERS,
    MPBatchNorm,
    MPConv,
    MPLinear,
    MultiPointLayer,
    PointContext,
)
from lerpfast.engine.pointparams import NeedsFallback, PointParamsModule
from lerpfast.engine.shared import SharedModule, SharedRegion, plan_regions
from lerpfast.geometry import AffineSlice

__all__ = ["MultiPointModel", "GraphedForward", "precision_context", "logits_of", "engine_for", "release_engine",
           "clear_engine_cache", "structure_key"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp64")


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Math mode of a pass: fp32/fp64 exact (no TF32), tf32 matmuls, or bf16 autocast. Restores the flags."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def logits_of(out, output=None):
    """The logits tensor of a model output.

    ``output=None``: a tensor as is, else ``.logits`` (transformers), else ``["logits"]``, else the same rule on
    ``out[0]``. ``output`` a callable: ``output(out)``; a string: ``out[output]`` (a mapping) or ``out.<output>``; an
    int: ``out[output]``. What it selects must be a tensor.
    """
    if output is not None:
        if callable(output):
            sel, how = output(out), f"output={getattr(output, '__qualname__', output)!r}"
        elif isinstance(output, str):
            sel = out[output] if isinstance(out, dict) and output in out else getattr(out, output, None)
            how = f"output={output!r}"
        elif isinstance(output, int) and isinstance(out, (tuple, list)) and -len(out) <= output < len(out):
            sel, how = out[output], f"output={output}"
        else:
            sel, how = None, f"output={output!r}"
        if not torch.is_tensor(sel):
            raise TypeError(f"{how} selects {type(sel).__name__} from a model output of type {type(out).__name__}"
                            f"{f' with {len(out)} items' if isinstance(out, (tuple, list)) else ''}; it must select "
                            "the logits tensor")
        return sel
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out:
        return logits_of(out[0])
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


# transformers' Conv1D flattens its input's leading axes before its addmm (which rows belong to which point is
# then unknowable: see engine.pointparams); torchvision's Swin attention passes its qkv / proj children's weights to
# a function
_OWN_FORWARD_UNSUPPORTED_NAMES = {"Conv1D"}  # (when its layout is not the one engine.layers.MPConv1DT takes)
# modules run whole with all their tensors per point, trusting every tensor with a multiple of K*B rows in their
# forward to be point-major (torchvision's Swin window attention: windows of a point's rows stay in its block)
_WHOLE_POINT_PARAMS = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2"}


def _own_forward_unsupported(module: nn.Module) -> bool:
    """Modules the per-point own-tensor path cannot take, sent to the per-module fallback at once (instead of a
    failed first call and a rebuild): those with registered batch axes (RNNs and MultiheadAttention: sequence-first
    inputs, and MultiheadAttention's forward reads its out_proj's weight directly) and the names above."""
    return fallback_rules(module) is not None or type(module).__name__ in _OWN_FORWARD_UNSUPPORTED_NAMES


def _native(typ: type):
    """The multi-point layer of ``typ``: its own, or a known base class's when ``typ`` keeps that class's forward
    (torch's ``NonDynamicallyQuantizableLinear``, a user's Linear subclass that only adds attributes)."""
    if typ in NATIVE_LAYERS:
        return NATIVE_LAYERS[typ]
    by_name = NATIVE_BY_NAME.get(typ.__name__)
    if by_name is not None and issubclass(typ, by_name[2]):
        return by_name[:2]
    for base in typ.__mro__[1:]:
        if base in NATIVE_LAYERS:
            return NATIVE_LAYERS[base] if typ.forward is base.forward else None
    return None


def _prefix(name: str) -> str:
    return name + "." if name else ""


class MultiPointModel(nn.Module):
    """A copy of ``model`` whose layers hold the slice and evaluate ``set_points``' K points per forward.

    The user's model is deep-copied once and never modified. Supported layer types become multi-point
    layers; any other module that directly owns interpolated tensors runs through :class:`FallbackModule`,
    as do the modules named in ``fallback``. ``paths`` maps module names to the path they run on.

    ``fuse`` ("auto": when the slice lives on a CUDA device or the CPU, True, False): trace the converted network with
    torch.fx and run conv / linear -> eval BN -> (+ residual) -> ReLU chains as one fused op
    (:mod:`lerpfast.engine.fusion`); :meth:`fusion_report` says what was fused.

    ``no_repeat`` (default True): an input that fx shows reaching only shared-input layers (the first Linear / Conv,
    through flatten / dropout / identity) is passed as the B-row data batch instead of its (K*B, ...) repeat
    (:func:`_plan_unrepeated`; ``unrepeated_inputs`` names them). False repeats every input, as before.
    """

    def __init__(self, model: nn.Module, slice_: AffineSlice, *, fallback: Iterable[str | type] = (),
                 fuse: bool | str = "auto", no_repeat: bool = True):
        super().__init__()
        self.ctx = PointContext()
        self.slice = slice_
        self._options = (set(fallback), fuse, no_repeat)
        self._source = weakref.ref(model)
        # module -> the type sent to the fallback because that module's own tensors could not run per point: every
        # module of the type goes (same forward, same failure; one rebuild instead of one per module)
        self.auto_fallback: dict[str, type] = {}
        self._build(model)

    def _build(self, model: nn.Module) -> None:
        force, fuse, no_repeat = self._options
        force = force | set(self.auto_fallback.values())
        slice_ = self.slice
        net = copy.deepcopy(model)
        self.paths: dict[str, str] = {}
        self._covered: set[str] = set()
        root = self._convert(net, "", force)
        if root is None:
            self._rewrite(net, "", force)
            root = net
        # Constant parts run once on the B rows (engine/shared.py): subtrees in _convert, runs of top-level nodes here
        self.shared_nodes: list[str] = []
        if self._share and any(isinstance(m, SharedModule) for m in root.modules()) \
                and not isinstance(root, MultiPointLayer):
            try:
                gm = trace(root)
            except Exception:  # untraceable: the constant subtrees still share, each on its own
                gm = None
            if gm is not None:
                self.shared_nodes = plan_regions(
                    gm, lambda region, members: SharedRegion(self.ctx, "<shared>", region, members))
                if self.shared_nodes:
                    self.paths["<shared>"] = f"shared:{len(self.shared_nodes)} top-level nodes"
                root = gm
                self._unshare_outside(gm)
        # Epilogue fusion (engine/fusion.py): conv / linear -> eval BN -> (+ residual) -> ReLU as one op.
        anchors = next(iter(slice_.params.values())).anchors if slice_.params else None
        device = anchors.device if anchors is not None else torch.device("cpu")
        self.fusion: dict = {"mode": fuse, "enabled": resolve_fuse(fuse, device), "fused": [], "untraced": {}}
        traced: dict = {}
        if self.fusion["enabled"]:
            root, rep = fuse_net(root, self.ctx)
            traced = rep.pop("traced", {})
            self.fusion.update(rep)
        # The no-repeat plan: inputs that reach only shared-input layers are passed as the B-row batch itself
        self.unrepeated_inputs: frozenset = frozenset()
        if no_repeat:
            root, self.unrepeated_inputs = _plan_unrepeated(root, self.ctx, traced.get(id(root)))
        self.net = root
        self.net.eval()
        dtype = next(iter(slice_.params.values())).anchors.dtype if slice_.params else torch.float32
        if dtype == torch.float64:
            self.net.to(torch.float64)  # leftover float buffers (non-persistent) follow the reference dtype
        missing = set(slice_.params) - self._covered
        if missing:
            raise RuntimeError(f"lerpfast: state-dict tensors not reached by any module: {sorted(missing)[:5]}")

    def _tensors(self, name: str, direct: bool) -> dict:
        p = _prefix(name)
        out = {}
        for key, ps in self.slice.params.items():
            if key.startswith(p):
                rel = key[len(p):]
                if not direct or "." not in rel:
                    out[rel] = ps
        return out

    def _unshare_outside(self, gm: fx.GraphModule) -> None:
        """Constant modules of the traced graph outside the shared region never see an input that is the same at
        every point (their input comes from per-point layers): they go back to their converted form, which the
        epilogue fusion can then join to the layer before them (a conv with a frozen BN after it)."""
        keep = {id(m) for r in gm.modules() if isinstance(r, SharedRegion) for m in r.members}
        leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for name in sorted(leaves):
            m = gm.get_submodule(name)
            if isinstance(m, SharedModule) and not isinstance(m, SharedRegion) and id(m) not in keep:
                parent, _, attr = name.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, m.alt)
                if self.paths.get(m.name, "").startswith("shared:"):
                    del self.paths[m.name]

    @property
    def _share(self) -> bool:
        return self.share_constant and os.environ.get("LERPFAST_SHARED", "1") != "0"

    def _convert(self, module: nn.Module, name: str, force: set, share: bool = True) -> nn.Module | None:
        typ = type(module)
        # containers (ModuleList, ModuleDict) have no forward of their own: their children share one by one
        if share and self._share and not (name in force or typ in force) and not isinstance(module, _MODULE_CONTAINERS):
            below = self._tensors(name, direct=False)
            if below and all(p.constant() for p in below.values()):
                # every tensor below is the same at every point: the user's module, run once on the B rows when
                # its input is the same at every point (engine/shared.py); the converted subtree for the rest
                inner = copy.deepcopy(module)
                alt = self._convert(module, name, force, share=False)
                if alt is None:
                    self._rewrite(module, name, force, share=False)
                    alt = module
                # a leaf keeps its converted path in the report (the shared ones are in shared_report())
                self.paths.setdefault(name, f"shared:{typ.__name__}")
                self._covered.update(_prefix(name) + k for k in below)
                return SharedModule(self.ctx, name, below, inner, alt)
        direct = self._tensors(name, direct=True)
        native = _native(typ)
        forced = name in force or typ in force
        if native is not None and not forced and (native[1] is None or native[1](module)):
            # a layer that computes with its children's tensors too (MultiheadAttention's out_proj) holds them all
            new = native[0](self.ctx, name, self._tensors(name, direct=not getattr(native[0], "whole", False)),
                            module)
            self.paths[name] = f"native:{typ.__name__}"
        elif not forced and self.point_params and typ.__name__ in _WHOLE_POINT_PARAMS:
            # its forward hands its children's weights to a function: all of them per point, children unconverted
            new = PointParamsModule(self.ctx, name, self._tensors(name, direct=False), module, whole=True)
            self.paths[name] = f"native:{typ.__name__} (its tensors per point)"
        elif direct and not forced and self.point_params and not _own_forward_unsupported(module):
            # its own tensors per point (PointTensors), its children converted like everything else
            new = PointParamsModule(self.ctx, name, direct, module)
            self.paths[name] = f"native:{typ.__name__} (own tensors per point: {', '.join(direct)})"
            self._covered.update(_prefix(name) + k for k in direct)
            self._rewrite(module, name, force, share)
            return new
        elif direct or forced:
            tensors = self._tensors(name, direct=False)
            if not tensors:
                return None
            new = FallbackModule(self.ctx, name, tensors, module)
            self.paths[name] = f"fallback:{typ.__name__}"
        else:
            return None
        self._covered.update(_prefix(name) + k for k in new.slices)
        return new

    def _rewrite(self, module: nn.Module, prefix: str, force: set, share: bool = True) -> None:
        for cname, child in list(module._modules.items()):
            if child is None:
                continue
            full = _prefix(prefix) + cname if prefix else cname
            new = self._convert(child, full, force, share)
            if new is not None:
                module._modules[cname] = new
            else:
                self._rewrite(child, full, force, share)

    point_params = True  # False: a module owning tensors directly runs whole on the fallback (as before issue 17)
    share_constant = True  # False (or LERPFAST_SHARED=0): constant subtrees run on all K*B rows like the rest

    def layers(self) -> list[MultiPointLayer]:
        return [m for m in self.net.modules() if isinstance(m, MultiPointLayer)]

    def report(self) -> dict[str, str]:
        """Module name -> path ("native:Linear", "fallback:LSTM (loop)", ...)."""
        out = {}
        for m in self.layers():
            path = self.paths[m.name]
            if isinstance(m, FallbackModule) and m.mode:
                path += f" ({m.mode})"
            out[m.name or "<root>"] = path
        return out

    def _fall_back(self, e: NeedsFallback) -> None:
        """Rebuild with ``e.module`` on the per-module fallback (its own tensors could not run as PointTensors)."""
        model = self._source()
        if model is None or e.module in self.auto_fallback:
            raise RuntimeError(f"lerpfast: {e}") from e
        typ = type(model.get_submodule(e.module))
        warnings.warn(f"lerpfast: modules of type {typ.__name__} (first {e.module or '<root>'!r}) run on the "
                      f"per-module fallback: {e.why}", stacklevel=3)
        self.auto_fallback[e.module] = typ
        device = next(iter(self.slice.params.values())).anchors.device
        self._build(model)  # the same PointContext: the points, the batch, the calibration flag carry over
        self.net.to(device)
        _drop_fallback_copies(self)

    def fusion_report(self) -> dict:
        """What epilogue fusion did: mode, enabled, the fused chains, modules fx could not trace, and how many
        chain calls ran fused / unfused (a chain runs unfused under BN recalibration or inputs it cannot take)."""
        chains = [m for m in self.net.modules() if isinstance(m, FusedChain)]
        calls = {k: sum(c.calls[k] for c in chains) for k in ("fused", "partial", "unfused")}
        return {**self.fusion, "chains": len(chains), "calls": calls,
                "constant_calls": sum(c.constant_calls for c in chains)}

    def shared_report(self) -> dict:
        """Where the part of the network that is the same at every point ends (engine/shared.py): the constant
        modules run once on the B rows, the top-level nodes folded into one shared region, and how many calls
        ran shared (once on B rows), on all rows (inputs that differ per point) or converted (per point)."""
        mods = [m for m in self.net.modules() if isinstance(m, SharedModule)]
        calls = {k: sum(m.calls[k] for m in mods) for k in ("shared", "rows", "converted")}
        region = next((m for m in mods if isinstance(m, SharedRegion)), None)
        return {"modules": sorted(m.name for m in mods if not isinstance(m, SharedRegion)),
                "region": list(self.shared_nodes), "ends_before": self._shared_end(region), "calls": calls}

    def _shared_end(self, region) -> list[str]:
        """The nodes of the top-level graph that read the shared region's outputs (where per-point work starts)."""
        if region is None or not isinstance(self.net, fx.GraphModule):
            return []
        for n in self.net.graph.nodes:
            if n.op == "call_module" and self.net.get_submodule(n.target) is region:
                return sorted({u2.name for u in n.users for u2 in u.users})
        return []

    def held_bytes(self) -> int:
        """Bytes of the slice tensors the model holds: independent of K."""
        return self.slice.nbytes()

    def set_points(self, pts: Points) -> None:
        self.ctx.pts = pts
        for m in self.layers():
            if isinstance(m, MPBatchNorm):
                m.reset_calibration()

    def bind(self, slice_: AffineSlice) -> None:
        """Hold ``slice_`` instead of the current slice (same tensor names, shapes and dtypes): what a cached
        engine does at the start of each sweep. Resets the per-sweep state (points, BN calibration and folds,
        chain counters, the largest materialized tensor)."""
        self.slice = slice_
        for m in self.layers():
            m.slices = self._tensors(m.name, direct=not (isinstance(m, FallbackModule) or getattr(m, "whole", False)))
            if isinstance(m, MPBatchNorm):
                m.reset_calibration()
        for c in self.net.modules():
            if isinstance(c, FusedChain):
                c.calls, c.constant_calls = dict.fromkeys(c.calls, 0), 0
        self.ctx.pts, self.ctx.shared, self.ctx.unrepeated = None, {}, []
        self.ctx.calibrate, self.ctx.max_materialized, self.ctx.stats = False, 0, {}

    def release(self) -> None:
        """Drop the references to the slice's tensors and the points (a cached engine outlives its sweep)."""
        empty = AffineSlice(self.slice.kind, {}, {}, self.slice.anchor_idx[:0], self.slice.coefs[:0],
                            self.slice.coords[:0], self.slice.coord_names)
        self.slice = empty
        for m in self.layers():
            m.slices = {}
            if isinstance(m, MPBatchNorm):
                m.reset_calibration()
        self.ctx.pts, self.ctx.shared, self.ctx.unrepeated = None, {}, []

    def forward(self, x, batch: int):
        """Evaluate the current K points on one data batch.

        Parameters
        ----------
        x : tensor (B, ...), or a tuple / dict of tensors with leading dim B (passed as *args / **kwargs).
        batch : B.

        Returns
        -------
        logits (K, B, ...)
        """
        K = self.ctx.K
        self.ctx.batch = batch
        self.ctx.shared = {}
        self.ctx.unrepeated = []
        self.repeated_inputs = 0  # inputs repeated K times in this pass (the no-repeat plan passes the others as is)
        plan = self.unrepeated_inputs

        def rep(t, where):
            if not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] != batch:
                return t
            if where in plan:
                return t  # reaches only shared-input layers (see _plan_unrepeated): never repeated
            r = t.repeat(K, *([1] * (t.dim() - 1)))  # (K*B, ...) point-major
            self.ctx.mark_shared(r)  # K equal row blocks (token ids too: engine/shared.py)
            self.repeated_inputs += 1
            return r

        def arg(v, where):  # an input whose value is a tensor may be in the plan; nested ones never are
            return rep(v, where) if torch.is_tensor(v) else tree_map(lambda t: rep(t, None), v)

        try:
            with _mha_fastpath_off():
                if isinstance(x, dict):
                    out = self.net(**{k: arg(v, k) for k, v in x.items()})
                elif isinstance(x, (tuple, list)):
                    out = self.net(*[arg(v, i) for i, v in enumerate(x)])
                else:
                    out = self.net(arg(x, 0))
        except NeedsFallback as e:
            self._fall_back(e)
            return self.forward(x, batch)
        finally:
            self.ctx.unrepeated = []  # no reference to the batch outlives the pass
            self.ctx.shared = {}
        logits = logits_of(out, getattr(self, "output", None))
        return logits.reshape(K, batch, *logits.shape[1:])


# ---------------------------------------------------------------------------------------------- no-repeat plan

# modules that act on each sample alone and keep the batch axis first (the engine's copy is in eval mode)
_MODULE_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_PER_SAMPLE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                       nn.FeatureAlphaDropout)


class _MarkUnrepeated(nn.Module):
    """Inserted before each shared-input layer of the no-repeat plan: registers the tensor that layer receives as
    the B-row data batch standing for K identical row blocks (``PointContext.is_unrepeated``, by identity)."""

    def __init__(self, ctx: PointContext):
        super().__init__()
        self.ctx = ctx

    def forward(self, x):
        if torch.is_tensor(x):
            self.ctx.unrepeated.append(x)
        return x


def _flatten_keeps_batch(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return isinstance(start, int) and isinstance(end, int) and start >= 1 and (end >= 1 or end < 0)


def _per_sample(node: fx.Node, prev: fx.Node, mods: dict) -> bool:
    """``node`` maps ``prev`` row by row, batch axis first and unchanged: flatten from dim >= 1, contiguous,
    identity / eval-mode dropout."""
    if not node.args or node.args[0] is not prev or any(a is prev for a in node.args[1:]) \
            or any(v is prev for v in node.kwargs.values()):
        return False
    if node.op == "call_function" and node.target is torch.flatten:
        return _flatten_keeps_batch(node)
    if node.op == "call_method" and node.target == "flatten":
        return _flatten_keeps_batch(node)
    if node.op == "call_method" and node.target == "contiguous":
        return len(node.args) == 1 and not node.kwargs
    if node.op == "call_module":
        m = mods.get(node.target)
        if isinstance(m, nn.Flatten):
            return len(node.args) == 1 and not node.kwargs and m.start_dim >= 1 and (m.end_dim >= 1 or m.end_dim < 0)
        return isinstance(m, _PER_SAMPLE_MODULES) and len(node.args) == 1 and not node.kwargs
    return False


def _shared_layer(node: fx.Node, prev: fx.Node, mods: dict) -> bool:
    """``node`` is a multi-point Linear / Conv (or a fused chain starting with one) taking ``prev`` as its input
    and nowhere else: a layer that computes on the B shared rows once."""
    if node.op != "call_module" or not node.args or node.args[0] is not prev or node.kwargs:
        return False
    if any(a is prev for a in node.args[1:]):
        return False
    m = mods.get(node.target)
    if type(m) in (MPLinear, MPConv):
        return len(node.args) == 1
    return isinstance(m, FusedChain) and type(m.layer) in (MPLinear, MPConv)


def _plan_unrepeated(net: nn.Module, ctx: PointContext, traced: fx.GraphModule | None):
    """(the network to run, the inputs to pass unrepeated: positional indices and keyword names).

    An input qualifies when fx traces ``net`` and every use of it reaches a shared-input layer through per-sample
    views only (LeNet: ``flatten(x, 1)`` -> the first Linear; ResNet: the first conv): then the data batch of B
    rows is passed as it is, and the K-fold repeat (a (K*B, ...) copy of every batch, 23 % of a LeNet CPU sweep)
    never happens. The layers compute on the B rows once either way, so the result is bit-identical. Anything
    else (an input read by other ops, an untraceable model) keeps the repeat.
    """
    gm = net if isinstance(net, fx.GraphModule) else traced
    if gm is None:
        if not any(type(m) in (MPLinear, MPConv) for m in net.modules()):
            return net, frozenset()
        try:
            gm = trace(net)
        except Exception:  # untraceable (data-dependent control flow, ...): keep the repeat
            return net, frozenset()
    mods = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    approved, marks = [], []
    for i, ph in enumerate(placeholders):
        if str(ph.target).startswith("*"):
            break  # *args / **kwargs: positions no longer map to placeholders
        todo, consumers, ok = [ph], [], bool(ph.users)
        while todo and ok:
            prev = todo.pop()
            for user in prev.users:
                if _shared_layer(user, prev, mods):
                    consumers.append((user, prev))
                elif _per_sample(user, prev, mods):
                    todo.append(user)
                else:
                    ok = False
                    break
        if ok and consumers:
            approved += [i, str(ph.target)]
            marks += consumers
    if not marks:
        return net, frozenset()
    attr = "lerpfast_unrepeated"
    while hasattr(gm, attr):
        attr += "_"
    gm.add_submodule(attr, _MarkUnrepeated(ctx))
    for user, prev in marks:
        with gm.graph.inserting_before(user):
            mark = gm.graph.call_module(attr, (prev,))
        user.replace_input_with(prev, mark)
    gm.graph.lint()
    gm.recompile()
    return gm, frozenset(approved)


class GraphedForward:
    """``mp(x, batch)`` replayed from CUDA graphs: one launch per batch instead of one per op (launch overhead is
    what limits small models at large K).

    A graph is captured per (input structure, shapes, dtypes, batch, autocast / tf32 state) for the current
    points. The first call with a new key runs eagerly, and so does every call while the dispatcher still has
    kernels compiling or choices to measure (:func:`lerpfast.engine.dispatch.pending`): a graph records the
    backend each op uses at capture time and replays never revisit it, so capturing while Triton compiles
    would freeze torch into the graph for the rest of the chunk. Then two eager warm-up calls on a side stream
    (the BN folds are cached there, so the graph reads them as fixed inputs) and the capture. All graphs share one
    private memory pool: the partial last batch of a sweep reuses the full batches' memory instead of doubling it
    (safe here because each replay's output is cloned before the next graph runs). :meth:`reset` drops the
    graphs: call it after ``set_points`` or any change of the model's state (BN recalibration). Out of memory
    during capture propagates (the sweep halves its points per pass and graphs stay on); any other capture
    failure (an op that synchronizes with the host, e.g. the point-by-point fallback of an LSTM) warns once and
    the forward runs eagerly from then on.
    """

    def __init__(self, mp: MultiPointModel):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.mp = mp
        self.graphs: dict = {}
        self.seen: set = set()
        self.failed = False
        self.pool = None
        self.stats = {"captures": 0, "replays": 0, "eager_while_compiling": 0}

    def reset(self) -> None:
        self.graphs.clear()

    @staticmethod
    def _on_device(tensors) -> bool:
        return all(t.device.type == "cuda" for t in tensors)

    def _compiling(self) -> bool:
        from lerpfast.engine import dispatch

        # kernels still compiling, or a fallback module still timing vmap against its loop
        return dispatch.pending() > 0 or any(isinstance(m, FallbackModule) and m.timing for m in self.mp.layers())

    def _pool(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    def __call__(self, x, batch: int):
        leaves, spec = tree_flatten(x)
        tensors = [t for t in leaves if torch.is_tensor(t)]
        if self.failed or not tensors or not self._on_device(tensors):
            return self.mp(x, batch)
        key = (str(spec), batch, _autocast_dtype(tensors[0].device), torch.backends.cuda.matmul.allow_tf32,
               torch.backends.cudnn.allow_tf32,
               tuple((tuple(t.shape), t.dtype, t.stride()) if torch.is_tensor(t) else repr(t) for t in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # first sight: eager, so the dispatcher sees these shapes (starts compiles)
                self.seen.add(key)
                return self.mp(x, batch)
            if self._compiling():  # choices not settled yet: eager until they are
                self.stats["eager_while_compiling"] += 1
                return self.mp(x, batch)
            try:
                entry = self._capture(leaves, spec, batch, self._pool())
            except Exception as exc:
                self.graphs.clear()
                torch.cuda.synchronize()
                from lerpfast.engine.oom import is_oom

                if is_oom(exc):
                    torch.cuda.empty_cache()
                    raise  # the sweep halves its points per pass; graphs stay on
                import warnings

                warnings.warn(f"lerpfast: CUDA graph capture failed ({exc!r}); running eagerly", RuntimeWarning,
                              stacklevel=2)
                self.failed = True
                return self.mp(x, batch)
            self.graphs[key] = entry
            self.stats["captures"] += 1
        graph, static, out = entry
        for s, t in zip(static, leaves):
            if torch.is_tensor(t):
                s.copy_(t)
        graph.replay()
        self.stats["replays"] += 1
        return out.clone()  # the static output is overwritten by the next replay (of any graph of the pool)

    def _capture(self, leaves, spec, batch, pool):
        static = [t.clone() if torch.is_tensor(t) else t for t in leaves]
        sx = tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.mp(sx, batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.mp(sx, batch)
        return graph, static, out


@contextlib.contextmanager
def _mha_fastpath_off():
    """nn.TransformerEncoderLayer's fused fast path reads child weights directly; the engine needs module calls."""
    get = getattr(torch.backends.mha, "get_fastpath_enabled", None)
    if get is None:
        yield
        return
    saved = get()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


# ---------------------------------------------------------------------------------------------- engine cache
#
# Building the engine (deep copy, rewrite, fx trace of the fusion and of the no-repeat plan) costs more than a whole
# LeNet-300-100 sweep's arithmetic on a GPU. A converted engine holds no weights of its own (the slice is bound per
# sweep), so it is kept per user model and reused while the model's structure is unchanged: the key below covers
# every module's type and forward, its plain attributes (by value), hooks and other objects (by identity), parameter
# and buffer shapes, and the tensors the copy carries over (non-slice buffers, tensor attributes: identity, storage
# and version counter).

_CACHE_SIZE = 8
_ENGINES: OrderedDict = OrderedDict()  # (id(model), options) -> _Entry, least recently used first
_LOCK = threading.RLock()
ENGINE_STATS = {"builds": 0, "reuses": 0}


class _Entry:
    __slots__ = ("model_ref", "signature", "engine", "in_use")

    def __init__(self, model_ref, signature, engine):
        self.model_ref, self.signature, self.engine, self.in_use = model_ref, signature, engine, False


def clear_engine_cache() -> None:
    """Forget every cached engine (:func:`engine_for`)."""
    with _LOCK:
        _ENGINES.clear()


def _tensor_key(t: torch.Tensor) -> tuple:
    version = None if t.is_inference() else t._version
    return ("tensor", id(t), t.data_ptr() if t.device.type != "meta" else 0, version, tuple(t.shape), t.dtype,
            str(t.device))


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, torch.memory_format,
          type)
_PLAIN_TYPES = frozenset(_PLAIN)
_CONTAINERS = frozenset((dict, OrderedDict, list, tuple, set, frozenset))


def _value_key(v, depth: int = 0):
    """A hashable stand-in for an attribute value: the value itself for plain data, identity for other objects."""
    typ = type(v)
    if typ in _PLAIN_TYPES:
        return v
    if typ in _CONTAINERS and not v:
        return (typ,)  # the empty hook dicts every module has: most of the attributes
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, torch.Tensor):
        return _tensor_key(v)
    if depth < 4 and isinstance(v, (tuple, list)):
        return (typ, tuple(_value_key(e, depth + 1) for e in v))
    if depth < 4 and isinstance(v, (set, frozenset)):
        try:
            return (typ, frozenset(_value_key(e, depth + 1) for e in v))
        except TypeError:
            return (typ, id(v))
    if depth < 4 and isinstance(v, dict):
        return (typ, tuple((_value_key(k, depth + 1), _value_key(e, depth + 1)) for k, e in v.items()))
    if depth < 2 and not isinstance(v, nn.Module) and not callable(v) and isinstance(getattr(v, "__dict__", None),
                                                                                    dict):
        return ("object", typ, id(v), _value_key(vars(v), depth + 1))  # e.g. a transformers config, by value
    return ("object", typ, id(v))


def structure_key(model: nn.Module) -> tuple:
    """What the engine built from ``model`` depends on, besides the slice: see the comment above."""
    parts = []
    for name, m in model.named_modules():
        typ = type(m)
        attrs = []
        for k, v in m.__dict__.items():
            if k == "training":
                continue  # the engine runs in eval mode whatever the user's model is in
            if k == "_parameters":
                v = {n: None if p is None else (tuple(p.shape), p.dtype, str(p.device)) for n, p in v.items()}
            elif k == "_buffers":
                v = {n: None if b is None else ((tuple(b.shape), b.dtype, str(b.device)) if b.is_floating_point()
                                                and n not in m._non_persistent_buffers_set else _tensor_key(b))
                     for n, b in v.items()}
            elif k == "_modules":
                v = {n: None if c is None else id(c) for n, c in v.items()}
            attrs.append((k, _value_key(v)))
        parts.append((name, typ, id(getattr(typ, "forward", None)), tuple(attrs)))
    return tuple(parts)


def engine_for(model: nn.Module, slice_: AffineSlice, *, fallback: Iterable[str | type] = (),
               fuse: bool | str = "auto", device: torch.device | None = None, channels_last: bool = False,
               cache: bool = True) -> tuple[MultiPointModel, object]:
    """A :class:`MultiPointModel` of ``model`` bound to ``slice_`` (on ``device``), reused from an earlier call when
    the model's structure and the options are unchanged.

    Returns (engine, token); pass the token to :func:`release_engine` when the sweep is done (or failed).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    first = next(iter(slice_.params.values()), None)
    # which tensors are constant decides which parts run once on the B rows (engine/shared.py): part of the key
    names = tuple((k, tuple(p.shape), p.anchors.dtype, p.dirs is not None, p.constant())
                  for k, p in slice_.params.items())
    options = (tuple(sorted(map(repr, fallback))), repr(fuse), str(device), channels_last,
               os.environ.get("LERPFAST_SHARED", "1") != "0",
               None if first is None else first.anchors.dtype, names)
    key = (id(model), options)
    signature = structure_key(model) if cache else None
    if cache:
        with _LOCK:
            entry = _ENGINES.get(key)
            if entry is not None and entry.model_ref() is model and entry.signature == signature \
                    and not entry.in_use:
                entry.in_use = True
                _ENGINES.move_to_end(key)
                ENGINE_STATS["reuses"] += 1
                entry.engine.bind(slice_)
                entry.engine.cache_state = "reused"
                return entry.engine, entry
    ENGINE_STATS["builds"] += 1
    mp = MultiPointModel(model, slice_, fallback=fallback, fuse=fuse).to(device)
    if channels_last:
        mp.to(memory_format=torch.channels_last)
    _drop_fallback_copies(mp)
    mp.cache_state = "built" if cache else "off"
    if not cache:
        return mp, None
    entry = _Entry(weakref.ref(model, lambda _, key=key: _ENGINES.pop(key, None)), signature, mp)
    entry.in_use = True
    with _LOCK:
        old = _ENGINES.get(key)
        if old is None or not old.in_use:  # a busy entry (a sweep running in another thread) stays as it is
            _ENGINES[key] = entry
            _ENGINES.move_to_end(key)
            while len(_ENGINES) > _CACHE_SIZE:
                _ENGINES.popitem(last=False)
    return mp, entry


def _drop_fallback_copies(mp: MultiPointModel) -> None:
    """Replace the fallback modules' own copies of the slice's tensors by storage-less meta tensors.

    A fallback module runs ``functional_call`` with every one of those tensors swapped for the points' values, so
    its copies (deep-copied from the user's model: all of GPT-2's weights, for one) are never read; a cached engine
    would otherwise keep them alive, on the device, after its sweep. Tied tensors stay tied.
    """
    memo: dict[int, torch.Tensor] = {}
    for layer in mp.layers():
        if not isinstance(layer, (FallbackModule, PointParamsModule, SharedModule)):
            continue  # those swap the points' (or the constant) values in per call (a SharedRegion holds none)
        for rel in layer.slices:
            owner_name, _, attr = rel.rpartition(".")
            owner = layer.inner.get_submodule(owner_name) if owner_name else layer.inner
            t = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
            if t is None or t.device.type == "meta":
                continue
            if id(t) not in memo:
                empty = torch.empty_like(t, device="meta")
                memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
            if attr in owner._parameters:
                owner._parameters[attr] = memo[id(t)]
            else:
                owner._buffers[attr] = memo[id(t)]
            if isinstance(owner, nn.RNNBase):
                owner._init_flat_weights()  # the RNN's list of its weights follows


def release_engine(token, failed: bool = False) -> None:
    """End of a sweep: the engine drops the slice; after a failure it is also dropped from the cache."""
    if token is None:
        return
    token.engine.release()
    with _LOCK:
        token.in_use = False
        if failed:
            for k, e in list(_ENGINES.items()):
                if e is token:
                    del _ENGINES[k]
