"""CPU end-to-end: lerpfast.sweep vs the per-point loop (load_state_dict + evaluate) vs torch.func vmap.

All three run in this one process on the same random data (never zeros), same K, same precision; the
script reports image-point evaluations per second and the ratio of each to the loop, and checks that the
three agree. Writes JSON (device, versions, settings) to benchmarks/results/sweep_cpu.json.

    python benchmarks/bench_sweep_cpu.py                 # LeNet-300-100 and ResNet-20, K = 32
    python benchmarks/bench_sweep_cpu.py --quick         # tiny sizes (CI smoke)
    python benchmarks/bench_sweep_cpu.py --profile       # fixed cost per sweep call -> sweep_overhead_cpu.json

--profile measures the fixed cost of one ``lerpfast.sweep`` call (LeNet-300-100, 8 points of a line, 10k
images of 1x28x28 in batches of 1000, fp32, one thread):

    fixed cost = wall time of the call - time spent inside its batched forward passes and metric updates,

i.e. everything in the call that is not arithmetic (checkpoint loading and validation, fingerprints, the slice,
the engine, the store, the batch loop's own work, the results). The forward passes and metric updates are timed
inside the same call (on a CPU the ops run synchronously), so the subtraction is not swamped by the noise of two
separate 400 ms measurements on a shared machine; the minimum over interleaved repeats is reported. Cross-checks:
the arithmetic timed alone through an engine built beforehand (sweep - arithmetic, meaningful on a quiet machine),
a sweep over one sample, the process's first call, a call on a new model and data objects (nothing cached), the
arithmetic with the K-fold repeat of each input batch (the layout before the no-repeat plan), and the breakdown of
the call from ``meta["timings"]``.
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
    # setting: zoo model, input shape, classes, data size (CPU-sized), batch size
    "lenet_300_100": ("lenet_300_100", (1, 28, 28), 10, 4096, 512),
    "resnet20": ("resnet20", (3, 32, 32), 10, 64, 64),  # one batch: every buffer is first touched in the sweep
    "resnet20_4_batches": ("resnet20", (3, 32, 32), 10, 256, 64),  # as a sweep over a data set goes on
}


def _checkpoints(name: str, in_shape, classes: int):
    torch.manual_seed(0)
    a = models.create(name, num_classes=classes, in_shape=in_shape).eval()
    torch.manual_seed(1)
    b = models.create(name, num_classes=classes, in_shape=in_shape).eval()
    return a, b


def _problem(name: str, K: int, n: int):
    """Two networks, n random samples (never zeros) with labels, and K coordinates of the line between them."""
    model, in_shape, classes = SETTINGS[name][:3]
    a, b = _checkpoints(model, in_shape, classes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *in_shape), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return a, b, x, y, np.linspace(-0.5, 1.5, K)


def run(name: str, K: int, n: int, threads: int, repeats: int) -> dict:
    a, b, x, y, alphas = _problem(name, K, n)
    batch_size = min(n, SETTINGS[name][4])
    out = {"model": SETTINGS[name][0], "setting": name, "K": K, "num_samples": n, "batch_size": batch_size,
           "params": sum(p.numel() for p in a.parameters())}
    results, best = {}, dict.fromkeys(METHODS, float("inf"))
    # repeats interleave the methods, so a load change on the machine hits all of them alike; best of the repeats
    for _ in range(repeats):
        for method in METHODS:
            t0 = time.perf_counter()
            r = lerpfast.sweep(a, (a, b), alphas, (x, y), batch_size=batch_size, progress=False, **METHODS[method])
            best[method] = min(best[method], time.perf_counter() - t0)
            results[method] = r
    for method in METHODS:
        out[method] = {"seconds": best[method], "image_points_per_s": K * n / best[method]}
    for method in ("vmap", "engine", "engine_unfused"):
        out[method]["speedup_vs_loop"] = out["loop"]["seconds"] / out[method]["seconds"]
        out[method]["max_abs_loss_diff_vs_loop"] = float(np.abs(results[method].loss - results["loop"].loss).max())
    out["engine"]["paths"] = results["engine"].meta["paths"]
    return out


# ---------------------------------------------------------------------------------------------------- --profile


def _min_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _arithmetic(model, theta_b, alphas, x, y, batch_size: int, no_repeat: bool = True):
    """A thunk running only the sweep's arithmetic: the K + 1 points' batched forward and the metric reductions,
    through an engine built here once, over batches sliced here once."""
    from lerpfast.checkpoints import load_checkpoints
    from lerpfast.engine.functional import Points
    from lerpfast.engine.model import MultiPointModel
    from lerpfast.geometry import as_slice
    from lerpfast.metrics import PointMetrics

    spec = as_slice((model, theta_b), alphas)
    aff = spec.resolve(load_checkpoints(spec.sources, model), model, torch.float32)
    try:
        mp = MultiPointModel(model, aff, no_repeat=no_repeat)
    except TypeError:  # a lerpfast without the no-repeat plan (the baseline run): it always repeats
        if no_repeat:
            return None
        mp = MultiPointModel(model, aff)
    K = aff.K
    pts = aff.points()
    allp = Points(torch.cat([pts.anchor_idx, torch.zeros(1, dtype=torch.long)]),
                  torch.cat([pts.coefs, torch.zeros(1, aff.J, dtype=pts.coefs.dtype)])).to("cpu")
    mp.set_points(allp)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]

    def run():
        m = PointMetrics(K)
        with torch.inference_mode():
            for xb, yb in batches:
                z = mp(xb, yb.shape[0])  # (K+1, B, C)
                m.update(z[:K], yb, z[K])
        return m.compute()

    return run


class _ArithmeticClock:
    """Seconds spent inside the engine's batched forward and the metric updates, summed while installed: the part of
    a sweep call that is arithmetic (on a CPU, where ops run synchronously). Wraps the class methods, so it measures
    any lerpfast version alike."""

    def __init__(self):
        from lerpfast.engine.model import MultiPointModel
        from lerpfast.metrics import PointMetrics

        self.seconds = self.cpu_seconds = 0.0
        self.targets = [(MultiPointModel, "forward"), (PointMetrics, "update")]
        self.saved = [getattr(cls, name) for cls, name in self.targets]

    def __enter__(self):
        for (cls, name), fn in zip(self.targets, self.saved):
            def timed(*args, _fn=fn, **kwargs):
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.cpu_seconds += time.thread_time() - c0
            setattr(cls, name, timed)
        return self

    def __exit__(self, *exc):
        for (cls, name), fn in zip(self.targets, self.saved):
            setattr(cls, name, fn)


def profile_overhead(repeats: int, threads: int, K: int = 8, n: int = 10_000, batch_size: int = 1000) -> dict:
    import copy

    name = "lenet_300_100"
    a, b, x, y, alphas = _problem(name, K, n)

    def sweep(model=a, data=(x, y)):
        return lerpfast.sweep(model, (model, b), alphas, data, batch_size=batch_size, progress=False)

    cpu_fixed = []

    def fixed_of(fn) -> tuple[float, float, object]:
        """(wall time of one call, its wall time minus the arithmetic inside it, the result); appends the same
        difference in this thread's CPU time to cpu_fixed (immune to the waits for a core on a loaded machine)"""
        with _ArithmeticClock() as clock:
            c0 = time.thread_time()
            t, r = _min_time(fn, 1)
            cpu_fixed.append(time.thread_time() - c0 - clock.cpu_seconds)
        return t, t - clock.seconds, r

    t_first, fixed_first, _ = fixed_of(sweep)  # the process's first call: fx traces, data hash, engine build
    cpu_fixed.clear()
    arith = _arithmetic(a, b, alphas, x, y, batch_size)
    arith_repeat = _arithmetic(a, b, alphas, x, y, batch_size, no_repeat=False)
    tiny = (x[:1].clone(), y[:1].clone())
    keys = ("sweep", "fixed", "arithmetic", "arithmetic_repeat", "sweep_1_sample", "sweep_uncached", "fixed_uncached")
    best = dict.fromkeys(keys, float("inf"))
    phases: dict[str, float] = {}
    for _ in range(repeats):  # interleaved: a load change on the machine hits every measurement alike
        t, fixed, r = fixed_of(sweep)
        best["sweep"], best["fixed"] = min(best["sweep"], t), min(best["fixed"], fixed)
        best["fixed_cpu"] = min(best.get("fixed_cpu", float("inf")), cpu_fixed.pop())
        for key, val in (r.meta.get("timings") or {}).items():
            phases[key] = min(phases.get(key, float("inf")), val)
        if arith is not None:
            best["arithmetic"] = min(best["arithmetic"], _min_time(arith, 1)[0])
        best["arithmetic_repeat"] = min(best["arithmetic_repeat"], _min_time(arith_repeat, 1)[0])
        best["sweep_1_sample"] = min(best["sweep_1_sample"], _min_time(lambda: sweep(data=tiny), 1)[0])
        fresh_model, fresh_data = copy.deepcopy(a), (x.clone(), y.clone())  # new objects: no cache applies
        t, fixed, _ = fixed_of(lambda: sweep(fresh_model, fresh_data))  # noqa: B023 - called at once
        best["sweep_uncached"], best["fixed_uncached"] = min(best["sweep_uncached"], t), \
            min(best["fixed_uncached"], fixed)
        best["fixed_uncached_cpu"] = min(best.get("fixed_uncached_cpu", float("inf")), cpu_fixed.pop())
    if arith is None:  # the baseline: its arithmetic is the repeat layout
        best["arithmetic"] = best["arithmetic_repeat"]
    ms = {k: v * 1e3 for k, v in best.items()}
    return {
        "model": name, "K": K, "num_samples": n, "batch_size": batch_size, "precision": "fp32", "threads": threads,
        "repeats": repeats,
        "fixed_cost_ms": ms["fixed"], "fixed_cost_cpu_time_ms": ms["fixed_cpu"],
        "sweep_ms": ms["sweep"], "arithmetic_ms": ms["arithmetic"],
        "sweep_minus_arithmetic_ms": ms["sweep"] - ms["arithmetic"],
        "sweep_1_sample_ms": ms["sweep_1_sample"],
        "first_call_ms": t_first * 1e3, "first_call_fixed_ms": fixed_first * 1e3,
        "uncached_call_ms": ms["sweep_uncached"], "uncached_fixed_ms": ms["fixed_uncached"],
        "uncached_fixed_cpu_time_ms": ms["fixed_uncached_cpu"],
        "arithmetic_with_repeat_ms": ms["arithmetic_repeat"],
        "repeat_saving_ms": ms["arithmetic_repeat"] - ms["arithmetic"],
        "breakdown_ms": {k: v * 1e3 for k, v in phases.items()},
    }


