"""Helpers shared by the Triton kernels: precision codes, bf16 rounding, the tile combine and epilogue pieces.

Everything here is importable on a CPU-only machine with triton installed; the kernels then run under
``TRITON_INTERPRET=1`` (the tests set it before triton is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "DOT_IEEE", "DOT_TF32", "DOT_BF16", "dot_code", "bf16_rne", "as_operand", "mma",
           "load_coefs", "combine_tile", "bn_affine", "bias_bn", "finish", "points_coefs", "launch_options"]

# Decided once, at import, exactly as triton.jit decides between the compiler and the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Compute precision of the tile products; accumulation is always fp32.
DOT_IEEE, DOT_TF32, DOT_BF16 = 0, 1, 2
_PRECISIONS = {"fp32": DOT_IEEE, "ieee": DOT_IEEE, "tf32": DOT_TF32, "bf16": DOT_BF16}


def _tf32_enabled() -> bool:
    # torch >= 2.9 has the fp32_precision knobs; older torch only allow_tf32. Both mean "cuBLAS may use tf32".
    mm = torch.backends.cuda.matmul
    prec = getattr(mm, "fp32_precision", None)
    if isinstance(prec, str) and prec not in ("", "none"):
        return prec == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def dot_code(x_dtype: torch.dtype, precision: str | None) -> int:
    """Precision code for a kernel from an explicit ``precision`` or, when None, from the input dtype.

    fp32 inputs follow torch's own matmul setting (tf32 when cuBLAS would use it), bf16 inputs compute in bf16.
    """
    if precision is not None:
        try:
            return _PRECISIONS[precision]
        except KeyError:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}") from None
    if x_dtype == torch.bfloat16:
        return DOT_BF16
    if x_dtype == torch.float32:
        return DOT_TF32 if _tf32_enabled() else DOT_IEEE
    raise TypeError(f"Triton multi-point kernels take float32 or bfloat16 inputs, got {x_dtype}")


@triton.jit
def bf16_rne(x):
    """Round fp32 to the nearest bf16 (ties to even), kept in fp32.

    The interpreter converts fp32 -> bf16 by truncation and its bf16 ``tl.dot`` returns garbage (triton 3.9),
    so under TRITON_INTERPRET the kernels round operands with this and multiply in fp32: on bf16-representable
    values with fp32 accumulation that is the arithmetic of a bf16 MMA. Not NaN-safe (NaN payloads may round
    to inf); logits that are NaN are wrong either way.
    """
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def as_operand(t, DOT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Cast a loaded tile to the MMA operand type of precision ``DOT``."""
    if DOT == 2:
        if EMULATE_BF16:
            return bf16_rne(t.to(tl.float32))
        else:
            return t.to(tl.bfloat16)
    else:
        return t.to(tl.float32)


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc += a @ b in precision ``DOT`` with fp32 accumulation."""
    if DOT == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    elif DOT == 2:
        if EMULATE_BF16:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def load_coefs(C_ptr, k, stride_ck, J: tl.constexpr):
    """Point k's J <= 3 coefficients as fp32 scalars (0.0 beyond J), loaded once per program."""
    c0 = 0.0
    c1 = 0.0
    c2 = 0.0
    if J >= 1:
        c0 = tl.load(C_ptr + k * stride_ck).to(tl.float32)
    if J >= 2:
        c1 = tl.load(C_ptr + k * stride_ck + 1).to(tl.float32)
    if J >= 3:
        c2 = tl.load(C_ptr + k * stride_ck + 2).to(tl.float32)
    return c0, c1, c2


@triton.jit
def combine_tile(a_ptrs, d_ptrs, stride_dj, mask, c0, c1, c2, J: tl.constexpr):
    """fp32 tile ``a + c0*d_0 + c1*d_1 + c2*d_2`` (d_j at ``d_ptrs + j*stride_dj``), term by term like torch.

    Builds a point's weight tile in registers (anchor and direction tiles), its bias, or a mix of basis
    products; with ``enable_fp_fusion=False`` each product and sum is rounded separately, as in the oracle.
    """
    t = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    if J >= 1:
        t += c0 * tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
    if J >= 2:
        t += c1 * tl.load(d_ptrs + stride_dj, mask=mask, other=0.0).to(tl.float32)
    if J >= 3:
        t += c2 * tl.load(d_ptrs + 2 * stride_dj, mask=mask, other=0.0).to(tl.float32)
    return t


