"""Frankle (2020), "Revisiting 'Qualitatively characterizing neural network optimization problems'".

Goodfellow et al. (2015) found the test loss along the line from initialization to the trained weights simple and
roughly convex. Frankle revisits this with OpenLTH's settings: the line from the checkpoint at iteration t to the
final weights, t in {0} U {2^k : k <= 10} U {1000k : k > 1} (§2), 100 points, test loss and error, three
replicates (mean and std), and the maximum increase of loss and error along each line against t (Fig. 3). He finds
the MNIST network behaves as Goodfellow et al. said (§3, §4), while for CIFAR-10 and ImageNet networks the loss from
initialization, although "roughly monotonically non-increasing (with slight deviations on the ResNets)", stays high
until close to the optimum (§3, Fig. 1), and lines from checkpoints after a little training meet loss barriers,
"starting at about iteration 16" for VGG-16 and ResNet-20 (§4, Fig. 2), which are gone again "after iteration 8K,
2K, and 50K" for VGG-16, ResNet-20 and ResNet-50 (§4, Fig. 3).

This module is that experiment, once, for any model: :class:`Setting` says what to train and sweep,
:func:`run_lines` trains the replicates with Frankle's checkpoint schedule and sweeps every t -> final line into
the context's store, and :func:`lines_figure`, :func:`max_increase_figure` and :func:`format_table` draw and print
it. ``lerpfast demo`` (:mod:`lerpfast.demo`) runs it for LeNet-300-100; ``lerpfast reproduce frankle``
(:func:`run`) runs it for LeNet-300-100 and ResNet-20 and checks the paper's claims on the results.

The full reproduction (2 CPU cores, about half an hour) trains ResNet-20 with OpenLTH's whole CIFAR recipe (160
epochs, lr 0.1 divided by 10 at epochs 80 and 120, SGD momentum 0.9, weight decay 1e-4, batch 128) on a small real
set instead of a sliver of it on a large one: scikit-learn's digits (1,437 training, 360 test images) enlarged to
16x16 inside the network (``upsample=2``), 1,920 iterations per replicate. Every t of the schedule below the end is
swept with 100 points on all 360 test images, twice: with the batch-norm running statistics interpolated with the
weights (``bn="interpolate"``) and recomputed at every point on a fixed calibration subset of the training images
(``bn="recompute"``); the paper does not say which it does, so each policy has its own claims rows.
LeNet-300-100 (the MNIST network) trains on the run's data set: by default ``mnist5k`` (``DEFAULTS["dataset"]``),
5,000 real MNIST digits with lerpfast's fixed, stratified 4,000 / 1,000 split (docs/data.md), because the paper's
MNIST is not here and real digits are closer to it than Fashion-MNIST (``--dataset fashion-mnist`` still runs the
same setting on Fashion-MNIST). It follows OpenLTH's own LeNet recipe (``models/mnist_lenet.py``,
``default_hparams`` of facebookresearch/open_lth: batch 128, SGD with lr 0.1, no momentum or weight decay, 40
epochs, Kaiming-normal initialization, no augmentation), which is the model registry's default: 32 iterations per
epoch, 1,280 in all, so its t run 0, 1, 2, ..., 1024, each swept with 100 points on all 1,000 test images, three
replicates. :func:`run` records every difference from the paper in the notes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lerpfast.reproduce._common import Context, fmt, fmt_pm, threads

__all__ = ["TITLE", "DEFAULTS", "REFERENCES", "Setting", "Lines", "pick_ts", "run_lines", "lines_figure",
           "max_increase_figure", "max_increase_compare_figure", "init_final_figure", "format_table",
           "half_drop_alpha", "run"]

TITLE = "Frankle (2020), \"Revisiting 'Qualitatively characterizing neural network optimization problems'\""
# The MNIST network trains on real MNIST digits by default (the 5k set, fixed 4,000 / 1,000 split; --dataset
# fashion-mnist or any registered set switches it); ResNet-20 keeps its own data (CIFAR_STAND_IN, or cifar10).
DEFAULTS = {"model": "lenet_300_100", "dataset": "mnist5k"}

# The paper's own sections and figures (§1-5, Figs. 1-3, no tables or appendices); every claims row cites some of
# these and nothing else.
REFERENCES = ("abstract", "§1", "§2", "§3", "§4", "§5", "Fig. 1", "Fig. 2", "Fig. 3")

# How the paper's words become thresholds (Frankle states his barriers in loss: "increases in loss", Fig. 3).
# A barrier: the max increase of test loss along theta_t -> final above this fraction of the test loss at
# initialization (the curves' scale); the same bound is "monotonically" for the MNIST network's line.
LOSS_TOL = 0.01
# Observations only: a barrier in test error is an increase of more than one percentage point.
ERROR_TOL = 0.01
# "roughly monotonically non-increasing (with slight deviations)": a rise of at most this fraction of the drop
SLIGHT = 0.05
# "approximately convex": the curve within this fraction of its drop of its lower convex hull
CONVEX_TOL = 0.05
# "loss is flat when interpolating" (MNIST, after iteration 1000): the loss varies along the line by at most this
# fraction of the drop from initialization
FLAT_TOL = 0.05
# "The loss remains high until close to the optimum" / error at chance "until near the optimum": half of the loss
# drop from theta_0 to theta_final happens after alpha = 0.7, and the error stays within CHANCE_TOL of chance
# (1 - 1/classes) up to that alpha.
LATE_DROP_ALPHA = 0.7
CHANCE_TOL = 0.1
# "starting at about iteration 16": the first t with a barrier is at most this (a factor 4 on the log-2 schedule)
ONSET_MAX = 64

# OpenLTH's LeNet-300-100 training length (models/mnist_lenet.py, default_hparams: training_steps='40ep'; batch 128,
# SGD, lr 0.1 are the model registry's defaults): 1,280 iterations of mnist5k's 4,000 training images.
MNIST_STEPS = "40ep"
# CIFAR-10 is not here: ResNet-20 runs OpenLTH's whole CIFAR recipe on scikit-learn's digits, enlarged by this
# factor inside the network (8x8 -> 16x16: the last stage keeps a 4x4 map, as CIFAR's 32x32 keeps 8x8).
CIFAR_STAND_IN = "digits"
UPSAMPLE = 2
# How the batch-norm statistics are treated along a line (the paper does not say): both, each with its claims rows.
BN_POLICIES = ("interpolate", "recompute")
# bn="recompute" recalibrates every point on the first CALIBRATION training images (one batch; digits' split is
# shuffled and stratified, so about 26 per class): the whole 1,437 would cost 5x the evaluation itself.
CALIBRATION = 256


# ---------------------------------------------------------------------------------------------------------------------
# The experiment (shared with lerpfast.demo)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One network's t -> final experiment (Frankle's Figs. 2 and 3 for one model)."""

    model: str
    dataset: str
    steps: str  # training length, e.g. "10ep", "320it"
    replicates: int = 3
    ts: str | Sequence[int] = "all"  # "all" saved steps before the final one | "thin" (0, 4^k, last 1000k) | list
    points: int = 100  # points per line (Frankle: 100)
    eval_limit: int | None = None  # evaluate on the first N test samples (default: all)
    eval_batch_size: int = 1000
    points_per_pass: int | None = 25
    train: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields (milestones, evaluate, ...)
    sweep: dict[str, Any] = field(default_factory=dict)  # further lerpfast.sweep options
    prefix: str = ""  # sweep names are "<prefix>t=<t>@rep<r>"
    label: str = ""  # for titles (default: the model name)
    calibration: int | None = None  # bn="recompute" (in ``sweep``): the first N training images (None: all)

    @property
    def bn(self) -> str:
        """The sweeps' batch-norm policy (``sweep["bn"]``, default ``"interpolate"``)."""
        return str(self.sweep.get("bn", "interpolate"))

    @property
    def title(self) -> str:
        return self.label or self.model


