"""CPU end-to-end: lerpfast.sweep vs the per-point loop (load_state_dict + evaluate) vs torch.func vmap.

All three run in this one process on the same random data (never zeros), same K, same precision; the
script reports image-point evaluations per second and the ratio of each to the loop, and checks that the
three agree. Writes JSON (device, versions, settings) to benchmarks/results/sweep_cpu.json.

    python benchmarks/bench_sweep_cpu.py                 # LeNet-300-100 and ResNet-20, K = 32
    python benchmarks/bench_sweep_cpu.py --quick         # tiny sizes (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lerpfast
from lerpfast.train import models

# name: sweep keywords (engine_unfused shows what epilogue fusion adds on the CPU)
METHODS = {"loop": dict(method="loop"), "vmap": dict(method="vmap"), "engine": dict(method="engine"),
           "engine_unfused": dict(method="engine", fuse=False)}
SETTINGS = {
    # model name, input shape, classes, data size (CPU-sized), points
    "lenet_300_100": ((1, 28, 28), 10, 4096),
    "resnet20": ((3, 32, 32), 10, 64),
}


def _checkpoints(name: str, in_shape, classes: int):
    torch.manual_seed(0)
    a = models.create(name, num_classes=classes, in_shape=in_shape).eval()
    torch.manual_seed(1)
    b = models.create(name, num_classes=classes, in_shape=in_shape).eval()
    return a, b


def run(name: str, K: int, n: int, threads: int, repeats: int) -> dict:
    in_shape, classes, _ = SETTINGS[name]
    a, b = _checkpoints(name, in_shape, classes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *in_shape), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    alphas = np.linspace(-0.5, 1.5, K)
    out = {"model": name, "K": K, "num_samples": n, "params": sum(p.numel() for p in a.parameters())}
    results, best = {}, dict.fromkeys(METHODS, float("inf"))
    # repeats interleave the methods, so a load change on the machine hits all of them alike; best of the repeats
    for _ in range(repeats):
        for method in METHODS:
            t0 = time.perf_counter()
            r = lerpfast.sweep(a, (a, b), alphas, (x, y), batch_size=min(n, 512), progress=False, **METHODS[method])
            best[method] = min(best[method], time.perf_counter() - t0)
            results[method] = r
    for method in METHODS:
        out[method] = {"seconds": best[method], "image_points_per_s": K * n / best[method]}
    for method in ("vmap", "engine", "engine_unfused"):
        out[method]["speedup_vs_loop"] = out["loop"]["seconds"] / out[method]["seconds"]
        out[method]["max_abs_loss_diff_vs_loop"] = float(np.abs(results[method].loss - results["loop"].loss).max())
    out["engine"]["paths"] = results["engine"].meta["paths"]
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SETTINGS))
    ap.add_argument("-K", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "sweep_cpu", "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": args.threads, "torch": torch.__version__, "lerpfast": lerpfast.__version__,
        "python": platform.python_version(), "precision": "fp32", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
        "runs": [], "loadavg_before": list(os.getloadavg()), "git_commit": _git_commit(),
        "command": "python benchmarks/bench_sweep_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for name in args.models:
        n = 8 if args.quick else SETTINGS[name][2]
        K = 3 if args.quick else args.K
        r = run(name, K, n, args.threads, 1 if args.quick else args.repeats)
        report["runs"].append(r)
        print(f"{name:14s} K={K:3d} N={n:5d}  loop {r['loop']['image_points_per_s']:10.0f} img-pt/s   "
              f"vmap {r['vmap']['image_points_per_s']:10.0f} ({r['vmap']['speedup_vs_loop']:.2f}x)   "
              f"lerpfast {r['engine']['image_points_per_s']:10.0f} ({r['engine']['speedup_vs_loop']:.2f}x; "
              f"unfused {r['engine_unfused']['speedup_vs_loop']:.2f}x)   "
              f"max|dloss| {r['engine']['max_abs_loss_diff_vs_loop']:.1e}")
    report["loadavg_after"] = list(os.getloadavg())
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
