"""Permutation alignment on the CPU (issue 14 part 1): weight-matching time of ResNet-20 and ResNet-50, and the loss
barrier of the raw against the aligned line for MLPs trained from different seeds on the real digits.

* Timing: two independently initialized networks (the zoo's ``resnet20`` and ``resnet50`` at 10 classes, batch-norm
  statistics and scales drawn at random so that every tensor takes part), ``lerpfast.align(method="weights")`` until
  a pass over the groups improves none, best of ``--repeats``. Reported with the time to derive the permutation
  structure alone (torch.fx trace + shape propagation), the passes, and the time of the closing output check. The
  networks are untrained (no CIFAR / ImageNet here); trained ones may take a different number of passes.
* Barrier: ``--pairs`` pairs of MLPs 64-128-128-10 trained from different seeds on scikit-learn's digits (1,437
  train images, SGD), each line swept at 21 alphas on the 360 test images: raw, weight matching, activation matching
  (on the training images); ``lerpfast.analysis.barrier`` of the test loss and error, mean and std over the pairs.
  ``--figure`` writes docs/images/align_digits_mlp.png.

    python benchmarks/bench_align.py [--threads 1] [--repeats 2] [--figure]

Writes benchmarks/results/align_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy
import torch
import torch.nn.functional as F
from torch import nn

import lerpfast
import lerpfast.data as ld
from lerpfast.align import permutation_groups
from lerpfast.analysis import barrier
from lerpfast.train import models


def _bn_random(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)


def time_align(name: str, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = models.create(name, 10, (3, 32, 32))
        _bn_random(model, gen)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    model.eval()
    best, structure, res = float("inf"), float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = lerpfast.align(model, states[0], states[1], example_input=(2, 3, 32, 32))
        best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        st = permutation_groups(model, example_input=(2, 3, 32, 32))
        structure = min(structure, time.perf_counter() - t)
    permuted = [g for g in st.groups if g.frozen is None]
    return {"model": name, "params": int(sum(p.numel() for p in model.parameters())), "groups": len(permuted),
            "largest_group": max(g.size for g in permuted), "units": int(sum(g.size for g in permuted)),
            "seconds": round(best, 3), "structure_seconds": round(structure, 3), "iterations": res.iterations,
            "seconds_per_iteration": round((best - structure) / res.iterations, 3),
            "objective_start": res.objective_start, "objective": res.objective,
            "max_deviation": res.max_deviation}


def train_mlp(seed: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    torch.manual_seed(seed)
    net = models.create("mlp", 10, (1, 8, 8), widths=(128, 128))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def barriers(pairs: int, steps: int, figure: Path | None) -> dict:
    x, y = next(iter(ld.load("digits", "train", batch_size=10_000)))
    test = ld.load("digits", "test")
    model = models.create("mlp", 10, (1, 8, 8), widths=(128, 128)).eval()
    curves: dict[str, list] = {"raw": [], "weight matching": [], "activation matching": []}
    seconds: dict[str, list] = {"weight matching": [], "activation matching": []}
    for p in range(pairs):
        a, b = train_mlp(2 * p, x, y, steps), train_mlp(2 * p + 1, x, y, steps)
        curves["raw"].append(lerpfast.sweep(model, lerpfast.Line(a, b), "0:1:21", test, progress=False))
        for label, method in (("weight matching", "weights"), ("activation matching", "activations")):
            t = time.perf_counter()
            res = lerpfast.align(model, a, b, method, data=(x, y))
            seconds[label].append(time.perf_counter() - t)
            curves[label].append(lerpfast.sweep(model, lerpfast.Line(a, res.state_dict), "0:1:21", test,
                                                progress=False))
    out = {"model": "mlp 64-128-128-10", "data": "digits (train 1437 / test 360)", "pairs": pairs,
           "train_steps": steps, "alphas": 21}
    for label, runs in curves.items():
        row = {}
        for metric in ("loss", "error"):
            vals = [barrier(r.alphas, r.metrics[metric]) for r in runs]
            row[f"{metric}_barrier_mean"] = float(np.mean(vals))
            row[f"{metric}_barrier_std"] = float(np.std(vals))
        row["endpoint_test_error"] = float(np.mean([[r.metrics["error"][0], r.metrics["error"][-1]] for r in runs]))
        if label in seconds:
            row["align_seconds"] = round(float(np.mean(seconds[label])), 4)
        out[label] = row
    if figure is not None:
        from lerpfast.plot import plot_lines, save

        fig = plot_lines(curves, ("loss", "error"), title=f"two MLPs from different seeds, digits test set "
                                                         f"(mean +- std over {pairs} pairs)", cmap="plasma")
        save(fig, figure, dpi=90)
        out["figure"] = str(figure)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="resnet20,resnet50")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--figure", action="store_true", help="write docs/images/align_digits_mlp.png")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "align_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parent.parent
    result = {
        "benchmark": "bench_align", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "scipy": scipy.__version__,
        "lerpfast": lerpfast.__version__, "python": platform.python_version(), "repeats": args.repeats,
        "timing": [time_align(m, args.repeats) for m in args.models.split(",") if m],
        "barrier": barriers(args.pairs, args.steps, root / "docs/images/align_digits_mlp.png" if args.figure else None),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
