"""Torch reference ops of the multi-point engine.

Every fast path (Triton in ``lerpfast.kernels``, C++ in ``csrc/``) is checked against these, and on
the CPU these *are* the engine. Shapes follow ``docs/architecture.md``:

* a ``ParamSlice`` holds one tensor of the model along a slice: ``anchors`` (M, *S) and ``dirs`` (J, *S);
* ``Points`` says which K points a pass evaluates: ``anchor_idx`` (K,), ``coefs`` (K, J);
* point k's tensor is ``anchors[anchor_idx[k]] + sum_j coefs[k, j] * dirs[j]`` (j in order).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lerpfast.engine import buffers

__all__ = ["ParamSlice", "Points", "combine", "combine_one", "lerp_linear", "lerp_conv"]


@dataclass
class ParamSlice:
    """One tensor of the model along a slice: ``anchors`` (M, *S), ``dirs`` (J, *S) or None (J = 0)."""

    anchors: torch.Tensor
    dirs: torch.Tensor | None
    _constant: bool | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> torch.Size:
        return self.anchors.shape[1:]

    def constant(self) -> bool:
        """True when the tensor is the same at every point of the slice: every anchor equal (bitwise) and every
        direction zero (a frozen backbone layer, a zero-shot head, a buffer neither endpoint changed). Checked once
        per slice (one pass over the tensor)."""
        if self._constant is None:
            a, d = self.anchors, self.dirs
            if a.is_meta:  # no values (the compile planner's shapes-only slices): treated as varying
                self._constant = False
                return False
            self._constant = bool((d is None or not bool(d.any()))
                                  and all(torch.equal(a[0], a[m]) for m in range(1, a.shape[0])))
        return self._constant

    def nbytes(self) -> int:
        n = self.anchors.numel() * self.anchors.element_size()
        if self.dirs is not None:
            n += self.dirs.numel() * self.dirs.element_size()
        return n

    def joint(self) -> torch.Tensor | None:
        """(M+J, *S): anchors then directions as one tensor without a copy, when they lie back to back in one
        storage (as :mod:`lerpfast.geometry` builds them); else None."""
        a, d = self.anchors, self.dirs
        if d is not None and torch.is_grad_enabled() and (a.requires_grad or d.requires_grad):
            # autograd takes an as_strided view as lying within its input's extent: through ``a`` it would pass the
            # gradient of the anchors' rows only and drop the directions' (lerpfast.fit_curve trains a bend point
            # through these tensors); the caller's torch.cat copy is differentiable
            return None
        if (d is None or a.dtype != d.dtype or a.device != d.device or not a.is_contiguous() or not d.is_contiguous()
                or a.shape[1:] != d.shape[1:] or a.untyped_storage().data_ptr() != d.untyped_storage().data_ptr()
                or d.data_ptr() != a.data_ptr() + a.numel() * a.element_size()):
            return None
        return a.as_strided((a.shape[0] + d.shape[0], *a.shape[1:]), a.stride(), a.storage_offset())

    def to(self, device) -> ParamSlice:
        """On ``device``; anchors and directions that share one storage keep sharing it (see :meth:`joint`)."""
        j = self.joint()
        if j is not None:
            j = j.to(device)
            M = self.anchors.shape[0]
            return ParamSlice(j[:M], j[M:])
        return ParamSlice(self.anchors.to(device), None if self.dirs is None else self.dirs.to(device))


@dataclass
class Points:
    """The K points of one pass. ``anchor_idx`` (K,) int64, ``coefs`` (K, J) in the combine dtype.

    A Points object caches what the shared-input layers derive from it (the anchors it uses and the (K, T)
    mixing matrix, :func:`_bank`), so that a pass over many batches computes them once per chunk of points
    and never synchronizes with the host for them (``torch.unique`` on a CUDA tensor does).
    """

    anchor_idx: torch.Tensor
    coefs: torch.Tensor
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def K(self) -> int:  # noqa: N802 - the paper's symbol
        return self.anchor_idx.shape[0]

    @property
    def J(self) -> int:  # noqa: N802
        return self.coefs.shape[1]

    def to(self, device) -> Points:
        out = Points(self.anchor_idx.to(device), self.coefs.to(device))
        if self.anchor_idx.device.type == "cpu":  # the used anchors, computed where it costs no device sync
            used, pos = self.used_anchors()
            out._cache["used"] = (used.to(device), pos.to(device))
        return out

    def used_anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted distinct anchor indices U, position of each point's anchor in U): ``torch.unique``, cached."""
        if "used" not in self._cache:
            self._cache["used"] = torch.unique(self.anchor_idx, return_inverse=True)
        return self._cache["used"]


