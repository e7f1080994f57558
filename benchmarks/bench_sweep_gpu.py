"""End-to-end sweep throughput on one GPU: lerpfast vs the baselines, measured in the same process.

Claim to check (issue 6 / DESIGN section 6): on an H100, lerpfast's batched sweep beats the per-point loop
(load_state_dict per point, then evaluate) by the factors in the README's performance section, with GPU
memory for weights flat in K and fp32 mode within 1e-5 relative of float64.

For each model (LeNet-300-100 on 10k x 784, ResNet-20 and VGG-16 on 10k x 3x32x32, ResNet-50 on >= 1024 x
3x224x224; synthetic GPU-resident data, two random inits as the line's endpoints) and each K it records:

* image-point evaluations per second of: ``loop`` fp32, ``loop`` bf16 + channels_last, ``vmap``
  (torch.func), lerpfast ``engine`` in fp32 / tf32 / bf16 (``lerpfast.sweep(..., method=...)``);
* the ratio to the fp32 loop at the same K, and the fraction of the FLOP floor (model FLOPs per image over a
  matmul peak measured in this run: 8192^3 fp32 / tf32 / bf16);
* peak GPU memory against K; max |loss - float64 reference| per precision (reference: ``precision="fp64"``
  on ``--acc-points`` points of the same line).

Results go to ``benchmarks/results/sweep_gpu_<device>_<utc time>.json`` with device, versions and settings.
Without CUDA the script refuses (exit code 2) unless ``--dry-run-cpu``, which runs everything at tiny sizes on
the CPU to check the plumbing (its numbers mean nothing).

Usage::

    python benchmarks/bench_sweep_gpu.py                         # everything, ~15-25 min on an H100
    python benchmarks/bench_sweep_gpu.py --models resnet20 --ks 1,8,64
    python benchmarks/bench_sweep_gpu.py --dry-run-cpu
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

# (model name, number of images, input shape, number of classes, batch size) at full size.
MODELS = {
    "lenet_300_100": (10_000, (1, 28, 28), 10, 10_000),
    "resnet20": (10_000, (3, 32, 32), 10, 1000),
    "vgg16": (10_000, (3, 32, 32), 10, 1000),
    "resnet50": (1024, (3, 224, 224), 1000, 128),
}
# Baselines evaluate points one by one (loop) or are memory-bound in K (vmap): a few K show the trend.
METHODS = {
    "loop_fp32": dict(method="loop", precision="fp32", channels_last=False),
    "loop_bf16_cl": dict(method="loop", precision="bf16", channels_last=True),
    "vmap_fp32": dict(method="vmap", precision="fp32", channels_last=False),
    "lerpfast_fp32": dict(method="engine", precision="fp32", channels_last=False),
    "lerpfast_tf32": dict(method="engine", precision="tf32", channels_last=True),
    "lerpfast_bf16": dict(method="engine", precision="bf16", channels_last=True),
    # what epilogue fusion and CUDA graphs each add (the rows above use the defaults: fused, no graphs)
    "lerpfast_bf16_unfused": dict(method="engine", precision="bf16", channels_last=True, fuse=False),
    "lerpfast_bf16_graphs": dict(method="engine", precision="bf16", channels_last=True, compile="cudagraphs"),
}
BASELINE_KS = (1, 8, 32, 128)


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: list(MODELS))
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    baseline_ks: list[int] = field(default_factory=lambda: list(BASELINE_KS))
    acc_points: int = 8  # points of the float64 accuracy check
    repeats: int = 2  # timed runs after one warm-up; the best is reported
    images_scale: float = 1.0  # multiply the number of images (e.g. 0.1 for a quick look)
    dry_run_cpu: bool = False
    out: str | None = None


def _parse(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--ks", default="1,2,4,8,16,32,64,128", help="numbers of points K for lerpfast")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--baseline-ks", default=",".join(map(str, BASELINE_KS)),
                   help="K values for the loop / vmap baselines (their cost is linear in K)")
    p.add_argument("--acc-points", type=int, default=8, help="points compared with the float64 reference")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (best is kept)")
    p.add_argument("--images-scale", type=float, default=1.0, help="scale the number of images per model")
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny sizes on the CPU: checks the script only")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sweep_gpu_<dev>_<time>.json)")
    a = p.parse_args(argv)
    ints = lambda s: [int(t) for t in s.split(",") if t]  # noqa: E731
    return Settings(models=[m for m in a.models.split(",") if m], ks=ints(a.ks),
                    methods=[m for m in a.methods.split(",") if m], baseline_ks=ints(a.baseline_ks),
                    acc_points=a.acc_points, repeats=a.repeats, images_scale=a.images_scale,
                    dry_run_cpu=a.dry_run_cpu, out=a.out)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n: int = 8192) -> dict[str, float]:
    """Measured dense matmul peak in TFLOP/s for fp32 (no tf32), tf32 and bf16 (best of 5)."""
    out = {}
    old = torch.get_float32_matmul_precision()
    try:
        for name, dtype, prec in [("fp32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
                                  ("bf16", torch.bfloat16, "highest")]:
            torch.set_float32_matmul_precision(prec)
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            a @ b
            _sync(device)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                a @ b
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * n**3 / best / 1e12
            del a, b
    finally:
        torch.set_float32_matmul_precision(old)
    return out


def flops_per_image(model, in_shape, device) -> float:
    """Forward FLOPs of one image (torch.utils.flop_counter: 2 per multiply-add of matmuls / convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *in_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() / 2


def _data(n, in_shape, classes, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn((n, *in_shape), generator=g).to(device)
    y = torch.randint(0, classes, (n,), generator=g).to(device)
    return X, y


def run_one(lerpfast, model, ends, alphas, data, batch, cfg, device, repeats):
    """Best wall time of ``repeats`` sweeps after a warm-up, peak memory, and the losses."""
    kw = dict(batch_size=batch, device=device, progress=False, method=cfg["method"], precision=cfg["precision"],
              channels_last=cfg["channels_last"], **{k: cfg[k] for k in ("fuse", "compile") if k in cfg})
    res = lerpfast.sweep(model, ends, alphas, data, **kw)  # warm-up: autotuning, cudnn benchmark, graphs
    best = float("inf")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        res = lerpfast.sweep(model, ends, alphas, data, **kw)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return best, peak, torch.as_tensor(res.loss, dtype=torch.float64).cpu()


def bench_model(name, s: Settings, device, peaks) -> dict:
    import lerpfast
    from lerpfast.engine import dispatch
    from lerpfast.train import models

    n, in_shape, classes, batch = MODELS[name]
    n = max(8, int(n * s.images_scale))
    if s.dry_run_cpu:
        n, batch = 16, 8
        in_shape = (3, 32, 32) if name == "resnet50" else in_shape
    batch = min(batch, n)
    torch.manual_seed(0)
    model_a = models.create(name, num_classes=classes, in_shape=in_shape).to(device)
    torch.manual_seed(1)
    model_b = models.create(name, num_classes=classes, in_shape=in_shape).to(device)
    ends = (model_a.state_dict(), model_b.state_dict())
    data = _data(n, in_shape, classes, device)
    fpi = flops_per_image(model_a, in_shape, device)
    out = {"model": name, "images": n, "in_shape": list(in_shape), "batch_size": batch, "flops_per_image": fpi,
           "flop_floor_img_points_per_s": {p: peaks[p] * 1e12 / (2 * fpi) for p in peaks}, "runs": [],
           "accuracy": {}}
    # float64 reference on acc_points points of the same line
    acc_alphas = torch.linspace(0, 1, s.acc_points).tolist()
    ref_loss = None
    try:
        _, _, ref_loss = run_one(lerpfast, model_a, ends, acc_alphas, data, batch,
                                 dict(method="engine", precision="fp64", channels_last=False), device, 1)
    except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
        out["accuracy"]["error"] = repr(exc)
    for method in s.methods:
        cfg = METHODS[method]
        engine = cfg["method"] == "engine"
        if ref_loss is not None:
            try:
                _, _, loss = run_one(lerpfast, model_a, ends, acc_alphas, data, batch, cfg, device, 1)
                dev = (loss - ref_loss).abs()
                out["accuracy"][method] = {"max_abs": dev.max().item(),
                                           "max_rel": (dev / ref_loss.abs().clamp_min(1e-12)).max().item()}
            except Exception as exc:  # noqa: BLE001
                out["accuracy"][method] = {"error": repr(exc)}
        for K in (s.ks if engine else s.baseline_ks):
            alphas = torch.linspace(-0.5, 1.5, K).tolist() if K > 1 else [0.5]
            dispatch.reset()
            rec = {**cfg, "sweep_method": cfg["method"], "method": method, "K": K}
            try:
                t, peak, _ = run_one(lerpfast, model_a, ends, alphas, data, batch, cfg, device, s.repeats)
                rate = K * n / t
                prec = cfg["precision"]
                rec.update(seconds=t, img_points_per_s=rate, peak_mem_bytes=peak,
                           frac_flop_floor=rate / out["flop_floor_img_points_per_s"][prec],
                           backends=dispatch.report())
            except torch.cuda.OutOfMemoryError:
                rec["error"] = "out of memory"
            except Exception as exc:  # noqa: BLE001
                rec["error"] = repr(exc)
                rec["traceback"] = traceback.format_exc(limit=4)
            out["runs"].append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
    loop = {r["K"]: r["img_points_per_s"] for r in out["runs"]
            if r["method"] == "loop_fp32" and "img_points_per_s" in r}
    loop_rate = max(loop.values()) if loop else None  # the loop's rate does not depend on K
    for r in out["runs"]:
        if loop_rate and "img_points_per_s" in r:
            r["ratio_to_loop_fp32"] = r["img_points_per_s"] / loop_rate
    return out


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import lerpfast
    from lerpfast.kernels import ext

    env["lerpfast"] = lerpfast.__version__
    env["lerpfast_C"] = ext.available()
    env["lerpfast_C_cuda"] = ext.has_cuda_kernels()
    env["LERPFAST_BACKEND"] = os.environ.get("LERPFAST_BACKEND", "auto")
    return env


def main(argv=None) -> int:
    s = _parse(argv)
    if not torch.cuda.is_available() and not s.dry_run_cpu:
        print("bench_sweep_gpu.py needs a CUDA GPU (use --dry-run-cpu to check the script on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if s.dry_run_cpu else "cuda")
    if s.dry_run_cpu:
        s.ks = [k for k in s.ks if k <= 3] or [1, 3]
        s.baseline_ks = [k for k in s.baseline_ks if k <= 3] or [1]
        s.acc_points, s.repeats = 3, 1
    peaks = matmul_peak(device, n=256 if s.dry_run_cpu else 8192)
    result = {"settings": asdict(s), "environment": environment(device), "matmul_peak_tflops": peaks,
              "started": _dt.datetime.now(_dt.UTC).isoformat(), "models": []}
    for name in s.models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        result["models"].append(bench_model(name, s, device, peaks))
    result["finished"] = _dt.datetime.now(_dt.UTC).isoformat()
    path = s.out
    if path is None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        tag = "cpu_dry_run" if s.dry_run_cpu else torch.cuda.get_device_name(device).replace(" ", "_")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"sweep_gpu_{tag}_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
