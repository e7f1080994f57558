"""docs/merging.md's example: WiSE-FT and task arithmetic in miniature, on real data, offline, on a CPU.

A small, honest stand-in for the papers' settings (not CLIP, not ImageNet):

* WiSE-FT: an MLP trained on classes 0-4 of a data set ("task A", the stand-in for the zero-shot model's broad
  competence) and fine-tuned on classes 5-9 ("task B", the fine-tuning distribution); ``lerpfast.merge.wiseft``
  sweeps the 21 alphas between them on task A's and task B's test images (each set read once for all alphas),
  draws each curve and the task-B-against-task-A plot (WiSE-FT Fig. 1's axes), and picks alpha on held-out
  training images of both tasks.
* Task arithmetic: a base model trained on classes 0-3, three fine-tunes that each add one pair of classes (4-5,
  6-7, 8-9); ``lerpfast.merge.task_arithmetic`` sweeps one shared lambda from 0 to 1.5 (31 points, one pass) and
  runs the per-task coordinate search; the curve of each task's test accuracy against lambda.

Data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``) by default; ``--data digits`` (scikit-learn's 8x8 digits)
with ``--quick`` is the few-second version the tests run. Writes ``wiseft.png``, ``task_arithmetic.png``,
``results.json`` and ``results.h5`` into ``--out``::

    python scripts/merging_example.py --out docs/images/merging          # Fashion-MNIST, about a minute
    python scripts/merging_example.py --data digits --quick --out /tmp/m
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lerpfast
import lerpfast.data as ld
from lerpfast.plot import save
from lerpfast.train import models


def _all(name: str, split: str):
    xs, ys = zip(*ld.load(name, split, batch_size=10_000))
    return torch.cat(xs), torch.cat(ys)


def _train(model, state, x, y, rows, steps: int, lr: float = 0.1, seed: int = 0) -> dict:
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    net.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    idx = torch.nonzero(rows).squeeze(1)
    for _ in range(steps):
        b = idx[torch.randint(len(idx), (128,), generator=g)]
        opt.zero_grad()
        F.cross_entropy(net(x[b]), y[b]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _subset(x, y, rows):
    return x[rows], y[rows]


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default) or digits")
    p.add_argument("--quick", action="store_true", help="fewer training steps and points (the test's setting)")
    p.add_argument("--out", default="merging-example", help="output folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", default=None, help="training steps 'PRE,FINE' (SGD, batch 128, momentum 0.9; default "
                                                 "2000,300, with --quick 300,150)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.h5"
    if store.exists():
        store.unlink()  # a fresh example each run (the figures are regenerated)
    t_start = time.perf_counter()

    x, y = _all(args.data, "train")
    xt, yt = _all(args.data, "test")
    shape = tuple(int(s) for s in x.shape[1:])
    steps = tuple(int(v) for v in args.steps.split(",")) if args.steps else (300, 150) if args.quick else (2000, 300)
    alphas = "0:1:11" if args.quick else "0:1:21"
    lambdas = "0:1.5:16" if args.quick else "0:1.5:31"
    torch.manual_seed(0)
    model = models.create("mlp", 10, shape, widths=(100,)).eval()
    init = model.state_dict()
    # held-out rows: the last 1/6 of the training split (never trained on)
    hold = torch.zeros(len(y), dtype=torch.bool)
    hold[len(y) * 5 // 6:] = True
    fit = ~hold

    # ---- WiSE-FT stand-in: train on task A (classes 0-4), fine-tune on task B (classes 5-9) ----
    a_rows, b_rows = y < 5, y >= 5
    zero_shot = _train(model, init, x, y, fit & a_rows, steps[0])
    fine_tuned = _train(model, zero_shot, x, y, fit & b_rows, steps[1], lr=0.05)
    test_sets = {"task A (0-4)": _subset(xt, yt, yt < 5), "task B (5-9)": _subset(xt, yt, yt >= 5)}
    held = {"held-out": _subset(x, y, hold)}
    w = lerpfast.merge.wiseft(model, zero_shot, fine_tuned, {**held, **test_sets}, alphas, select="held-out",
                              store=store, name="wiseft")
    fig = lerpfast.merge.plot_wiseft(w, id="task B (5-9)", shift=["task A (0-4)"],
                                     title=f"WiSE-FT stand-in on {args.data}: trained on 0-4, fine-tuned on 5-9")
    save(fig, out / "wiseft.png", dpi=110)

    # ---- task arithmetic: base on classes 0-3, three fine-tunes adding 4-5, 6-7, 8-9 ----
    base = _train(model, init, x, y, fit & (y < 4), steps[0])
    pairs = ((4, 5), (6, 7), (8, 9))
    tasks = [_train(model, base, x, y, fit & ((y < 4) | (y == a) | (y == b)), steps[1], lr=0.05, seed=i + 1)
             for i, (a, b) in enumerate(pairs)]
    t0 = time.perf_counter()
    ta = lerpfast.merge.task_arithmetic(model, base, tasks, _subset(x, y, hold), lambdas, store=store, name="ta")
    t_engine = time.perf_counter() - t0
    coord = lerpfast.merge.task_arithmetic(model, base, tasks, _subset(x, y, hold), "0:1.5:7", search="coordinate",
                                           store=store, name="ta-coord")
    # the curve on each task's test classes (one pass per set, all lambdas at once)
    ta_sets = {"classes 0-3 (base)": yt < 4, **{f"classes {a}-{b}": (yt == a) | (yt == b) for a, b in pairs},
               "all 10 classes": yt >= 0}
    curves = {}
    for label, rows in ta_sets.items():
        r = lerpfast.sweep(model, lerpfast.TaskVectors(base, tasks, lambdas), data=_subset(xt, yt, rows),
                           reference=None, store=store, name=f"ta-test.{label}")
        curves[label] = (r.alphas, 1 - r.error)
    t0 = time.perf_counter()
    lerpfast.sweep(model, lerpfast.TaskVectors(base, tasks, lambdas), data=_subset(x, y, hold), reference=None,
                   method="loop")
    t_loop = time.perf_counter() - t0

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, (lam, acc) in curves.items():
        ax.plot(lam, acc, marker="o", ms=3, lw=2.2 if label.startswith("all") else 1.2, label=label)
    ax.axvline(ta.choice["lambdas"][0], color="0.5", ls=":", lw=1, label="chosen on held-out data")
    ax.set_xlabel("lambda (shared by the three task vectors)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Task arithmetic on {args.data}: base on 0-3, + three task vectors", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out / "task_arithmetic.png", dpi=110)

    def acc(sd, data):
        net = copy.deepcopy(model)
        net.load_state_dict(sd)
        with torch.no_grad():
            return float((net(data[0]).argmax(1) == data[1]).double().mean())

    full = (xt, yt)
    summary = {
        "data": args.data, "quick": args.quick, "train_steps": steps, "torch": torch.__version__,
        "lerpfast": lerpfast.__version__,
        "wiseft": {
            "alphas": w.meta["alphas"],
            "accuracy": {d: (1 - w.results[w.meta["sweeps"][d]].error).round(4).tolist() for d in w.meta["datasets"]},
            "chosen_alpha": w.choice["alpha"],
            "test_accuracy_all_classes": {"zero_shot": acc(zero_shot, full), "fine_tuned": acc(fine_tuned, full),
                                          "chosen": acc(w.state_dict, full)},
        },
        "task_arithmetic": {
            "lambdas": curves["all 10 classes"][0].tolist(),
            "test_accuracy": {k: v[1].round(4).tolist() for k, v in curves.items()},
            "shared_lambda": ta.choice["lambdas"][0],
            "coordinate_lambdas": coord.choice["lambdas"],
            "test_accuracy_all_classes": {"base": acc(base, full), "shared": acc(ta.state_dict, full),
                                          "coordinate": acc(coord.state_dict, full),
                                          **{f"fine_tuned {a}-{b}": acc(t, full) for (a, b), t in zip(pairs, tasks)}},
            "held_out_sweep_seconds": {"engine_one_pass": round(t_engine, 3), "loop": round(t_loop, 3),
                                       "points": len(curves["all 10 classes"][0]), "samples": int(hold.sum())},
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    wa, tt = summary["wiseft"]["test_accuracy_all_classes"], summary["task_arithmetic"]["test_accuracy_all_classes"]
    print(f"WiSE-FT: alpha {w.choice['alpha']:g} chosen on held-out data; accuracy on all 10 test classes: zero-shot "
          f"{wa['zero_shot']:.3f}, fine-tuned {wa['fine_tuned']:.3f}, WiSE-FT {wa['chosen']:.3f}")
    print(f"task arithmetic: shared lambda {ta.choice['lambdas'][0]:g} -> {tt['shared']:.3f}; per task "
          f"{coord.choice['lambdas']} -> {tt['coordinate']:.3f}; base {tt['base']:.3f}")
    print(f"wrote {out / 'wiseft.png'}, {out / 'task_arithmetic.png'}, {out / 'results.json'} "
          f"({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    run(sys.argv[1:])