@triton.jit
def bn_affine(acc, SCALE_ptr, SHIFT_ptr, k, stride_sk, ro, mask_o):
    """Eval-mode batch norm of point k as its per-channel affine map ``acc * scale + shift`` (columns ``ro``)."""
    scale = tl.load(SCALE_ptr + k * stride_sk + ro, mask=mask_o, other=0.0)
    shift = tl.load(SHIFT_ptr + k * stride_sk + ro, mask=mask_o, other=0.0)
    return acc * scale[None, :] + shift[None, :]


@triton.jit
def bias_bn(acc, k, a, ro, mask_o, c0, c1, c2, BA_ptr, stride_bam, BD_ptr, stride_bdj, SCALE_ptr, SHIFT_ptr, stride_sk,
            HAS_BIAS: tl.constexpr, JB: tl.constexpr, HAS_BN):
    """Epilogue head on an (rows, ro) fp32 tile of point k (anchor a): + the point's bias, then its BN affine.

    ``HAS_BN`` (like ``HAS_RES`` and ``RELU`` of the kernels) is a runtime flag: one uniform branch per output
    tile costs nothing beside the GEMM, and every combination of the epilogue shares one compiled kernel.
    """
    if HAS_BIAS:
        acc += combine_tile(BA_ptr + a * stride_bam + ro, BD_ptr + ro, stride_bdj, mask_o, c0, c1, c2, JB)[None, :]
    if HAS_BN:
        acc = bn_affine(acc, SCALE_ptr, SHIFT_ptr, k, stride_sk, ro, mask_o)
    return acc


@triton.jit
def finish(acc, RELU, OUT_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """ReLU, and bf16 round-to-nearest-even where the interpreter's store would truncate.

    The ReLU keeps NaN like ``torch.relu`` (``tl.maximum`` would turn it into 0): a point whose BN running
    variance extrapolates below zero folds to a NaN scale and must give NaN outputs, as PyTorch does."""
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if OUT_BF16 and EMULATE_BF16:
        acc = bf16_rne(acc)
    return acc


EPILOGUE_FLAGS = ("HAS_BN", "HAS_RES", "RELU")


def epilogue_flags(bn, residual, relu) -> tuple[int, int, int]:
    """The epilogue's runtime flags :data:`EPILOGUE_FLAGS` as 0 / 1.

    Ints rather than bools (triton 3.6's interpreter cannot pass a Python bool as a runtime argument), and never
    specialized on (each kernel lists them as ``do_not_specialize``), so one compiled variant serves every
    combination of BN, residual and ReLU.
    """
    return int(bn is not None), int(residual is not None), int(bool(relu))


def launch_options() -> dict:
    """Compile options of every launch: no FMA contraction (``enable_fp_fusion=False``).

    The point weights ``a + c0*d0 + c1*d1`` are then rounded term by term exactly like the torch combine,
    so the fused kernels multiply the same fp32 weights the oracle builds (before any bf16/tf32 operand
    rounding); the MMA itself is unaffected, and the few epilogue FMAs lost cost nothing measurable in a
    GEMM. The interpreter takes no compile options.
    """
    return {} if INTERPRET else {"enable_fp_fusion": False}


def points_coefs(coefs: torch.Tensor, J: int) -> torch.Tensor:
    """Coefficients as a contiguous fp32 (K, max(J, 1)) tensor (weights are always combined in fp32)."""
    c = coefs.to(torch.float32)
    if J == 0:
        c = torch.zeros((coefs.shape[0], 1), dtype=torch.float32, device=coefs.device)
    return c.contiguous()
