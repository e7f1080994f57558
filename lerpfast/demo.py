"""``lerpfast demo``: Frankle's (2020) experiment in miniature, on real data, offline, in a few minutes on a CPU.

Trains LeNet-300-100 with Frankle's / OpenLTH's hyper-parameters (SGD, lr 0.1, batch 128, checkpoints at
t = 0, 1, 2, 4, ..., 1024, 2000, 3000, ...: {1000k : k > 1}) on Fashion-MNIST (Debian's ``dataset-fashion-mnist``
package, or any MNIST-format copy lerpfast finds; else scikit-learn's 8x8 digits), for several replicates;
sweeps the straight line from the checkpoint at iteration t to the final weights for several t, 100 points
each, on the test set (t = 0 is Goodfellow et al.'s init -> final); writes every point to ``results.h5`` as it
goes (interrupt it and run it again: it continues), draws the papers' figures, and prints the maximum increase
of test loss and error along each path against t (Frankle's Fig. 3).

Files written into the output folder (default ``./lerpfast-demo``)::

    results.h5            one sweep per (t, replicate): "t=<t>@rep<r>", plus everything that reproduces it
    lines.png             loss and error against alpha, one curve per t, mean +- std over replicates (Fig. 2)
    max_increase.png      max increase of loss / error along t -> final against t, log axis (Fig. 3)
    trajectory.png        projection of the training trajectory onto init -> final vs the residual, with a
                          random walk of the same step lengths (Goodfellow et al. Figs. 11, 13)
    functional.png        functional distance and disagreement to theta_t along each path (Im et al.)
    table.txt             the printed table
    runs/                 the training runs (checkpoints, logs)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoConfig", "add_arguments", "run", "run_demo"]


@dataclass
class DemoConfig:
    """What the demo trains and sweeps."""

    out: str = "lerpfast-demo"  # output folder
    data: str = "auto"  # auto: fashion-mnist when found, else digits
    model: str = "lenet_300_100"
    epochs: int | None = None  # default: 10 on Fashion-MNIST (4690 iterations), 40 on digits; --quick: 30 on digits
    replicates: int | None = None  # default 3 (Frankle's), --quick 2
    ts: tuple[int, ...] | None = None  # starting iterations; default: 0, 4, 16, ..., 1024 and the last 1000k
    points: int = 100  # points per line (Frankle: 100)
    eval_limit: int | None = None  # evaluate on the first N test samples (default: all)
    device: str = "auto"
    threads: int | None = None  # torch threads (default: min(2, cores))
    formats: tuple[str, ...] = ("png",)
    quick: bool = False

    def resolved(self, dataset: str) -> DemoConfig:
        epochs = self.epochs or (30 if self.quick else 10 if dataset != "digits" else 40)
        reps = self.replicates or (2 if self.quick else 3)
        return DemoConfig(**{**self.__dict__, "data": dataset, "epochs": epochs, "replicates": reps})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's command-line options (used by ``lerpfast demo``)."""
    p.add_argument("--out", default="lerpfast-demo", help="output folder (default: ./lerpfast-demo)")
    p.add_argument("--quick", action="store_true",
                   help="scikit-learn digits, 30 epochs, 2 replicates: well under a minute")
    p.add_argument("--data", default=None, choices=["auto", "fashion-mnist", "mnist", "digits"],
                   help="data set (default: fashion-mnist when found, else digits; --quick: digits)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 10 on Fashion-MNIST)")
    p.add_argument("--replicates", type=int, default=None, help="replicates / seeds (default: 3)")
    p.add_argument("--ts", default=None, help="starting iterations t, comma-separated (default: from the schedule)")
    p.add_argument("--points", type=int, default=100, help="points per line (default: 100)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test samples only")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    p.add_argument("--format", default="png", help="figure formats, comma-separated: png, pdf, svg")


def _config_from_args(args: argparse.Namespace) -> DemoConfig:
    data = args.data or ("digits" if args.quick else "auto")
    ts = None if not args.ts else tuple(int(t) for t in args.ts.split(",") if t.strip())
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    return DemoConfig(out=args.out, data=data, epochs=args.epochs, replicates=args.replicates, ts=ts,
                      points=args.points, eval_limit=args.eval_limit, device=args.device, threads=args.threads,
                      formats=formats, quick=args.quick)


def _pick_dataset(name: str, root: str | None = None) -> str:
    if name != "auto":
        return name
    import lerpfast.data as ld

    try:
        ld.load("fashion-mnist", "test", root=root, limit=16)
        return "fashion-mnist"
    except FileNotFoundError:
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist): using scikit-learn's digits",
              file=sys.stderr)
        return "digits"


