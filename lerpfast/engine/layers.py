"""Multi-point layers: each holds its tensors along the slice and builds the K points' weights inside forward.

Activations carry the K points along the batch axis, point-major: a tensor of the original model with
batch B has batch K*B here, rows [k*B, (k+1)*B) belonging to point k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from lerpfast.engine import dispatch, functional
from lerpfast.engine.functional import ParamSlice, Points, combine
from lerpfast.kernels._ref import bn_fold

__all__ = ["PointContext", "MultiPointLayer", "NATIVE_LAYERS", "NATIVE_BY_NAME"]


@dataclass
class PointContext:
    """State shared by all multi-point layers of one model during a pass."""

    pts: Points | None = None
    batch: int = 0  # per-point batch size B of the current data batch
    # (data_ptr, numel) -> tensor, for the tensors of K equal row blocks made in this pass (the repeated input,
    # engine.shared's outputs): held until the pass ends, so that no other tensor can take over their memory (and
    # with it their entry) while it runs
    shared: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # input tensors of B rows (not repeated K times) that the model's traced graph hands straight to a
    # shared-input layer (engine.model: the no-repeat plan); compared by identity
    unrepeated: list[torch.Tensor] = field(default_factory=list)
    calibrate: bool = False  # "recompute" BN policy: accumulate per-point batch statistics
    max_materialized: int = 0  # largest per-layer K-point weight tensor built (bytes), for memory checks
    # during a trusted module's call (engine.pointparams, whole=True): ids of its constant buffers; tensors with a
    # multiple of K*B rows are then point-major activations
    row_multiple: set | None = None
    stats: dict = field(default_factory=dict)
    # inside a shared part of the network (engine.shared): constant modules compute on the rows they are given
    # (B rows standing for the K points), with meta tensors while shapes alone are asked for
    rows_mode: bool = False
    shared_meta: bool = False

    @property
    def K(self) -> int:  # noqa: N802
        return self.pts.K

    def mark_shared(self, t: torch.Tensor) -> None:
        """Register ``t`` (contiguous, (K*B, ...)) as K equal row blocks for the rest of the pass."""
        self.shared[(t.data_ptr(), t.numel())] = t

    def is_unrepeated(self, x: torch.Tensor) -> bool:
        """True when x is the B-row data batch itself, standing for K identical row blocks (see ``unrepeated``)."""
        return any(x is t for t in self.unrepeated) and x.dim() >= 1 and x.shape[0] == self.batch

    def is_shared(self, x: torch.Tensor) -> bool:
        """True when all K row blocks of x are the same data: x is an unmodified view of the repeated input,
        or the unrepeated B-row input itself."""
        if self.unrepeated and self.is_unrepeated(x):
            return True
        return (x.dim() >= 1 and x.shape[0] == self.K * self.batch and x.is_contiguous()
                and (x.data_ptr(), x.numel()) in self.shared)

    def rows(self, x: torch.Tensor) -> int:
        """Rows of x in the (K*B, ...) layout: K*B, also for the unrepeated B-row input."""
        return self.K * x.shape[0] if self.is_unrepeated(x) else x.shape[0]

    def note(self, nbytes: int) -> None:
        self.max_materialized = max(self.max_materialized, nbytes)


def external_read_error(module: str, source_type: str, attr: str) -> AttributeError:
    """The error for code outside ``module`` reading its tensor ``attr``, which has K values during a pass.

    The reader is the forward of a module above this one: the advice names its parent ('' = the whole model for a
    top-level module). Naming the module itself would not help: its own forward does not read the tensor.
    """
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    return AttributeError(
        f"lerpfast: module {module!r} ({source_type}) is evaluated at K points at once, so its {attr!r} has no "
        f"single value; code outside the module reads it directly. Pass fallback=[{parent!r}] to sweep to run the "
        f"reading module per point ('' is the whole model; if the read is in a module further up, name that one).")


# what code outside a module may read of a tensor it holds at K points: its description, never its values
_STAND_IN_READS = frozenset({"dtype", "device", "shape", "ndim", "dim", "size", "numel", "is_floating_point",
                             "is_complex", "requires_grad", "layout", "is_cuda", "is_meta", "element_size",
                             "is_contiguous", "__len__"})


class StandIn(torch.Tensor):
    """What a module evaluated at K points hands out for one of its tensors read from outside (transformers'
    ``self.embeddings.patch_embeddings.projection.weight.dtype``): its dtype, device and shape are the tensor's,
    and any use of its values raises :func:`external_read_error` (the tensor has K values during a pass). It
    holds no storage of its own (a broadcast zero)."""

    @staticmethod
    def __new__(cls, like: torch.Tensor, error: AttributeError):
        t = torch.Tensor._make_subclass(cls, torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape))
        t._lerpfast_error = error
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property (t.dtype): the name is the descriptor's
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _STAND_IN_READS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten((args, kwargs or {}))
        raise next(t._lerpfast_error for t in leaves if isinstance(t, StandIn))

    def __repr__(self):
        return f"StandIn(shape={tuple(self.shape)}, dtype={self.dtype}: {self._lerpfast_error})"


def stand_in(module: str, source_type: str, attr: str, like: torch.Tensor) -> StandIn:
    return StandIn(like, external_read_error(module, source_type, attr))


def check_calibration(layer: MultiPointLayer) -> None:
    """``bn="recompute"`` recalibrates the engine's own batch-norm layers only: running statistics held by a module
    that runs its own forward (the fallback, own tensors per point) would silently stay interpolated."""
    if layer.ctx.calibrate:
        stats = sorted(k for k in layer.slices if k.endswith(("running_mean", "running_var")))
        if stats:
            raise RuntimeError(
                f"lerpfast: bn='recompute' cannot recalibrate {', '.join(stats[:4])} of module {layer.name!r} "
                f"({layer.source_type}), which runs its own forward; use method='loop' for this sweep, or "
                f"bn='interpolate' / 'endpoint'")


class MultiPointLayer(nn.Module):
    """Base: holds ``ParamSlice`` per tensor name (plain attributes, not buffers: ``.to()`` must not touch them)."""

    path = "native"
    #: the child module that answers reads of other attributes (a wrapper's wrapped module), if any
    reads_through: str | None = None

    def __init__(self, ctx: PointContext, name: str, tensors: dict[str, ParamSlice], source: nn.Module):
        super().__init__()
        self.ctx, self.name = ctx, name
        self.slices = tensors
        self.source_type = type(source).__name__
        # the source module's plain settings (in_features, kernel_size, eps...), for code that reads them
        self.source_settings = {k: v for k, v in vars(source).items()
                                if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        K, B = ctx.K, ctx.batch
        if x.dim() >= 1 and (x.shape[0] == K * B or ctx.is_unrepeated(x)):
            return self.run(x)
        # An input without the batch axis (position ids of shape (T,) or (1, T), a constant): the K points'
        # outputs on it, broadcast over the batch, so that the usual broadcasting against batched tensors holds.
        x1 = x if (x.dim() >= 1 and x.shape[0] == 1) else x.unsqueeze(0)
        ctx.batch = 1
        try:
            r = x1.repeat(K, *([1] * (x1.dim() - 1)))
            ctx.mark_shared(r)  # K equal blocks of one row
            y = self.run(r)  # (K, ...)
        finally:
            ctx.batch = B
        return y.unsqueeze(1).expand(K, B, *y.shape[1:]).reshape(K * B, *y.shape[1:])

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def slice(self, key: str) -> ParamSlice | None:
        return self.slices.get(key)

    def constants(self) -> dict[str, torch.Tensor] | None:
        """This layer's tensors when every one is the same at every point (``ParamSlice.constant``), else None: the
        layer then runs as the plain op over all K*B rows (once over B when its input is the same for every
        point), with no per-point weights built. Decided once per slice."""
        cached = getattr(self, "_constants", None)
        if cached is not None and cached[0] is self.slices:
            return cached[1]
        value = ({k: p.anchors[0] for k, p in self.slices.items()}
                 if self.slices and all(p.constant() for p in self.slices.values()) else None)
        self._constants = (self.slices, value)
        return value

    def _plain(self, x: torch.Tensor, fn) -> torch.Tensor:
        """``fn(rows)`` on the B shared rows once (repeated to K*B after), or on all K*B rows."""
        K = self.ctx.K
        if self.ctx.is_unrepeated(x) or self.ctx.is_shared(x):
            y = fn(x if self.ctx.is_unrepeated(x) else x[: x.shape[0] // K])
            return y.repeat(K, *([1] * (y.dim() - 1)))
        return fn(x)

    def build(self, key: str) -> torch.Tensor | None:
        """(K, *S) tensor of this layer for the current points (materialized for this layer only)."""
        p = self.slices.get(key)
        if p is None:
            return None
        w = combine(p.anchors, p.dirs, self.ctx.pts.anchor_idx, self.ctx.pts.coefs)
        self.ctx.note(w.numel() * w.element_size())
        return w

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            p = self.__dict__.get("slices", {}).get(name)
            if p is not None and p.constant():  # the same at every point: the tensor itself is right everywhere
                return p.anchors[0]
            if p is not None:  # its dtype / shape read from outside: a stand-in (using the values raises)
                return stand_in(self.name, self.source_type, name, p.anchors[0])
            settings = self.__dict__.get("source_settings", {})
            if name in settings:
                return settings[name]
            through = self._modules.get(self.reads_through) if self.reads_through else None
            if through is not None:  # children and configuration (batch_first, num_heads, ...) of the wrapped module
                return getattr(through, name)
            if name in ("weight", "bias", "running_mean", "running_var"):
                raise external_read_error(self.name, self.source_type, name) from None
            raise

    def extra_repr(self) -> str:
        return f"{self.source_type}, name={self.name!r}"


def _split(x: torch.Tensor, K: int) -> torch.Tensor:
    return x.reshape(K, x.shape[0] // K, *x.shape[1:])


class MPLinear(MultiPointLayer):
    @property
    def out_channels(self) -> int:
        return self.slices["weight"].anchors.shape[1]

    def out_shape(self, in_shape: torch.Size) -> tuple[int, ...]:
        """Shape of this layer's output for an input of shape ``in_shape`` (K*B, ..., in)."""
        return (*in_shape[:-1], self.out_channels)

    def run(self, x: torch.Tensor, bn: tuple[torch.Tensor, torch.Tensor] | None = None,
            residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:  # (K*B, ..., in)
        """Without the keywords: the layer. With them (engine fusion, see :mod:`lerpfast.engine.fusion`): the layer
        followed by the per-point affine ``bn`` (over the last axis), + ``residual`` (the output's shape), ReLU."""
        const = self.constants() if bn is None and residual is None and not relu else None
        if const is not None:  # the same weights at every point: one plain linear, no per-point weights
            return self._plain(x, lambda r: F.linear(r, const["weight"].to(r.dtype),
                                                     None if "bias" not in const else const["bias"].to(r.dtype)))
        K, lead = self.ctx.K, x.shape[:-1]
        shared = self.ctx.is_shared(x)
        if self.ctx.is_unrepeated(x):
            xin = x.reshape(-1, x.shape[-1])  # (N, in): the data batch itself, never repeated
            lead = (K * lead[0], *lead[1:])
        else:
            xin = x.reshape(K, -1, x.shape[-1])  # (K, N, in)
            if shared:
                xin = xin[0]  # (N, in): the same rows for every point
        w = self.slices["weight"]
        self.ctx.note(K * w.anchors[0].numel() * w.anchors.element_size())
        if bn is None and residual is None and not relu:
            out = dispatch.lerp_linear(xin, w, self.slice("bias"), self.ctx.pts, shared_input=shared)  # (K, N, out)
        else:
            res = None if residual is None else residual.reshape(K, -1, residual.shape[-1])
            out = dispatch.lerp_linear_fused(xin, w, self.slice("bias"), self.ctx.pts, shared_input=shared, bn=bn,
                                             residual=res, relu=relu)
        return out.reshape(*lead, out.shape[-1])


class MPConv(MultiPointLayer):
    def __init__(self, ctx, name, tensors, source: nn.Conv1d | nn.Conv2d | nn.Conv3d):
        super().__init__(ctx, name, tensors, source)
        self.stride, self.dilation, self.groups = source.stride, source.dilation, source.groups
        self.padding_mode = source.padding_mode
        if source.padding_mode != "zeros":
            self.pad = source._reversed_padding_repeated_twice
            self.padding = 0
        else:
            self.padding = source.padding

    @property
    def out_channels(self) -> int:
        return self.slices["weight"].anchors.shape[1]

    def out_shape(self, in_shape: torch.Size) -> tuple[int, ...]:
        """Shape of this layer's output for an input of shape ``in_shape`` (K*B, C, *spatial)."""
        ks = self.slices["weight"].anchors.shape[3:]
        sp = list(in_shape[2:])
        if self.padding_mode != "zeros":
            sp = [n + self.pad[2 * (len(sp) - 1 - i)] + self.pad[2 * (len(sp) - 1 - i) + 1] for i, n in enumerate(sp)]
        if self.padding == "same":
            return (in_shape[0], self.out_channels, *sp)
        pad = (0,) * len(sp) if self.padding == "valid" else _tuple(self.padding, len(sp))
        st, dil = _tuple(self.stride, len(sp)), _tuple(self.dilation, len(sp))
        out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(sp, pad, dil, ks, st)]
        return (in_shape[0], self.out_channels, *out)

    def run(self, x: torch.Tensor, bn: tuple[torch.Tensor, torch.Tensor] | None = None,
            residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:  # (K*B, C, *spatial)
        """Without the keywords: the layer. With them (engine fusion, see :mod:`lerpfast.engine.fusion`): the conv
        followed by the per-point per-channel affine ``bn``, + ``residual`` (the output's shape), ReLU."""
        K = self.ctx.K
        const = self.constants() if bn is None and residual is None and not relu else None
        if const is not None:  # the same weights at every point: one plain convolution over the rows

            def plain(r):
                if self.padding_mode != "zeros":
                    r = F.pad(r, self.pad, mode=self.padding_mode)
                return functional.CONV[r.dim() - 2](r, const["weight"].to(r.dtype),
                                             None if "bias" not in const else const["bias"].to(r.dtype),
                                             self.stride, self.padding, self.dilation, self.groups)

            return self._plain(x, plain)
        shared = self.ctx.is_shared(x)
        unrepeated = self.ctx.is_unrepeated(x)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
        if unrepeated:
            xin = x  # (B, C, *sp): the data batch itself, never repeated
        else:
            xin = _split(x, K)  # (K, B, C, *sp)
            if shared:
                xin = xin[0]
        w = self.slices["weight"]
        self.ctx.note(K * w.anchors[0].numel() * w.anchors.element_size())
        if bn is None and residual is None and not relu:
            out = dispatch.lerp_conv(xin, w, self.slice("bias"), self.ctx.pts, self.stride, self.padding,
                                     self.dilation, self.groups, shared_input=shared)  # (K, B, O, *sp')
        else:
            out = dispatch.lerp_conv_fused(xin, w, self.slice("bias"), self.ctx.pts, self.stride, self.padding,
                                           self.dilation, self.groups, shared_input=shared, bn=bn,
                                           residual=None if residual is None else _split(residual, K), relu=relu)
        return out.reshape(K * out.shape[1], *out.shape[2:])


def _tuple(v, n: int) -> tuple:
    return (v,) * n if isinstance(v, int) else tuple(v)


class MPBatchNorm(MultiPointLayer):
    """Batch norm with per-point statistics: one ``F.batch_norm`` with points folded into channels (GPU), or one
    per point (CPU: no transposes, activations normalized while in cache).

    Either way every point's arithmetic is exactly PyTorch's, in eval mode and in the "recompute" policy's
    calibration, where ``momentum=1/n`` reproduces BatchNorm's cumulative average (``momentum=None``).
    """

    def __init__(self, ctx, name, tensors, source: nn.modules.batchnorm._BatchNorm):
        super().__init__(ctx, name, tensors, source)
        self.eps, self.momentum = source.eps, source.momentum
        self.track = source.track_running_stats
        self.calibrated: tuple[torch.Tensor, torch.Tensor] | None = None  # (K, C) each, "recompute" policy
        self.n_calib = 0
        self._fold: tuple | None = None  # (points, (scale, shift)) of the last fold()

    def reset_calibration(self) -> None:
        self.calibrated, self.n_calib = None, 0
        self._fold = None

    @property
    def num_features(self) -> int:
        for key in ("running_mean", "weight", "bias"):
            if key in self.slices:
                return self.slices[key].anchors.shape[1]
        return -1

    def foldable(self) -> bool:
        """True when this BN is a per-point affine map of its input: eval mode with running statistics that
        follow the slice (BN policies 'interpolate' and 'endpoint'), not batch statistics ('recompute')."""
        return (self.track and "running_mean" in self.slices and "running_var" in self.slices
                and not self.ctx.calibrate and self.calibrated is None)

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), (K, C) each in the slice's dtype: ``bn(y) = y * scale[k] + shift[k]`` for point k
        (:func:`lerpfast.kernels._ref.bn_fold`); cached until the points change."""
        pts = self.ctx.pts
        if self._fold is not None and self._fold[0] is pts:
            return self._fold[1]
        s = self.slices

        def pair(key):
            return None if key not in s else (s[key].anchors, s[key].dirs)

        folded = bn_fold(pair("weight"), pair("bias"), pair("running_mean"), pair("running_var"), self.eps,
                         pts.anchor_idx, pts.coefs, dtype=s["running_mean"].anchors.dtype)
        self._fold = (pts, folded)
        return folded

    def constant_path(self) -> bool:
        """Every tensor the same at every point, running statistics in use and none recalibrated: the plain
        eval-mode batch norm."""
        return (self.track and self.calibrated is None and not self.ctx.calibrate and "running_mean" in self.slices
                and self.constants() is not None)

    def run(self, x: torch.Tensor) -> torch.Tensor:  # (K*B, C, *)
        K = self.ctx.K
        if self.constant_path():
            c = self.constants()

            def plain(r):
                w, b = c.get("weight"), c.get("bias")
                return F.batch_norm(r, c["running_mean"].to(r.dtype), c["running_var"].to(r.dtype),
                                    None if w is None else w.to(r.dtype), None if b is None else b.to(r.dtype),
                                    False, 0.0, self.eps)

            return self._plain(x, plain)
        xs = _split(x, K)  # (K, B, C, *)
        C = xs.shape[2]
        weight, bias = self.build("weight"), self.build("bias")
        weight = None if weight is None else weight.reshape(K * C).to(x.dtype)
        bias = None if bias is None else bias.reshape(K * C).to(x.dtype)
        if self.ctx.calibrate and self.track:
            if self.calibrated is None:
                dt = self.slices["running_mean"].anchors.dtype
                self.calibrated = (torch.zeros(K * C, dtype=dt, device=x.device),
                                   torch.ones(K * C, dtype=dt, device=x.device))
            self.n_calib += 1
            mean, var, training, momentum = self.calibrated[0], self.calibrated[1], True, 1.0 / self.n_calib
        elif not self.track:
            mean, var, training, momentum = None, None, True, 0.0
        else:
            if self.calibrated is not None:
                mean, var = self.calibrated
            else:
                mean, var = self.build("running_mean").reshape(K * C), self.build("running_var").reshape(K * C)
            mean, var, training, momentum = mean.to(x.dtype), var.to(x.dtype), False, 0.0
        if x.device.type == "cpu":
            # one batch_norm per point on its contiguous block (the calibration statistics update in place through
            # the views): no transposes, and each point's activations are normalized while in cache
            def part(t, k):
                return None if t is None else t[k * C:(k + 1) * C]

            # (unbind, not xs[k]: under autograd each select's backward would fill a zero (K, ...) tensor)
            return torch.stack([F.batch_norm(xk, part(mean, k), part(var, k), part(weight, k), part(bias, k),
                                             training, momentum, self.eps)
                                for k, xk in enumerate(xs.unbind(0))]).reshape(x.shape)
        B = xs.shape[1]
        xf = xs.transpose(0, 1).reshape(B, K * C, *xs.shape[3:])  # (B, K*C, *): points folded into channels
        y = F.batch_norm(xf, mean, var, weight, bias, training, momentum, self.eps)
        return y.reshape(B, K, C, *xs.shape[3:]).transpose(0, 1).reshape(x.shape)


class MPBatchNormAct(MPBatchNorm):
    """timm's ``BatchNormAct2d`` (batch norm, then its ``drop`` and ``act`` children): the batch norm per point like
    :class:`MPBatchNorm` (recalibration under ``bn="recompute"`` included), then the two children as they are."""

    def __init__(self, ctx, name, tensors, source):
        super().__init__(ctx, name, tensors, source)
        self.drop, self.act = source.drop, source.act

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(super().run(x))

    def post(self, y: torch.Tensor) -> torch.Tensor:
        """What follows the batch norm's affine map (its ``drop``, then ``act``), for a fused chain that has
        folded the affine map into the layer before it."""
        return self.act(self.drop(y))

    def tail(self) -> str:
        """'identity' when nothing follows the affine map, 'relu' when a ReLU alone does, else 'other'."""
        if not isinstance(self.drop, nn.Identity):
            return "other"
        if isinstance(self.act, nn.Identity):
            return "identity"
        return "relu" if type(self.act) is nn.ReLU else "other"


def _bn_act_ok(m: nn.Module) -> bool:
    """timm's norm + activation layers keep this shape; anything else with the name runs its own forward."""
    return isinstance(getattr(m, "drop", None), nn.Module) and isinstance(getattr(m, "act", None), nn.Module) \
        and not any(True for _ in m.drop.parameters()) and not any(True for _ in m.act.parameters()) \
        and not any(True for _ in m.drop.buffers()) and not any(True for _ in m.act.buffers())


