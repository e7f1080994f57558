"""The multi-point model: a rewritten copy of the user's model that evaluates K points per forward."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lerpfast.engine.dispatch import _autocast_dtype
from lerpfast.engine.fallback import FallbackModule
from lerpfast.engine.functional import Points
from lerpfast.engine.fusion import FusedChain, resolve_fuse
from lerpfast.engine.fusion import fuse as fuse_net
from lerpfast.engine.layers import NATIVE_LAYERS, MPBatchNorm, MultiPointLayer, PointContext
from lerpfast.geometry import AffineSlice

__all__ = ["MultiPointModel", "GraphedForward", "precision_context", "logits_of"]

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


def logits_of(out):
    """The logits tensor of a model output: a tensor, ``.logits`` (transformers), ``['logits']``, or ``out[0]``."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out:
        return logits_of(out[0])
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


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
    """

    def __init__(self, model: nn.Module, slice_: AffineSlice, *, fallback: Iterable[str | type] = (),
                 fuse: bool | str = "auto"):
        super().__init__()
        self.ctx = PointContext()
        self.slice = slice_
        force = set(fallback)
        net = copy.deepcopy(model)
        self.paths: dict[str, str] = {}
        self._covered: set[str] = set()
        root = self._convert(net, "", force)
        if root is None:
            self._rewrite(net, "", force)
            root = net
        # Epilogue fusion (engine/fusion.py): conv / linear -> eval BN -> (+ residual) -> ReLU as one op.
        anchors = next(iter(slice_.params.values())).anchors if slice_.params else None
        device = anchors.device if anchors is not None else torch.device("cpu")
        self.fusion: dict = {"mode": fuse, "enabled": resolve_fuse(fuse, device), "fused": [], "untraced": {}}
        if self.fusion["enabled"]:
            root, rep = fuse_net(root, self.ctx)
            self.fusion.update(rep)
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

    def _convert(self, module: nn.Module, name: str, force: set) -> nn.Module | None:
        typ = type(module)
        direct = self._tensors(name, direct=True)
        native = NATIVE_LAYERS.get(typ)
        forced = name in force or typ in force
        if native is not None and not forced and (native[1] is None or native[1](module)):
            new = native[0](self.ctx, name, direct, module)
            self.paths[name] = f"native:{typ.__name__}"
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

    def _rewrite(self, module: nn.Module, prefix: str, force: set) -> None:
        for cname, child in list(module._modules.items()):
            if child is None:
                continue
            full = _prefix(prefix) + cname if prefix else cname
            new = self._convert(child, full, force)
            if new is not None:
                module._modules[cname] = new
            else:
                self._rewrite(child, full, force)

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

    def fusion_report(self) -> dict:
        """What epilogue fusion did: mode, enabled, the fused chains, modules fx could not trace, and how many
        chain calls ran fused / unfused (a chain runs unfused under BN recalibration or inputs it cannot take)."""
        chains = [m for m in self.net.modules() if isinstance(m, FusedChain)]
        calls = {k: sum(c.calls[k] for c in chains) for k in ("fused", "partial", "unfused")}
        return {**self.fusion, "chains": len(chains), "calls": calls}

    def held_bytes(self) -> int:
        """Bytes of the slice tensors the model holds: independent of K."""
        return self.slice.nbytes()

    def set_points(self, pts: Points) -> None:
        self.ctx.pts = pts
        for m in self.layers():
            if isinstance(m, MPBatchNorm):
                m.reset_calibration()

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
        self.ctx.shared = []

        def rep(t):
            if not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] != batch:
                return t
            r = t.repeat(K, *([1] * (t.dim() - 1)))  # (K*B, ...) point-major
            if r.is_floating_point():
                self.ctx.shared.append((r.data_ptr(), r.numel()))
            return r

        xr = tree_map(rep, x)
        with _mha_fastpath_off():
            if isinstance(xr, dict):
                out = self.net(**xr)
            elif isinstance(xr, (tuple, list)):
                out = self.net(*xr)
            else:
                out = self.net(xr)
        logits = logits_of(out)
        return logits.reshape(K, batch, *logits.shape[1:])


class GraphedForward:
    """``mp(x, batch)`` replayed from CUDA graphs: one launch per batch instead of one per op (launch overhead is
    what limits small models at large K).

    A graph is captured per (input structure, shapes, dtypes, batch, autocast / tf32 state) for the current
    points, after two eager warm-up calls on a side stream (the dispatcher measures and Triton autotunes
    there; the BN folds are cached then, so the graph reads them as fixed inputs). :meth:`reset` drops the
    graphs: call it after ``set_points`` or any change of the model's state (BN recalibration). A capture
    that fails (an op that synchronizes with the host, e.g. the point-by-point fallback of an LSTM) warns once
    and the forward runs eagerly from then on.
    """

    def __init__(self, mp: MultiPointModel):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.mp = mp
        self.graphs: dict = {}
        self.failed = False

    def reset(self) -> None:
        self.graphs.clear()

    def __call__(self, x, batch: int):
        leaves, spec = tree_flatten(x)
        tensors = [t for t in leaves if torch.is_tensor(t)]
        if self.failed or not tensors or any(t.device.type != "cuda" for t in tensors):
            return self.mp(x, batch)
        key = (str(spec), batch, _autocast_dtype(tensors[0].device), torch.backends.cuda.matmul.allow_tf32,
               torch.backends.cudnn.allow_tf32,
               tuple((tuple(t.shape), t.dtype, t.stride()) if torch.is_tensor(t) else repr(t) for t in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(leaves, spec, batch)
            except Exception as exc:  # any capture failure: eager from now on
                import warnings

                warnings.warn(f"lerpfast: CUDA graph capture failed ({exc!r}); running eagerly", RuntimeWarning,
                              stacklevel=2)
                self.failed = True
                self.graphs.clear()
                torch.cuda.synchronize()
                return self.mp(x, batch)
            self.graphs[key] = entry
        graph, static, out = entry
        for s, t in zip(static, leaves):
            if torch.is_tensor(t):
                s.copy_(t)
        graph.replay()
        return out.clone()  # the static output is overwritten by the next replay

    def _capture(self, leaves, spec, batch):
        static = [t.clone() if torch.is_tensor(t) else t for t in leaves]
        sx = tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.mp(sx, batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
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
