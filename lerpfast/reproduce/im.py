"""Im, Tao & Branson (2016), "An empirical analysis of the optimization of deep network loss surfaces".

The paper trains one network from ONE initialization with several optimizers (SGD, SGD with momentum, RMSprop,
Adadelta, Adam and second-order Runge-Kutta SGD) and looks at the loss between the solutions they reach:
barycentric surfaces through three solutions and bilinear surfaces through four (appendix A.1), functional
distance and label disagreement between the networks, the size of each solution's basin along the ray of
absolute length ``theta(l) = theta1 + l (theta0 - theta1) / ||theta0 - theta1||`` (eq. 1), switching optimizer
at 25 / 50 / 75 % of training, and all of it with and without batch norm. (The paper's networks are CIFAR-10
convnets, NIN and VGG; here LeNet-300-100 on Fashion-MNIST, or on scikit-learn's digits with ``--quick``.)

What runs, all from seed 0 (the same initialization, and the same minibatch order unless said otherwise):

* 6 optimizers x {without, with batch norm} (``bn=True`` puts BatchNorm1d before each hidden ReLU; for one seed
  the Linear weights of both models are the same); without batch norm a second replicate of each optimizer with
  another minibatch order (``seed_policy="data"``: same initialization), the paper's "re-runs";
* SGD switched to Adam (fresh state, Adam's rate) at 25, 50 and 75 % of training, with and without batch norm;
* per batch-norm setting: the 15 lines between the optimizers' solutions (loss, error, functional distance and
  disagreement to the first end), a barycentric surface through SGD / RK2 / Adam and a bilinear one through
  SGD+momentum / RMSprop / Adadelta / Adam, the eq.-1 ray from each solution towards the shared initialization,
  and the lines from each switched solution to the solutions of SGD alone and Adam alone; without batch norm
  also the line between the two re-runs of each optimizer, and each solution's distance to every other
  optimizer's re-run (so that both comparisons change the minibatch order).

Surfaces, lines and rays evaluate the *training* loss (the surface the optimizers descend) on a fixed part of the
training set; the networks' functions (label disagreement, functional distance) are compared on the test set,
where they differ (on the training set they all fit). With batch norm each point's running statistics are
recomputed on training data (``bn="recompute"``) before it is evaluated, so every point is a network with
statistics that fit its own weights. The claims table is computed from the stored sweeps only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from lerpfast.reproduce._common import Context, fmt, threads

TITLE = ('Im, Tao & Branson (2016), "An empirical analysis of the optimization of deep network loss surfaces": '
         "optimizers from one initialization, surfaces between their solutions, basins, switching, batch norm")
DEFAULTS = {"model": "lenet_300_100"}

# name -> (label, constant learning rate); batch 128, no weight decay, no schedule.
OPTIMIZERS: dict[str, tuple[str, float]] = {
    "sgd": ("SGD", 0.05),
    "sgdm": ("SGD+momentum", 0.005),      # momentum 0.9: the same long-run step as SGD's 0.05
    "rmsprop": ("RMSprop", 5e-4),
    "adadelta": ("Adadelta", 1.0),         # Zeiler's (and the paper's) rate: the update is not rescaled
    "adam": ("Adam", 1e-3),
    "rk_sgd_heun": ("RK2 (Heun)", 0.05),   # Runge-Kutta SGD, appendix A.3; two gradient evaluations per step
}
BARYCENTRIC = ("sgd", "rk_sgd_heun", "adam")            # theta0, theta1, theta2 of the triangle
BILINEAR = ("sgdm", "rmsprop", "adadelta", "adam")      # corners (0,0), (1,0), (0,1), (1,1)
SWITCH = ("sgd", "adam")                                # from, to
SWITCH_AT = (25, 50, 75)                                # % of training
BARRIER_TOL = 0.01  # nats: a rise of the training loss below this counts as no barrier (the loss is exact, not noisy)
THRESHOLD = 1.0     # basin edge (eq. 1): the absolute training loss where the ray leaves the basin
BASIN_DIFF = 1.25   # basin widths "differ" when the widest is at least this many times the narrowest


@dataclass(frozen=True)
class _Setting:
    steps: str          # training length
    eval_limit: int | None   # training (and test) images every sweep evaluates (None: all)
    calib_limit: int | None  # training images that recalibrate batch norm at each point
    line: int           # points per line
    grid: int           # barycentric grid side (alphas = betas = 0:1:grid)
    bilinear_step: float  # bilinear grid spacing over [-0.25, 1.25]^2
    ray_quarter: int    # ray: lambda = d * k / (4 * ray_quarter), k = -ray_quarter .. 4 * ray_quarter


FULL = _Setting(steps="5ep", eval_limit=5_000, calib_limit=1_000, line=21, grid=13, bilinear_step=0.125,
                ray_quarter=8)
QUICK = _Setting(steps="15ep", eval_limit=500, calib_limit=500, line=11, grid=7, bilinear_step=0.25,
                 ray_quarter=4)


def _label(opt: str) -> str:
    return OPTIMIZERS[opt][0]


def _tag(bn: bool) -> str:
    return "bn" if bn else "nobn"


# ------------------------------------------------------------------------------------------------------------ train


def _config(ctx: Context, opt: str, bn: bool, st: _Setting, **extra) -> dict:
    return dict(model=ctx.s.model, model_options=f"bn={bn}", dataset=ctx.s.dataset, optimizer=opt,
                lr=OPTIMIZERS[opt][1], batch_size=128, steps=st.steps, milestones="", warmup="", weight_decay=0.0,
                checkpoints="none", seed=0, seed_policy="data", resume_every="1000ep", log_every=10, **extra)


def _train_all(ctx: Context, st: _Setting) -> tuple[dict, dict]:
    """Every run; returns ``{(opt, bn): run_dir}`` and ``{(pct, bn): run_dir}`` of the switched runs."""
    runs, switched = {}, {}
    jobs = [("opt", o, bn) for bn in (False, True) for o in OPTIMIZERS]
    jobs += [("switch", p, bn) for bn in (False, True) for p in SWITCH_AT]
    with ctx.stage("train: 6 optimizers and 3 switches, without and with batch norm", total=len(jobs)) as bar, \
            threads(1):
        for kind, key, bn in jobs:
            if kind == "opt":
                # without batch norm a second replicate: same initialization, another minibatch order
                runs[(key, bn)] = ctx.train(**_config(ctx, key, bn, st, replicates=1 if bn else 2))
            else:
                old, new = SWITCH
                switched[(key, bn)] = ctx.train(**_config(ctx, old, bn, st, switch_optimizer=new,
                                                            switch_at=f"{key}%", switch_lr=OPTIMIZERS[new][1]))
            bar.update()
    return runs, switched


# ------------------------------------------------------------------------------------------------------------ helpers


def _final(run, replicate: int = 0):
    from lerpfast.train import list_checkpoints

    ck = list_checkpoints(run, replicate)
    return ck[max(ck)]


def _init(run):
    from lerpfast.train import list_checkpoints

    return list_checkpoints(run, 0)[0]


def _params(path, names: set[str]):
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    return torch.cat([sd[k].reshape(-1).double() for k in sd if k in names])


def _summary(run) -> dict:
    import json

    return json.loads((run / "replicate_0" / "summary.json").read_text())


def _at(res, alpha: float, metric: str) -> float:
    i = int(np.argmin(np.abs(res.alphas - alpha)))
    return float(res.metrics[metric][i])


# ------------------------------------------------------------------------------------------------------------ run


def run(ctx: Context) -> None:
    import torch

    from lerpfast.analysis import barrier, basin_width

    st = QUICK if ctx.s.quick else FULL
    runs, switched = _train_all(ctx, st)
    data = ctx.data("train", limit=st.eval_limit)  # the training loss: the surface the optimizers descend
    test = ctx.data("test", limit=st.eval_limit)  # functions compared on held-out images
    calib = ctx.data("train", limit=st.calib_limit)
    opts = list(OPTIMIZERS)
    pairs = list(itertools.combinations(opts, 2))

    # the same initialization for every run of a batch-norm setting (seed 0): checked, not assumed
    same_init = {}
    for bn in (False, True):
        ref = torch.load(_init(runs[(opts[0], bn)]), weights_only=True)
        others = [runs[(o, bn)] for o in opts] + [switched[(p, bn)] for p in SWITCH_AT]
        same_init[bn] = all(all(torch.equal(ref[k], v) for k, v in torch.load(_init(r), weights_only=True).items())
                            for r in others)

    n_sweeps = 2 * (2 * len(pairs) + 2 + len(opts) + 2 * len(SWITCH_AT)) + 2 * len(opts) + 2 * len(pairs)
    out: dict = {}  # (bn, kind, key) -> SweepResult
    dist_init: dict = {}  # (bn, optimizer) -> ||theta_final - theta_init|| over the parameters
    with ctx.stage(f"sweeps: lines, surfaces, rays, switches ({n_sweeps})", total=n_sweeps) as bar:
        for bn in (False, True):
            _sweep_setting(ctx, st, bar, bn, runs, switched, data, test, calib, out, dist_init)

    if not ctx.is_writer:
        return
    with ctx.stage("analysis and figures"):
        _analyse(ctx, st, out, runs, switched, dist_init, same_init, barrier, basin_width)


def _sweep_setting(ctx, st, bar, bn, runs, switched, data, test, calib, out, dist_init) -> None:
    """Every sweep of one batch-norm setting into ``out[(bn, kind, key)]``."""
    import torch

    from lerpfast import Barycentric, Bilinear, Line, Ray
    from lerpfast.train import load_model

    opts = list(OPTIMIZERS)
    tag = _tag(bn)
    model = load_model(runs[(opts[0], bn)])
    kw = dict(bn="recompute", bn_data=calib) if bn else {}
    final = {o: _final(runs[(o, bn)]) for o in opts}
    init = _init(runs[(opts[0], bn)])

    def sweep(kind, key, name, spec, on=data):
        out[(bn, kind, key)] = ctx.sweep(f"{tag}:{name}", model, spec, data=on, device=ctx.s.device, **kw)
        bar.update()

    line = f"0:1:{st.line}"
    for a, b in itertools.combinations(opts, 2):
        sweep("line", (a, b), f"line:{a}~{b}", Line(final[a], final[b], line))
        sweep("test-line", (a, b), f"test-line:{a}~{b}", Line(final[a], final[b], line), test)
    if not bn:  # re-runs: the same optimizer, another minibatch order
        second = {o: _final(runs[(o, bn)], 1) for o in opts}
        for o in opts:
            rerun = Line(final[o], second[o], line)
            sweep("rerun", o, f"rerun:{o}", rerun)
            sweep("test-rerun", o, f"test-rerun:{o}", rerun, test)
        for o, p in itertools.permutations(opts, 2):  # another optimizer AND another order: the fair comparison
            sweep("test-cross", (o, p), f"test-cross:{o}~{p}", Line(final[o], second[p], [1.0]), test)
    g = f"0:1:{st.grid}"
    sweep("bary", None, "barycentric:" + "~".join(BARYCENTRIC),
          Barycentric(*(final[o] for o in BARYCENTRIC), alphas=g, betas=g))
    gb = f"-0.25:1.25:{int(round(1.5 / st.bilinear_step)) + 1}"  # (0, 0) and (1, 1) lie exactly on the grid
    sweep("bilinear", None, "bilinear:" + "~".join(BILINEAR),
          Bilinear(*(final[o] for o in BILINEAR), alphas=gb, betas=gb))
    names = {n for n, _ in model.named_parameters()}
    theta0 = _params(init, names)
    q = st.ray_quarter
    for o in opts:
        d = float(torch.linalg.vector_norm(_params(final[o], names) - theta0))
        dist_init[(bn, o)] = d
        lambdas = [d * k / (4 * q) for k in range(-q, 4 * q + 1)]  # lambda = 0 (the solution) exactly; d: the init
        sweep("ray", o, f"ray:{o}", Ray(final[o], init, lambdas))
    old, new = SWITCH
    for p in SWITCH_AT:
        sw = _final(switched[(p, bn)])
        sweep("switch-old", p, f"switch{p}:{old}", Line(sw, final[old], line))
        sweep("switch-new", p, f"switch{p}:{new}", Line(sw, final[new], line))


# ------------------------------------------------------------------------------------------------------------ claims


def _analyse(ctx, st, out, runs, switched, dist_init, same_init, barrier, basin_width) -> None:
    opts = list(OPTIMIZERS)
    pairs = list(itertools.combinations(opts, 2))
    data_note = ("Fashion-MNIST for CIFAR-10, LeNet-300-100 for NIN / VGG" if ctx.s.dataset == "fashion-mnist"
                 else f"{ctx.s.dataset} for CIFAR-10, {ctx.s.model} for NIN / VGG")
    train_note = f"{st.steps} per run, constant rates"
    facts = ctx.facts
    facts["test_acc"] = {f"{_tag(bn)}:{o}": _summary(runs[(o, bn)]).get("test_acc") for bn in (False, True)
                         for o in opts}
    facts["train_loss_at_solution"] = {}
    facts["distance_from_init"] = {f"{_tag(bn)}:{o}": dist_init[(bn, o)] for bn in (False, True) for o in opts}
    facts["same_initialization"] = {_tag(bn): bool(v) for bn, v in same_init.items()}

    barriers, disagree, fdist, derr = {}, {}, {}, {}
    for bn in (False, True):
        for a, b in pairs:
            r = out[(bn, "line", (a, b))]
            barriers[(bn, a, b)] = barrier(r.alphas, r.loss)
            for o, al in ((a, 0.0), (b, 1.0)):
                facts["train_loss_at_solution"][f"{_tag(bn)}:{o}"] = _at(r, al, "loss")
            r = out[(bn, "test-line", (a, b))]
            disagree[(bn, a, b)] = _at(r, 1.0, "disagreement")
            fdist[(bn, a, b)] = _at(r, 1.0, "distance")
            derr[(bn, a, b)] = abs(_at(r, 1.0, "error") - _at(r, 0.0, "error"))

    # 1 / 2: different minima, different functions
    for bn in (False, True):
        bs = np.array([barriers[(bn, a, b)] for a, b in pairs])
        n_pos = int((bs > BARRIER_TOL).sum())
        lo = min(pairs, key=lambda p: barriers[(bn, *p)])
        prefix = "With batch norm: " if bn else ""
        ctx.claim(_sentence(f"{prefix}from one initialization the six optimizers reach different minima: the "
                            "training loss rises on the line between every pair of solutions"),
                  "abstract; surfaces between the optimizers' solutions",
                  f"barrier {n_pos}/{len(pairs)} pairs > {BARRIER_TOL}; min {fmt(bs.min())} "
                  f"({_label(lo[0])}-{_label(lo[1])}), median {fmt(float(np.median(bs)))}, max {fmt(bs.max())}",
                  n_pos == len(pairs),
                  note=f"{data_note}; {train_note}; training loss on {_n(ctx, st)}"
                       + ("; BN statistics recomputed at every point" if bn else ""),
                  pairs_with_barrier=n_pos, barrier_min=bs.min(), barrier_median=float(np.median(bs)),
                  barrier_max=bs.max())
    dis = np.array([disagree[(False, a, b)] for a, b in pairs])
    de = np.array([derr[(False, a, b)] for a, b in pairs])
    fd = np.array([fdist[(False, a, b)] for a, b in pairs])
    ctx.claim("Networks from different optimizers compute different functions, not just reach different weights: "
              "label disagreement well above the difference of their errors",
              "functional distance and label disagreement between the solutions",
              f"test set, {len(pairs)} pairs: disagreement median {fmt(float(np.median(dis)))} (min {fmt(dis.min())}); "
              f"|error difference| median {fmt(float(np.median(de)))}; functional distance median "
              f"{fmt(float(np.median(fd)))}",
              float(np.median(dis)) > 2 * float(np.median(de)),
              note=f"agrees when the median disagreement is > 2x the median error difference; {data_note}",
              disagreement_median=float(np.median(dis)), disagreement_min=dis.min(),
              error_difference_median=float(np.median(de)), functional_distance_median=float(np.median(fd)))

    # 3: surfaces: a separate basin at each solution
    bary, bil = out[(False, "bary", None)], out[(False, "bilinear", None)]
    rise_bary, rise_bil, k_min = _surface_stats(bary, bil)
    ctx.claim("Barycentric (3 solutions) and bilinear (4 solutions) surfaces show a separate basin around each "
              "solution, with higher loss between them",
              "barycentric / bilinear surfaces (appendix A.1)",
              f"loss at the centre above the highest corner: barycentric {fmt(rise_bary)}, bilinear "
              f"{fmt(rise_bil)}; {k_min}/4 bilinear corners are local minima of the surface",
              rise_bary > BARRIER_TOL and rise_bil > BARRIER_TOL and k_min == 4,
              note=f"barycentric {'/'.join(_label(o) for o in BARYCENTRIC)}, bilinear "
                   f"{'/'.join(_label(o) for o in BILINEAR)}; {data_note}",
              centre_rise_barycentric=rise_bary, centre_rise_bilinear=rise_bil, bilinear_corner_minima=k_min)

    # 4: re-runs of one optimizer stay together (the abstract's "characteristic choices"): the re-run of o (data
    # order 1) against o's run (order 0), and every other optimizer's re-run (order 1) against o's run (order 0), so
    # both comparisons change the minibatch order and only the second changes the optimizer
    within = {o: _at(out[(False, "test-rerun", o)], 1.0, "distance") for o in opts}
    between = {o: min(float(out[(False, "test-cross", (o, p))].metrics["distance"][0]) for p in opts if p != o)
               for o in opts}
    same_order = {o: min(fdist[(False, *sorted((o, p), key=opts.index))] for p in opts if p != o) for o in opts}
    closer = sum(within[o] < between[o] for o in opts)
    ctx.claim("Re-runs of the same optimizer (another minibatch order) end closer to each other than to any other "
              "optimizer's solution: each optimizer makes characteristic choices",
              "abstract (re-runs of one optimizer)",
              f"{closer}/6 optimizers; test-set functional distance to its own re-run median "
              f"{fmt(float(np.median(list(within.values()))))}, to the nearest other optimizer's re-run median "
              f"{fmt(float(np.median(list(between.values()))))} (same order: "
              f"{fmt(float(np.median(list(same_order.values()))))})",
              closer == len(opts),
              note="same initialization; re-runs use data order 1, the first runs order 0; functional distance = RMS "
                   f"of the softmax difference; {data_note}",
              optimizers_closer=closer, within_median=float(np.median(list(within.values()))),
              between_median=float(np.median(list(between.values()))),
              same_order_median=float(np.median(list(same_order.values()))),
              **{f"within_{o}": within[o] for o in opts}, **{f"between_{o}": between[o] for o in opts})

    # 5 / 6: basin widths along eq. 1's ray towards the initialization
    widths = {}
    for bn in (False, True):
        for o in opts:
            r = out[(bn, "ray", o)]
            widths[(bn, o)] = basin_width(r.alphas, r.loss, THRESHOLD)
    w0 = {o: widths[(False, o)] for o in opts}
    fin = [w for w in w0.values() if np.isfinite(w)]
    ratio = max(fin) / min(fin) if fin and min(fin) > 0 else float("nan")
    wide = max(opts, key=lambda o: w0[o] if np.isfinite(w0[o]) else -1)
    narrow = min(opts, key=lambda o: w0[o] if np.isfinite(w0[o]) else math.inf)
    ctx.claim("Basin size (eq. 1: distance from the solution towards the initialization until the loss crosses the "
              "threshold) depends on the optimizer",
              "eq. 1 and the basin-size comparison",
              ", ".join(f"{_label(o)} {fmt(w0[o], 2)}" for o in opts) + f" (widest/narrowest {fmt(ratio, 2)})",
              bool(ratio >= BASIN_DIFF),
              note=f"threshold: training loss {THRESHOLD}; widths in absolute weight distance; 'depends' = widest "
                   f">= {BASIN_DIFF}x narrowest; {data_note}",
              width_ratio=ratio, **{f"width_{o}": w0[o] for o in opts})
    adaptive, sgd_like = ("rmsprop", "adadelta", "adam"), ("sgd", "sgdm", "rk_sgd_heun")
    ctx.claim("Adam's solution lies in a larger basin than SGD's",
              "basin-size comparison (our reading of it)",
              f"Adam {fmt(w0['adam'], 2)} vs SGD {fmt(w0['sgd'], 2)}; widest {_label(wide)}, narrowest "
              f"{_label(narrow)}; adaptive (RMSprop, Adadelta, Adam) {fmt(min(w0[o] for o in adaptive), 2)}-"
              f"{fmt(max(w0[o] for o in adaptive), 2)}, SGD-like {fmt(min(w0[o] for o in sgd_like), 2)}-"
              f"{fmt(max(w0[o] for o in sgd_like), 2)}",
              w0["adam"] > w0["sgd"],
              note="in units of each solution's distance from the initialization: Adam "
                   f"{fmt(w0['adam'] / dist_init[(False, 'adam')], 2)} ({fmt(dist_init[(False, 'adam')], 1)} away), "
                   f"SGD {fmt(w0['sgd'] / dist_init[(False, 'sgd')], 2)} ({fmt(dist_init[(False, 'sgd')], 1)} away)",
              width_adam=w0["adam"], width_sgd=w0["sgd"], distance_adam=dist_init[(False, "adam")],
              distance_sgd=dist_init[(False, "sgd")])

    # 7 / 8: switching optimizers (with and without batch norm)
    old, new = SWITCH
    for bn in (False, True):
        prefix = "With batch norm: " if bn else ""
        b_old = {p: barrier(out[(bn, "switch-old", p)].alphas, out[(bn, "switch-old", p)].loss) for p in SWITCH_AT}
        b_new = {p: barrier(out[(bn, "switch-new", p)].alphas, out[(bn, "switch-new", p)].loss) for p in SWITCH_AT}
        ctx.claim(_sentence(f"{prefix}switching optimizer ({_label(old)} -> {_label(new)}) even late in training "
                            "ends in a different basin from the run that never switched"),
                  "switching optimizers at 25 / 50 / 75 % of training",
                  "barrier switched<->unswitched " + ", ".join(f"{p}%: {fmt(b_old[p])}" for p in SWITCH_AT),
                  all(b_old[p] > BARRIER_TOL for p in SWITCH_AT),
                  note=f"{data_note}; fresh {_label(new)} state at the switch, its own rate"
                       + ("; BN statistics recomputed at every point" if bn else ""),
                  **{f"barrier_unswitched_{p}": b_old[p] for p in SWITCH_AT})
        ctx.claim(_sentence(f"{prefix}the switched run also ends apart from the minimum that {_label(new)} alone "
                            "reaches"),
                  "switching optimizers at 25 / 50 / 75 % of training",
                  f"barrier switched<->{_label(new)} alone " + ", ".join(f"{p}%: {fmt(b_new[p])}" for p in SWITCH_AT),
                  all(b_new[p] > BARRIER_TOL for p in SWITCH_AT),
                  note=data_note, **{f"barrier_{new}_alone_{p}": b_new[p] for p in SWITCH_AT})

    # 9: batch norm changes the landscape: steeper valleys (narrower basins) around the solutions
    w1 = {o: widths[(True, o)] for o in opts}
    narrower = sum(w1[o] < w0[o] for o in opts)
    med0 = float(np.median([barriers[(False, a, b)] for a, b in pairs]))
    med1 = float(np.median([barriers[(True, a, b)] for a, b in pairs]))
    ctx.claim("Batch norm changes the surface: the solutions sit in steeper valleys (narrower basins along eq. 1) "
              "rather than on plateaus",
              "surfaces with / without batch norm",
              f"basin narrower with BN for {narrower}/6 optimizers (median width "
              f"{fmt(float(np.median(list(w0.values()))), 2)} -> {fmt(float(np.median(list(w1.values()))), 2)}); "
              "median barrier between optimizers "
              f"{fmt(med0)} -> {fmt(med1)}",
              narrower >= 5,
              note="agrees when >= 5 of 6 basins are narrower with BN; BN statistics recomputed at every point; "
                   f"{data_note}",
              basins_narrower_with_bn=narrower, median_width_nobn=float(np.median(list(w0.values()))),
              median_width_bn=float(np.median(list(w1.values()))), median_barrier_nobn=med0,
              median_barrier_bn=med1, **{f"width_bn_{o}": w1[o] for o in opts})

    facts["basin_width"] = {f"{_tag(bn)}:{o}": widths[(bn, o)] for bn in (False, True) for o in opts}
    facts["barrier"] = {f"{_tag(bn)}:{a}~{b}": barriers[(bn, a, b)] for bn in (False, True) for a, b in pairs}
    ctx.note(f"Training: LeNet-style MLP ({ctx.s.model}) on {ctx.s.dataset}, batch 128, {st.steps}, constant rates "
             + ", ".join(f"{_label(o)} {OPTIMIZERS[o][1]:g}" for o in opts) + "; seed 0 for every run (the same "
             "initialization: checked bit for bit), the same minibatch order except the re-runs (data seed 1).")
    ctx.note(f"Loss surfaces (lines, planes, rays) are the training loss on {_n(ctx, st)}; functions are compared "
             f"(disagreement, functional distance, error difference) on {_n(ctx, st, 'test')}; with batch norm every "
             "point's statistics "
             f"are recomputed on {'the first ' + str(st.calib_limit) if st.calib_limit else 'all'} training images "
             f"(bn='recompute'). Barrier = max over the line of the loss above the chord between its ends; a barrier "
             f"counts when > {BARRIER_TOL}.")
    ctx.note("Test accuracy of the solutions: " + ", ".join(
        f"{_label(o)} {facts['test_acc'][f'nobn:{o}']:.4f} / {facts['test_acc'][f'bn:{o}']:.4f} (BN)" for o in opts))
    _figures(ctx, out, widths, barriers, disagree, dist_init)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _n(ctx, st, split: str = "training") -> str:
    return f"the first {st.eval_limit:,} {split} images" if st.eval_limit else f"the whole {split} split"


def _surface_stats(bary, bil) -> tuple[float, float, int]:
    """(centroid loss - max corner loss) of the barycentric surface, the same at (0.5, 0.5) of the bilinear one,
    and how many bilinear corners are strict local minima of the grid (8 neighbours)."""
    c = bary.coords
    corners = [bary.loss[np.flatnonzero((c[:, 0] == a) & (c[:, 1] == b))[0]] for a, b in ((0, 0), (1, 1), (1, 0))]
    i = int(np.argmin((c[:, 0] - 2 / 3) ** 2 + (c[:, 1] - 0.5) ** 2))  # centroid: a*b = a*(1-b) = 1/3
    rise_bary = float(bary.loss[i] - max(corners))
    z = bil.grid("loss")
    xs, ys = bil.axes()
    ij = [(int(np.argmin(np.abs(xs - a))), int(np.argmin(np.abs(ys - b)))) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
    ci, cj = int(np.argmin(np.abs(xs - 0.5))), int(np.argmin(np.abs(ys - 0.5)))
    rise_bil = float(z[ci, cj] - max(z[i, j] for i, j in ij))
    k = 0
    for i, j in ij:
        nb = z[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].copy()
        nb[min(i, 1), min(j, 1)] = np.inf
        k += bool(z[i, j] < nb.min())
    return rise_bary, rise_bil, k


# ------------------------------------------------------------------------------------------------------------ figures


def _figures(ctx, out, widths, barriers, disagree, dist_init) -> None:
    from matplotlib.figure import Figure

    from lerpfast.plot import plot_plane

    opts = list(OPTIMIZERS)
    labels = [_label(o) for o in opts]

    # pairwise barrier and disagreement matrices, without and with batch norm
    fig = Figure(figsize=(9.0, 7.4), layout="constrained")
    axes = fig.subplots(2, 2)
    for row, bn in enumerate((False, True)):
        for col, (vals, name) in enumerate(((barriers, "training-loss barrier"),
                                            (disagree, "test-set label disagreement"))):
            m = np.zeros((len(opts), len(opts)))
            for (b, x, y), v in vals.items():
                if b == bn:
                    i, j = opts.index(x), opts.index(y)
                    m[i, j] = m[j, i] = v
            ax = axes[row, col]
            im = ax.imshow(m, cmap="magma")
            for i in range(len(opts)):
                for j in range(len(opts)):
                    if i != j:
                        ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=7,
                                color="w" if m[i, j] < 0.6 * m.max() else "k")
            ax.set_xticks(range(len(opts)), labels, rotation=40, ha="right", fontsize=7)
            ax.set_yticks(range(len(opts)), labels, fontsize=7)
            ax.set_title(f"{name}, {'with' if bn else 'without'} batch norm", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Between the solutions of six optimizers from one initialization")
    ctx.figure(fig, "pairs", "Barrier of the training loss (its max above the chord) on the line between every pair "
                             "of solutions, and the pair's label disagreement on the test set, without (top) and "
                             "with (bottom) batch norm")

    for bn in (False, True):
        suffix, what = ("_bn", " (BN)") if bn else ("", "")
        cap = ", with batch norm (statistics recomputed at every point)" if bn else ", without batch norm"
        r = out[(bn, "bary", None)]
        corners = ", ".join(f"$\\theta_{i}$ {_label(o)}" for i, o in enumerate(BARYCENTRIC))
        fig = plot_plane(r, "loss", logz=True, title=f"barycentric: {corners}{what}")
        ctx.figure(fig, f"barycentric{suffix}",
                   f"Training loss (log10) on the triangle through the {', '.join(_label(o) for o in BARYCENTRIC)} "
                   f"solutions (theta0, theta1, theta2){cap}")
        r = out[(bn, "bilinear", None)]
        corners = ", ".join(f"{c} {_label(o)}" for c, o in zip(("(0,0)", "(1,0)", "(0,1)", "(1,1)"), BILINEAR))
        fig = plot_plane(r, "loss", logz=True, title=f"bilinear: {corners}{what}")
        ctx.figure(fig, f"bilinear{suffix}",
                   f"Training loss (log10) on the bilinear surface through the {', '.join(_label(o) for o in BILINEAR)}"
                   f" solutions at corners (0,0), (1,0), (0,1), (1,1){cap}")

    # rays (eq. 1) with the basin threshold
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, bn in zip(axes, (False, True)):
        for k, o in enumerate(opts):
            r = out[(bn, "ray", o)]
            ax.plot(r.alphas, r.loss, color=f"C{k}", lw=1.3, label=f"{_label(o)} ({fmt(widths[(bn, o)], 1)})")
            if np.isfinite(widths[(bn, o)]):
                ax.plot([widths[(bn, o)]], [THRESHOLD], marker="o", color=f"C{k}", ms=4)
            ax.axvline(dist_init[(bn, o)], color=f"C{k}", lw=0.6, ls=":")
        ax.axhline(THRESHOLD, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel(r"distance $\lambda$ from the solution towards the initialization")
        ax.set_title(f"{'with' if bn else 'without'} batch norm", fontsize=9)
        ax.legend(fontsize=7, frameon=False, title="basin width", title_fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.suptitle(f"Eq. 1 rays: basin width where the loss crosses {THRESHOLD} (dotted: the initialization)")
    ctx.figure(fig, "rays", "Training loss along eq. 1's ray from each solution towards the shared initialization; "
                            f"dots mark the basin width at loss {THRESHOLD}, dotted lines the initialization")

    # switching
    old, new = SWITCH
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, bn in zip(axes, (False, True)):
        for k, p in enumerate(SWITCH_AT):
            for kind, ls, who in (("switch-old", "-", f"{_label(old)} alone"),
                                  ("switch-new", "--", f"{_label(new)} alone")):
                r = out[(bn, kind, p)]
                ax.plot(r.alphas, r.loss, color=f"C{k}", ls=ls, lw=1.3, label=f"switch at {p}% -> {who}")
        ax.set_xlabel(r"$\alpha$ (0: switched solution)")
        ax.set_title(f"{'with' if bn else 'without'} batch norm", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.suptitle(f"{_label(old)} switched to {_label(new)}: lines to the solutions of either optimizer alone")
    ctx.figure(fig, "switch", f"Training loss on the lines from the runs switched from {_label(old)} to "
                              f"{_label(new)} at 25/50/75 % to the {_label(old)}-only (solid) and {_label(new)}-only "
                              "(dashed) solutions")

    # functional distance along the lines from SGD
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for k, o in enumerate(opts[1:]):
        r = out[(False, "test-line", ("sgd", o))]
        for ax, metric in zip(axes, ("distance", "disagreement")):
            ax.plot(r.alphas, r.metrics[metric], color=f"C{k + 1}", lw=1.3, label=f"SGD -> {_label(o)}")
    for ax, metric in zip(axes, ("functional distance to SGD's network", "label disagreement with SGD's network")):
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Test set: functional distance and disagreement along the lines from the SGD solution (no BN)")
    ctx.figure(fig, "functional", "Functional distance (RMS of the softmax difference) and label disagreement with the "
                                  "SGD solution on the test set, along the lines to the other optimizers' solutions")
