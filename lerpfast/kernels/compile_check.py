"""Compile every Triton kernel for a GPU target without a GPU (``python -m lerpfast.kernels.compile_check``).

The interpreter (``TRITON_INTERPRET=1``) checks the arithmetic but not what only the compiler sees: types
at MMA boundaries, constexpr control flow, tile shapes the target rejects. This runs each kernel wrapper on
meta tensors with launches recorded instead of run (:func:`lerpfast.kernels.launch.recording`) — every
precision, J in {0, 1, 3}, the full epilogue, per-point and shared inputs, small and wide channel counts (so
each tile class of :mod:`lerpfast.kernels.tiles`) — and compiles the distinct variants to PTX and a cubin
(triton ships ptxas) for sm_80 and sm_90 (:func:`lerpfast.kernels.launch.cross_compile`). It must run with
the interpreter off (it refuses otherwise). ``benchmarks/bench_compile.py`` does the same for the exact
variants of a model's sweep.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["compile_all", "launches"]

_TARGETS = {"sm80": 80, "sm90": 90}


def launches(quick: bool = False) -> list:
    """The recorded launches of the cases above (dry: nothing runs; meta tensors, no memory)."""
    import torch

    from lerpfast.kernels import combine, launch, lerp_conv, lerp_linear, point_metrics

    m = dict(device="meta")
    K, N = 5, 64
    idx = torch.zeros(K, dtype=torch.long)
    out = []
    with launch.recording(dry=True) as rec:
        for prec, xdt in [("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16),
                          ("bf16", torch.float32)]:
            for J in ([3] if quick else [0, 1, 3]):
                c = torch.zeros(K, J)
                for co in ([48] if quick else [16, 48, 200]):  # the output-block classes
                    wd = (lambda *s, J=J: torch.empty(J, *s, **m)) if J else (lambda *s: None)
                    bn = (torch.empty(K, co, **m), torch.empty(K, co, **m))
                    lerp_linear.lerp_linear(
                        torch.empty(K, N, 40, dtype=xdt, **m), torch.empty(2, co, 40, **m), wd(co, 40), idx, c,
                        torch.empty(2, co, **m), wd(co), bn=bn, residual=torch.empty(K, N, co, dtype=xdt, **m),
                        relu=True, precision=prec)
                    for C in ([3, 40] if not quick else [40]):
                        lerp_conv.lerp_conv2d(
                            torch.empty(K, 2, C, 6, 6, dtype=xdt, **m), torch.empty(2, co, C, 3, 3, **m),
                            wd(co, C, 3, 3), idx, c, torch.empty(2, co, **m), wd(co), 1, 1, bn=bn,
                            residual=torch.empty(K, 2, co, 6, 6, dtype=xdt, **m), relu=True, precision=prec)
            # shared input: basis products (J = 0 launches) and the mixing kernel
            c = torch.zeros(K, 2)
            lerp_linear.lerp_linear(torch.empty(N, 40, dtype=xdt, **m), torch.empty(2, 48, 40, **m),
                                    torch.empty(2, 48, 40, **m), idx, c, torch.empty(2, 48, **m),
                                    torch.empty(2, 48, **m), shared_input=True, relu=True, precision=prec,
                                    used=(torch.zeros(1, dtype=torch.long), idx))
            lerp_conv.lerp_conv2d(torch.empty(2, 3, 6, 6, dtype=xdt, **m), torch.empty(2, 48, 3, 3, 3, **m),
                                  torch.empty(2, 48, 3, 3, 3, **m), idx, c, None, None, 1, 1, shared_input=True,
                                  bn=(torch.empty(K, 48, **m), torch.empty(K, 48, **m)), relu=True, precision=prec,
                                  used=(torch.zeros(1, dtype=torch.long), idx))
        for zt in [torch.float32, torch.bfloat16]:
            point_metrics.point_metrics(torch.empty(K, N, 10, dtype=zt, **m), torch.empty(N, dtype=torch.long, **m),
                                        torch.empty(N, 10, dtype=zt, **m))
        combine.combine(torch.empty(2, 100, **m), torch.empty(2, 100, **m), idx, torch.zeros(K, 2))
    out += rec.launches
    return launch.unique(out)


def compile_all(targets=("sm80", "sm90"), quick: bool = False, verbose: bool = False) -> list[str]:
    """Compile all kernel variants; returns the list of failures (empty when everything compiles)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (kernels must be JIT functions)")
    from lerpfast.kernels import launch

    failures = []
    variants = launches(quick)
    for t in targets:
        with launch.cross_compile(_TARGETS[t]):
            for res in launch.warm(variants):
                label = f"{t} {res['launch'].describe()}"
                if res["error"]:
                    failures.append(f"{label}: {res['error']}")
                if verbose:
                    print(f"FAIL {label}: {res['error']}" if res["error"] else f"ok   {label}")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="J = 3 and one channel count only")
    p.add_argument("--targets", default="sm80,sm90")
    a = p.parse_args(argv)
    fails = compile_all(tuple(a.targets.split(",")), quick=a.quick, verbose=True)
    print(f"{len(fails)} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
