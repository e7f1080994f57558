"""Multi-point linear layer: ``y[k] = epilogue(x[k] @ W_k^T + b_k)`` with ``W_k`` built in registers.

``W_k = anchors[anchor_idx[k]] + sum_j coefs[k, j] * dirs[j]`` is never written to memory: each program loads
the anchor tile and the J direction tiles of its (in, out) block, combines them in fp32 and feeds the
result straight to the MMA. For K = 64 points of a 300x784 layer that saves writing and re-reading
64 x 0.94 MB of fp32 weights per batch, which at LeNet sizes is as much traffic as the activations.

Two forms:

* per-point input, x (K, N, in): one grouped GEMM, grid (row tiles x out tiles, K);
* shared input, x (N, in) for every point (the first layer of a sweep): the basis GEMM
  ``x @ [anchors_used; dirs]^T`` runs once over N rows (T = M_used + J products instead of K), then
  :func:`_lerp_mix_kernel` mixes the T products per point and applies the epilogue. For LeNet-300-100's
  first layer (88 % of its FLOPs) at K = 64, J = 1 that is 3 GEMMs instead of 64.

The epilogue is shared by both forms: + bias_k, then eval-mode batch norm as a per-point affine map
(``y * scale[k] + shift[k]``, i.e. BN folded into the point's weights and bias: ``s*W, s*b + t``), then
+ residual, then ReLU. :func:`lerp_linear_ref` is the torch reference (float64 capable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
from lerpfast.kernels._ref import bn_fold, epilogue_ref
from lerpfast.kernels._ref import combine_ref_dtype as _combine_ref
from lerpfast.kernels.launch import kernel, launch

__all__ = ["lerp_linear", "lerp_linear_ref", "lerp_mix", "lerp_mix_ref", "bn_fold", "epilogue_ref"]


@kernel("N", *EPILOGUE_FLAGS)
def _lerp_linear_fwd_kernel(
    X_ptr, stride_xk, stride_xn, stride_xi,
    WA_ptr, stride_wam, stride_wao, stride_wai,
    WD_ptr, stride_wdj, stride_wdo, stride_wdi,
    BA_ptr, stride_bam, BD_ptr, stride_bdj,
    IDX_ptr, C_ptr, stride_ck,
    SCALE_ptr, SHIFT_ptr, stride_sk,
    RES_ptr, stride_rk, stride_rn, stride_ro,
    Y_ptr, stride_yk, stride_yn, stride_yo,
    N, IN, OUT,
    HAS_BN, HAS_RES, RELU,
    J: tl.constexpr, JB: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr, EMULATE_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    num_o = tl.cdiv(OUT, BLOCK_O)
    pid_n = pid // num_o
    pid_o = pid % num_o
    a = tl.load(IDX_ptr + k).to(tl.int64)
    c0, c1, c2 = load_coefs(C_ptr, k, stride_ck, J)  # once per program, not once per reduction step

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = tl.arange(0, BLOCK_I)
    mask_n = rn < N
    mask_o = ro < OUT
    x_ptrs = X_ptr + k * stride_xk + rn[:, None] * stride_xn + ri[None, :] * stride_xi  # (BLOCK_N, BLOCK_I)
    # W^T tiles (BLOCK_I, BLOCK_O) of the anchor and of each direction.
    wa_ptrs = WA_ptr + a * stride_wam + ro[None, :] * stride_wao + ri[:, None] * stride_wai
    wd_ptrs = WD_ptr + ro[None, :] * stride_wdo + ri[:, None] * stride_wdi

    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        mask_i = (i0 + ri) < IN
        xt = tl.load(x_ptrs, mask=mask_n[:, None] & mask_i[None, :], other=0.0)
        mw = mask_i[:, None] & mask_o[None, :]
        w = combine_tile(wa_ptrs, wd_ptrs, stride_wdj, mw, c0, c1, c2, J)  # fp32 combine, any compute dtype
        acc = mma(as_operand(xt, DOT, EMULATE_BF16), as_operand(w, DOT, EMULATE_BF16), acc, DOT, EMULATE_BF16)
        x_ptrs += BLOCK_I * stride_xi
        wa_ptrs += BLOCK_I * stride_wai
        wd_ptrs += BLOCK_I * stride_wdi

    acc = bias_bn(acc, k, a, ro, mask_o, c0, c1, c2, BA_ptr, stride_bam, BD_ptr, stride_bdj, SCALE_ptr, SHIFT_ptr,
                  stride_sk, HAS_BIAS, JB, HAS_BN)
    mask = mask_n[:, None] & mask_o[None, :]
    if HAS_RES:
        r_ptrs = RES_ptr + k * stride_rk + rn[:, None] * stride_rn + ro[None, :] * stride_ro
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = finish(acc, RELU, OUT_BF16, EMULATE_BF16)
    y_ptrs = Y_ptr + k * stride_yk + rn[:, None] * stride_yn + ro[None, :] * stride_yo
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=mask)


@kernel("R", "TA", *EPILOGUE_FLAGS)
def _lerp_mix_kernel(
    B_ptr, stride_bt, stride_br, stride_bo,
    POS_ptr, C_ptr, stride_ck,
    BA_ptr, stride_bam, BD_ptr, stride_bdj, IDX_ptr,
    SCALE_ptr, SHIFT_ptr, stride_sk,
    RES_ptr, stride_rk, stride_rr, stride_ro,
    Y_ptr, stride_yk, stride_yr, stride_yo,
    R, OUT, TA,
    HAS_BN, HAS_RES, RELU,
    J: tl.constexpr, JB: tl.constexpr, HAS_BIAS: tl.constexpr,
    EMULATE_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """y[k, r, o] = epilogue(basis[pos[k], r, o] + sum_j c[k, j] * basis[TA + j, r, o] + bias_k[o])."""
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    num_o = tl.cdiv(OUT, BLOCK_O)
    rr = (pid // num_o) * BLOCK_R + tl.arange(0, BLOCK_R)
    ro = (pid % num_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = ro < OUT
    mask = (rr < R)[:, None] & mask_o[None, :]
    off = rr[:, None] * stride_br + ro[None, :] * stride_bo
    t = tl.load(POS_ptr + k).to(tl.int64)
    c0, c1, c2 = load_coefs(C_ptr, k, stride_ck, J)
    acc = combine_tile(B_ptr + t * stride_bt + off, B_ptr + TA * stride_bt + off, stride_bt, mask, c0, c1, c2, J)
    a = tl.load(IDX_ptr + k).to(tl.int64)
    acc = bias_bn(acc, k, a, ro, mask_o, c0, c1, c2, BA_ptr, stride_bam, BD_ptr, stride_bdj, SCALE_ptr, SHIFT_ptr,
                  stride_sk, HAS_BIAS, JB, HAS_BN)
    if HAS_RES:
        acc += tl.load(RES_ptr + k * stride_rk + rr[:, None] * stride_rr + ro[None, :] * stride_ro,
                       mask=mask, other=0.0).to(tl.float32)
    acc = finish(acc, RELU, OUT_BF16, EMULATE_BF16)
    tl.store(Y_ptr + k * stride_yk + rr[:, None] * stride_yr + ro[None, :] * stride_yo,
             acc.to(Y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- wrappers


def _check_points(anchor_idx: torch.Tensor, coefs: torch.Tensor, dirs: torch.Tensor | None) -> int:
    J = coefs.shape[1] if dirs is not None else 0
    if J > 3:
        raise ValueError(f"fused kernels take J <= 3 directions, got {J}")
    if dirs is not None and dirs.shape[0] < J:
        raise ValueError(f"coefs has {J} columns but dirs only {dirs.shape[0]} entries")
    return J


def _bias_args(b_anchors, b_dirs, J, dummy):
    if b_anchors is None:
        return dummy, 0, dummy, 0, 0
    JB = J if b_dirs is not None else 0
    bd = b_dirs if b_dirs is not None else dummy
    return b_anchors, b_anchors.stride(0), bd, (bd.stride(0) if JB else 0), JB


def _bn_args(bn, K, OUT, dummy):
    """Kernel arguments (scale, shift, row stride) of a per-point BN fold (scale, shift), each (K, OUT), or None."""
    if bn is None:
        return dummy, dummy, OUT  # the row stride a real (K, OUT) fold has: same JIT specialization
    scale, shift = (t.to(torch.float32).contiguous() for t in bn)
    if scale.shape != (K, OUT) or shift.shape != (K, OUT):
        raise ValueError(f"bn scale/shift must be (K, out) = ({K}, {OUT}), got {tuple(scale.shape)}, "
                         f"{tuple(shift.shape)}")
    return scale, shift, scale.stride(0)


def _epi_args(bn, residual3, K, OUT, dummy, out):
    """bn: (scale (K, OUT), shift (K, OUT)) fp32 or None; residual3: (K, R, OUT) view or None.

    Without a residual the output stands in for it (never read: HAS_RES is off): its dtype and strides are those
    a residual would have, so layers with and without one share a compiled kernel (a dummy with strides 0
    would differ in the JIT's specialization: a stride of 1 is a constant, 0 is not)."""
    s_args = _bn_args(bn, K, OUT, dummy)
    r = residual3 if residual3 is not None else out
    return s_args, (r, r.stride(0), r.stride(1), r.stride(2))


def lerp_mix(basis: torch.Tensor, pos: torch.Tensor, n_anchor_rows: int, anchor_idx: torch.Tensor,
             coefs: torch.Tensor, b_anchors: torch.Tensor | None = None, b_dirs: torch.Tensor | None = None,
             bn: tuple[torch.Tensor, torch.Tensor] | None = None, residual: torch.Tensor | None = None,
             relu: bool = False, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mix per point the products of a shared input with the anchors and directions, then the epilogue.

    Parameters
    ----------
    basis : (T, R, out) products; rows ``pos[k]`` hold point k's anchor, rows ``n_anchor_rows + j`` direction j.
    pos : (K,) int64 row of ``basis`` holding each point's anchor product.
    anchor_idx, coefs : the points (K,), (K, J); J = basis.shape[0] - n_anchor_rows.
    b_anchors, b_dirs : bias slice (M, out), (J, out) or None.
    bn : per-point batch-norm fold (scale, shift), each (K, out), or None.
    residual : (K, R, out) added before the ReLU, or None.
    out : optional (K, R, out) output view (any strides); else a contiguous tensor of ``out_dtype``.

    Returns
    -------
    (K, R, out)
    """
    T, R, OUT = basis.shape
    K = anchor_idx.shape[0]
    J = T - n_anchor_rows
    if out is None:
        out = torch.empty((K, R, OUT), dtype=out_dtype or basis.dtype, device=basis.device)
    dummy = basis
    c = points_coefs(coefs[:, :J] if J else coefs, J)
    ba, sba, bd, sbd, JB = _bias_args(b_anchors, b_dirs, J, dummy)
    (sc, sh, ssk), (res, srk, srr, sro) = _epi_args(bn, residual, K, OUT, dummy, out)
    args = (basis, basis.stride(0), basis.stride(1), basis.stride(2),
            pos, c, c.stride(0),
            ba, sba, bd, sbd, anchor_idx,
            sc, sh, ssk,
            res, srk, srr, sro,
            out, out.stride(0), out.stride(1), out.stride(2),
            R, OUT, n_anchor_rows,
            *epilogue_flags(bn, residual, relu))
    consts = dict(J=J, JB=JB, HAS_BIAS=b_anchors is not None, EMULATE_BF16=INTERPRET,
                  OUT_BF16=out.dtype == torch.bfloat16)
    launch(_lerp_mix_kernel, lambda b: (triton.cdiv(R, b["BLOCK_R"]) * triton.cdiv(OUT, b["BLOCK_O"]), K), args,
           consts, tiles.mix(R, OUT))
    return out


def _linear_launch(x3, wa, wd, ba, bd, anchor_idx, coefs, bn, residual, relu, dot, out):
    K, N, IN = x3.shape
    OUT = wa.shape[1]
    J = _check_points(anchor_idx, coefs, wd)
    dummy = wa
    c = points_coefs(coefs[:, :J] if J else coefs, J)
    wd_ = wd if J else dummy
    bap, sba, bdp, sbd, JB = _bias_args(ba, bd, J, dummy)
    (sc, sh, ssk), (res, srk, srn, sro) = _epi_args(bn, residual, K, OUT, dummy, out)
    args = (x3, x3.stride(0), x3.stride(1), x3.stride(2),
            wa, wa.stride(0), wa.stride(1), wa.stride(2),
            wd_, wd_.stride(0) if J else 0, wd_.stride(1) if J else 0, wd_.stride(2) if J else 0,
            bap, sba, bdp, sbd,
            anchor_idx, c, c.stride(0),
            sc, sh, ssk,
            res, srk, srn, sro,
            out, out.stride(0), out.stride(1), out.stride(2),
            N, IN, OUT,
            *epilogue_flags(bn, residual, relu))
    consts = dict(J=J, JB=JB, HAS_BIAS=ba is not None, DOT=dot, EMULATE_BF16=INTERPRET,
                  OUT_BF16=out.dtype == torch.bfloat16)
    launch(_lerp_linear_fwd_kernel, lambda b: (triton.cdiv(N, b["BLOCK_N"]) * triton.cdiv(OUT, b["BLOCK_O"]), K),
           args, consts, tiles.linear(N, IN, OUT, dot))
    return out


def lerp_linear(x: torch.Tensor, w_anchors: torch.Tensor, w_dirs: torch.Tensor | None, anchor_idx: torch.Tensor,
                coefs: torch.Tensor, b_anchors: torch.Tensor | None = None, b_dirs: torch.Tensor | None = None, *,
                shared_input: bool = False, bn: tuple[torch.Tensor, torch.Tensor] | None = None,
                residual: torch.Tensor | None = None, relu: bool = False,
                precision: str | None = None, used: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Fused multi-point linear layer (Triton).

    Parameters
    ----------
    x : (K, N, in), or (N, in) with ``shared_input``; float32 or bfloat16.
    w_anchors : (M, out, in); w_dirs : (J, out, in) or None.
    anchor_idx : (K,) int64; coefs : (K, J), combined in fp32.
    b_anchors : (M, out) or None; b_dirs : (J, out) or None.
    bn : eval-mode batch norm of the output as per-point (scale, shift), each (K, out) (see :func:`bn_fold`).
    residual : (K, N, out) added before the ReLU.
    relu : apply ReLU last.
    precision : "fp32" | "tf32" | "bf16"; None follows x's dtype and torch's tf32 setting.
    used : ``torch.unique(anchor_idx, return_inverse=True)`` when the caller has it (shared input; saves a sync).

    Returns
    -------
    (K, N, out) in x's dtype.
    """
    K = anchor_idx.shape[0]
    OUT = w_anchors.shape[1]
    dot = dot_code(x.dtype, precision)
    J = _check_points(anchor_idx, coefs, w_dirs)
    anchor_idx = anchor_idx.contiguous()
    if shared_input:
        N = x.shape[0]
        used, pos = used if used is not None else torch.unique(anchor_idx, return_inverse=True)  # (Mu,) sorted
        Mu = used.numel()
        T = Mu + J
        if T < K:
            # Basis products over the N shared rows once, kept in fp32 so mixing adds no rounding step.
            basis = torch.empty((T, N, OUT), dtype=torch.float32, device=x.device)
            w_used = w_anchors if Mu == w_anchors.shape[0] else w_anchors.index_select(0, used.to(x.device))
            _linear_launch(x.unsqueeze(0).expand(Mu, -1, -1), w_used, None, None, None,
                           torch.arange(Mu, device=x.device),
                           torch.zeros((Mu, 1), dtype=torch.float32, device=x.device),
                           None, None, False, dot, basis[:Mu])
            if J:
                jj = torch.arange(J, device=x.device)
                _linear_launch(x.unsqueeze(0).expand(J, -1, -1), w_dirs[:J], None, None, None, jj,
                               torch.zeros((J, 1), dtype=torch.float32, device=x.device), None, None, False, dot,
                               basis[Mu:])
            return lerp_mix(basis, pos, Mu, anchor_idx, coefs, b_anchors, b_dirs, bn=bn, residual=residual,
                            relu=relu, out_dtype=x.dtype)
        x = x.unsqueeze(0).expand(K, -1, -1)  # stride 0 over points: T >= K, nothing to share
    out = torch.empty((K, x.shape[1], OUT), dtype=x.dtype, device=x.device)
    return _linear_launch(x, w_anchors, w_dirs, b_anchors, b_dirs, anchor_idx, coefs, bn, residual, relu, dot, out)


# ---------------------------------------------------------------------------------------------- references


def lerp_linear_ref(x, w_anchors, w_dirs, anchor_idx, coefs, b_anchors=None, b_dirs=None, *, shared_input=False,
                    bn=None, residual=None, relu=False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference of :func:`lerp_linear`: materialize W_k, bmm, epilogue; everything in ``dtype``.

    With ``dtype=torch.float64`` this is the float64 oracle the tests measure errors against; with
    ``dtype=None`` it runs in x's dtype (weights combined in fp32 first), i.e. "torch at the same precision".
    """
    cdt = dtype or x.dtype
    wdt = dtype or torch.float32
    w = _combine_ref(w_anchors, w_dirs, anchor_idx, coefs, wdt).to(cdt)  # (K, out, in)
    xx = x.to(cdt)
    if shared_input:
        xx = xx.unsqueeze(0).expand(w.shape[0], -1, -1)
    y = torch.bmm(xx, w.transpose(1, 2))  # (K, N, out)
    if b_anchors is not None:
        b = _combine_ref(b_anchors, b_dirs, anchor_idx, coefs, wdt)
        y = y + b.to(cdt)[:, None, :]
    if bn is not None:
        bn = tuple(t.to(wdt) for t in bn)
    return epilogue_ref(y, bn, residual, relu)


def lerp_mix_ref(basis, pos, n_anchor_rows, anchor_idx, coefs, b_anchors=None, b_dirs=None, bn=None, residual=None,
                 relu=False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference of :func:`lerp_mix`."""
    cdt = dtype or torch.float32
    y = basis.to(cdt).index_select(0, pos)
    J = basis.shape[0] - n_anchor_rows
    for j in range(J):
        y = y + coefs[:, j].to(cdt)[:, None, None] * basis[n_anchor_rows + j].to(cdt)
    if b_anchors is not None:
        y = y + _combine_ref(b_anchors, b_dirs, anchor_idx, coefs[:, :J], cdt)[:, None, :]
    return epilogue_ref(y, bn, residual, relu)
