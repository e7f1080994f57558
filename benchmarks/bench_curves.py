"""Curve fitting (issue 14 part 2): seconds per epoch of ``lerpfast.fit_curve`` with the T sampled t's of each batch
in one batched forward (``method="engine"``, and ``"vmap"``) against one forward per t (``method="loop"``), all
measured in the same process.

Held equal between the methods: the model, the endpoints, the data batches (the same tensors in the same order),
the T t-samples of every batch (the same seed), the SGD steps (one per batch) and so the gradient of every step (the
same up to rounding: tests/test_curves.py). Only the forward/backward organisation differs: one pass over T points
against T passes of one point. An "epoch" is ``--batches`` batches of random data of the real input shape (MNIST
28x28 for LeNet-300-100, CIFAR 32x32x3 for ResNet-20; nothing is downloaded, never zeros); its first epoch (engine
build, allocator warm-up) is dropped, the time is the median of the ``--epochs`` that follow.

    PYTHONPATH=. python benchmarks/bench_curves.py [--threads 1] [--ts 4,8,16]

Writes benchmarks/results/curves_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

import lerpfast
from lerpfast.curves import fit_curve
from lerpfast.train import models

MODELS = {  # name: (input shape, batch size, batches per epoch)
    "lenet_300_100": ((1, 28, 28), 128, 8),
    "resnet20": ((3, 32, 32), 32, 2),
}


def _case(name: str, T: int, epochs: int, batches: int | None) -> dict:
    shape, bs, default_batches = MODELS[name]
    n_batches = batches or default_batches
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_shape=shape)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = models.create(name, num_classes=10, in_shape=shape).state_dict()  # another seed: another solution
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(bs, *shape, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n_batches)]
    out = {"model": name, "T": T, "batch_size": bs, "batches_per_epoch": n_batches,
           "t_samples_per_epoch": T * n_batches, "sgd_steps_per_epoch": n_batches}
    fits = {}
    for method in ("engine", "vmap", "loop"):
        fit = fit_curve(model, a, b, data, kind="bezier", epochs=epochs + 1, ts_per_batch=T, method=method, lr=0.01,
                        seed=0)
        fits[method] = fit
        out[f"{method}_s_per_epoch"] = float(np.median(fit.seconds[1:]))
        out[f"{method}_first_epoch_s"] = fit.seconds[0]
    out["loop_over_engine"] = out["loop_s_per_epoch"] / out["engine_s_per_epoch"]
    out["loop_over_vmap"] = out["loop_s_per_epoch"] / out["vmap_s_per_epoch"]
    ref = fits["loop"].bend
    out["max_abs_bend_diff_engine_vs_loop"] = max(float((fits["engine"].bend[k] - v).abs().max())
                                                  for k, v in ref.items() if v.is_floating_point())
    out["history_loop"] = fits["loop"].history
    out["history_engine"] = fits["engine"].history
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lenet_300_100,resnet20")
    ap.add_argument("--ts", default="4,8,16", help="T values (t's per batch), comma-separated")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batches", type=int, default=None, help="batches per epoch (default: per model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "curves_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for T in (int(t) for t in args.ts.split(",")):
            row = _case(name, T, args.epochs, args.batches)
            rows.append(row)
            print(f"{name:14s} T={T:3d}  engine {row['engine_s_per_epoch']:.3f} s  vmap {row['vmap_s_per_epoch']:.3f} s"
                  f"  loop {row['loop_s_per_epoch']:.3f} s  loop/engine {row['loop_over_engine']:.2f}x  "
                  f"loop/vmap {row['loop_over_vmap']:.2f}x", flush=True)
    record = {
        "benchmark": "curve_fitting_epoch", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "lerpfast": lerpfast.__version__, "precision": "fp32",
        "kind": "bezier", "held_equal": "model, endpoints, data batches, the T t-samples of each batch (same seed), "
                                      "one SGD step per batch (the same gradient up to rounding)",
        "baseline": "method='loop': one forward+backward per t, gradients accumulated, same process",
        "timing": f"median seconds per epoch over {args.epochs} epochs after a dropped warm-up epoch",
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