@dataclass
class Lines:
    """What :func:`run_lines` gives back: the run, the sweeps and the max-increase table."""

    setting: Setting
    run_dir: Path
    ckpts: list[dict[int, Path]]  # per replicate {step: path}
    steps: list[int]  # saved by every replicate
    final: int
    ts: list[int]
    results: dict[int, list]  # t -> [SweepResult per replicate]
    increase: dict[str, np.ndarray]  # "loss" / "error" -> (R, T) max increase along t -> final
    rows: list[dict]  # per t: t, loss / error (mean, std) of the max increase, start_loss, start_error
    final_error: float  # test error of theta_final (mean over replicates, on the sweeps' test samples)
    seconds: dict[str, float]  # train, sweep

    def mean_std(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std over replicates of the max increase of ``metric``, each (T,)."""
        v = self.increase[metric]
        std = v.std(axis=0, ddof=1) if v.shape[0] > 1 else np.zeros(v.shape[1])
        return v.mean(axis=0), std


def pick_ts(steps: Sequence[int], which: str | Sequence[int] = "all") -> list[int]:
    """Starting iterations t among the saved checkpoint ``steps`` (the last one is the final weights).

    ``"all"``: every saved step before the final one (Frankle's schedule: 0, 1, 2, 4, ..., 1024, 2000, 3000, ...);
    ``"thin"``: 0, the powers of 4 up to 1024 and the last multiple of 1000 (the demo's); a list: those steps,
    each of which must be saved.
    """
    final = max(steps)
    saved = sorted(set(steps) - {final})
    if which == "all":
        return saved
    if which == "thin":
        ts = [t for t in (0, 4, 16, 64, 256, 1024) if t in saved]
        late = [t for t in saved if t > 1024 and t % 1000 == 0]
        return ts + ([max(late)] if late else [])
    ts = [int(t) for t in which]
    missing = [t for t in ts if t not in saved]
    if missing:
        raise ValueError(f"no checkpoint at t={missing}; saved steps: {sorted(steps)}")
    return ts


def run_lines(ctx: Context, s: Setting) -> Lines:
    """Train ``s.replicates`` replicates with Frankle's checkpoint schedule and sweep every t -> final line.

    Training and sweeps go through ``ctx`` (``<out>/runs``, ``<out>/results.h5``), so a second call trains and
    computes nothing: it reads the finished runs and the stored sweeps.
    """
    from lerpfast.analysis import max_increase
    from lerpfast.train import list_checkpoints, load_model

    config = dict(model=s.model, dataset=s.dataset, steps=s.steps, checkpoints="frankle", **s.train)
    t0 = time.perf_counter()
    mlp = s.model.startswith(("lenet", "mlp"))  # MLP steps are too small to share between threads
    with ctx.stage(f"train {s.title} ({s.replicates} replicates)", total=s.replicates) as bar, \
            (threads(1) if mlp else contextlib.nullcontext()):
        for r in range(s.replicates):  # one call per replicate, for the progress bar (finished ones are skipped)
            t1 = time.perf_counter()
            run_dir = ctx.train(replicates=r + 1, **config)
            bar.update()
            ctx.log(f"    {s.title} replicate {r + 1}/{s.replicates} ready (trained or found) in "
                    f"{time.perf_counter() - t1:.0f} s (elapsed {ctx.elapsed:.0f} s)")
    t_train = time.perf_counter() - t0
    ckpts = [list_checkpoints(run_dir, r) for r in range(s.replicates)]
    steps = sorted(set.intersection(*(set(c) for c in ckpts)))
    final = max(steps)
    ts = pick_ts(steps, s.ts)

    model = load_model(run_dir).to(ctx.s.device)
    test = ctx.data("test", limit=s.eval_limit, batch_size=s.eval_batch_size, dataset=s.dataset)
    alphas = f"0:1:{s.points}"
    sweep_kw = {"points_per_pass": s.points_per_pass, **s.sweep}
    if s.bn == "recompute":  # a fixed calibration subset of the training images, one batch
        n = s.calibration or ctx.data("train", dataset=s.dataset, batch_size=s.eval_batch_size).num_samples
        sweep_kw["bn_data"] = ctx.data("train", limit=s.calibration, batch_size=n, dataset=s.dataset)
    results: dict[int, list] = {t: [] for t in ts}
    t0 = time.perf_counter()
    with ctx.stage(f"sweep {s.title}: {len(ts)} t x {s.replicates} replicates x {s.points} points",
                   total=len(ts) * s.replicates) as bar:
        for t in ts:
            t1 = time.perf_counter()
            for r in range(s.replicates):
                res = ctx.sweep(f"{s.prefix}t={t}@rep{r}", model, (ckpts[r][t], ckpts[r][final]), alphas, test,
                                labels=[f"t={t}", f"final={final}"], **sweep_kw)
                results[t].append(res)
                bar.update()
            ctx.log(f"    swept {s.title} t={t} x {s.replicates} replicates in "
                    f"{time.perf_counter() - t1:.0f} s (elapsed {ctx.elapsed:.0f} s)")
    t_sweep = time.perf_counter() - t0

    increase = {m: np.asarray([[max_increase(results[t][r].alphas, results[t][r].metrics[m]) for t in ts]
                               for r in range(s.replicates)]) for m in ("loss", "error")}  # (R, T) each
    rows = []
    for j, t in enumerate(ts):
        row: dict = {"t": t}
        for m, v in increase.items():
            row[m] = (float(v[:, j].mean()), float(v[:, j].std(ddof=1)) if s.replicates > 1 else 0.0)
        for m in ("loss", "error"):  # where the path starts: the test loss / error of theta_t
            row[f"start_{m}"] = float(np.mean([res.metrics[m][np.argmin(res.alphas)] for res in results[t]]))
        rows.append(row)
    final_error = float(np.mean([res.metrics["error"][np.argmax(res.alphas)] for res in results[ts[0]]]))
    return Lines(s, run_dir, ckpts, steps, final, ts, results, increase, rows, final_error,
                 {"train": t_train, "sweep": t_sweep})


def _curves(lines: Lines, ts: Sequence[int] | None = None) -> dict[str, list]:
    return {f"t={t}": lines.results[t] for t in (lines.ts if ts is None else ts)}


def lines_figure(lines: Lines, ts: Sequence[int] | None = None, title: str | None = None):
    """Test loss and error from theta_t to theta_final, one curve per t, mean +- std over replicates (Fig. 2)."""
    from lerpfast.plot import plot_lines

    s = lines.setting
    title = title or f"{s.title}, {s.dataset}: test loss and error from $\\theta_t$ to $\\theta_{{final}}$"
    return plot_lines(_curves(lines, ts), title=title)


def max_increase_figure(lines: Lines, title: str | None = None):
    """Max increase of loss and error along theta_t -> theta_final against t, log axis (Fig. 3)."""
    from lerpfast.plot import plot_max_increase

    return plot_max_increase(lines.ts, lines.increase, title=title or "maximum increase along "
                                                                      "$\\theta_t \\to \\theta_{final}$")


def max_increase_compare_figure(settings: Sequence[Lines], title: str | None = None):
    """Max increase of test loss (top) and error (bottom) against t, log axis, one curve per setting with mean +- std
    over replicates (Frankle's Fig. 3 layout): here ResNet-20's lines under each batch-norm policy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for k, lines in enumerate(settings):
        t = np.asarray(lines.ts, dtype=np.float64)
        for ax, metric in zip(axes, ("loss", "error")):
            mean, std = lines.mean_std(metric)
            ax.plot(t, mean, color=f"C{k}", marker="o", ms=3, lw=1.3, label=lines.setting.title)
            ax.fill_between(t, mean - std, mean + std, color=f"C{k}", alpha=0.25, lw=0)
    for ax, metric in zip(axes, ("test loss", "test error")):
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_ylabel(f"max increase of {metric}")
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("starting iteration t (log scale)")
    axes[0].legend(fontsize="small", frameon=False)
    fig.suptitle(title or "maximum increase along $\\theta_t \\to \\theta_{final}$ (mean $\\pm$ std)")
    return fig


def init_final_figure(settings: Sequence[Lines]):
    """Test loss and error along theta_0 -> theta_final for each model, mean +- std over replicates (Fig. 1)."""
    from matplotlib.figure import Figure

    from lerpfast.analysis import replicate_stats

    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for k, lines in enumerate(settings):
        reps = lines.results[0]
        a = np.asarray(reps[0].alphas, dtype=np.float64)
        for ax, metric in zip(axes, ("loss", "error")):
            mean, std = replicate_stats([r.metrics[metric] for r in reps])
            ax.plot(a, mean, color=f"C{k}", lw=1.4, label=f"{lines.setting.title}, {lines.setting.dataset}")
            if len(reps) > 1:
                ax.fill_between(a, mean - std, mean + std, color=f"C{k}", alpha=0.25, lw=0)
    for ax, metric in zip(axes, ("test loss", "test error")):
        ax.set_xlabel("$\\alpha$ ($\\theta_0 \\to \\theta_{final}$)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", frameon=False)
    fig.suptitle("from initialization to the trained weights (mean $\\pm$ std over replicates)")
    return fig


def format_table(lines: Lines) -> str:
    """Max increase of test loss and error along theta_t -> theta_final against t, as printed by the demo."""
    s = lines.setting
    head = (f"max increase along theta_t -> theta_final ({s.model}, {s.dataset} test, final iteration {lines.final}, "
            f"final test error {lines.final_error:.3f}; mean +- std over {s.replicates} replicates)")
    out = [head, f"{'t':>6}  {'loss at t':>9}  {'max increase of loss':>20}  {'error at t':>10}  "
                 f"{'max increase of error':>21}"]
    for r in lines.rows:
        (lm, ls), (em, es) = r["loss"], r["error"]
        out.append(f"{r['t']:>6}  {r['start_loss']:>9.4f}  {lm:>10.4f} +- {ls:<6.4f}  {r['start_error']:>10.4f}  "
                   f"{em:>11.4f} +- {es:<6.4f}")
    return "\n".join(out)


def half_drop_alpha(alphas, values) -> float:
    """The first alpha where a curve has come down half of the way from its value at 0 to its value at 1.

    Small for a curve that falls early (convex, Goodfellow et al.'s shape), close to 1 for one that stays high
    until close to the end (Frankle's CIFAR-10 / ImageNet networks). Linear interpolation between samples; NaN if
    the curve does not fall.
    """
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(a)
    a, v = a[order], v[order]
    start, end = v[0], v[-1]
    if not end < start:
        return float("nan")
    half = 0.5 * (start + end)
    i = int(np.argmax(v <= half))  # first sample at or below half way
    if i == 0:
        return float(a[0])
    return float(a[i - 1] + (v[i - 1] - half) / (v[i - 1] - v[i]) * (a[i] - a[i - 1]))


# ---------------------------------------------------------------------------------------------------------------------
# The reproduction
# ---------------------------------------------------------------------------------------------------------------------


def _settings(ctx: Context) -> list[tuple[str, Setting]]:
    """(role, setting) pairs: "small" is the MNIST network (LeNet-300-100 by default), "modern" and
    "modern:recompute" ResNet-20's one training run swept with each of :data:`BN_POLICIES`."""
    s = ctx.s
    cpu = s.device == "cpu"
    out: list[tuple[str, Setting]] = []
    small_model = s.model
    if small_model != "resnet20":
        # CPU: 250 samples x 25 points per pass keep the engine's repeated input (25 x 250 x 784 floats, 20 MB) below
        # glibc's mmap threshold: a LeNet line costs half the CPU time of 2,500 x 25 (3.6 s instead of 7.2 s,
        # 45x fewer page faults)
        ev = dict(eval_batch_size=250, points_per_pass=25) if cpu else dict(eval_batch_size=2500, points_per_pass=None)
        if s.quick:  # scikit-learn digits: 12 iterations per epoch
            small = Setting(small_model, s.dataset, "30ep", replicates=2, points=100, **ev)
        else:  # OpenLTH's recipe: 40 epochs (1,280 iterations of mnist5k), every t of the schedule, all test images
            small = Setting(small_model, s.dataset, MNIST_STEPS, replicates=3, points=100, **ev)
        small.prefix, small.label = f"{small_model}:", _pretty(small_model)
        out.append(("small", small))
    if s.quick:
        # ResNet-20 on digits (8x8, not enlarged): 96 iterations, lr drops at 50 % / 75 %, t from the powers of four
        modern = Setting("resnet20", s.dataset, "96it", replicates=2, ts=[0, 4, 16, 64], points=21,
                         eval_batch_size=360, points_per_pass=None, calibration=128,
                         train={"milestones": "48it,72it", "evaluate": "none"})
    else:
        # OpenLTH's whole CIFAR recipe (160 epochs, lr 0.1, drops at epochs 80 / 120, SGDM 0.9, wd 1e-4, batch 128:
        # the registry's resnet20 defaults) on digits enlarged to 16x16: 1,920 iterations, every t, all 360 test
        # images. CPU: interpolate 360 samples x 50 points per pass (5.5 s a line); recompute 10 points per pass
        # (15 s a line with 256 calibration images; 25 points per pass took 32-160 s on the shared machine)
        on_cifar = s.dataset == "cifar10"
        modern = Setting("resnet20", "cifar10" if on_cifar else CIFAR_STAND_IN, "160ep", replicates=3, points=100,
                         eval_batch_size=1000 if on_cifar else 360, points_per_pass=50 if cpu else None,
                         calibration=CALIBRATION,
                         train={"milestones": "80ep,120ep", "evaluate": "none",
                                **({} if on_cifar else {"model_options": f"upsample={UPSAMPLE}"})})
    modern.prefix, modern.label = "resnet20:", "ResNet-20 (bn=interpolate)"
    modern.sweep = {"reference": None}  # the claims need loss and error only (saves the reference's 1/K)
    out.append(("modern", modern))
    for policy in BN_POLICIES[1:]:
        other = replace(modern, prefix=f"resnet20-{policy}:", label=f"ResNet-20 (bn={policy})",
                        sweep={**modern.sweep, "bn": policy})
        if policy == "recompute" and cpu and not s.quick:
            other.points_per_pass = 10
        out.append((f"modern:{policy}", other))
    return out


def _pretty(model: str) -> str:
    return {"lenet_300_100": "LeNet-300-100", "resnet20": "ResNet-20"}.get(model, model)


def _init_final(lines: Lines) -> dict[str, float]:
    """Numbers of the theta_0 -> theta_final line (mean over replicates)."""
    from lerpfast.analysis import convexity_violation

    reps = lines.results[0]
    j0 = lines.ts.index(0)
    out = {}
    for m in ("loss", "error"):
        out[f"max_increase_{m}"] = float(lines.increase[m][:, j0].mean())
        out[f"max_increase_{m}_std"] = float(lines.increase[m][:, j0].std(ddof=1)) if len(reps) > 1 else 0.0
        out[f"half_drop_alpha_{m}"] = float(np.mean([half_drop_alpha(r.alphas, r.metrics[m]) for r in reps]))
    drop = np.mean([r.loss[np.argmin(r.alphas)] - r.loss[np.argmax(r.alphas)] for r in reps])
    out["convexity_violation_loss"] = float(np.mean([convexity_violation(r.alphas, r.loss) for r in reps]))
    out["relative_convexity_violation_loss"] = out["convexity_violation_loss"] / float(drop) if drop > 0 else np.inf
    out["start_loss"] = float(np.mean([r.loss[np.argmin(r.alphas)] for r in reps]))
    return out


def run(ctx: Context) -> None:
    """``lerpfast reproduce frankle``: both networks' t -> final lines, figures and the claims table."""
    settings = _settings(ctx)
    done: dict[str, Lines] = {}
    for role, setting in settings:
        lines = run_lines(ctx, setting)
        done[role] = lines
        name = setting.prefix.rstrip(":") or setting.model  # lenet_300_100, resnet20, resnet20-recompute
        ctx.figure(lines_figure(lines, ts=_figure_ts(lines)), f"{name}_lines",
                   f"{setting.title}: test loss and error from theta_t to theta_final (Frankle Fig. 2)")
        ctx.figure(max_increase_figure(lines, title=f"{setting.title}, {setting.dataset}: maximum increase along "
                                                    "$\\theta_t \\to \\theta_{final}$"),
                   f"{name}_max_increase", f"{setting.title}: max increase of loss and error against t (Fig. 3)")
        ctx.facts[f"{name}_final_test_error"] = lines.final_error
        ctx.facts[f"{name}_final_iteration"] = lines.final
        ctx.facts[f"{name}_ts"] = lines.ts
        ctx.facts[f"{name}_table"] = lines.rows
        ctx.log(format_table(lines))
    modern = [lines for role, lines in done.items() if role.startswith("modern")]
    if len(modern) > 1:
        ctx.figure(max_increase_compare_figure(modern, title=f"ResNet-20, {modern[0].setting.dataset}: maximum "
                                               "increase along $\\theta_t \\to \\theta_{final}$"),
                   "resnet20_max_increase_bn", "ResNet-20: max increase of loss and error against t, both batch-norm "
                   "policies (Frankle Fig. 3)")
    ctx.figure(init_final_figure(list(done.values())), "init_final",
               "theta_0 -> theta_final for both networks, ResNet-20 with each batch-norm policy (Frankle Fig. 1, "
               "whose caption points to Goodfellow et al. Fig. 4a for MNIST)")

    if "small" in done:
        small = done["small"].setting.dataset
        data_note = {"fashion-mnist": "Fashion-MNIST for MNIST", "digits": "scikit-learn's 8x8 digits for MNIST",
                     "mnist5k": "real MNIST, mnist5k's 5,000 digits (4,000 train / 1,000 test) for the full "
                                "60,000 / 10,000",
                     "mnist": "", "cifar10": ""}.get(small, f"{small} for MNIST")
        _small_claims(ctx, done["small"], data_note)
    for role, lines in done.items():
        if role.startswith("modern"):
            _modern_claims(ctx, lines)
    _notes(ctx, done)


def _figure_ts(lines: Lines) -> list[int]:
    """At most 8 curves in a lines figure: 0, powers of 4 and the last t (every t is in the max-increase one)."""
    if len(lines.ts) <= 8:
        return lines.ts
    keep = [t for t in lines.ts if t == 0 or (t & (t - 1) == 0 and (t.bit_length() - 1) % 2 == 0)]
    late = [t for t in lines.ts if t > 1024]
    return sorted(set(keep[:7] + late[-1:]))


def _barrier_tol(lines: Lines) -> float:
    """A barrier counts when the max increase of test loss along theta_t -> final exceeds :data:`LOSS_TOL` x the test
    loss at initialization (the scale of the curves: about ln 10 = 2.3 nats for 10 classes)."""
    return LOSS_TOL * float(lines.rows[lines.ts.index(0)]["start_loss"])


def _small_claims(ctx: Context, lines: Lines, data_note: str) -> None:
    s = lines.setting
    n = s.replicates
    f = _init_final(lines)
    where = f"{s.title}; {data_note}" if data_note else s.title
    reduced = (f"{lines.final} iterations ({s.steps}; OpenLTH's LeNet recipe is 40 epochs, the paper states no MNIST "
               "length, only \"standard accuracy\")")
    tol = _barrier_tol(lines)
    ctx.claim(
        "MNIST network: Goodfellow et al.'s result holds: the test loss decreases \"gradually and monotonically\" "
        "from initialization to the trained weights", "§1; §3, Fig. 1",
        f"max increase of loss along theta_0 -> final {fmt_pm(f['max_increase_loss'], f['max_increase_loss_std'])} "
        f"({n} replicates; error: {fmt_pm(f['max_increase_error'], f['max_increase_error_std'])})",
        f["max_increase_loss"] <= tol,
        note=f"{where}; {reduced}; monotonically: no rise above {LOSS_TOL:g} x the loss at initialization "
             f"({fmt(tol, 3)})",
        max_increase_loss=f["max_increase_loss"], max_increase_loss_std=f["max_increase_loss_std"],
        max_increase_error=f["max_increase_error"], max_increase_error_std=f["max_increase_error_std"])
    ctx.claim(
        "MNIST network: the loss \"has a simple, approximately convex shape\", \"decreasing rapidly close to "
        "initialization and reaching a 'flat region' close to the optimum\"", "§3, Fig. 1",
        f"largest rise above the lower convex hull {fmt(f['convexity_violation_loss'])} = "
        f"{100 * f['relative_convexity_violation_loss']:.1f} % of the drop; half of the loss drop by "
        f"alpha = {fmt(f['half_drop_alpha_loss'], 2)}",
        f["relative_convexity_violation_loss"] <= CONVEX_TOL and f["half_drop_alpha_loss"] < 0.5,
        note=f"{where}; approximately convex: hull gap <= {CONVEX_TOL:g} x the drop; rapidly close to "
             "initialization: half of the drop before alpha = 0.5",
        convexity_violation_loss=f["convexity_violation_loss"],
        relative_convexity_violation_loss=f["relative_convexity_violation_loss"],
        half_drop_alpha_loss=f["half_drop_alpha_loss"], half_drop_alpha_error=f["half_drop_alpha_error"])
    lmean, lstd = lines.mean_std("loss")
    jl = int(np.argmax(lmean))
    emean, estd = lines.mean_std("error")
    je = int(np.argmax(emean))
    ctx.claim(
        "MNIST network: no loss barrier when interpolating from later iterations (\"This is not the case for "
        "MNIST\"; the test loss \"retains its convex behavior\")", "§1; §4, Figs. 2-3",
        f"largest mean max increase of loss over {len(lines.ts)} t: {fmt_pm(lmean[jl], lstd[jl])} at "
        f"t = {lines.ts[jl]}; of error: {fmt_pm(emean[je], estd[je])} at t = {lines.ts[je]}",
        bool(lmean[jl] <= tol),
        note=f"{where}; every t of the schedule up to {max(lines.ts)} of {lines.final}; barrier: max increase of "
             f"loss > {LOSS_TOL:g} x the loss at initialization ({fmt(tol, 3)})",
        max_increase_loss=lmean[jl], max_increase_loss_std=lstd[jl], loss_at_t=lines.ts[jl],
        max_increase_error=emean[je], max_increase_error_std=estd[je], at_t=lines.ts[je], tolerance=tol)
    late = [t for t in lines.ts if t >= 1000]
    after = 1000
    if not late:  # a short (quick) run: the later half of the schedule's t stands in for "after iteration 1000"
        after = lines.final // 4
        late = [t for t in lines.ts if t >= after]
    ranges = []
    for t in late:
        curve = np.mean([r.loss for r in lines.results[t]], axis=0)
        ranges.append(float(np.max(curve) - np.min(curve)))
    drop = float(f["start_loss"] - np.mean([r.loss[np.argmax(r.alphas)] for r in lines.results[0]]))
    worst = int(np.argmax(ranges))
    ctx.claim(
        "MNIST network: \"After iteration 1000 ... loss is flat when interpolating\"", "§4, Fig. 2",
        f"largest range of the mean test loss along theta_t -> final for t >= {after}: {fmt(ranges[worst])} at "
        f"t = {late[worst]} = {fmt(ranges[worst] / drop, 3)} of the drop along theta_0 -> final ({len(late)} t)",
        ranges[worst] <= FLAT_TOL * drop,
        note=f"{where}; flat: the loss varies along the line by at most {FLAT_TOL:g} x the drop from initialization"
             + ("" if after == 1000 else f"; training is shorter than 1000 iterations: t >= {after} stands in"),
        max_range=ranges[worst], relative_range=ranges[worst] / drop, at_t=late[worst], after=after)
    ctx.facts["small_init_final"] = f


def _modern_claims(ctx: Context, lines: Lines) -> None:
    s = lines.setting
    n = s.replicates
    f = _init_final(lines)
    dataset = s.dataset
    on_cifar = dataset == "cifar10"
    up = "upsample=" in s.train.get("model_options", "")
    net = f"CIFAR-10 network (bn={s.bn})"
    calib = (f"; batch norm recomputed at every point on {s.calibration or 'all'} training images"
             if s.bn == "recompute" else "; batch-norm running statistics interpolated with the weights")
    where = (f"ResNet-20 on {dataset}" + (f" enlarged to {8 * UPSAMPLE}x{8 * UPSAMPLE}" if up else "")
             + ("" if on_cifar else " (the paper: CIFAR-10, not available here)")
             + f"; {lines.final} iterations ({s.steps}; the paper: 62,560 of CIFAR-10), lr drops at 50 % / 75 %; "
             + (f"{s.points} points on {s.eval_limit} test images" if s.eval_limit else f"{s.points} points on all "
                f"test images") + calib)
    reps = lines.results[0]
    drop = float(np.mean([r.loss[np.argmin(r.alphas)] - r.loss[np.argmax(r.alphas)] for r in reps]))
    ctx.claim(
        f"{net}: \"loss is roughly monotonically non-increasing (with slight deviations on the ResNets)\" "
        "from initialization", "abstract; §3, Fig. 1",
        f"max increase of loss along theta_0 -> final {fmt_pm(f['max_increase_loss'], f['max_increase_loss_std'])} "
        f"= {fmt(f['max_increase_loss'] / drop, 3)} of the drop ({n} replicates; error: "
        f"{fmt_pm(f['max_increase_error'], f['max_increase_error_std'])})",
        f["max_increase_loss"] <= SLIGHT * drop,
        note=f"{where}; slight deviation: a rise of at most {SLIGHT:g} x the loss drop along the line (the paper "
             "reports one for ResNet-20 at x ~ 0.6)",
        max_increase_loss=f["max_increase_loss"], max_increase_loss_std=f["max_increase_loss_std"],
        relative=f["max_increase_loss"] / drop, max_increase_error=f["max_increase_error"],
        max_increase_error_std=f["max_increase_error_std"])
    ctx.claim(
        f"{net}: \"loss remains close to its initial value along most ... of the line segment\"; \"it "
        "remains high until close to the optimum\"", "abstract; §3, Fig. 1",
        f"half of the loss drop by alpha = {fmt(f['half_drop_alpha_loss'], 2)}, of the error drop by alpha = "
        f"{fmt(f['half_drop_alpha_error'], 2)} (mean of {n})",
        f["half_drop_alpha_loss"] >= LATE_DROP_ALPHA,
        note=f"{where}; close to its initial value along most of the line: half of the loss drop after alpha = "
             f"{LATE_DROP_ALPHA}",
        half_drop_alpha_loss=f["half_drop_alpha_loss"], half_drop_alpha_error=f["half_drop_alpha_error"],
        relative_convexity_violation_loss=f["relative_convexity_violation_loss"])
    a = np.asarray(reps[0].alphas, dtype=np.float64)
    err = np.mean([r.metrics["error"] for r in reps], axis=0)
    classes = int(ctx.data("test", limit=s.eval_limit, batch_size=s.eval_batch_size, dataset=s.dataset).num_classes)
    chance = 1.0 - 1.0 / classes
    below = np.flatnonzero(err < chance - CHANCE_TOL)
    leaves = float(a[below[0]]) if below.size else float("nan")
    ctx.claim(
        f"{net}: \"error remains at the level of random chance along this line segment until near ... "
        "the optimum\"", "§1",
        f"the mean test error first falls below chance ({fmt(chance, 2)}) - {CHANCE_TOL:g} at alpha = "
        f"{fmt(leaves, 2)}; error at theta_0 {fmt(float(err[0]), 3)}, at alpha = 0.5 "
        f"{fmt(float(np.interp(0.5, a, err)), 3)}",
        bool(below.size and leaves >= LATE_DROP_ALPHA),
        note=f"{where}; at the level of chance: within {CHANCE_TOL:g} of 1 - 1/classes; until near the optimum: "
             f"up to alpha = {LATE_DROP_ALPHA}",
        leaves_chance_alpha=leaves, error_at_init=float(err[0]), error_at_half=float(np.interp(0.5, a, err)),
        chance=chance)
    tol = _barrier_tol(lines)
    lmean, lstd = lines.mean_std("loss")
    emean, _ = lines.mean_std("error")
    with_barrier = [t for t, m in zip(lines.ts, lmean) if t > 0 and m > tol]
    onset = with_barrier[0] if with_barrier else None
    later = [k for k, t in enumerate(lines.ts) if t > 0]
    j = max(later, key=lambda k: lmean[k])  # the largest barrier after initialization
    frac = (lambda t: f"{100 * t / lines.final:.1f} %")
    ctx.claim(
        f"{net}: interpolating after a little training meets a loss barrier: \"increases in loss "
        "starting at about iteration 16\" (\"as early as iteration 16\")", "abstract; §1; §4, Figs. 2-3",
        (f"a mean max increase of loss > {fmt(tol, 3)} at t = {with_barrier} of {lines.ts}; first at t = {onset} "
         f"({frac(onset)} of training; the paper: 16 of 62,560, 0.03 %)" if onset is not None
         else f"no t of {lines.ts} with a mean max increase of loss > {fmt(tol, 3)}")
        + f"; largest for t > 0 {fmt_pm(lmean[j], lstd[j])} at t = {lines.ts[j]} (error there {fmt(emean[j], 3)})",
        onset is not None and onset <= ONSET_MAX,
        note=f"{where}; barrier: max increase of loss > {LOSS_TOL:g} x the loss at initialization; about iteration "
             f"16: the first t with one is at most {ONSET_MAX} (a factor 4 on the schedule's log scale)",
        peak_increase_loss=lmean[j], peak_increase_loss_std=lstd[j], peak_t=lines.ts[j],
        ts_with_barrier=float(len(with_barrier)), tolerance=tol,
        **({} if onset is None else {"onset_t": onset}))
    last = len(lines.ts) - 1
    gone = [t for t in lines.ts if t > (onset or 0) and all(m <= tol for tt, m in zip(lines.ts, lmean) if tt >= t)]
    ctx.claim(
        f"{net}: \"The optimum becomes linearly accessible again later in training\": after iteration "
        "2K (ResNet-20) \"there is no longer a barrier\"", "§4, Fig. 3",
        f"loss: {fmt_pm(lmean[0], lstd[0])} at t = 0, peak for t > 0 {fmt_pm(lmean[j], lstd[j])} at t = "
        f"{lines.ts[j]}, "
        f"{fmt_pm(lmean[last], lstd[last])} at t = {lines.ts[last]}"
        + (f"; no barrier from t = {gone[0]} on ({frac(gone[0])} of training; the paper: 2K of 62,560, 3.2 %)"
           if onset is not None and gone else ""),
        (onset is not None and bool(gone)) if onset is not None else None,
        note=f"{where}; a barrier appears (previous row) and every later t from some point on has none (max "
             f"increase of loss <= {fmt(tol, 3)})"
             + ("" if onset is not None else "; not checkable: no barrier appeared at any t"),
        at_t0=lmean[0], peak=lmean[j], peak_t=lines.ts[j], at_last_t=lmean[last], last_t=lines.ts[last],
        **({"gone_from_t": gone[0]} if onset is not None and gone else {}))
    per_rep = lines.increase["loss"][:, j]
    ctx.observe(
        f"ResNet-20 (bn={s.bn}): each replicate shows the mean's largest loss barrier",
        "ours (Figs. 2-3 plot mean and std of 3)",
        f"replicates with a max increase of loss > {fmt(tol, 3)} at t = {lines.ts[j]}: "
        f"{int((per_rep > tol).sum())}/{n} (" + ", ".join(fmt(v, 3) for v in per_rep) + ")",
        bool((per_rep > tol).all()),
        note=f"{where}; quick runs use 2 replicates" if ctx.s.quick else where,
        replicates_with_barrier=float((per_rep > tol).sum()), replicates=n, peak_t=lines.ts[j],
        spread=float(per_rep.max() - per_rep.min()))
    ctx.observe(
        f"ResNet-20 (bn={s.bn}): the same barrier question in test error", "ours (Fig. 3, bottom, plots error too)",
        "mean max increase of error by t: " + ", ".join(f"{t}: {fmt(m, 3)}" for t, m in zip(lines.ts, emean)),
        bool(any(m > ERROR_TOL for t, m in zip(lines.ts, emean) if t > 0)),
        note=f"{where}; holds: some t > 0 with a mean max increase of error > {ERROR_TOL} (1 point)",
        peak_increase_error=float(np.max(emean)), peak_error_t=lines.ts[int(np.argmax(emean))])
    ctx.facts[f"modern_init_final_{s.bn}"] = f


def _notes(ctx: Context, done: dict[str, Lines]) -> None:
    s = ctx.s
    if "small" in done and done["small"].setting.dataset == "mnist5k":
        ctx.note("Data: real MNIST digits, mnist5k (5,000 of them, lerpfast's fixed stratified split: 4,000 training, "
                 "1,000 test images; docs/data.md) in place of MNIST's 60,000 / 10,000; the paper says only that "
                 f"\"all networks reach standard accuracy\" (§2); ours {100 * (1 - done['small'].final_error):.1f} % "
                 "on the 1,000 test digits.")
    elif "small" in done and done["small"].setting.dataset != "mnist":
        small = done["small"].setting.dataset
        ctx.note(f"Data: {small} stands in for MNIST; the paper says only that \"all networks reach standard "
                 f"accuracy\" (§2); ours {100 * (1 - done['small'].final_error):.1f} % on {small}.")
    modern = done["modern"].setting
    if modern.dataset != "cifar10":
        ctx.note(f"ResNet-20 runs on {modern.dataset} (1-channel input; no CIFAR-10 here: `--dataset cifar10` where "
                 "it is installed). Its final test error: "
                 f"{100 * done['modern'].final_error:.1f} % on the sweeps' test images.")
    for lines in done.values():
        st = lines.setting
        ctx.note(f"{st.title}: {st.replicates} replicates, {lines.final} iterations ({st.steps}), t in "
                 f"{lines.ts}, {st.points} points per line, "
                 + (f"first {st.eval_limit} test images" if st.eval_limit else "the whole test set")
                 + (f", extra training options {st.train}" if st.train else "")
                 + (f", batch norm recomputed on the first {st.calibration} training images" if st.bn == "recompute"
                    else "") + ".")
    if not s.quick and modern.dataset == CIFAR_STAND_IN:
        ctx.note(f"ResNet-20 follows OpenLTH's whole CIFAR-10 recipe (the paper's \"default hyperparameters\" (§2), "
                 "which it does not state): 160 epochs, batch 128, SGD with momentum 0.9, lr 0.1 divided by 10 at "
                 "epochs 80 and 120, weight decay 1e-4; on scikit-learn's digits (1,437 training images, 12 "
                 f"iterations per epoch, {done['modern'].final} in all; the paper: 62,560 on CIFAR-10), enlarged to "
                 f"{8 * UPSAMPLE}x{8 * UPSAMPLE} by bilinear upsampling inside the network so that the last stage "
                 "keeps a 4x4 map. No augmentation: OpenLTH's crop and flip are for CIFAR (flipped digits are "
                 "other digits). Digits fit the whole schedule in minutes per replicate on 2 cores; a sliver of "
                 "the schedule on a large set does not train the network the paper interpolates to.")
    if not s.quick and "small" in done and done["small"].setting.model == "lenet_300_100":
        small = done["small"]
        ctx.note("LeNet-300-100 follows OpenLTH's LeNet recipe (facebookresearch/open_lth, models/mnist_lenet.py, "
                 "default_hparams; the paper's \"default hyperparameters\", §2): batch 128, SGD with lr 0.1, no "
                 "momentum, no weight decay, no learning-rate drops, Kaiming-normal initialization, no augmentation, "
                 f"{small.setting.steps} ({small.final} iterations of {small.setting.dataset}; OpenLTH's 40 epochs of "
                 "MNIST are 18,760); every t of its schedule below the end is swept with 100 points on the whole "
                 "test set.")
    policies = sorted({lines.setting.bn for role, lines in done.items() if role.startswith("modern")})
    ctx.note("Batch norm along a line: the paper does not say how it treats the running statistics; ResNet-20's lines "
             f"are swept with bn={' and bn='.join(policies)} (`interpolate`: running statistics interpolated with "
             "the weights; `recompute`: reset and recomputed at every point on a fixed subset of the training "
             "images), each with its own claims rows.")
