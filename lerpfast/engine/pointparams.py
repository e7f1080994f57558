"""A module's own raw tensors at K points, its children native (issue 17).

Class tokens, position embeddings, layer-scale gammas, the affine tensors of ``LayerNorm`` / ``BatchNorm``
subclasses, a user's ``nn.Parameter`` used in arithmetic: a module that owns such tensors directly used to run whole
on the per-module fallback (a whole ViT under vmap, 4-18x slower than a loop on a CPU). Here the module keeps its
own ``forward`` and its children stay multi-point layers; only its own tensors become :class:`PointTensor` s for
the duration of the call: (K, *S) values standing for one tensor of shape S per point.

Every torch op that touches a PointTensor runs under ``torch.func.vmap`` over the point axis, with the (K*B, ...)
activations among its arguments split into (K, B, ...): for point k the op sees exactly the tensors the original
module would see at point k (its batch of B rows and its own weights), so the result is the per-point result by
construction, and an activation result is folded back to (K*B, ...). An op on PointTensors alone (a reshape of a
gamma, a gather from a relative-position table) gives a PointTensor. ``t.expand(n, ...)`` / ``t.repeat(n, ...)``
with n = K*B (``class_token.expand(x.shape[0], -1, -1)``) expands each point's tensor to its own B rows. Metadata
(``.shape``, ``.dim()``, ``.dtype``) is that of one point's tensor.

What this cannot take (an op vmap has no rule for, a tensor of the module's read by code outside it, a result that
is neither a PointTensor nor an activation) raises :class:`NeedsFallback` naming the module; the engine then rebuilds
with that module on the fallback (:class:`lerpfast.engine.fallback.FallbackModule`) and warns once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lerpfast.engine.layers import MultiPointLayer, _affine, check_calibration

__all__ = ["PointTensor", "PointParamsModule", "NeedsFallback"]


class NeedsFallback(RuntimeError):
    """A module whose own tensors cannot run as PointTensors: ``module`` is its name in the model."""

    def __init__(self, module: str, why: str):
        super().__init__(f"module {module!r}: {why}")
        self.module, self.why = module, why


# metadata of one point's tensor: these return it for point 0 (no vmap, no per-point work)
_META_METHODS = {"size", "dim", "numel", "__len__", "is_floating_point", "is_complex", "element_size", "ndimension",
                 "nelement", "is_contiguous", "get_device", "type"}
_EXPANDS = {"expand", "repeat", "expand_as"}


class PointTensor(torch.Tensor):
    """K values of one tensor of a module: ``.points`` (K, *S); ``.shape`` etc. are one point's (S)."""

    owner: str
    ctx: object

    @staticmethod
    def __new__(cls, points: torch.Tensor, owner: str, ctx):
        t = torch.Tensor._make_subclass(cls, points, False)
        t.owner, t.ctx = owner, ctx
        return t

    @property
    def points(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.as_subclass(self, torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            return _apply(func, args, kwargs)

    def __repr__(self) -> str:  # noqa: D105
        return f"PointTensor(K={self.points.shape[0]}, shape={tuple(self.points.shape[1:])}, owner={self.owner!r})"


def _plain(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor.as_subclass(t, torch.Tensor)


def _apply(func, args, kwargs):
    flat, spec = tree_flatten((args, kwargs))
    pts = [v for v in flat if isinstance(v, PointTensor)]
    first = pts[0]
    ctx, owner = first.ctx, first.owner
    K, B = ctx.K, ctx.batch
    N = K * B
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return _meta_get(func, args)
    if name in _META_METHODS:
        a, kw = tree_unflatten([_plain(v)[0] if isinstance(v, PointTensor) else v for v in flat], spec)
        return func(*a, **kw)
    if name in _EXPANDS and isinstance(args[0], PointTensor):
        out = _expand_rows(name, args, kwargs, K, B)
        if out is not None:
            return out
    if func is F.layer_norm and not isinstance(args[0], PointTensor):
        out = _layer_norm(args, kwargs, K, N)
        if out is not None:
            return out
    # trusted (a module whose every row-multiple tensor derives from its input: Swin's window attention, where the
    # windows of each point's rows stay together, point-major): a first axis that is a multiple of K*B is point-major
    trusted = ctx.row_multiple
    is_act = [torch.is_tensor(v) and not isinstance(v, PointTensor) and v.dim() >= 1 and v.shape[0] > 0
              and (v.shape[0] == N or (trusted is not None and v.shape[0] % N == 0 and id(v) not in trusted))
              for v in flat]
    acts = any(is_act)
    if N > 1 and trusted is None and any(torch.is_tensor(v) and not isinstance(v, PointTensor) and not a
                     and any(d % N == 0 for d in v.shape) for v, a in zip(flat, is_act)):
        # an axis that is a multiple of K*B other than a first axis of exactly K*B rows: a sequence-first activation,
        # or one whose leading axes were flattened together (transformers' Conv1D: x.view(-1, d)); which rows belong
        # to which point is not knowable here, and guessing could be silently wrong
        raise NeedsFallback(owner, f"{name or func}: an input whose batch axis is not its first axis of K*B rows")
    pos = [i for i, v in enumerate(flat) if isinstance(v, PointTensor) or is_act[i]]
    values = [(_plain(flat[i]) if isinstance(flat[i], PointTensor)
               else flat[i].reshape(K, flat[i].shape[0] // K, *flat[i].shape[1:])) for i in pos]

    def one(*tensors):
        vals = list(flat)
        for i, t in zip(pos, tensors):
            vals[i] = t
        a, kw = tree_unflatten(vals, spec)
        return func(*a, **kw)

    try:
        out = vmap(one, in_dims=0, out_dims=0)(*values)
    except Exception as e:  # noqa: BLE001 - any failure means: run this module on the fallback
        raise NeedsFallback(owner, f"{name or func} on its own tensors failed under vmap ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]})") from e
    if acts:
        return tree_map(lambda t: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) if torch.is_tensor(t) else t, out)
    return tree_map(lambda t: PointTensor(t, owner, ctx) if torch.is_tensor(t) else t, out)


def _meta_get(func, args):
    """A property of one point's tensor (.shape, .dtype, .device, .ndim, ...); .data / .T / .mT stay per point."""
    t = args[0]
    value = func(_plain(t)[0])
    if torch.is_tensor(value):  # .T, .mT, .data, .real: a tensor per point
        return PointTensor(vmap(lambda x: func(x))(_plain(t)), t.owner, t.ctx)
    return value


def _expand_rows(name, args, kwargs, K, B):
    """``expand`` / ``repeat`` / ``expand_as`` to K*B rows: each point's tensor to its own B rows (an activation).
    None when the sizes do not start with K*B."""
    per = _plain(args[0])  # (K, *S)
    if name == "expand_as":
        sizes = list(args[1].shape)
    else:
        sizes = list(args[1:]) if len(args) > 1 else list(kwargs.get("size", ()))
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = list(sizes[0])
    if not sizes or sizes[0] != K * B:
        return None
    sizes[0] = B
    if name == "repeat":
        out = vmap(lambda x: x.repeat(*sizes))(per)
    else:
        out = vmap(lambda x: x.expand(*sizes))(per)
    if out.shape[1] != B:
        return None
    return out.reshape(K * B, *out.shape[2:])


def _layer_norm(args, kwargs, K, N):
    """``F.layer_norm(x, shape, weight, bias, eps)`` with per-point weight / bias (LayerNorm2d): normalized over
    all K*B rows at once, then the per-point affine, as the native LayerNorm does (no vmap, no copies)."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = dict(zip(names, args), **kwargs)
    x = a["input"]
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] != N:
        return None
    w, b = a.get("weight"), a.get("bias")
    if not all(t is None or isinstance(t, PointTensor) for t in (w, b)):
        return None
    y = F.layer_norm(x, a["normalized_shape"], None, None, a.get("eps", 1e-5))
    return _affine(y, None if w is None else _plain(w), None if b is None else _plain(b), K, None)


class PointParamsModule(MultiPointLayer):
    """A module that owns tensors directly, run with its own ``forward``: its own tensors as PointTensors, its
    children (already converted) multi-point layers."""

    reads_through = "inner"  # its children (converted) and configuration

    path = "native-params"

    def __init__(self, ctx, name, tensors, source, whole: bool = False):
        super().__init__(ctx, name, tensors, source)
        self.inner = source
        # whole: the module's children's tensors are its own too (its forward reads them: Swin's window attention),
        # and tensors with a multiple of K*B rows are trusted to be point-major activations during its call
        self.whole = whole
        self.where = {}
        for k in tensors:
            owner_name, _, attr = k.rpartition(".")
            owner = source.get_submodule(owner_name) if owner_name else source
            self.where[k] = (owner, "_parameters" if attr in owner._parameters else "_buffers", attr)

    # a ParameterList / ParameterDict read by its parent: each entry as an attribute read (the tensor itself when it
    # is the same at every point, else a stand-in); other containers index their (converted) children
    def __getitem__(self, i):
        inner = self.inner
        if isinstance(inner, (nn.ParameterList, nn.ParameterDict)):
            if isinstance(i, int) and i < 0:
                i += len(inner)
            return self.__getattr__(str(i))
        return inner[i]

    def __iter__(self):
        if isinstance(self.inner, nn.ParameterList):
            return (self[i] for i in range(len(self.inner)))
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def forward(self, *args, **kwargs):
        check_calibration(self)
        inner = self.inner
        saved = {k: getattr(o, d)[a] for k, (o, d, a) in self.where.items()}
        const = self.constants()  # the same tensors at every point: the plain module over all rows
        if self.whole:
            self.ctx.row_multiple = {id(b) for b in inner.buffers()}  # its own constant buffers are never rows
        try:
            for k, (o, d, a) in self.where.items():
                getattr(o, d)[a] = const[k] if const is not None else PointTensor(self.build(k), self.name, self.ctx)
            out = inner(*args, **kwargs)
        except NeedsFallback:
            raise
        except AttributeError as e:
            if "lerpfast:" in str(e):  # this forward reads a child's tensor directly (MultiheadAttention's out_proj)
                raise NeedsFallback(self.name, str(e)) from e
            raise
        finally:
            self.ctx.row_multiple = None
            for k, (o, d, a) in self.where.items():
                getattr(o, d)[a] = saved[k]
        leaves, _ = tree_flatten(out)
        if any(isinstance(v, PointTensor) for v in leaves):
            raise NeedsFallback(self.name, "its output is computed from its own tensors alone (no batch axis)")
        return out