def combine_one(anchor: torch.Tensor, dirs: list[torch.Tensor] | torch.Tensor | None, coefs) -> torch.Tensor:
    """One point: ``anchor + sum_j coefs[j] * dirs[j]``, accumulated in order (the oracle's formula)."""
    out = anchor
    if dirs is not None:
        for j in range(len(coefs)):
            out = out + coefs[j] * dirs[j]
    return out


#: From this many directions on, :func:`combine` on a CPU is one (K x J) @ (J x numel) product added to the gathered
#: anchors instead of 2J passes over (K, numel) (benchmarks/bench_many_dirs.py: 13x at J = 4, 27x at J = 16 for a
#: 1024 x 1024 Linear, K = 11, one thread). Below it the loop stays: it is bit-identical to the fused kernels
#: (Triton, csrc), which take J <= 3.
MATMUL_MIN_J = 4


def _ieee_fp32_matmul(device: torch.device) -> bool:
    """Whether fp32 matmuls on ``device`` are exact fp32 (no TF32 / bf16 shortcut a user may have switched on)."""
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    mkl = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    prec = getattr(mkl, "fp32_precision", None)
    return not isinstance(prec, str) or prec in ("", "none", "ieee")


def combine(anchors: torch.Tensor, dirs: torch.Tensor | None, anchor_idx: torch.Tensor,
            coefs: torch.Tensor) -> torch.Tensor:
    """K points of one tensor: (K, *S) with ``W_k = anchors[idx_k] + sum_j coefs[k, j] * dirs[j]``.

    :func:`combine_torch` computes it; on a CPU with the C++ extension built, 0 < J < :data:`MATMUL_MIN_J`
    directions and no gradient to record, ``torch.ops.lerpfast.combine`` computes the same bits in one pass over
    the sources (csrc/lerpfast_ops.cpp; tests/test_csrc.py holds it to :func:`combine_torch` bit for bit) instead
    of the 1 + 2J passes of torch ops over (K, *S): one thread, K = 5, a (640, 160) weight 0.84 -> 0.22 ms, K = 11,
    a (768, 3072) one 100 -> 50 ms.
    """
    if (anchors.device.type == "cpu" and dirs is not None and 0 < coefs.shape[1] < MATMUL_MIN_J
            and dirs.dtype == anchors.dtype and anchors.dtype in _CPU_COMBINE_DTYPES
            and not (torch.is_grad_enabled() and (anchors.requires_grad or dirs.requires_grad or coefs.requires_grad))
            and not torch.compiler.is_compiling()):
        op = _cpu_combine_op()
        if op is not None:
            return op(anchors, dirs, anchor_idx, coefs)
    return combine_torch(anchors, dirs, anchor_idx, coefs)


_CPU_COMBINE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_combine_op():
    """``torch.ops.lerpfast.combine`` when the C++ extension is built (and LERPFAST_CPU_COMBINE is not 0), else None."""
    if os.environ.get("LERPFAST_CPU_COMBINE", "1") == "0":
        return None
    from lerpfast.kernels import ext

    return torch.ops.lerpfast.combine if ext.available() else None