def run_demo(cfg: DemoConfig, *, log=print) -> dict:
    """Train, sweep, analyse and plot; returns the table rows, the files written and the timings.

    The experiment itself is :func:`lerpfast.reproduce.frankle.run_lines` (``lerpfast reproduce frankle`` runs the
    same code for LeNet-300-100 and ResNet-20 and checks the paper's claims); the demo adds Goodfellow et al.'s
    trajectory and Im et al.'s functional distance figures.

    Parameters
    ----------
    cfg : DemoConfig
    log : callable
        Where progress lines go (``print``; pass ``lambda *a: None`` for silence).

    Returns
    -------
    dict
        ``rows`` (one per t: t, max increase of loss / error as mean and std over replicates), ``files``,
        ``store``, ``seconds`` (train, sweep, total), ``dataset``, ``final_test_error``.
    """
    import torch

    from lerpfast.plot import plot_checkpoint_trajectory, plot_functional, save
    from lerpfast.reproduce._common import Context, Settings
    from lerpfast.reproduce.frankle import Setting, format_table, lines_figure, max_increase_figure, run_lines

    t_start = time.perf_counter()
    threads = cfg.threads or max(1, min(2, os.cpu_count() or 1))  # the demo's documented default
    torch.set_num_threads(threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = _pick_dataset(cfg.data)
    cfg = cfg.resolved(dataset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 25 points per pass: as fast as 100 on a CPU, a quarter of the activations (demo peak RSS 0.9 GB instead of
    # 1.9 GB with all 100), and an interrupted sweep loses at most 25 points
    setting = Setting(cfg.model, dataset, f"{cfg.epochs}ep", replicates=cfg.replicates, ts=cfg.ts or "thin",
                      points=cfg.points, eval_limit=cfg.eval_limit, eval_batch_size=2500, points_per_pass=25)
    ctx = Context(Settings(paper="demo", out=out, dataset=dataset, model=cfg.model, quick=cfg.quick, device=device,
                           threads=threads), log=log)
    log(f"training {cfg.model} on {dataset}: {cfg.epochs} epochs x {cfg.replicates} replicates, "
        f"Frankle's checkpoint schedule ({device}, {torch.get_num_threads()} threads), then sweeping "
        f"theta_t -> theta_final, {cfg.points} points each")
    try:
        lines = run_lines(ctx, setting)
    finally:
        ctx.close()
    ts, steps = lines.ts, lines.steps
    log(f"  {lines.final} iterations, checkpoints at {steps}; swept t in {ts}: {len(ts) * cfg.replicates} lines "
        f"({len(ts) * cfg.replicates * cfg.points} points)")

    # -- figures ----------------------------------------------------------------------------------------------
    files = []
    curves = {f"t={t}": lines.results[t] for t in ts}
    files += save(lines_figure(lines, title=f"{cfg.model}, {dataset}: test loss and error from $\\theta_t$ to "
                                            "$\\theta_{final}$"), out / "lines", cfg.formats)
    files += save(max_increase_figure(lines), out / "max_increase", cfg.formats)
    trajectory = plot_checkpoint_trajectory({s: lines.ckpts[0][s] for s in steps},
                                            title="replicate 0: SGD vs a random walk")
    files += save(trajectory, out / "trajectory", cfg.formats)
    files += save(plot_functional(curves, title="distance to $\\theta_t$ along $\\theta_t \\to \\theta_{final}$"),
                  out / "functional", cfg.formats)

    (out / "table.txt").write_text(format_table(lines) + "\n")
    files.append(out / "table.txt")
    total = time.perf_counter() - t_start
    return {"rows": lines.rows, "files": files, "store": ctx.store_path, "dataset": dataset,
            "final_step": lines.final, "final_test_error": lines.final_error,
            "seconds": {**lines.seconds, "total": total}, "config": cfg}


def run(args: argparse.Namespace) -> int:
    """Handler of ``lerpfast demo``."""
    cfg = _config_from_args(args)
    out = run_demo(cfg)
    print()
    print((Path(cfg.out) / "table.txt").read_text().rstrip())
    print()
    s = out["seconds"]
    print(f"done in {s['total']:.0f}s (training {s['train']:.0f}s, sweeps {s['sweep']:.0f}s). Wrote {out['store']}")
    for f in out["files"]:
        if f.suffix != ".txt":
            print(f"  {f}")
    print(f"next: lerpfast show {out['store']}   |   lerpfast plot {out['store']} --out {Path(cfg.out) / 'figs'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lerpfast.demo``."""
    p = argparse.ArgumentParser(prog="lerpfast demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
