"""Multi-point conv2d as an implicit GEMM on channels-last activations, point weights built in registers.

For point k the GEMM is (N*OH*OW rows) x (CO cols) with reduction over (KH, KW, C): each program owns a
(BLOCK_M rows, BLOCK_O channels) output tile of one point, walks the KH*KW filter taps and the input channels
in BLOCK_C steps in one loop (KH, KW are runtime values: one compiled kernel for 1x1, 3x3 and 7x7 filters,
and a loop body compiled once, not KH*KW times), gathers the shifted input rows (zero padding by masking, no
im2col buffer) and builds the (BLOCK_C, BLOCK_O) weight tile ``anchors[idx_k] + sum_j c_kj dirs[j]`` in fp32
registers. The K weight copies are never written: for ResNet-20 at K = 64 materializing them costs
64 x 1.1 MB fp32 per batch.

Activations are read channels_last (NHWC; other layouts are copied first) so the C-contiguous gathers
coalesce and every call compiles to the same variant, and the output is written NHWC, i.e. the returned
(K, N, CO, OH, OW) tensor is channels_last for the next layer. Epilogue: + bias, eval-mode BN as a per-point
affine map (BN folded into the weights and bias of each point: ``s*W, s*b + t``), + residual, ReLU — what a
ResNet basic block needs after each conv.

Shared input (the first conv of a sweep): the basis products ``conv(x, anchor_used)``, ``conv(x, dir_j)``
are computed once over the N shared images and mixed per point by ``lerp_mix`` (same epilogue).

Scope: 2-D, groups = 1; everything else goes to the torch path via the dispatcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from lerpfast.kernels import tiles
from lerpfast.kernels._common import (
    EPILOGUE_FLAGS,
    INTERPRET,
    as_operand,
    bias_bn,
    combine_tile,
    dot_code,
    epilogue_flags,
    finish,
    load_coefs,
    mma,
    points_coefs,
)
from lerpfast.kernels._ref import combine_ref_dtype as _combine_ref
from lerpfast.kernels._ref import epilogue_ref
from lerpfast.kernels.launch import kernel, launch
from lerpfast.kernels.lerp_linear import _bias_args, _bn_args, _check_points, lerp_mix

__all__ = ["lerp_conv2d", "lerp_conv2d_ref", "conv_out_size"]


@kernel("NP", "H", "W", "OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W",
        *EPILOGUE_FLAGS)
def _lerp_conv2d_fwd_kernel(
    X_ptr, stride_xk, stride_xn, stride_xc, stride_xh, stride_xw,
    WA_ptr, stride_wam, stride_wao, stride_wac, stride_wah, stride_waw,
    WD_ptr, stride_wdj, stride_wdo, stride_wdc, stride_wdh, stride_wdw,
    BA_ptr, stride_bam, BD_ptr, stride_bdj,
    IDX_ptr, C_ptr, stride_ck,
    SCALE_ptr, SHIFT_ptr, stride_sk,
    RES_ptr, stride_rk, stride_rn, stride_ro, stride_rh, stride_rw,
    Y_ptr, stride_yk, stride_yn, stride_yo, stride_yh, stride_yw,
    NP, C, H, W, CO, OH, OW, KH, KW,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    HAS_BN, HAS_RES, RELU,
    J: tl.constexpr, JB: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr, EMULATE_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    num_o = tl.cdiv(CO, BLOCK_O)
    pid_m = pid // num_o
    pid_o = pid % num_o
    a = tl.load(IDX_ptr + k).to(tl.int64)
    c0, c1, c2 = load_coefs(C_ptr, k, stride_ck, J)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel index over (N, OH, OW), int64
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rc = tl.arange(0, BLOCK_C)
    mask_m = rm < NP
    mask_o = ro < CO
    n = rm // (OH * OW)
    rem = rm % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    x_base = X_ptr + k * stride_xk + n * stride_xn  # (BLOCK_M,)
    wa_base = WA_ptr + a * stride_wam + ro[None, :] * stride_wao + rc[:, None] * stride_wac  # (BLOCK_C, BLOCK_O)
    wd_base = WD_ptr + ro[None, :] * stride_wdo + rc[:, None] * stride_wdc
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W

    # One loop over (filter tap, channel block): a single pipelined loop body whatever the filter size (KH, KW
    # are runtime values: 1x1, 3x3 and 7x7 convolutions share one compiled kernel, and the body is not
    # unrolled KH*KW times, which is what made the compile slow).
    n_cb = tl.cdiv(C, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for t in range(0, KH * KW * n_cb):
        tap = t // n_cb
        c_start = (t - tap * n_cb) * BLOCK_C
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r * DIL_H
        iw = iw0 + s * DIL_W
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        mask_c = (c_start + rc) < C
        x_ptrs = (x_base + ih * stride_xh + iw * stride_xw)[:, None] + (c_start + rc)[None, :] * stride_xc
        xt = tl.load(x_ptrs, mask=valid[:, None] & mask_c[None, :], other=0.0)
        mw = mask_c[:, None] & mask_o[None, :]
        w = combine_tile(wa_base + r * stride_wah + s * stride_waw + c_start * stride_wac,
                         wd_base + r * stride_wdh + s * stride_wdw + c_start * stride_wdc, stride_wdj, mw,
                         c0, c1, c2, J)  # fp32 combine, any compute dtype
        acc = mma(as_operand(xt, DOT, EMULATE_BF16), as_operand(w, DOT, EMULATE_BF16), acc, DOT, EMULATE_BF16)

    acc = bias_bn(acc, k, a, ro, mask_o, c0, c1, c2, BA_ptr, stride_bam, BD_ptr, stride_bdj, SCALE_ptr, SHIFT_ptr,
                  stride_sk, HAS_BIAS, JB, HAS_BN)
    mask = mask_m[:, None] & mask_o[None, :]
    if HAS_RES:
        r_off = k * stride_rk + n * stride_rn + oh * stride_rh + ow * stride_rw
        acc += tl.load(RES_ptr + r_off[:, None] + ro[None, :] * stride_ro, mask=mask, other=0.0).to(tl.float32)
    acc = finish(acc, RELU, OUT_BF16, EMULATE_BF16)
    y_off = k * stride_yk + n * stride_yn + oh * stride_yh + ow * stride_yw
    tl.store(Y_ptr + y_off[:, None] + ro[None, :] * stride_yo, acc.to(Y_ptr.dtype.element_ty), mask=mask)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(t) for t in v)
    return v if len(v) == 2 else (v[0], v[0])


def conv_out_size(h: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of one spatial axis (PyTorch's formula)."""
    return (h + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _empty_nhwc(K, N, CO, OH, OW, dtype, device) -> torch.Tensor:
    # Allocated (K, N, OH, OW, CO) and viewed (K, N, CO, OH, OW): channels_last for the next conv, and
    # reshape(K*N, CO, OH, OW) stays a view.
    return torch.empty((K, N, OH, OW, CO), dtype=dtype, device=device).permute(0, 1, 4, 2, 3)


_CL_WEIGHTS = WeakIdKeyDictionary()  # weight tensor -> (its version, the same weights stored (.., CO, KH, KW, C))


def _channels_last_weights(w: torch.Tensor) -> torch.Tensor:
    """``w`` (M, CO, C, KH, KW) as a view with strides ``(CO*KH*KW*C, KH*KW*C, 1, KW*C, C)``, i.e. stored
    (M, CO, KH, KW, C); copied once per weight tensor when it is not stored that way.

    C-contiguous weight tiles load coalesced, and every filter size has the same stride pattern (C-stride 1,
    the others multiples of C), so 1x1, 3x3 and 7x7 convolutions share one compiled kernel.
    """
    M, CO, C, KH, KW = w.shape
    want = (CO * KH * KW * C, KH * KW * C, 1, KW * C, C)
    if w.stride() == want:
        return w
    if w.permute(0, 1, 3, 4, 2).is_contiguous():  # same addresses; only strides of size-1 dims differ
        return w.as_strided(w.shape, want, w.storage_offset())
    cacheable = not (w.is_inference() or torch.compiler.is_compiling())  # inference tensors have no version
    hit = _CL_WEIGHTS.get(w) if cacheable else None
    if hit is not None and hit[0] == w._version:
        return hit[1]
    cl = w.permute(0, 1, 3, 4, 2).contiguous().as_strided(w.shape, want)
    if cacheable:
        _CL_WEIGHTS[w] = (w._version, cl)
    return cl


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) activations as a view with channels-last strides (C-stride 1, W-stride C, H-stride W*C, ...);
    copied when not stored that way."""
    perm = (*range(t.dim() - 3), t.dim() - 2, t.dim() - 1, t.dim() - 3)
    if not t.permute(perm).is_contiguous():
        t = t.permute(perm).contiguous().permute(*range(t.dim() - 3), t.dim() - 1, t.dim() - 3, t.dim() - 2)
    C, H, W = t.shape[-3:]
    lead, step = [], H * W * C
    for n in reversed(t.shape[:-3]):
        lead.insert(0, step)
        step *= n
    want = (*lead, 1, W * C, C)
    return t if t.stride() == want else t.as_strided(t.shape, want, t.storage_offset())


def _conv_launch(x5, wa, wd, ba, bd, anchor_idx, coefs, stride, padding, dilation, bn, residual, relu, dot, out):
    K, N, C, H, W = x5.shape
    CO, Cw, KH, KW = wa.shape[1:]
    if Cw != C:
        raise ValueError(f"groups != 1 is not supported by the Triton conv (weight has {Cw} of {C} channels)")
    OH, OW = out.shape[3], out.shape[4]
    J = _check_points(anchor_idx, coefs, wd)
    dummy = wa
    c = points_coefs(coefs[:, :J] if J else coefs, J)
    wd_ = wd if J else dummy
    wds = wd_.stride() if J else (0,) * 5
    bap, sba, bdp, sbd, JB = _bias_args(ba, bd, J, dummy)
    s_args = _bn_args(bn, K, CO, dummy)
    r = residual if residual is not None else out  # never read without one: see lerp_linear._epi_args
    r_args = (r, *r.stride())
    NP = N * OH * OW
    tile = tiles.conv2d(NP, C, CO, KH * KW, dot)
    args = (x5, *x5.stride(),
            wa, *wa.stride(),
            wd_, *wds,
            bap, sba, bdp, sbd,
            anchor_idx, c, c.stride(0),
            *s_args,
            *r_args,
            out, *out.stride(),
            NP, C, H, W, CO, OH, OW, KH, KW,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *epilogue_flags(bn, residual, relu))
    consts = dict(J=J, JB=JB, HAS_BIAS=ba is not None, DOT=dot, EMULATE_BF16=INTERPRET,
                  OUT_BF16=out.dtype == torch.bfloat16)
    launch(_lerp_conv2d_fwd_kernel, lambda b: (triton.cdiv(NP, b["BLOCK_M"]) * triton.cdiv(CO, b["BLOCK_O"]), K),
           args, consts, tile)
    return out


def lerp_conv2d(x: torch.Tensor, w_anchors: torch.Tensor, w_dirs: torch.Tensor | None, anchor_idx: torch.Tensor,
                coefs: torch.Tensor, b_anchors: torch.Tensor | None = None, b_dirs: torch.Tensor | None = None,
                stride=1, padding=0, dilation=1, *, shared_input: bool = False,
                bn: tuple[torch.Tensor, torch.Tensor] | None = None, residual: torch.Tensor | None = None,
                relu: bool = False, precision: str | None = None,
                used: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Fused multi-point conv2d (Triton implicit GEMM, groups = 1).

    Parameters
    ----------
    x : (K, N, C, H, W), or (N, C, H, W) with ``shared_input``; best in channels_last memory.
    w_anchors : (M, CO, C, KH, KW); w_dirs : (J, CO, C, KH, KW) or None.
    anchor_idx : (K,) int64; coefs : (K, J).
    b_anchors, b_dirs : (M, CO), (J, CO) or None.
    stride, padding, dilation : int or pair (padding is explicit; 'same' strings are resolved by the caller).
    bn : per-point BN fold (scale, shift), each (K, CO); residual : (K, N, CO, OH, OW); relu : ReLU last.
    precision : "fp32" | "tf32" | "bf16" or None (follow x's dtype and torch's tf32 setting).
    used : ``torch.unique(anchor_idx, return_inverse=True)`` when the caller has it (shared input; saves a sync).

    x and residual are read in channels_last memory (NHWC): in any other layout they are copied first, so the
    kernel always sees the same stride pattern (one compiled variant, whichever path produced its input).

    Returns
    -------
    (K, N, CO, OH, OW) in x's dtype, channels_last memory.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    K = anchor_idx.shape[0]
    CO, _, KH, KW = w_anchors.shape[1:]
    dot = dot_code(x.dtype, precision)
    J = _check_points(anchor_idx, coefs, w_dirs)
    anchor_idx = anchor_idx.contiguous()
    N, H, W = x.shape[-4], x.shape[-2], x.shape[-1]
    OH = conv_out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, KW, stride[1], padding[1], dilation[1])
    x = _nhwc(x)
    residual = _nhwc(residual) if residual is not None else None
    wa = _channels_last_weights(w_anchors)
    wd = _channels_last_weights(w_dirs) if (J and w_dirs is not None) else w_dirs
    if shared_input:
        used, pos = used if used is not None else torch.unique(anchor_idx, return_inverse=True)
        Mu = used.numel()
        T = Mu + J
        if T < K:
            basis = _empty_nhwc(T, N, CO, OH, OW, torch.float32, x.device)
            dev = x.device
            # the used anchors, selected in the stored (M, CO, KH, KW, C) order: stays channels-last, no copy
            w_used = wa if Mu == wa.shape[0] else (
                wa.permute(0, 1, 3, 4, 2).index_select(0, used.to(dev)).permute(0, 1, 4, 2, 3))
            _conv_launch(x.unsqueeze(0).expand(Mu, *x.shape), w_used, None, None, None,
                         torch.arange(Mu, device=dev), torch.zeros((Mu, 1), device=dev), stride, padding, dilation,
                         None, None, False, dot, basis[:Mu])
            if J:
                _conv_launch(x.unsqueeze(0).expand(J, *x.shape), wd[:J], None, None, None,
                             torch.arange(J, device=dev), torch.zeros((J, 1), device=dev), stride, padding, dilation,
                             None, None, False, dot, basis[Mu:])
            out = _empty_nhwc(K, N, CO, OH, OW, x.dtype, x.device)
            as3 = lambda t: t.permute(0, 1, 3, 4, 2).reshape(t.shape[0], N * OH * OW, CO)  # views when NHWC
            res3 = as3(residual) if residual is not None else None
            lerp_mix(as3(basis), pos, Mu, anchor_idx, coefs, b_anchors, b_dirs, bn=bn, residual=res3, relu=relu,
                     out=as3(out))
            return out
        x = x.unsqueeze(0).expand(K, *x.shape)
    out = _empty_nhwc(K, N, CO, OH, OW, x.dtype, x.device)
    return _conv_launch(x, wa, wd, b_anchors, b_dirs, anchor_idx, coefs, stride, padding, dilation, bn, residual, relu,
                        dot, out)


def lerp_conv2d_ref(x, w_anchors, w_dirs, anchor_idx, coefs, b_anchors=None, b_dirs=None, stride=1, padding=0,
                    dilation=1, *, shared_input=False, bn=None, residual=None, relu=False,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference of :func:`lerp_conv2d`: materialize W_k, one conv per point, epilogue, in ``dtype``."""
    cdt = dtype or x.dtype
    wdt = dtype or torch.float32
    w = _combine_ref(w_anchors, w_dirs, anchor_idx, coefs, wdt).to(cdt)  # (K, CO, C, KH, KW)
    b = _combine_ref(b_anchors, b_dirs, anchor_idx, coefs, wdt).to(cdt) if b_anchors is not None else None
    K = w.shape[0]
    ys = []
    for k in range(K):
        xk = x if shared_input else x[k]
        ys.append(torch.nn.functional.conv2d(xk.to(cdt), w[k], None if b is None else b[k], _pair(stride),
                                             _pair(padding), _pair(dilation)))
    y = torch.stack(ys)  # (K, N, CO, OH, OW)
    if bn is not None:
        bn = tuple(t.to(wdt) for t in bn)
    return epilogue_ref(y, bn, residual, relu, channel_dim=2)