def _print_profile(r: dict) -> None:
    print(f"LeNet-300-100, K={r['K']} (+ reference), {r['num_samples']} images in batches of {r['batch_size']}, "
          f"{r['threads']} thread(s), min of {r['repeats']}:")
    print(f"  fixed cost per call            {r['fixed_cost_ms']:9.2f} ms   (the call minus its forward + metrics)")
    print(f"  the same in CPU time           {r['fixed_cost_cpu_time_ms']:9.2f} ms   (not counting waits for a core)")
    print(f"  sweep call                     {r['sweep_ms']:9.2f} ms")
    print(f"  its arithmetic alone           {r['arithmetic_ms']:9.2f} ms   (difference "
          f"{r['sweep_minus_arithmetic_ms']:.2f}: meaningful on a quiet machine only)")
    print(f"  sweep over 1 sample            {r['sweep_1_sample_ms']:9.2f} ms")
    print(f"  first call in the process      {r['first_call_ms']:9.2f} ms   fixed {r['first_call_fixed_ms']:.2f}")
    print(f"  uncached call (new objects)    {r['uncached_call_ms']:9.2f} ms   fixed {r['uncached_fixed_ms']:.2f} "
          f"(CPU time {r['uncached_fixed_cpu_time_ms']:.2f})")
    print(f"  arithmetic with the K-repeat   {r['arithmetic_with_repeat_ms']:9.2f} ms   "
          f"(no-repeat saves {r['repeat_saving_ms']:.2f})")
    if r["breakdown_ms"]:
        print("  breakdown of the call, meta['timings'] (min per phase over the repeats, ms):")
        for k, v in r["breakdown_ms"].items():
            print(f"    {k:26s} {v:9.3f}")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def _baseline(commit: str, args) -> dict:
    """This script's --profile run against the lerpfast package of ``commit`` (extracted with git archive)."""
    import shutil
    import tempfile

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", commit, "lerpfast"], cwd=repo, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for ext in (repo / "lerpfast").glob("_C*.so"):  # the built C++ extension, if any (not in git)
            shutil.copy(ext, Path(tmp) / "lerpfast")
        out = Path(tmp) / "baseline.json"
        mode = ["--profile"] if args.profile else ["--models", *args.models, "-K", str(args.K)]
        cmd = [sys.executable, str(Path(__file__).resolve()), *mode, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--out", str(out)] + (["--quick"] if args.quick else [])
        env = dict(os.environ, PYTHONPATH=tmp)  # ahead of the editable install of this tree
        subprocess.run(cmd, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
        rec = json.loads(out.read_text())
        if not rec["lerpfast_path"].startswith(tmp):
            raise RuntimeError(f"the baseline run imported {rec['lerpfast_path']}, not the package of {commit}")
    rec["commit"] = subprocess.run(["git", "rev-parse", commit], cwd=repo, capture_output=True,
                                   text=True).stdout.strip()
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SETTINGS))
    ap.add_argument("-K", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    ap.add_argument("--profile", action="store_true",
                    help="fixed cost per sweep call with its breakdown (LeNet-300-100, K=8, 10k images)")
    ap.add_argument("--baseline", metavar="COMMIT", default=None,
                    help="first measure the lerpfast package of git COMMIT the same way (in a subprocess, from "
                         "`git archive`), and record both")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/sweep_cpu.json, "
                                                "sweep_overhead_cpu.json with --profile)")
    args = ap.parse_args(argv)
    write = not args.quick or args.out is not None
    results = Path(__file__).parent / "results"
    args.out = args.out or str(results / ("sweep_overhead_cpu.json" if args.profile else "sweep_cpu.json"))
    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "sweep_cpu", "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": args.threads, "torch": torch.__version__, "lerpfast": lerpfast.__version__,
        "lerpfast_path": str(Path(lerpfast.__file__).parent),
        "python": platform.python_version(), "precision": "fp32", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
        "runs": [], "loadavg_before": list(os.getloadavg()), "git_commit": _git_commit(),
        "command": "python benchmarks/bench_sweep_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.profile:
        report["benchmark"] = "sweep_overhead_cpu"
        report["definition"] = ("fixed cost = wall time of one lerpfast.sweep(lenet, (a, b), alphas(K), (X, y)) call "
                                "minus the time spent inside that call's batched forward passes (the K points and "
                                "the reference) and metric updates, i.e. everything that is not arithmetic; min "
                                "over interleaved repeats. Cross-check: sweep_ms - arithmetic_ms, the arithmetic "
                                "timed alone through a pre-built engine")
        if args.baseline:
            report["baseline"] = _baseline(args.baseline, args)
            print(f"baseline {args.baseline}:")
            _print_profile(report["baseline"]["runs"][0])
            print("this tree:")
        r = profile_overhead(1 if args.quick else args.repeats, args.threads, n=200 if args.quick else 10_000,
                             batch_size=100 if args.quick else 1000)
        report["runs"].append(r)
        report["loadavg_after"] = list(os.getloadavg())
        _print_profile(r)
        if write:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
            print(f"wrote {args.out}")
        return report
    if args.baseline:
        report["baseline"] = _baseline(args.baseline, args)
        for r in report["baseline"]["runs"]:
            print(f"baseline {args.baseline}: {r['model']:14s} lerpfast {r['engine']['speedup_vs_loop']:.2f}x the loop "
                  f"(unfused {r['engine_unfused']['speedup_vs_loop']:.2f}x, vmap {r['vmap']['speedup_vs_loop']:.2f}x)")
    for name in args.models:
        n = 8 if args.quick else SETTINGS[name][3]
        K = 3 if args.quick else args.K
        r = run(name, K, n, args.threads, 1 if args.quick else args.repeats)
        report["runs"].append(r)
        print(f"{name:18s} K={K:3d} N={n:5d}  loop {r['loop']['image_points_per_s']:10.0f} img-pt/s   "
              f"vmap {r['vmap']['image_points_per_s']:10.0f} ({r['vmap']['speedup_vs_loop']:.2f}x)   "
              f"lerpfast {r['engine']['image_points_per_s']:10.0f} ({r['engine']['speedup_vs_loop']:.2f}x; "
              f"unfused {r['engine_unfused']['speedup_vs_loop']:.2f}x)   "
              f"max|dloss| {r['engine']['max_abs_loss_diff_vs_loop']:.1e}")
    report["loadavg_after"] = list(os.getloadavg())
    if write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