def combine_torch(anchors: torch.Tensor, dirs: torch.Tensor | None, anchor_idx: torch.Tensor,
                  coefs: torch.Tensor) -> torch.Tensor:
    """K points of one tensor: (K, *S) with ``W_k = anchors[idx_k] + sum_j coefs[k, j] * dirs[j]``.

    With J < :data:`MATMUL_MIN_J` directions (or off the CPU) the sum runs over j in order with one rounding per
    term, exactly as :func:`combine_one` and the fused kernels do. With more, on a CPU, the directions are summed
    by one ``addmm`` over the flattened tensor (no autocast, exact fp32 matmul only): the same value up to
    rounding, ~J times less memory traffic. Either way a point with all coefficients 0 is its anchor bit for bit
    (``a + 0 = a``), and the per-point oracle (:meth:`lerpfast.geometry.AffineSlice.state_dict`, ``method="loop"``)
    builds its weights with this same function.
    """
    out = anchors.index_select(0, anchor_idx)  # (K, *S)
    if dirs is None or coefs.shape[1] == 0:
        return out
    coefs = coefs.to(anchors.dtype)
    J = coefs.shape[1]
    if (J >= MATMUL_MIN_J and anchors.dtype in (torch.float32, torch.float64) and dirs.dtype == anchors.dtype
            and _ieee_fp32_matmul(anchors.device)):
        with torch.autocast("cpu", enabled=False):
            flat = out.reshape(out.shape[0], -1)  # a fresh tensor: summed into in place
            flat.addmm_(coefs, dirs.reshape(J, -1))
        return out
    view = (coefs.shape[0],) + (1,) * (anchors.dim() - 1)
    for j in range(J):
        # in place into the gathered anchors (a fresh tensor): one (K, *S) temporary per term instead of two, the
        # same roundings (GPT-2's 124 M weights at K = 11: a 5.5 GB allocation less per batch)
        out.add_(coefs[:, j].reshape(view) * dirs[j])
    return out


