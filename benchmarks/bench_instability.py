"""Instability analysis on real data, end to end: the README's runs, with their time split into stages.

Two settings, each trained, forked at five iterations k into 3 children, the children trained to the end and the 3
child <-> child lines per k swept (21 points on the test set):

* LeNet-300-100 on Fashion-MNIST (OpenLTH's MNIST setting: SGD lr 0.1, batch 128; 10 epochs = 4,690 iterations,
  Frankle's checkpoint schedule), k = 0, 16, 128, 1024, 4000, swept on the 10k test images;
* ResNet-20 (batch norm; SGD momentum 0.9, lr 0.1, weight decay 1e-4, batch 128) on scikit-learn's 8x8 digits
  (1,437 training images, 30 epochs = 360 iterations), k = 0, 4, 16, 64, 256, swept on the 360 test images.

Records each parent's training, the replay, the children's training and the sweeps separately, and, as the sweep's
baseline in the same process, one line of each setting evaluated by the per-point loop (``method="loop"``) against
the engine (their losses must agree to 1e-4). Writes ``benchmarks/results/instability_cpu.json`` and the figure.
Everything resumes: a second run retrains nothing and only re-times the baseline.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_instability.py --threads 1 --out /tmp/instability-readme
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
import lerpfast.data as ld
from lerpfast.instability import analyze_instability, plot_instability
from lerpfast.plot import save
from lerpfast.train import TrainConfig, list_checkpoints, load_model, train

SETTINGS = {
    "LeNet-300-100, Fashion-MNIST": dict(model="lenet_300_100", dataset="fashion-mnist", steps="10ep",
                                         at="0,16,128,1024,4000"),
    "ResNet-20, digits": dict(model="resnet20", dataset="digits", steps="30ep", at="0,4,16,64,256"),
}


def run_setting(label: str, s: dict, out: Path, children: int, alphas: str) -> tuple[dict, object]:
    t0 = time.perf_counter()
    cfg = TrainConfig(model=s["model"], dataset=s["dataset"], steps=s["steps"], checkpoints="frankle",
                      evaluate="end", out_dir=str(out / "runs"), device="cpu")
    run = train(cfg, progress=False)
    parent_s = time.perf_counter() - t0
    parent = json.loads((run / "replicate_0" / "summary.json").read_text())
    res = analyze_instability(run, s["at"], children, alphas=alphas, device="cpu", log=print)
    print(label)
    print(res.table())

    # the sweep's baseline, same process: one child <-> child line by the per-point loop and by the engine
    k, (i, j) = res.ks[0], res.pairs[0]
    base = run / "instability" / f"k_{k}"
    ends = tuple(list_checkpoints(base, c)[max(list_checkpoints(base, c))] for c in (i, j))
    model = load_model(run)
    test = ld.load(s["dataset"], "test", batch_size=1000)
    timing, out_res = {}, {}
    for method in ("loop", "engine", "loop", "engine"):  # each twice, the best counts
        t = time.perf_counter()
        out_res[method] = lerpfast.sweep(model, ends, alphas, test, method=method, progress=False)
        timing[method] = min(timing.get(method, np.inf), time.perf_counter() - t)
    agree = float(np.max(np.abs(out_res["loop"].loss - out_res["engine"].loss)))
    assert agree < 1e-4, agree
    sec = res.seconds
    record = {
        "settings": {**s, "run": run.name, "total_iterations": int(json.loads((run / "hparams.json").read_text())
                                                                   ["total_steps"]),
                     "children": children, "pairs_per_k": len(res.pairs), "alphas": alphas,
                     "config": json.loads((run / "hparams.json").read_text())["non_default"]},
        "seconds": {"parent_training": round(parent.get("wall_time_s", parent_s), 2),
                    "replay": round(sec["replay_total"], 2), "children_training": round(sec["train_total"], 2),
                    "children_training_this_call": round(sec["train"], 2), "sweeps": round(sec["sweep"], 2),
                    "analysis_total_this_call": round(sec["total"], 2)},
        "sweep_baseline": {"line": f"k={k}:c{i}-c{j}", "points": len(out_res["engine"].alphas),
                           "loop_s": round(timing["loop"], 3), "engine_s": round(timing["engine"], 3),
                           "loop_over_engine": round(timing["loop"] / timing["engine"], 2),
                           "max_abs_loss_difference": agree},
        "parent_final_test_error": round(1 - parent.get("test_acc", float("nan")), 4),
        "rows": res.rows(),
    }
    return record, res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="instability-readme", help="folder of the training runs")
    p.add_argument("--only", default=None, help="run only the settings whose label contains this")
    p.add_argument("--children", type=int, default=3)
    p.add_argument("--alphas", default="0:1:21")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", default="docs/images/instability.png")
    p.add_argument("--json", default="benchmarks/results/instability_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records, results = {}, {}
    for label, s in SETTINGS.items():
        if args.only and args.only not in label:
            continue
        records[label], results[label] = run_setting(label, s, Path(args.out), args.children, args.alphas)
    fig = plot_instability(results, title=f"instability: {args.children} children per fork, mean $\\pm$ std over "
                                          "pairs")
    save(fig, args.figure, dpi=90)
    record = {
        "benchmark": "instability",
        "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_instability.py --threads 1",
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "lerpfast": lerpfast.__version__, "python": platform.python_version()},
        "results": records,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    for label, r in records.items():
        print(label, json.dumps(r["seconds"]), json.dumps(r["sweep_baseline"]))


if __name__ == "__main__":
    main()
