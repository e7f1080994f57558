"""Compile every Triton kernel for a GPU target without a GPU (``python -m lerpfast.kernels.compile_check``).

The interpreter (``TRITON_INTERPRET=1``) checks the arithmetic but not what only the compiler sees: types
at MMA boundaries, constexpr control flow, tile shapes the target rejects. This compiles each kernel, in
every precision and with its autotune configs, to PTX and a cubin (triton ships ptxas) for sm_80 and
sm_90. It must run with the interpreter off (it refuses otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["compile_all"]

_TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32)}


def _sig(fn, types: dict[str, str], consts: dict[str, object]):
    """Full signature: named pointer / scalar types; every other non-constexpr argument is an i32 scalar."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _cases(quick: bool):
    from lerpfast.kernels import combine, lerp_conv, lerp_linear, point_metrics

    flags = dict(HAS_BIAS=True, HAS_BN=True, HAS_RES=True, RELU=True, EMULATE_BF16=False)
    for dot, xt in [(0, "*fp32"), (1, "*fp32"), (2, "*bf16"), (2, "*fp32")]:
        out_bf16 = xt == "*bf16"
        yt = xt
        for J in ([3] if quick else [0, 1, 3]):
            c = dict(J=J, JB=J, DOT=dot, OUT_BF16=out_bf16, **flags)
            yield ("linear", lerp_linear._lerp_linear_fwd_kernel, {"X_ptr": xt, "Y_ptr": yt, "RES_ptr": xt,
                                                                    "IDX_ptr": "*i64"}, c)
            yield ("conv2d", lerp_conv._lerp_conv2d_fwd_kernel, {"X_ptr": xt, "Y_ptr": yt, "RES_ptr": xt,
                                                                  "IDX_ptr": "*i64"}, dict(c, KH=3, KW=3))
        yield ("mix", lerp_linear._lerp_mix_kernel, {"Y_ptr": yt, "RES_ptr": xt, "IDX_ptr": "*i64", "POS_ptr": "*i64"},
               dict(J=2, JB=2, OUT_BF16=out_bf16, HAS_BIAS=True, HAS_BN=True, HAS_RES=True, RELU=True,
                    EMULATE_BF16=False))
    for zt in ["*fp32", "*bf16"]:
        yield ("metrics", point_metrics._point_metrics_kernel, {"Z_ptr": zt, "R_ptr": zt, "T_ptr": "*i64"},
               dict(HAS_REF=True, BLOCK_N=8, BLOCK_C=1024, num_warps=4))
    yield ("combine", combine._combine_kernel, {"IDX_ptr": "*i64"}, dict(J=2, BLOCK=1024, num_warps=4))


def compile_all(targets=("sm80", "sm90"), quick: bool = False, verbose: bool = False) -> list[str]:
    """Compile all kernels; returns the list of failures (empty when everything compiles)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (kernels must be JIT functions)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    failures = []
    for name, kernel, types, consts in _cases(quick):
        jit = kernel if isinstance(kernel, JITFunction) else kernel.fn  # unwrap the autotuner
        configs = getattr(kernel, "configs", None) or [None]
        if quick:
            configs = configs[:1]
        for cfg in configs:
            c = dict(consts)
            opts = {"num_warps": c.pop("num_warps", 4), "num_stages": 3, "enable_fp_fusion": False}
            if cfg is not None:
                c.update(cfg.kwargs)
                opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            src = ASTSource(jit, _sig(jit, types, c), constexprs=c)
            for t in targets:
                label = f"{name} {t} {c} {opts}"
                try:
                    triton.compile(src, target=GPUTarget(*_TARGETS[t]), options=opts)
                    if verbose:
                        print("ok  ", label)
                except Exception as exc:  # noqa: BLE001 - collected and reported
                    failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:400]}")
                    if verbose:
                        print("FAIL", label, exc)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="first autotune config and J = 3 only")
    p.add_argument("--targets", default="sm80,sm90")
    a = p.parse_args(argv)
    fails = compile_all(tuple(a.targets.split(",")), quick=a.quick, verbose=True)
    print(f"{len(fails)} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