def _bank(w: ParamSlice, pts: Points) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct tensors the points mix, (T, *S) = used anchors then directions, and the (K, T) mixing matrix.

    Row k of the matrix holds 1 at point k's anchor and its coefficients at the directions, so a point on an
    anchor gets exactly that anchor's output (1*y + 0*y' rounds to y). When the points use every anchor and the
    slice keeps anchors and directions in one storage (:meth:`ParamSlice.joint`), the bank is that storage:
    no copy per batch (LeNet-300-100's first layer: 2.8 MB per batch). The matrix is cached on ``pts``.
    """
    used, pos = pts.used_anchors()
    with_dirs = w.dirs is not None and pts.J > 0
    joint = w.joint() if with_dirs and used.numel() == w.anchors.shape[0] else None
    if joint is not None:
        bank = joint  # used == arange(M): anchors in order, then the directions
    else:
        parts = [w.anchors.index_select(0, used)]
        if with_dirs:
            parts.append(w.dirs)
        bank = torch.cat(parts, 0)
    key = ("mix", w.anchors.dtype, w.anchors.device, bank.shape[0], with_dirs)
    mix = pts._cache.get(key)
    if mix is None:
        mix = torch.zeros((pts.K, bank.shape[0]), dtype=w.anchors.dtype, device=w.anchors.device)
        mix[torch.arange(pts.K, device=mix.device), pos.to(mix.device)] = 1
        if with_dirs:
            mix[:, used.numel():] = pts.coefs.to(mix)
        pts._cache[key] = mix
    return bank, mix


def _basis_pays(w: ParamSlice, pts: Points) -> bool:
    """Whether a shared input is cheaper in the basis form (the rows times each used anchor and each direction, T
    products) than times the K points' own weights (K products, plus building them): T <= K. Task vectors over
    16 tasks at K = 11 have T = 17 (benchmarks/bench_many_dirs.py: the basis form 1.4x slower there)."""
    used, _ = pts.used_anchors()
    T = used.numel() + (pts.J if w.dirs is not None else 0)
    return T <= pts.K


def _mix(mix: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, T) @ (T, ...) -> (K, ...), in fp32 at least: the coefficients must not be rounded to bf16 by autocast."""
    dt = mix.dtype if mix.dtype == torch.float64 else torch.float32
    y2 = y.reshape(y.shape[0], -1).to(dt)
    with torch.autocast(y.device.type, enabled=False):
        if _owned_outputs():  # into a recycled buffer (engine.buffers; plain torch.empty off the CPU)
            out = torch.matmul(mix.to(dt), y2, out=buffers.empty((mix.shape[0], y2.shape[1]), dt, y.device))
        else:
            out = torch.matmul(mix.to(dt), y2)
    return out.reshape(mix.shape[0], *y.shape[1:])


def _owned_outputs() -> bool:
    """Whether ops may write their outputs in place / into recycled buffers: no autograd graph can be recording
    (sweeps run under inference mode; an in-place op on a recorded output would only raise, never be wrong)."""
    return torch.is_inference_mode_enabled() or not torch.is_grad_enabled()


def _add_bias(out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``out + bias`` (bias broadcast against ``out``), in place on the freshly made ``out`` where allowed."""
    return out.add_(bias) if _owned_outputs() else out + bias


# Bytes of per-point weights a chunk of points may keep across its batches on the CPU (LERPFAST_CPU_WEIGHT_CACHE).
# Small on purpose: kept weights pay off where building them is a large part of a layer's cost (ResNet-18, K = 5:
# 234 MB, 1.6 s -> 0.9 s over 4 batches); for large models the kept gigabytes cost more than they save (ViT-B/32,
# K = 11, 4 batches: 26.5 s for the loop, 35.8 s with 3 GB kept).
CPU_WEIGHT_CACHE = int(os.environ.get("LERPFAST_CPU_WEIGHT_CACHE") or str(256 << 20))


# Memory held across batches is fresh memory, paid for in page faults on first touch (~1 GB/s here), where a
# rebuilt layer reuses the block the previous layer freed: keeping the weights pays from about 4 batches per chunk
# (ViT-B/16, K = 5, 2 batches: 7.2 s rebuilt, 12.3 s kept; ResNet-18, 4 batches: 1.6 s rebuilt, 0.9 s kept).
# The sweep sets pts._cache["batches"] when it knows the number of batches; unknown: never kept.
CACHE_MIN_BATCHES = 4


def cpu_cached(pts: Points, key: tuple, device: torch.device, make):
    """``make()`` (a tensor or a tuple of tensors / None), kept in the points' cache for the chunk's next batches
    when on the CPU and within the :data:`CPU_WEIGHT_CACHE` budget.

    Building a layer's K weight settings costs as much as the layer itself on a small batch (ResNet-18, batches of
    8 images of 64 px: the combine and the BN fold were 2/3 of an engine sweep, which the loop does once per point
    for all batches); on a GPU the kernels combine in registers instead, and memory is scarcer: never cached there.
    """
    if device.type != "cpu" or pts._cache.get("batches", 0) < CACHE_MIN_BATCHES:
        return make()
    hit = pts._cache.get(key)
    if hit is not None:
        return hit
    value = make()
    parts = value if isinstance(value, tuple) else (value,)
    nbytes = sum(t.numel() * t.element_size() for t in parts if t is not None)
    used = pts._cache.get("cpu_weight_bytes", 0)
    if used + nbytes <= CPU_WEIGHT_CACHE:
        pts._cache[key] = value
        pts._cache["cpu_weight_bytes"] = used + nbytes
    return value


def points_bias(b: ParamSlice | None, pts: Points) -> torch.Tensor | None:
    return None if b is None else combine(b.anchors, b.dirs, pts.anchor_idx, pts.coefs)


def lerp_linear(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points,
                shared_input: bool = False) -> torch.Tensor:
    """Multi-point ``F.linear``.

    Parameters
    ----------
    x : (K, N, in), or (N, in) when ``shared_input`` (every point sees the same rows).
    w, b : the weight (M, out, in) / (J, out, in) and bias slices.
    pts : the K points.

    Returns
    -------
    (K, N, out)
    """
    if shared_input and _basis_pays(w, pts):
        # The same N rows for every point: x @ anchor^T and x @ dir_j^T once (|anchors| + J GEMMs over N rows
        # instead of K), then one small GEMM mixes them per point. LeNet-300-100's first layer is 88 % of its FLOPs.
        bank, mix = _bank(w, pts)  # (T, out, in), (K, T)
        y = torch.matmul(x, bank.to(x.dtype).transpose(-1, -2))  # (T, N, out)
        out = _mix(mix, y)
    elif shared_input:  # more tensors in the basis than points (many directions): the K weights, the rows once
        weight = combine(w.anchors, w.dirs, pts.anchor_idx, pts.coefs)  # (K, out, in)
        out = torch.matmul(x, weight.to(x.dtype).transpose(-1, -2))  # (N, in) @ (K, in, out) -> (K, N, out)
    elif (x.device.type == "cpu" and pts.K > 1 and _owned_outputs()
          and w.anchors[0].numel() * max(x.element_size(), w.anchors.element_size()) >= CPU_POINT_WEIGHT_BYTES):
        out = _linear_point_by_point(x, w, pts)
    else:
        weight = cpu_cached(pts, ("linear", id(w.anchors), x.dtype), x.device,
                            lambda: combine(w.anchors, w.dirs, pts.anchor_idx, pts.coefs).to(x.dtype))  # (K, out, in)
        out = torch.bmm(x, weight.transpose(1, 2))  # (K, N, out)
    bias = points_bias(b, pts)
    if bias is not None:
        out = _add_bias(out, bias.to(out.dtype)[:, None, :])
    return out


#: A Linear whose one-point weight is this large is run point by point on a CPU (LERPFAST_CPU_POINT_WEIGHT, bytes).
CPU_POINT_WEIGHT_BYTES = int(os.environ.get("LERPFAST_CPU_POINT_WEIGHT") or str(16 << 20))


def _linear_point_by_point(x: torch.Tensor, w: ParamSlice, pts: Points) -> torch.Tensor:
    """(K, N, in) -> (K, N, out): each point's weight built alone, then its GEMM into the (K, ...) result.

    For a weight far beyond the caches (GPT-2's tied 50257 x 768 output layer: 154 MB a point) the K weights at once
    (1.7 GB at K = 11) buy nothing, since no GEMM reuses them from cache, and cost K times the memory, fresh pages
    included; point by point is what the loop does with one model, without its copy into the model.
    """
    K, N = x.shape[:2]
    out = buffers.empty((K, N, w.anchors.shape[1]), x.dtype, x.device)
    for k in range(K):
        wk = combine(w.anchors, w.dirs, pts.anchor_idx[k:k + 1], pts.coefs[k:k + 1])[0].to(x.dtype)  # (out, in)
        torch.mm(x[k], wk.t(), out=out[k])
        del wk  # its block serves the next point's weight
    return out


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def lerp_conv(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points, stride, padding, dilation,
              groups: int, shared_input: bool = False) -> torch.Tensor:
    """Multi-point convolution (1-3 d): on CUDA one grouped convolution with the points folded into channels,
    on the CPU :func:`conv_per_point`; a shared input is convolved once with the anchors and directions.

    Parameters
    ----------
    x : (K, N, C, *spatial), or (N, C, *spatial) when ``shared_input``.
    w : weight slice, anchors (M, O, C/groups, *kernel).

    Returns
    -------
    (K, N, O, *spatial_out)
    """
    nd = w.anchors.dim() - 3
    conv = CONV[nd]
    K = pts.K
    if shared_input:
        # Convolution is linear in the weights: convolve the N shared rows with the used anchors and the J
        # directions once, then mix per point with one small GEMM. With more of them than points (many
        # directions), convolve the rows once with the K points' own weights instead.
        if _basis_pays(w, pts):
            bank, mix = _bank(w, pts)  # (T, O, C/g, *k), (K, T)
        else:
            bank, mix = combine(w.anchors, w.dirs, pts.anchor_idx, pts.coefs), None  # (K, O, C/g, *k)
        T, n_out = bank.shape[:2]
        if groups == 1:  # one ordinary conv with T*O output channels
            y = conv(x, bank.reshape(T * n_out, *bank.shape[2:]).to(x.dtype), None, stride, padding, dilation)
            y = y.reshape(y.shape[0], T, n_out, *y.shape[2:]).transpose(0, 1)  # (T, N, O, *sp)
        else:
            xt = x.unsqueeze(0).expand(T, *x.shape)
            y = _grouped(conv, xt, bank.to(x.dtype), None, stride, padding, dilation, groups)  # (T, N, O, *sp)
        out = y if mix is None else _mix(mix, y)
    elif x.device.type == "cpu":
        return conv_per_point(x, w, b, pts, stride, padding, dilation, groups)
    else:
        weight = combine(w.anchors, w.dirs, pts.anchor_idx, pts.coefs).to(x.dtype)  # (K, O, C/g, *k)
        out = _grouped(conv, x, weight, None, stride, padding, dilation, groups)
    bias = points_bias(b, pts)
    if bias is not None:
        out = _add_bias(out, bias.to(out.dtype).reshape((K, 1, -1) + (1,) * nd))
    return out


def conv_per_point(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points, stride, padding, dilation,
                   groups: int, *, bn: tuple[torch.Tensor, torch.Tensor] | None = None,
                   residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """(K, N, C, *sp) -> (K, N, O, *sp'): one convolution per point with that point's weights, the CPU layout.

    On a CPU a convolution of one point's batch is compute-bound and its output still sits in cache, while the
    grouped form (points folded into channels) needs transposes in and out and a slower grouped kernel, and
    streams K-times-larger activations through memory. Each point's conv reads its own contiguous block
    ``x[k]``. The epilogue (per-channel affine ``bn`` = (scale, shift) of shape (K, O), + ``residual`` of the
    output's shape, ReLU) costs no extra pass where it can be avoided: the affine is folded into the point's
    weights and bias (``W * scale``, ``b * scale + shift``: the same map, rounded differently by one ulp-level
    step), and the residual add or the ReLU writes the output straight into the (K, ...) result while it is hot.
    """
    conv = CONV[w.anchors.dim() - 3]

    def weights():  # (K, O, C/g, *k), (K, O) or None: the points' weights and biases, BN folded in
        weight = combine(w.anchors, w.dirs, pts.anchor_idx, pts.coefs).to(x.dtype)
        bias = points_bias(b, pts)
        bias = None if bias is None else bias.to(x.dtype)
        if bn is not None:
            scale, shift = bn[0].to(x.dtype), bn[1].to(x.dtype)
            weight = weight * scale.reshape(scale.shape + (1,) * (weight.dim() - 2))
            bias = shift if bias is None else torch.addcmul(shift, bias, scale)
        return weight, bias

    key = ("conv", id(w.anchors), x.dtype, None if bn is None else id(bn[0]))
    weight, bias = cpu_cached(pts, key, x.device, weights)
    K = x.shape[0]
    rows = _gemm_rows(x, weight, stride, padding, groups)
    if rows is not None:
        # a 1x1 convolution that is a linear map of each position's channels, as one batched GEMM over the points
        # straight into the (K, ...) result: no per-point output to copy into it. Taken for 1x1 maps (squeeze-and-
        # excitation gates, heads after global pooling; K = 5, 8 rows, 1152 -> 48 channels, 1 thread: 173 us as 5
        # convolutions, 51 us as one GEMM) and channels-last inputs (timm ConvNeXt's MLP; K = 5, 8 images of 32x32,
        # 40 -> 160 channels: 6.9 ms as 5 convolutions + 4.3 ms copying their outputs, 8.0 ms as one GEMM); a
        # channels-first input with a larger map stays a convolution (its GEMM is a batch of small products).
        ws = weight.reshape(K, weight.shape[1], -1).transpose(1, 2)  # (K, C, O)
        y = torch.bmm(rows, ws) if bias is None else torch.baddbmm(bias[:, None, :], rows, ws)  # (K, N * P, O)
        sp = x.shape[3:]
        out = y.view(K, x.shape[1], *sp, weight.shape[1]).movedim(-1, 2)  # (K, N, O, *sp), channels-last blocks
        if residual is not None:
            out = out.add_(residual.to(out.dtype)) if _owned_outputs() else out + residual.to(out.dtype)
        if relu:
            out = out.clamp_min_(0) if _owned_outputs() else torch.relu(out)
        return out
    if not _owned_outputs():
        # autograd records (lerpfast.fit_curve): unbind / stack instead of x[k] and writes into out[k], whose
        # backward would build a zero-filled (K, ...) tensor per point (ResNet-20, T = 8: 3.0 s of a 4.4 s step)
        ys = []
        for k, xk in enumerate(x.unbind(0)):
            y = conv(xk, weight[k], None if bias is None else bias[k], stride, padding, dilation, groups)
            if residual is not None:
                y = y + residual[k].to(y.dtype)
            ys.append(torch.relu(y) if relu else y)
        return torch.stack(ys)
    out = None
    for k in range(K):
        y = conv(x[k], weight[k], None if bias is None else bias[k], stride, padding, dilation, groups)
        if out is None:
            out = _points_empty(K, y)
        if residual is not None:
            torch.add(y, residual[k].to(y.dtype), out=out[k])
            if relu:
                out[k].clamp_min_(0)
        elif relu:
            torch.clamp_min(y, 0, out=out[k])
        else:
            out[k].copy_(y)
    return out


def _points_empty(K: int, y: torch.Tensor) -> torch.Tensor:
    """An empty (K, *y.shape) tensor (recycled within a sweep, :mod:`lerpfast.engine.buffers`) whose every [k] has
    ``y``'s memory layout: a channels-last conv output (timm ConvNeXt's blocks hand their convolutions channels-last
    inputs) is copied into it as it lies, not transposed on the way (timm convnext_atto: 14 % of an engine sweep)."""
    order = sorted(range(y.dim()), key=lambda d: (-y.stride(d), d))  # outermost to innermost axis in memory
    if order == list(range(y.dim())) or y.stride(order[-1]) != 1:
        return buffers.empty((K, *y.shape), y.dtype, y.device)
    buf = buffers.empty((K, *(y.shape[d] for d in order)), y.dtype, y.device)
    return buf.permute(0, *(1 + order.index(d) for d in range(y.dim())))


def _gemm_rows(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> torch.Tensor | None:
    """(K, N * P, C) rows of ``x`` (K, N, C, *sp) when its convolution with ``weight`` is a linear map of each
    position's C channels that one GEMM per point computes; else None.

    That needs a 1x1 kernel, no zero padding ('same' and 'valid' pad nothing for a 1x1 kernel), one group, and either
    1x1 maps (any stride or dilation), or unit stride over channels-last points (x[k] laid out (N, *sp, C)) or over
    maps of at most :data:`GEMM_CONV_MAX_POSITIONS` positions (copied to rows)."""
    if groups != 1 or any(k != 1 for k in weight.shape[3:]):
        return None
    if not isinstance(padding, str) and any(padding if isinstance(padding, (tuple, list)) else (padding,)):
        return None
    K, N, C = x.shape[:3]
    if all(n == 1 for n in x.shape[3:]):
        return x.reshape(K, N, C)
    if any(s != 1 for s in (stride if isinstance(stride, (tuple, list)) else (stride,))):
        return None
    last = x.movedim(2, -1)  # (K, N, *sp, C)
    if last.is_contiguous():
        return last.view(K, -1, C)
    # small channels-first maps: the copy to rows is cheap and torch's own convolution of them is its slow
    # im2col path (EfficientNet-B0's 2x2 and 4x4 stages, K = 5, 8 images: 192 -> 1152 channels at 2x2 3.0 ms as 5
    # convolutions + copies, 0.8 ms as copy + GEMM; 512 -> 2048 at 4x4 14.4 -> 9.8 ms; from 8x8 on mkldnn's
    # convolution is as fast or faster: 1024 -> 256 at 8x8 9.5 ms against 12.5 ms)
    return last.reshape(K, -1, C) if math.prod(x.shape[3:]) <= GEMM_CONV_MAX_POSITIONS else None


#: Channels-first maps of at most this many positions convolve 1x1 as copy + GEMM (see :func:`_gemm_rows`).
GEMM_CONV_MAX_POSITIONS = 16


def _grouped(conv, x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups: int):
    """(K, N, C, *sp) x (K, O, C/g, *k) -> (K, N, O, *sp') as one conv with groups = K * groups."""
    K, N, C = x.shape[:3]
    sp = x.shape[3:]
    xin = x.transpose(0, 1).reshape(N, K * C, *sp)  # (N, K*C, *sp): points folded into channels
    wk = weight.reshape(K * weight.shape[1], *weight.shape[2:])
    y = conv(xin, wk, bias, stride, padding, dilation, groups * K)  # (N, K*O, *sp')
    return y.reshape(N, K, weight.shape[1], *y.shape[2:]).transpose(0, 1)
