"""torchvision / timm zoo: lerpfast.sweep (engine) against the per-point loop, in one process (issue 17).

Each model: two random initializations (nothing is downloaded), a line of K points, the same random images for
both methods. The engine is timed cold (its first call: the model's conversion, fx traces, the fallback's
vmap-or-loop timing) and warm (the converted engine reused, as in any second sweep of the same model); warm engine
and loop are run three times each, interleaved, after a warm-up call, and the best of each is kept (one run is
+-15 % on this machine). The two methods must agree (fp32, 1e-4 relative on the loss). ``not_native`` lists the
modules that ran on the per-module fallback. Needs torchvision and timm (the environment of
scripts/test_torch214.sh):

    PYTHONPATH=. .venv-torch214/bin/python benchmarks/bench_zoo.py [--only NAME ...] [--threads 1]

Writes benchmarks/results/zoo_cpu.json (device, versions, settings, per model: seconds, ratios, paths).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import lerpfast
from lerpfast.evaluate import clear_caches


def _zoo():
    import timm
    import torchvision.models as M

    return {  # name: (builder, image size, images)
        "tv resnet18": (lambda: M.resnet18(num_classes=10), 64, 32),
        "tv mobilenet_v3_small": (lambda: M.mobilenet_v3_small(num_classes=10), 64, 32),
        "tv efficientnet_b0": (lambda: M.efficientnet_b0(num_classes=10), 64, 32),
        "tv convnext_tiny": (lambda: M.convnext_tiny(num_classes=10), 64, 16),
        "tv vit_b_16 (112 px)": (lambda: M.vit_b_16(num_classes=10, image_size=112), 112, 16),
        "tv swin_t": (lambda: M.swin_t(num_classes=10), 64, 16),
        "tv densenet121": (lambda: M.densenet121(num_classes=10), 64, 16),
        "timm vit_tiny (112 px)": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=112, num_classes=10),
                                   112, 32),
        "timm deit_tiny (112 px)": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=112,
                                                              num_classes=10), 112, 32),
        "timm convnext_atto (128 px)": (lambda: timm.create_model("convnext_atto", num_classes=10), 128, 16),
        "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), 64, 32),
    }


def bench(name, build, size, n, K, batch, repeats):
    torch.manual_seed(0)
    a = build().eval()
    torch.manual_seed(1)
    b = build().eval()
    g = torch.Generator().manual_seed(2)
    data = (torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    alphas = np.linspace(0, 1, K).tolist()
    kw = dict(batch_size=batch, progress=False, reference=None)

    def run(**extra):
        t = time.perf_counter()
        res = lerpfast.sweep(a, (a, b), alphas, data, **kw, **extra)
        return time.perf_counter() - t, res

    clear_caches()
    cold, res = run()
    run(method="loop")  # warm-up of the loop's own first-call costs
    warms, loops = [], []
    for _ in range(repeats):  # interleaved, best of each: the machine's noise is +-15 % on one run
        t, res = run()
        warms.append(t)
        t, ref = run(method="loop")
        loops.append(t)
    warm, loop = min(warms), min(loops)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-4, atol=1e-6, err_msg=name)
    paths = res.meta["paths"]
    return {
        "model": name, "image_size": size, "images": n, "K": K, "batch_size": batch, "repeats": repeats,
        "engine_cold_s": round(cold, 3), "engine_warm_s": round(warm, 3), "loop_s": round(loop, 3),
        "ratio_warm": round(loop / warm, 3), "ratio_cold": round(loop / cold, 3),
        "not_native": sorted(m for m, p in paths.items() if p.startswith("fallback")),
        "own_tensors_per_point": sorted(m for m, p in paths.items() if "own tensors per point" in p),
        "max_loss_rel_diff": float(np.max(np.abs(res.loss - ref.loss) / np.abs(ref.loss))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="model names (substrings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each method (best is kept)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import timm
    import torchvision

    zoo = _zoo()
    rows = []
    meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "lerpfast": lerpfast.__version__, "precision": "fp32", "K": args.K, "batch_size": args.batch,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
    for name, (build, size, n) in zoo.items():
        if args.only and not any(o in name for o in args.only):
            continue
        row = bench(name, build, size, n, args.K, args.batch, args.repeats)
        rows.append(row)
        print(f"{name:30s} engine warm {row['engine_warm_s']:7.2f}s cold {row['engine_cold_s']:7.2f}s  "
              f"loop {row['loop_s']:7.2f}s  loop/engine {row['ratio_warm']:.2f} (cold {row['ratio_cold']:.2f})  "
              f"not native: {row['not_native'] or 'none'}", flush=True)
        Path(args.out).write_text(json.dumps(meta, indent=1) + "\n")  # after every model: a killed run keeps them


if __name__ == "__main__":
    main()
