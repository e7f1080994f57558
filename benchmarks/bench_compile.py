"""Cold start: what the first sweep of a model compiles, and how long that takes (no GPU needed).

Plans the model as ``lerpfast.sweep`` runs it on a GPU (``lerpfast.kernels.warmup.plan``: the engine traced on
meta tensors, every Triton launch of one batched forward recorded), compiles exactly the distinct kernel variants
(constexprs x launch config x JIT specialization) for sm_90 from an empty ``TRITON_CACHE_DIR``, in parallel
threads (one per CPU), and writes ``benchmarks/results/compile_<model>_<precision>.json``. The last printed line is
``compiles=N seconds=S``.

    python benchmarks/bench_compile.py --model resnet20 --precision bf16
    python benchmarks/bench_compile.py --all            # the 4 models x fp32 / tf32 / bf16, one process each
    python benchmarks/bench_compile.py --tiles          # compile seconds of one conv / linear variant per tile

Targets (issue 9): at most 12 compiles and 30 s of compile wall time on 2 CPU cores for LeNet-300-100, ResNet-20,
VGG-16 and ResNet-50 in each precision. Timings depend on the machine's load: the JSON records the load average
before and after, and the CPU count.

Kernel quality (issue 15): each compiled variant's registers per thread, spill bytes, shared memory, warps,
stages, tensor-core instructions (wgmma / mma) and whether the MMA loop waits for all of them each iteration, and
the CTAs per SM and limiting resource on an H100, read from the cubin and PTX Triton produced
(:mod:`lerpfast.kernels.quality`); each launch's CTAs and waves on 132 SMs. ``record["quality"]`` sums them up;
``--table`` prints the markdown table of docs/kernels.md from the JSONs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODELS = ("lenet_300_100", "resnet20", "vgg16", "resnet50")
PRECISIONS = ("fp32", "tf32", "bf16")
# the settings of benchmarks/bench_sweep_gpu.py (images per batch; channels_last for tf32 / bf16)
BATCH = {"lenet_300_100": 10_000, "resnet20": 1000, "vgg16": 1000, "resnet50": 128}
TARGET_COMPILES, TARGET_SECONDS = 12, 30.0


def _git() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lerpfast/kernels", "lerpfast/engine"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def _fresh_cache() -> str:
    """An empty Triton cache for this process (set before triton is imported)."""
    d = tempfile.mkdtemp(prefix="lerpfast-compile-")
    os.environ["TRITON_CACHE_DIR"] = d
    os.environ.pop("TRITON_INTERPRET", None)
    return d


def _count(cache: str, suffix: str) -> int:
    return sum(f.endswith(suffix) for _, _, files in os.walk(cache) for f in files)


def run_one(model: str, precision: str, K: int, workers: int | None, arch: int, out: str | None) -> dict:
    cache = _fresh_cache()
    load0 = os.getloadavg()
    import torch

    torch.set_num_threads(1)
    import triton

    from lerpfast.kernels import warmup

    cpus = os.cpu_count() or 1
    pl = warmup.plan(model, precision, K, batch=BATCH.get(model), channels_last=precision != "fp32")
    res = warmup.compile_plan(pl.launches, device="cpu", arch=arch, workers=workers or cpus, quality=True)
    record = {
        "model": model, "precision": precision, "compiles": res["compiles"], "seconds": res["seconds"],
        "cpus": cpus, "workers": res["workers"], "errors": res["errors"], "target": res["target"],
        "cubins": _count(cache, ".cubin"),
        "targets": {"compiles": TARGET_COMPILES, "seconds": TARGET_SECONDS},
        "within_target": res["errors"] == 0 and res["compiles"] <= TARGET_COMPILES and res["seconds"] <= TARGET_SECONDS,
        "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "plan": pl.to_json(), "variants": res["variants"], "quality": summarize(res["variants"]),
        "environment": {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                        "commit": _git(), "cpu_count": cpus},
        "command": f"python benchmarks/bench_compile.py --model {model} --precision {precision} --K {K}",
    }
    path = out or os.path.join(RESULTS, f"compile_{model}_{precision}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    for v in res["variants"]:
        q = v.get("quality")
        info = "" if q is None else (
            f"  regs {q['regs']:3d} spill {q['spill_store_bytes']:3d} B smem {q['shared'] // 1024:3d} KB "
            f"{q['mma'] or '-':5s}{' wait0' if q['wait0_in_loop'] else '      '} {q['ctas_per_sm']} CTA/SM "
            f"({q['limiter']}) min {min(ln['waves'] for ln in v['launches']):.2f} waves")
        print(f"  {v['seconds']:6.2f} s  {v['kernel']}{info}" + (f"  FAILED {v['error']}" if v["error"] else ""))
    qs = record["quality"]
    print(f"quality: max {qs['max_regs']} registers, {qs['spill_bytes']} B spilled in {len(qs['spilling'])} variants, "
          f"tensor cores {qs['tensor_cores']}, {qs['min_ctas_per_sm']} CTA/SM at least ({qs['limiter']}), smallest "
          f"launch {qs['min_waves']} waves ({qs['min_waves_ctas']} CTAs)")
    print(f"{model} {precision}: {len(pl.launches)} launches per batch, {res['compiles']} variants compiled for "
          f"{res['target']} with {res['workers']} threads; load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"wrote {os.path.relpath(path, ROOT)}")
    shutil.rmtree(cache, ignore_errors=True)
    print(f"compiles={res['compiles']} seconds={res['seconds']}")
    return record


def summarize(variants: list[dict]) -> dict:
    """Kernel quality of a model's compiled variants (rows of ``compile_plan(..., quality=True)``), in one dict:
    max registers, spill bytes and the spilling variants, tensor cores of the GEMMs ("wgmma", "mma", "no", or
    "k of n" when only some use them), GEMMs waiting for every MMA in their loop, the fewest CTAs per SM (and the
    limiting resource) and the smallest launch in waves on 132 SMs."""
    qs = [(v, v["quality"]) for v in variants if v.get("quality")]
    gemms = [(v, q) for v, q in qs if "conv2d_fwd" in v["kernel"] or "linear_fwd" in v["kernel"]]
    kinds = {q["mma"] for _, q in gemms}
    if not gemms or kinds == {None}:
        tc = "no"
    elif None not in kinds and len(kinds) == 1:
        tc = kinds.pop()
    else:
        tc = f"{sum(q['mma'] is not None for _, q in gemms)} of {len(gemms)}"
    low = min(qs, key=lambda vq: vq[1]["ctas_per_sm"], default=(None, None))
    launches = [(ln, v) for v, _ in qs for ln in v["launches"]]
    small = min(launches, key=lambda lv: lv[0]["waves"], default=({"waves": None, "ctas": None}, None))
    return {"variants": len(qs), "max_regs": max((q["regs"] for _, q in qs), default=0),
            "spill_bytes": sum(q["spill_store_bytes"] for _, q in qs),
            "spilling": [v["kernel"] for v, q in qs if q["spill_store_bytes"] or q["spill_load_bytes"]],
            "tensor_cores": tc, "wait0_in_loop": sum(q["wait0_in_loop"] for _, q in gemms), "gemms": len(gemms),
            "min_ctas_per_sm": low[1]["ctas_per_sm"] if low[1] else None,
            "limiter": low[1]["limiter"] if low[1] else None,
            "min_waves": small[0]["waves"], "min_waves_ctas": small[0]["ctas"],
            "min_waves_kernel": small[1]["kernel"] if small[1] else None}


def table(prefix: str = "compile_") -> str:
    """Markdown table of the kernel quality in benchmarks/results/<prefix><model>_<precision>.json."""
    rows = ["| model | precision | variants | max registers | spills | tensor cores (GEMMs waiting wgmma 0 in the "
            "loop) | fewest CTAs/SM (limiter) | smallest launch |", "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for prec in PRECISIONS:
            path = os.path.join(RESULTS, f"{prefix}{model}_{prec}.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                rec = json.load(f)
            q = rec.get("quality")
            if not q:
                continue
            tc = q["tensor_cores"] + (f" ({q['wait0_in_loop']} of {q['gemms']})" if q["tensor_cores"] != "no" else "")
            rows.append(f"| {model} | {prec} | {q['variants']} | {q['max_regs']} | {q['spill_bytes']} B | {tc} | "
                        f"{q['min_ctas_per_sm']} ({q['limiter']}) | {q['min_waves']} waves ({q['min_waves_ctas']} "
                        f"CTAs) |")
    return "\n".join(rows)


def run_all(K: int, workers: int | None, arch: int) -> int:
    """Each model x precision in its own process (empty caches, nothing compiled before)."""
    rows, rc = [], 0
    for model in MODELS:
        for prec in PRECISIONS:
            cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--precision", prec, "--K", str(K),
                   "--arch", str(arch)] + (["--workers", str(workers)] if workers else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            print(f"{model:14s} {prec}: {last}" + ("" if proc.returncode == 0 else f"  (exit {proc.returncode})"),
                  flush=True)
            if proc.returncode != 0:
                rc = 1
                sys.stderr.write(proc.stderr[-2000:])
            else:
                with open(os.path.join(RESULTS, f"compile_{model}_{prec}.json")) as f:
                    rows.append(json.load(f))
    worst_c = max((r["compiles"] for r in rows), default=0)
    worst_s = max((r["seconds"] for r in rows), default=0.0)
    print(table())
    spills = sum(r["quality"]["spill_bytes"] for r in rows)
    print(f"max compiles={worst_c} max seconds={worst_s} (targets {TARGET_COMPILES} / {TARGET_SECONDS} s); "
          f"spilled bytes in all plans: {spills}")
    return rc


def run_tiles(arch: int) -> int:
    """Compile seconds of one variant per candidate tile (ResNet-like 3x3 conv 64->64 with the full epilogue, and a
    512->512 linear), sequentially, each from an empty cache: the data behind lerpfast.kernels.tiles' defaults."""
    cache = _fresh_cache()
    import dataclasses

    import torch

    from lerpfast.kernels import launch, lerp_conv, lerp_linear, tiles

    def rec(fn):
        with launch.recording(dry=True) as r:
            fn()
        return r.launches[0]

    K, N = 33, 128
    m = dict(device="meta")
    out = {"cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in os.getloadavg()], "rows": []}
    for prec, dot in (("fp32", 0), ("tf32", 1), ("bf16", 2)):
        xdt = torch.bfloat16 if prec == "bf16" else torch.float32
        conv = rec(lambda xdt=xdt, prec=prec: lerp_conv.lerp_conv2d(
            torch.empty(K, N, 64, 8, 8, dtype=xdt, **m), torch.empty(2, 64, 64, 3, 3, **m),
            torch.empty(1, 64, 64, 3, 3, **m), torch.zeros(K, dtype=torch.long), torch.zeros(K, 1), None, None, 1, 1,
            bn=(torch.empty(K, 64, **m), torch.empty(K, 64, **m)), residual=torch.empty(K, N, 64, 8, 8, dtype=xdt, **m),
            relu=True, precision=prec))
        lin = rec(lambda xdt=xdt, prec=prec: lerp_linear.lerp_linear(
            torch.empty(K, N, 512, dtype=xdt, **m), torch.empty(2, 512, 512, **m), torch.empty(1, 512, 512, **m),
            torch.zeros(K, dtype=torch.long), torch.zeros(K, 1), torch.empty(2, 512, **m), torch.empty(1, 512, **m),
            precision=prec))
        for ln, name in ((conv, "conv2d"), (lin, "linear")):
            choice = (tiles.conv2d(N * 64, 64, 64, 9, dot) if name == "conv2d" else tiles.linear(N, 512, 512, dot))
            for tile in tiles.candidates(choice):
                c = dict(ln.constexprs)
                c.update(tile.kwargs())
                v = dataclasses.replace(ln, constexprs=tuple(sorted(c.items())), num_warps=tile.num_warps,
                                        num_stages=tile.num_stages)
                with launch.cross_compile(arch):
                    t0 = time.perf_counter()
                    err = None
                    try:
                        launch.compile_one(v)
                    except Exception as exc:  # noqa: BLE001
                        err = f"{type(exc).__name__}: {str(exc)[:200]}"
                    sec = time.perf_counter() - t0
                row = {"kernel": name, "precision": prec, "tile": str(tile), "default": tile == choice.default,
                       "seconds": round(sec, 2), "error": err}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    out["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    with open(os.path.join(RESULTS, "compile_tiles.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    shutil.rmtree(cache, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS + ("resnet32", "resnet56", "vgg11", "vgg19", "nin"), default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--K", type=int, default=32, help="points per pass (the sweep adds the reference point)")
    p.add_argument("--workers", type=int, default=None, help="compile threads (default: CPU count)")
    p.add_argument("--arch", type=int, default=90, help="CUDA target sm_<arch> (default 90: H100 / H200)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compile_<model>_<prec>.json)")
    p.add_argument("--all", action="store_true", help="all 4 models x 3 precisions, one process each")
    p.add_argument("--tiles", action="store_true", help="compile seconds per candidate tile -> compile_tiles.json")
    p.add_argument("--table", action="store_true", help="print the kernel-quality table of the result JSONs")
    a = p.parse_args(argv)
    if a.table:
        print(table())
        return 0
    if a.tiles:
        return run_tiles(a.arch)
    if a.all:
        return run_all(a.K, a.workers, a.arch)
    if a.model is None:
        p.error("--model is required (or --all / --tiles)")
    rec = run_one(a.model, a.precision, a.K, a.workers, a.arch, a.out)
    return 0 if rec["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