class MPMultiheadAttention(MultiPointLayer):
    """``nn.MultiheadAttention`` with its projections multi-point and the attention itself one call over the K*B
    rows (attention is per sample: the points only differ in the projections). Holds its ``out_proj`` tensors too.

    Self-attention (query, key and value the same tensor) runs one (K, N, E) x (3E, E) projection; otherwise each
    input is projected with the full in_proj and its third kept. ``need_weights=True`` computes the attention
    weights explicitly (averaged over heads unless ``average_attn_weights=False``), as torch does.
    """

    whole = True  # the slices of its children (out_proj) are its own: nothing below it is converted

    def __init__(self, ctx, name, tensors, source: nn.MultiheadAttention):
        super().__init__(ctx, name, tensors, source)
        self.embed_dim, self.num_heads, self.batch_first = source.embed_dim, source.num_heads, source.batch_first

    def _project(self, x: torch.Tensor, key: str, part: int | None) -> torch.Tensor:
        K, E = self.ctx.K, self.embed_dim
        y = dispatch.lerp_linear(x.reshape(K, -1, x.shape[-1]), self.slices[key + "weight"],
                                 self.slice(key + "bias"), self.ctx.pts).reshape(*x.shape[:-1], -1)
        return y if part is None else y[..., part * E:(part + 1) * E]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, E = query.shape
        S, H = key.shape[1], self.num_heads
        if query is key and key is value:
            q, k, v = self._project(query, "in_proj_", None).chunk(3, dim=-1)
        else:
            q, k, v = (self._project(t, "in_proj_", i) for i, t in enumerate((query, key, value)))
        q, k, v = (t.reshape(N, -1, H, E // H).transpose(1, 2) for t in (q, k, v))  # (N, H, L|S, E/H)
        mask = _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
        if need_weights:
            scores = (q * (E // H) ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            weights = scores.softmax(-1)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
            weights = None
        out = self._project(out.transpose(1, 2).reshape(N, L, E), "out_proj.", None)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _merge_masks(attn_mask, key_padding_mask, N, H, L, S, dtype):
    """torch's attention masks as one additive float mask broadcastable to (N, H, L, S), or None."""
    def additive(m):
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(N, H, L, S) if mask.dim() == 3 else mask  # (N*H, L, S) or (L, S)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(N, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask


def _mha_ok(m: nn.MultiheadAttention) -> bool:
    return (m._qkv_same_embed_dim and m.in_proj_bias is not None and m.bias_k is None and not m.add_zero_attn
            and m.out_proj.bias is not None and type(m.out_proj).forward is nn.Linear.forward)


class MPConv1DT(MultiPointLayer):
    """transformers' ``Conv1D`` (GPT-2's projections): ``x @ weight + bias`` with weight (in, out), per point one
    batched GEMM over its rows; a shared input is multiplied once per point without the K-fold repeat."""

    def run(self, x: torch.Tensor) -> torch.Tensor:  # (K*B, ..., in)
        const = self.constants()
        if const is not None:
            return self._plain(x, lambda r: torch.addmm(const["bias"].to(r.dtype), r.reshape(-1, r.shape[-1]),
                                                        const["weight"].to(r.dtype)).reshape(*r.shape[:-1], -1))
        K = self.ctx.K
        pts, w, b = self.ctx.pts, self.slices["weight"], self.slices["bias"]
        weight = functional.cpu_cached(pts, ("conv1d_t", id(w.anchors), x.dtype), x.device,
                                       lambda: combine(w.anchors, w.dirs, pts.anchor_idx, pts.coefs).to(x.dtype))
        bias = combine(b.anchors, b.dirs, pts.anchor_idx, pts.coefs).to(x.dtype)  # (K, out)
        self.ctx.note(weight.numel() * weight.element_size())
        if self.ctx.is_unrepeated(x) or self.ctx.is_shared(x):
            rows = x if self.ctx.is_unrepeated(x) else x[: x.shape[0] // K]
            lead = (K * rows.shape[0], *rows.shape[1:-1])
            out = torch.baddbmm(bias[:, None, :], rows.reshape(1, -1, rows.shape[-1]).expand(K, -1, -1), weight)
        else:
            lead = x.shape[:-1]
            out = torch.baddbmm(bias[:, None, :], x.reshape(K, -1, x.shape[-1]), weight)  # (K, N, out)
        return out.reshape(*lead, out.shape[-1])


def _conv1d_t_ok(m: nn.Module) -> bool:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(b, torch.Tensor)
            and getattr(m, "nf", None) == w.shape[1] and not list(m.children()))


# layers known by class name (their packages are not imported here): name -> (layer, check, required base class)
NATIVE_BY_NAME: dict[str, tuple[type, callable, type]] = {
    "BatchNormAct2d": (MPBatchNormAct, _bn_act_ok, nn.modules.batchnorm._BatchNorm),
    "Conv1D": (MPConv1DT, _conv1d_t_ok, nn.Module),
}


def _affine(y: torch.Tensor, weight, bias, K: int, channel_dim: int | None) -> torch.Tensor:
    """Per-point elementwise affine on (K*B, ...) activations; channel_dim None: over the trailing dims."""
    if weight is None and bias is None:
        return y
    ys = _split(y, K)  # (K, B, ...)
    if channel_dim is None:
        shape = lambda t: t.reshape(K, *([1] * (ys.dim() - t.dim())), *t.shape[1:])  # noqa: E731
    else:
        shape = lambda t: t.reshape(K, 1, t.shape[1], *([1] * (ys.dim() - 3)))  # noqa: E731
    if weight is not None:
        ys = ys * shape(weight.to(y.dtype))
    if bias is not None:
        ys = ys + shape(bias.to(y.dtype))
    return ys.reshape(y.shape)


class MPLayerNorm(MultiPointLayer):
    def __init__(self, ctx, name, tensors, source: nn.LayerNorm):
        super().__init__(ctx, name, tensors, source)
        self.normalized_shape, self.eps = source.normalized_shape, source.eps

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return _affine(y, self.build("weight"), self.build("bias"), self.ctx.K, None)


class MPGroupNorm(MultiPointLayer):
    def __init__(self, ctx, name, tensors, source: nn.GroupNorm):
        super().__init__(ctx, name, tensors, source)
        self.num_groups, self.eps = source.num_groups, source.eps

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.num_groups, None, None, self.eps)
        return _affine(y, self.build("weight"), self.build("bias"), self.ctx.K, 1)


class MPEmbedding(MultiPointLayer):
    def __init__(self, ctx, name, tensors, source: nn.Embedding):
        super().__init__(ctx, name, tensors, source)
        self.num_embeddings = source.num_embeddings

    def run(self, idx: torch.Tensor) -> torch.Tensor:  # (K*B, ...) int
        K = self.ctx.K
        p = self.slices["weight"]
        if self.ctx.is_shared(idx) or self.ctx.is_unrepeated(idx):
            ids = idx if self.ctx.is_unrepeated(idx) else idx[: idx.shape[0] // K]  # the same tokens at every point
            if ids.numel() < self.num_embeddings:
                # only the rows the batch reads, for each point: combine is elementwise, so the rows of the combined
                # table, bit for bit, at K*N*D instead of K*V*D (GPT-2: 256 tokens of a 50257-row table)
                flat = ids.reshape(-1)
                rows = combine(p.anchors[:, flat], None if p.dirs is None else p.dirs[:, flat],
                               self.ctx.pts.anchor_idx, self.ctx.pts.coefs)  # (K, N, D)
                self.ctx.note(rows.numel() * rows.element_size())
                return rows.reshape(K * ids.shape[0], *ids.shape[1:], rows.shape[-1])
        table = self.build("weight")  # (K, V, D)
        offset = torch.arange(K, device=idx.device).reshape(K, *([1] * idx.dim())) * self.num_embeddings
        flat = (_split(idx, K) + offset).reshape(idx.shape)
        return F.embedding(flat, table.reshape(-1, table.shape[-1]))


def _embedding_ok(m: nn.Embedding) -> bool:
    return m.max_norm is None  # max_norm renormalizes the table in place: per-point fallback instead


NATIVE_LAYERS: dict[type, tuple[type, callable]] = {
    nn.Linear: (MPLinear, None),
    nn.Conv1d: (MPConv, None),
    nn.Conv2d: (MPConv, None),
    nn.Conv3d: (MPConv, None),
    nn.BatchNorm1d: (MPBatchNorm, None),
    nn.BatchNorm2d: (MPBatchNorm, None),
    nn.BatchNorm3d: (MPBatchNorm, None),
    nn.LayerNorm: (MPLayerNorm, None),
    nn.GroupNorm: (MPGroupNorm, None),
    nn.Embedding: (MPEmbedding, _embedding_ok),
    nn.MultiheadAttention: (MPMultiheadAttention, _mha_ok),
}
