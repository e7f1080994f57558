"""Im, Tao & Branson (2016), "An empirical analysis of deep network loss surfaces".

The paper trains CIFAR-10 convnets (NIN, VGG; batch norm and dropout, §3.4) with seven methods (§3.2): SGD, SGD with
momentum, RMSprop, Adadelta, ADAM, and second-order Runge-Kutta with SGD (RK2) and with ADAM (ADAM&RK2), the RK rates
doubled (§3.4). From ONE initialization and minibatching the methods reach different minima: the training loss rises
sharply between every pair of solutions (§4.1, Table 1), also on surfaces through three and four of them (Figs. 2-3),
and the networks disagree on "over 1/3" of the test examples they could disagree on (eq. 4.1). Past a solution the
loss increases (§3.3, Fig. 10). Re-run from different initializations (§4.2), each method lands in different minima
whose surroundings look "strikingly similar for different runs of the same algorithm, but characteristically
different for different algorithms" (Fig. 5), ADAM's and ADAM&RK2's basins wider than SGD's and RK2's in units of
``alpha`` (Fig. 5a, c) and basin sizes varying by method along eq. 1's ray ``theta(l) = theta1 + l (theta0 -
theta1) / ||theta0 - theta1||`` (Fig. 6). Switching method at 25 / 50 / 75 % of training still ends in a different
minimum (§4.3, Fig. 7). Without batch norm the quality of the minimum depends more on the initialization, and the
surfaces between minima are "wide bumpy" instead of "sharp unimodal" (§4.4, Table 2, Fig. 8).

Here LeNet-300-100 with batch norm (BatchNorm1d before each hidden ReLU) and dropout (after it): the paper's setting;
and without batch norm (the §4.4 variant), on Fashion-MNIST, or on scikit-learn's digits with ``--quick``. Every
rate is multiplied by 0.2 at half of training (ours: the paper states no schedule), so that the switch at 75 % falls
in the slow "minimization" phase §4.3 speaks of. The MLP stands in for the paper's NIN / VGG: CIFAR-10 is not on
this machine (``lerpfast reproduce im --dataset cifar10 --model nin`` is the command where it is; not run here).
``--model nin`` on scikit-learn's digits (``lerpfast reproduce im --model nin --dataset digits``) runs the small
batch-norm convnet instead: NIN at width 0.25 (``NIN_WIDTH``), 30 epochs, the sweeps on ``--quick``'s grids
(``CONV``), about 8.5 minutes on one thread.

* 7 methods x {with, without batch norm} x 2 initializations (seeds 0 and 1, ``seed_policy="init"``: the same
  minibatch order); seed 0 is the shared initialization of §4.1 (for one seed the Linear weights of both models are
  the same);
* switched runs (fresh state, the new method's rate): SGD -> ADAM at 25, 50 and 75 % of training with and without
  batch norm; with batch norm also ADAM -> SGD at 25 / 50 / 75 % and SGD <-> Adadelta, ADAM <-> Adadelta at 50 %
  (§4.3, App. A.6);
* SGD from the exotic initializations N(-10, 0.01) and N(-1, 1) of App. A.5, with and without batch norm;
* per batch-norm setting: the 21 lines between the methods' solutions (training loss; on the test set also the
  functional distance and disagreement to the first end), the triangles (init, A, B) of Table 1 for every pair of
  SGD / RK2 / ADAM / ADAM&RK2, the quadrilateral of Fig. 2 (two initializations and their SGD solutions), a bilinear
  surface through SGD+momentum / RMSprop / Adadelta / Adam (Fig. 3) and a barycentric one through SGD / RK2 / Adam
  (ours), the eq.-1 ray from each solution towards the initialization, the init -> final line of every run of both
  initializations continued to alpha = 2 (Figs. 5a, c and 10), the lines from each switched solution to the
  solutions of either method alone, and the lines from the exotic initializations.

Training accuracy and the distance from the initialization after a switch (Fig. 7 left / middle) come from the
training logs; the accuracies of Fig. 4 from the sweeps (training) and the runs' summaries (test).

Surfaces, lines and rays evaluate the *training* loss (the surface the optimizers descend) on a fixed part of the
training set; the networks' functions (label disagreement, functional distance) are compared on the test set. With
batch norm each point's running statistics are recomputed on training data (``bn="recompute"``) before it is
evaluated; the paper does not say how it treats them. The claims table is computed from the stored sweeps only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from lerpfast.reproduce._common import Context, fmt, threads

TITLE = ('Im, Tao & Branson (2016), "An empirical analysis of deep network loss surfaces": seven methods from one '
         "initialization, surfaces between their solutions, basins, switching, batch norm")
DEFAULTS = {"model": "lenet_300_100"}
# The paper's own sections, appendices, figures, tables and numbered equations (the text in ../shared/papers: §1-5,
# A.1-A.6, Figs. 1-15, Tables 1-3, eq. 1 and the distance of §4.1, which §4.1 calls Equation 4.1). Unnumbered
# headings are numbered by the paper's own cross-references (§4.1-4.4; A.4 = "Experiments with Runge-Kutta
# integrator"). Every claims row cites some of these and nothing else.
REFERENCES = ("abstract", "§1", "§2", "§2.1", "§2.2", "§2.2.1", "§3", "§3.1", "§3.2", "§3.3", "§3.4", "§4", "§4.1",
              "§4.2", "§4.3", "§4.4", "§5", "App. A", "App. A.1", "App. A.2", "App. A.2.1", "App. A.2.2",
              "App. A.2.3", "App. A.3", "App. A.3.1", "App. A.4", "App. A.5", "App. A.6",
              *(f"Fig. {i}" for i in range(1, 16)), "Table 1", "Table 2", "Table 3", "eq. 1", "eq. 4.1")

# name -> (label, constant learning rate); batch 128 (§3.4), no weight decay, no schedule. Rates from the paper's
# grids (§3.4: {0.2, 0.1, 0.05, 0.01} for SGD, {0.002, 0.001, 0.0005, 0.0001} for the adaptive methods), doubled for
# the Runge-Kutta versions ("We doubled the learning rates when we ran our augmented versions with Runge-Kutta").
OPTIMIZERS: dict[str, tuple[str, float]] = {
    "sgd": ("SGD", 0.05),
    "sgdm": ("SGD+momentum", 0.01),        # momentum 0.9; the grid's smallest SGD rate
    "rmsprop": ("RMSprop", 5e-4),
    "adadelta": ("Adadelta", 1.0),         # Zeiler's (and the paper's, A.2.3) rate: the update is not rescaled
    "adam": ("Adam", 1e-3),
    "rk_sgd_heun": ("RK2", 0.1),           # Runge-Kutta SGD (Heun), A.3; SGD's 0.05 doubled
    "rk_adam_heun": ("ADAM&RK2", 2e-3),    # Runge-Kutta ADAM (Heun), A.3.1; Adam's 1e-3 doubled
}
BARYCENTRIC = ("sgd", "rk_sgd_heun", "adam")            # theta0, theta1, theta2 of the triangle (ours)
BILINEAR = ("sgdm", "rmsprop", "adadelta", "adam")      # corners (0,0), (1,0), (0,1), (1,1) (four methods, Fig. 3)
TRIANGLE = ("sgd", "rk_sgd_heun", "adam", "rk_adam_heun")  # Table 1's triangles (init, A, B) for every pair of these
SWITCH = ("sgd", "adam")                                # from, to: run with and without batch norm
SWITCH_AT = (25, 50, 75)                                # % of training (§4.3)
# the other switches of §4.3 / App. A.6 (Figs. 7, 12-15), with batch norm (the paper's setting): (from, to, %)
SWITCHES_BN = (("adam", "sgd", 25), ("adam", "sgd", 50), ("adam", "sgd", 75), ("sgd", "adadelta", 50),
               ("adadelta", "sgd", 50), ("adam", "adadelta", 50), ("adadelta", "adam", 50))
EXOTIC = ("normal(-10,0.01)", "normal(-1,1)")           # App. A.5: N(-10, 0.01) and N(-1, 1), trained with SGD
DROPOUT = 0.3       # §3.4 "batchnormalization and dropout"; the rate is not stated (ours), after every hidden ReLU
MILESTONES, GAMMA = "50%", 0.2  # a decaying rate (ours: the paper states none): x0.2 at half of training, so the
# switch at 75 % falls in the slow "minimization" phase (§4.3); the switched optimizer's rate decays alike
# How the paper's words become thresholds:
BARRIER_TOL = 0.01  # nats: "a sharp increase" / "separated by high loss": a rise above the chord of more than this
# (lenient: any visible rise counts; the loss is an exact average, not noisy)
THRESHOLD = 1.0     # "the training loss is small" (§4.2): below this (the loss at initialization is ~2.3 = ln 10)
BASIN_DIFF = 1.25   # "varies by optimization algorithm": the widest basin at least this many times the narrowest
THIRD = 1 / 3       # "over 1/3rd" of the maximum possible disagreement (the sum of the two networks' test errors)
MUCH_MORE = 2.0     # "much more dependent on the initialization": the error spread between inits this many times
SIGNIFICANT = 0.05  # "not significantly different" / "no relationship" (Fig. 4b): a test's p-value above this
FEW = 0.05          # "within a few epochs" (§4.3): 5 % of training after the switch (10 of the paper's 200 epochs)
NO_TRAIN = 0.8      # "does not train at all" (App. A.5): training error still at least this (chance: 0.9)
FLAT = 0.01         # a "plateau" (App. A.5): the training loss moves by less than this fraction over training


@dataclass(frozen=True)
class _Setting:
    steps: str          # training length
    eval_limit: int | None   # training (and test) images every sweep evaluates (None: all)
    calib_limit: int | None  # training images that recalibrate batch norm at each point
    line: int           # points per line
    grid: int           # barycentric grid side (alphas = betas = 0:1:grid)
    bilinear_step: float  # bilinear grid spacing over [-0.25, 1.25]^2
    ray_quarter: int    # ray: lambda = d * k / (4 * ray_quarter), k = -ray_quarter .. 4 * ray_quarter
    log_every: int      # training log (loss, accuracy, distance from init) every N steps


FULL = _Setting(steps="6ep", eval_limit=5_000, calib_limit=1_000, line=21, grid=13, bilinear_step=0.125,
                ray_quarter=8, log_every=10)
QUICK = _Setting(steps="15ep", eval_limit=500, calib_limit=500, line=11, grid=7, bilinear_step=0.25,
                 ray_quarter=4, log_every=2)
# the small batch-norm convnet (``--model nin``; issue 13): NIN trained 30 epochs (15 leave SGD at 82 % test accuracy
# on digits, 30 at 95 %), the sweeps on QUICK's grids and 500 training images, batch norm recalibrated on 250 (a
# point costs ~65 ms on one thread with NIN at width 0.25 on 8x8 digits: ~3,100 points: 153 s of the full run)
CONV = _Setting(steps="30ep", eval_limit=500, calib_limit=250, line=11, grid=7, bilinear_step=0.25,
                ray_quarter=4, log_every=2)
# models the module trains: each takes ``bn`` and ``dropout`` (the zoo's VGGs have no dropout)
MODELS = ("lenet_300_100", "mlp", "nin")
# NIN's channel multiplier per data set (the paper's NIN elsewhere): at width 0.25 one 30-epoch training on the 1,437
# 8x8 digits takes ~9 s on one thread (width 0.5: 17 s; width 0.25 on mnist5k's 28x28 images: 42 s for 5 epochs)
NIN_WIDTH = {"digits": 0.25}
INITS = 2  # initializations per method and batch-norm setting (§4.2: "different initial parameters")


def _label(opt: str) -> str:
    return OPTIMIZERS[opt][0]


def _tag(bn: bool) -> str:
    return "bn" if bn else "nobn"


# ------------------------------------------------------------------------------------------------------------ train


def _setting(ctx: Context) -> _Setting:
    """QUICK with ``--quick``; CONV for the convnet (``--model nin``); else FULL (the MLP)."""
    if ctx.s.quick:
        return QUICK
    return CONV if ctx.s.model == "nin" else FULL


def _width(ctx: Context) -> float | None:
    """NIN's channel multiplier on this data set (None: not NIN, or the paper's full width)."""
    return NIN_WIDTH.get(ctx.s.dataset) if ctx.s.model == "nin" else None


def _model_note(ctx: Context) -> str:
    """What stands for the paper's NIN / VGG, in words."""
    if ctx.s.model == "lenet_300_100":
        return "LeNet-300-100"
    if ctx.s.model == "nin":
        w = _width(ctx)
        return "NIN" + (f" at width {w:g}" if w else "")
    return ctx.s.model


def _config(ctx: Context, opt: str, bn: bool, st: _Setting, init: str | None = None, **extra) -> dict:
    w = _width(ctx)
    options = (f"bn={bn},dropout={DROPOUT}" + (f",width={w:g}" if w else "") + (f",init={init}" if init else ""))
    return dict(model=ctx.s.model, model_options=options, dataset=ctx.s.dataset, optimizer=opt,
                lr=OPTIMIZERS[opt][1], batch_size=128, steps=st.steps, milestones=MILESTONES, gamma=GAMMA,
                warmup="", weight_decay=0.0, checkpoints="none", seed=0, seed_policy="init", resume_every="1000ep",
                log_every=st.log_every, **extra)


def _switches() -> list[tuple[str, str, int, bool]]:
    """Every switched run as ``(from, to, percent, bn)``."""
    old, new = SWITCH
    return ([(old, new, p, bn) for bn in (True, False) for p in SWITCH_AT]
            + [(a, b, p, True) for a, b, p in SWITCHES_BN])


def _train_all(ctx: Context, st: _Setting) -> tuple[dict, dict, dict]:
    """Every run: ``{(opt, bn): run_dir}``, ``{(from, to, pct, bn): run_dir}`` of the switched runs and
    ``{(init, bn): run_dir}`` of the exotic initializations (SGD)."""
    runs, switched, exotic = {}, {}, {}
    jobs = [("opt", (o, bn)) for bn in (True, False) for o in OPTIMIZERS]
    jobs += [("switch", k) for k in _switches()]
    jobs += [("exotic", (e, bn)) for bn in (True, False) for e in EXOTIC]
    with ctx.stage(f"train: {len(OPTIMIZERS)} methods x {INITS} initializations, {len(_switches())} switched runs, "
                   f"{len(EXOTIC)} exotic initializations, with and without batch norm", total=len(jobs)) as bar, \
            threads(1):
        for kind, key in jobs:
            if kind == "opt":
                # replicate 1: another initialization (seed 1), the same minibatch order (§4.2)
                runs[key] = ctx.train(**_config(ctx, key[0], key[1], st, replicates=INITS))
            elif kind == "switch":
                old, new, p, bn = key
                switched[key] = ctx.train(**_config(ctx, old, bn, st, switch_optimizer=new, switch_at=f"{p}%",
                                                    switch_lr=OPTIMIZERS[new][1]))
            else:
                exotic[key] = ctx.train(**_config(ctx, "sgd", key[1], st, init=key[0]))
            bar.update()
    return runs, switched, exotic


# ------------------------------------------------------------------------------------------------------------ helpers


def _final(run, replicate: int = 0):
    from lerpfast.train import list_checkpoints

    ck = list_checkpoints(run, replicate)
    return ck[max(ck)]


def _init(run, replicate: int = 0):
    from lerpfast.train import list_checkpoints

    return list_checkpoints(run, replicate)[0]


def _params(path, names: set[str]):
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    return torch.cat([sd[k].reshape(-1).double() for k in sd if k in names])


def _summary(run, replicate: int = 0) -> dict:
    import json

    return json.loads((run / f"replicate_{replicate}" / "summary.json").read_text())


def _at(res, alpha: float, metric: str) -> float:
    i = int(np.argmin(np.abs(res.alphas - alpha)))
    return float(res.metrics[metric][i])


# ------------------------------------------------------------------------------------------------------------ run


def run(ctx: Context) -> None:
    import torch

    from lerpfast.analysis import barrier, basin_width

    if ctx.s.model not in MODELS:
        raise ValueError(f"lerpfast reproduce im: --model {ctx.s.model!r} is not supported (it needs the options bn "
                         f"and dropout); choose one of {', '.join(MODELS)}")
    st = _setting(ctx)
    runs, switched, exotic = _train_all(ctx, st)
    data = ctx.data("train", limit=st.eval_limit)  # the training loss: the surface the optimizers descend
    test = ctx.data("test", limit=st.eval_limit)  # functions compared on held-out images
    calib = ctx.data("train", limit=st.calib_limit)
    opts = list(OPTIMIZERS)

    # the same initialization for every run of a batch-norm setting (seed 0): checked, not assumed
    same_init = {}
    for bn in (False, True):
        ref = torch.load(_init(runs[(opts[0], bn)]), weights_only=True)
        others = [runs[(o, bn)] for o in opts] + [r for k, r in switched.items() if k[3] == bn]
        same_init[bn] = all(all(torch.equal(ref[k], v) for k, v in torch.load(_init(r), weights_only=True).items())
                            for r in others)

    n_sweeps = sum(_n_sweeps(bn) for bn in (True, False))
    out: dict = {}  # (bn, kind, key) -> SweepResult
    dist_init: dict = {}  # (bn, optimizer) -> ||theta_final - theta_init|| over the parameters
    with ctx.stage(f"sweeps: lines, surfaces, triangles, rays, switches, exotic initializations ({n_sweeps})",
                   total=n_sweeps) as bar:
        for bn in (True, False):
            _sweep_setting(ctx, st, bar, bn, runs, switched, exotic, data, test, calib, out, dist_init)

    if not ctx.is_writer:
        return
    with ctx.stage("analysis and figures"):
        _analyse(ctx, st, out, runs, switched, exotic, dist_init, same_init, barrier, basin_width)


def _n_sweeps(bn: bool) -> int:
    n_pairs = len(OPTIMIZERS) * (len(OPTIMIZERS) - 1) // 2
    n_tri = len(TRIANGLE) * (len(TRIANGLE) - 1) // 2
    return (2 * n_pairs + 3 + n_tri + len(OPTIMIZERS) * (1 + INITS) + 2 * sum(k[3] == bn for k in _switches())
            + 2 * len(EXOTIC))


def _sweep_setting(ctx, st, bar, bn, runs, switched, exotic, data, test, calib, out, dist_init) -> None:
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
    # init -> final of every run, each from its own initialization, continued to alpha = 2 (Fig. 10; its [0, 1]
    # part is Fig. 5a, c)
    line2 = f"0:2:{2 * st.line - 1}"
    for o in opts:
        for r in range(INITS):
            sweep("init-final", (o, r), f"init-final2:{o}@init{r}",
                  Line(_init(runs[(o, bn)], r), _final(runs[(o, bn)], r), line2))
    g = f"0:1:{st.grid}"
    sweep("bary", None, "barycentric:" + "~".join(BARYCENTRIC),
          Barycentric(*(final[o] for o in BARYCENTRIC), alphas=g, betas=g))
    for a, b in itertools.combinations(TRIANGLE, 2):  # Table 1: the triangle through (init, A, B)
        sweep("triangle", (a, b), f"triangle:init~{a}~{b}", Barycentric(init, final[a], final[b], alphas=g, betas=g))
    gb = f"-0.25:1.25:{int(round(1.5 / st.bilinear_step)) + 1}"  # (0, 0) and (1, 1) lie exactly on the grid
    sweep("bilinear", None, "bilinear:" + "~".join(BILINEAR),
          Bilinear(*(final[o] for o in BILINEAR), alphas=gb, betas=gb))
    # Fig. 2: the two SGD solutions (0, 0), (1, 0) and their two initializations (0, 1), (1, 1)
    sweep("quad", None, "quadrilateral:sgd@init0~sgd@init1~init0~init1",
          Bilinear(_final(runs[("sgd", bn)], 0), _final(runs[("sgd", bn)], 1), _init(runs[("sgd", bn)], 0),
                   _init(runs[("sgd", bn)], 1), alphas=gb, betas=gb))
    names = {n for n, _ in model.named_parameters()}
    theta0 = _params(init, names)
    q = st.ray_quarter
    for o in opts:
        d = float(torch.linalg.vector_norm(_params(final[o], names) - theta0))
        dist_init[(bn, o)] = d
        lambdas = [d * k / (4 * q) for k in range(-q, 4 * q + 1)]  # lambda = 0 (the solution) exactly; d: the init
        sweep("ray", o, f"ray:{o}", Ray(final[o], init, lambdas))
    for key in _switches():
        old, new, p, b = key
        if b != bn:
            continue
        sw = _final(switched[key])
        name = f"switch{p}:{old}" if (old, new) == SWITCH else f"switch{p}:{old}>{new}:{old}"
        sweep("switch-old", key[:3], name, Line(sw, final[old], line))
        name = f"switch{p}:{new}" if (old, new) == SWITCH else f"switch{p}:{old}>{new}:{new}"
        sweep("switch-new", key[:3], name, Line(sw, final[new], line))
    for e in EXOTIC:  # App. A.5: the exotic initialization to its own end, and to SGD's solution from a small init
        x0 = _init(exotic[(e, bn)])
        sweep("exotic", e, f"exotic:{e}", Line(x0, _final(exotic[(e, bn)]), line))
        sweep("exotic-sgd", e, f"exotic:{e}~sgd", Line(x0, final["sgd"], line))


# ------------------------------------------------------------------------------------------------------------ claims


def _analyse(ctx, st, out, runs, switched, exotic, dist_init, same_init, barrier, basin_width) -> None:
    opts = list(OPTIMIZERS)
    pairs = list(itertools.combinations(opts, 2))
    data_note = ("Fashion-MNIST" if ctx.s.dataset == "fashion-mnist" else ctx.s.dataset) + " for CIFAR-10, " + (
        f"{_model_note(ctx)} (the paper's network)" if ctx.s.model == "nin" and ctx.s.dataset == "cifar10"
        else f"{_model_note(ctx)} for NIN / VGG")
    train_note = (f"{st.steps} per run (the paper: 200 epochs), rates x{GAMMA:g} at {MILESTONES} of training, dropout "
                  f"{DROPOUT:g}")
    facts = ctx.facts
    facts["test_acc"] = {f"{_tag(bn)}:{o}@init{r}": _summary(runs[(o, bn)], r).get("test_acc")
                         for bn in (True, False) for o in opts for r in range(INITS)}
    facts["train_loss_at_solution"] = {}
    facts["distance_from_init"] = {f"{_tag(bn)}:{o}": dist_init[(bn, o)] for bn in (True, False) for o in opts}
    facts["same_initialization"] = {_tag(bn): bool(v) for bn, v in same_init.items()}

    def setting(bn):
        return ("with batch norm (the paper's setting, BN statistics recomputed at every point)" if bn
                else "without batch norm (the paper's §4.4 variant)")

    barriers, disagree, fdist, errs = {}, {}, {}, {}
    for bn in (True, False):
        for a, b in pairs:
            r = out[(bn, "line", (a, b))]
            barriers[(bn, a, b)] = barrier(r.alphas, r.loss)
            for o, al in ((a, 0.0), (b, 1.0)):
                facts["train_loss_at_solution"][f"{_tag(bn)}:{o}"] = _at(r, al, "loss")
            r = out[(bn, "test-line", (a, b))]
            disagree[(bn, a, b)] = _at(r, 1.0, "disagreement")
            fdist[(bn, a, b)] = _at(r, 1.0, "distance")
            errs[(bn, a, b)] = (_at(r, 0.0, "error"), _at(r, 1.0, "error"))

    # 1 / 2: different minima from one initialization (§4.1, Table 1, lower triangle)
    for bn in (True, False):
        bs = np.array([barriers[(bn, a, b)] for a, b in pairs])
        n_pos = int((bs > BARRIER_TOL).sum())
        lo = min(pairs, key=lambda p: barriers[(bn, *p)])
        prefix = "" if bn else "Without batch norm: "
        ctx.claim(_sentence(f"{prefix}\"For every pair of optimization algorithms ... the training loss between the "
                            "final weights for different algorithms shows a sharp increase along the interpolated "
                            "path\" (same initialization and minibatching)"),
                  "§4.1, Table 1" if bn else "§4.1, Table 1; §4.4",
                  f"barrier above the chord > {BARRIER_TOL} for {n_pos}/{len(pairs)} pairs; min {fmt(bs.min())} "
                  f"({_label(lo[0])}-{_label(lo[1])}), median {fmt(float(np.median(bs)))}, max {fmt(bs.max())}",
                  n_pos == len(pairs),
                  note=f"{setting(bn)}; {data_note}; {train_note}; training loss on {_n(ctx, st)}; sharp increase: "
                       f"any rise above the chord of more than {BARRIER_TOL} nats (lenient); the lines between the "
                       "solutions (the triangles through the initialization: their own row)",
                  pairs_with_barrier=n_pos, barrier_min=bs.min(), barrier_median=float(np.median(bs)),
                  barrier_max=bs.max())

    # 3: the bilinear surface through four methods' solutions (Fig. 3), with batch norm
    rise_bary, rise_bil, k_min = _surface_stats(out[(True, "bary", None)], out[(True, "bilinear", None)])
    _, rise_bil0, k_min0 = _surface_stats(out[(False, "bary", None)], out[(False, "bilinear", None)])
    ctx.claim("On the surface through four methods' solutions \"the local minima returned by different algorithms "
              "are separated by high loss weight parameters\"", "§4.1, Fig. 3",
              f"bilinear {'/'.join(_label(o) for o in BILINEAR)}: loss at the centre above the highest corner "
              f"{fmt(rise_bil)}, {k_min}/4 corners local minima of the surface (without BN: {fmt(rise_bil0)}, "
              f"{k_min0}/4)",
              rise_bil > BARRIER_TOL and k_min == 4,
              note=f"{setting(True)}; separated: every corner a local minimum of the grid (8 neighbours) and the "
                   f"centre more than {BARRIER_TOL} above the highest corner; {data_note}",
              centre_rise_bilinear=rise_bil, bilinear_corner_minima=k_min, centre_rise_bilinear_nobn=rise_bil0,
              bilinear_corner_minima_nobn=k_min0)

    # 3b: Table 1's triangles through (init, A, B) and Fig. 2's quadrilateral: the solutions separated by high loss
    tri = {(bn, a, b): _pass_height(out[(bn, "triangle", (a, b))]) for bn in (True, False)
           for a, b in itertools.combinations(TRIANGLE, 2)}
    hs = [tri[(True, a, b)] for a, b in itertools.combinations(TRIANGLE, 2)]
    hs0 = [tri[(False, a, b)] for a, b in itertools.combinations(TRIANGLE, 2)]
    n_sep = sum(h > BARRIER_TOL for h in hs)
    ctx.claim("On the surfaces through the initialization and two methods' solutions, \"the training loss "
              "between the final weights for different algorithms shows a sharp increase\"", "§4.1, Table 1",
              f"triangles (init, A, B) of {'/'.join(_label(o) for o in TRIANGLE)} (6 pairs): every path "
              f"from A to B on the triangle climbs more than {BARRIER_TOL} above the higher solution for "
              f"{n_sep}/{len(hs)}; lowest pass {fmt(min(hs))}, median {fmt(float(np.median(hs)))} (without "
              f"BN median {fmt(float(np.median(hs0)))})",
              n_sep == len(hs),
              note=f"{setting(True)}; Barycentric(init, A, B) on a {st.grid}x{st.grid} grid; pass: the lowest "
                   "training loss on the points weighing A and B equally (every path from A to B in the "
                   "triangle crosses them, the init included) minus max(L(A), L(B)); sharp increase: a pass "
                   f"> {BARRIER_TOL}; {data_note}",
              triangles_separated=n_sep, pass_min=min(hs), pass_median=float(np.median(hs)))
    quad = {bn: _quad_pass(out[(bn, "quad", None)]) for bn in (True, False)}
    ctx.claim("On the surface through two initializations and the SGD solutions reached from them, the two minima are "
              "\"separated by high loss weight parameters\"", "§4.1, Fig. 2",
              f"every path between the two SGD solutions on the bilinear surface climbs {fmt(quad[True])} above the "
              f"higher one (without BN {fmt(quad[False])})",
              quad[True] > BARRIER_TOL,
              note=f"{setting(True)}; Bilinear(SGD@init0, SGD@init1, init0, init1) over [0, 1]^2 (plotted over "
                   "[-0.25, 1.25]^2); pass: the lowest loss on the midline a = 1/2 (every path inside the square "
                   f"between the two solutions crosses it) minus the higher solution's loss; separated: > "
                   f"{BARRIER_TOL}; {data_note}",
              quad_pass=quad[True], quad_pass_nobn=quad[False])

    # 3c: accuracies of the solutions (§4.2, Fig. 4): training accuracy stereotyped, test accuracy not different
    _accuracy_claims(ctx, out, facts, data_note)

    # 4: effectively different networks (§4.1, eq. 4.1): disagreement over 1/3 of the most it could be
    ratio, dis, fd, err = {}, {}, {}, {}
    for bn in (True, False):
        ratio[bn] = np.array([disagree[(bn, a, b)] / max(sum(errs[(bn, a, b)]), 1e-12) for a, b in pairs])
        dis[bn] = np.array([disagree[(bn, a, b)] for a, b in pairs])
        fd[bn] = np.array([fdist[(bn, a, b)] for a, b in pairs])
        err[bn] = float(np.median([e for a, b in pairs for e in errs[(bn, a, b)]]))
    ctx.claim("The networks from different methods disagree on \"over 1/3rd\" of the test examples they could "
              "disagree on (the sum of their errors): \"effectively different networks\"", "§4.1, Table 1, eq. 4.1",
              f"median disagreement {fmt(float(np.median(dis[True])))} / (2 x error, median error "
              f"{fmt(err[True], 3)}) -> ratio median {fmt(float(np.median(ratio[True])), 3)} (min "
              f"{fmt(float(ratio[True].min()), 3)}); functional distance median {fmt(float(np.median(fd[True])), 3)} "
              f"(the paper: 0.16, 8 % of 22 %); without BN ratio {fmt(float(np.median(ratio[False])), 3)}",
              float(np.median(ratio[True])) > THIRD,
              note=f"{setting(True)}; per pair disagreement / (error A + error B) on {_n(ctx, st, 'test')}, median "
                   f"over the {len(pairs)} pairs > 1/3; eq. 4.1 distance: RMS of the softmax difference; {data_note}",
              ratio_median=float(np.median(ratio[True])), ratio_min=float(ratio[True].min()),
              disagreement_median=float(np.median(dis[True])), error_median=err[True],
              functional_distance_median=float(np.median(fd[True])),
              ratio_median_nobn=float(np.median(ratio[False])))

    # 5: beyond the solution the loss increases (§3.3, Fig. 10): init -> final continued to alpha = 2
    beyond = {}
    for bn in (True, False):
        for o in opts:
            for r in range(INITS):
                res = out[(bn, "init-final", (o, r))]
                al, loss = np.asarray(res.alphas, dtype=np.float64), np.asarray(res.loss, dtype=np.float64)
                i1 = int(np.argmin(np.abs(al - 1.0)))
                beyond[(bn, o, r)] = float(np.min(loss[al > 1.0 + 1e-9]) - loss[i1])
    rises = sum(v > 0 for v in beyond.values())
    ctx.claim("\"If we interpolate beyond the critical point ... the loss increases\" (minima, not saddle points)",
              "§3.3, Fig. 10",
              f"the loss on alpha in (1, 2] above the loss at the solution for {rises}/{len(beyond)} init -> final "
              f"lines (7 methods x {INITS} initializations, with and without BN); smallest rise "
              f"{fmt(min(beyond.values()))}",
              rises == len(beyond),
              note=f"the line from each run's initialization through its solution, continued to alpha = 2 as in Fig. "
                   f"10 ({2 * st.line - 1} points on [0, 2]); increases: the lowest loss past alpha = 1 is above the "
                   f"solution's; {data_note}",
              solutions_rising=rises, min_rise=min(beyond.values()))

    # 6: the same method from different initializations: similar surfaces; different methods: different (Fig. 5)
    curves = {(o, r): _unit(out[(True, "init-final", (o, r))]) for o in opts for r in range(INITS)}
    rms = (lambda u, v: float(np.sqrt(np.mean((u - v) ** 2))))
    within = {o: rms(curves[(o, 0)], curves[(o, 1)]) for o in opts}
    between = {o: min(min(rms(curves[(o, 0)], curves[(p, 1)]), rms(curves[(o, 1)], curves[(p, 0)]))
                      for p in opts if p != o) for o in opts}
    closer = sum(within[o] < between[o] for o in opts)
    ctx.claim("From different initializations, the init -> final curves \"look strikingly similar for different runs "
              "of the same algorithm, but characteristically different for different algorithms\"",
              "§4.2, Fig. 5; §5",
              f"{closer}/{len(opts)} methods' two runs closer to each other than to any other method's run from the "
              f"other initialization; RMS curve difference within median {fmt(float(np.median(list(within.values()))))}"
              f", to the nearest other method median {fmt(float(np.median(list(between.values()))))}",
              closer == len(opts),
              note=f"{setting(True)}; seeds 0 and 1 (initialization), the same minibatch order; curves: training "
                   f"loss along init -> final at {st.line} alphas; {data_note}",
              methods_closer=closer, within_median=float(np.median(list(within.values()))),
              between_median=float(np.median(list(between.values()))),
              **{f"within_{o}": within[o] for o in opts}, **{f"between_{o}": between[o] for o in opts})

    # 7 / 8: basins along eq. 1's ray (Fig. 6: absolute distance; Fig. 5a, c: in units of alpha)
    widths = {(bn, o): basin_width(out[(bn, "ray", o)].alphas, out[(bn, "ray", o)].loss, THRESHOLD)
              for bn in (True, False) for o in opts}
    in_alpha = {(bn, o): widths[(bn, o)] / dist_init[(bn, o)] for bn in (True, False) for o in opts}
    w1 = {o: widths[(True, o)] for o in opts}
    a1 = {o: in_alpha[(True, o)] for o in opts}
    adam_like, sgd_like = ("adam", "rk_adam_heun"), ("sgd", "rk_sgd_heun")
    ctx.claim("\"the size of the basins around the local minima found by ADAM and ADAM&RK2 are larger than those "
              "found by SGD and RK2, i.e. that the training loss is small for a wider range of alpha values\"",
              "§4.2, Fig. 5",
              "basin width in units of alpha: " + ", ".join(f"{_label(o)} {fmt(a1[o], 2)}"
                                                             for o in adam_like + sgd_like)
              + " (without BN: " + ", ".join(f"{_label(o)} {fmt(in_alpha[(False, o)], 2)}"
                                             for o in adam_like + sgd_like) + ")",
              bool(min(a1[o] for o in adam_like) > max(a1[o] for o in sgd_like)),
              note=f"{setting(True)}; small: training loss below {THRESHOLD} (ours; the loss at initialization is "
                   "about 2.3); width along eq. 1's ray from the solution towards the initialization, divided by "
                   f"the solution's distance from it; {data_note}",
              **{f"alpha_width_{o}": a1[o] for o in opts})
    fin = [w for w in w1.values() if np.isfinite(w)]
    spread = max(fin) / min(fin) if fin and min(fin) > 0 else float("nan")
    ctx.claim("Along eq. 1 (absolute distance) \"the size of the basin around the local minima varies by "
              "optimization algorithm\"", "§4.2, eq. 1, Fig. 6",
              ", ".join(f"{_label(o)} {fmt(w1[o], 2)}" for o in opts) + f" (widest / narrowest {fmt(spread, 2)})",
              bool(spread >= BASIN_DIFF),
              note=f"{setting(True)}; basin edge: training loss {THRESHOLD} (ours: the paper compares the curves by "
                   f"eye, eq. 1 only defines the ray); varies: widest >= {BASIN_DIFF} x narrowest; {data_note}",
              width_ratio=spread, **{f"width_{o}": w1[o] for o in opts})

    # 9 / 10: switching methods late still ends in a different minimum (§4.3, Fig. 7; App. A.6, Figs. 12-15)
    sw_barrier = {}
    for key in _switches():
        old, new, p, bn = key
        sw_barrier[key] = (barrier(out[(bn, "switch-old", key[:3])].alphas, out[(bn, "switch-old", key[:3])].loss),
                           barrier(out[(bn, "switch-new", key[:3])].alphas, out[(bn, "switch-new", key[:3])].loss))
    old, new = SWITCH
    for bn in (True, False):
        keys = [k for k in _switches() if k[3] == bn]
        n_diff = sum(min(sw_barrier[k]) > BARRIER_TOL for k in keys)
        prefix = "" if bn else "Without batch norm: "
        others = "; other switches (barrier to the first / second method alone): " + ", ".join(
            f"{_label(k[0])}->{_label(k[1])} {k[2]}%: {fmt(sw_barrier[k][0])} / {fmt(sw_barrier[k][1])}"
            for k in keys if (k[0], k[1]) != SWITCH) if bn else ""
        ctx.claim(_sentence(f"{prefix}switching method at 25 / 50 / 75 % of training: \"regardless of how late we "
                            "switch optimization algorithms ... the local minima found were all different\""),
                  "§4.3, Fig. 7; App. A.6, Figs. 12-15" if bn else "§4.3, Fig. 7",
                  f"{n_diff}/{len(keys)} switched solutions with a barrier > {BARRIER_TOL} to both methods' own "
                  f"solutions; {_label(old)} -> {_label(new)}: barrier to {_label(old)} alone "
                  + ", ".join(f"{p}%: {fmt(sw_barrier[(old, new, p, bn)][0])}" for p in SWITCH_AT)
                  + f"; to {_label(new)} alone "
                  + ", ".join(f"{p}%: {fmt(sw_barrier[(old, new, p, bn)][1])}" for p in SWITCH_AT) + others,
                  n_diff == len(keys),
                  note=f"{setting(bn)}; different: a barrier > {BARRIER_TOL} to both unswitched solutions for every "
                       f"switched run; fresh optimizer state at the switch, the new method's own rate (x{GAMMA:g} "
                       f"after {MILESTONES} of training, like every run); {data_note}",
                  switched_different=n_diff,
                  **{f"barrier_unswitched_{p}": sw_barrier[(old, new, p, bn)][0] for p in SWITCH_AT},
                  **{f"barrier_{new}_alone_{p}": sw_barrier[(old, new, p, bn)][1] for p in SWITCH_AT})

    # 9b: the training accuracy jumps to the new method's within a few epochs; the distance from init follows the
    # new method and shrinks after ADAM -> SGD (§4.3, Fig. 7 left / middle), with batch norm
    _switch_dynamics(ctx, st, runs, switched, data_note)

    # 11: without BN the quality of the minimum depends more on the initialization (§4.4, Table 2, Fig. 8)
    spread_err = {bn: float(np.median([abs(facts["test_acc"][f"{_tag(bn)}:{o}@init0"]
                                           - facts["test_acc"][f"{_tag(bn)}:{o}@init1"]) for o in opts]))
                  for bn in (True, False)}
    ctx.claim("\"without batch normalization, the quality of local minimum found by a given algorithm is much more "
              "dependent on the initialization\"", "§4.4, Table 2, Fig. 8; §5",
              f"median over the 7 methods of the test-accuracy difference between the two initializations: without "
              f"BN {fmt(spread_err[False], 3)}, with BN {fmt(spread_err[True], 3)}",
              spread_err[False] >= MUCH_MORE * spread_err[True],
              note=f"much more: the median spread without BN at least {MUCH_MORE:g} x the spread with BN; two "
                   f"initializations per method (the paper: several); test accuracy on the whole test split; "
                   f"{data_note}",
              spread_nobn=spread_err[False], spread_bn=spread_err[True])

    # 12: BN: sharp unimodal jumps between minima; without BN wide bumpy shapes (§4.4)
    modes = {}
    for bn in (True, False):
        modes[bn] = [_n_maxima(out[(bn, "line", p)].loss) for p in pairs]
    uni = {bn: sum(m <= 1 for m in modes[bn]) for bn in (True, False)}
    ctx.claim("\"with batch normalization we see sharp unimodal jumps in performance but without batch normalization "
              "we obtain wide bumpy shapes that aren't necessarily unimodal\"", "§4.4, Table 2",
              f"lines between two methods' solutions with at most one interior maximum: with BN {uni[True]}/"
              f"{len(pairs)}, without BN {uni[False]}/{len(pairs)}",
              uni[True] == len(pairs) and uni[False] < len(pairs),
              note=f"unimodal: at most one strict interior local maximum of the training loss on {st.line} points; "
                   "agrees when every BN line is unimodal and some line without BN is not; 'sharp' and 'wide' are "
                   f"not tested; {data_note}",
              unimodal_bn=uni[True], unimodal_nobn=uni[False])

    # 13: exotic initializations (App. A.5, Fig. 11)
    _exotic_claims(ctx, out, exotic, data_note)

    # observations of ours (not counted)
    ctx.observe("The triangle through the SGD, RK2 and Adam solutions rises at its centre above its corners",
                "ours (Table 1's triangles pass through the initialization)",
                f"with BN {fmt(rise_bary)}", rise_bary > BARRIER_TOL,
                note=f"barycentric {'/'.join(_label(o) for o in BARYCENTRIC)}, centre above the highest corner",
                centre_rise_barycentric=rise_bary)
    w0 = {o: widths[(False, o)] for o in opts}
    narrower = sum(w1[o] < w0[o] for o in opts)
    ctx.observe("With batch norm the basins along eq. 1 are narrower", "ours (§4.4 says nothing of basin width)",
                f"narrower with BN for {narrower}/{len(opts)} methods (median width "
                f"{fmt(float(np.median(list(w0.values()))), 2)} -> {fmt(float(np.median(list(w1.values()))), 2)})",
                narrower >= len(opts) - 1, note="holds when all but at most one are narrower",
                basins_narrower_with_bn=narrower, median_width_nobn=float(np.median(list(w0.values()))),
                median_width_bn=float(np.median(list(w1.values()))))

    facts["basin_width"] = {f"{_tag(bn)}:{o}": widths[(bn, o)] for bn in (True, False) for o in opts}
    facts["barrier"] = {f"{_tag(bn)}:{a}~{b}": barriers[(bn, a, b)] for bn in (True, False) for a, b in pairs}
    facts["beyond_solution_rise"] = {f"{_tag(bn)}:{o}@init{r}": beyond[(bn, o, r)] for bn in (True, False)
                                     for o in opts for r in range(INITS)}
    layers = "conv" if ctx.s.model == "nin" else "Linear"
    net = (f"{_model_note(ctx)} (with batch norm: after every conv but the last), dropout {DROPOUT:g} after its "
           "first two blocks" if ctx.s.model == "nin"
           else f"LeNet-style MLP ({ctx.s.model}) with dropout {DROPOUT:g} after every hidden ReLU")
    ctx.note(f"Training: {net}, on "
             f"{ctx.s.dataset}, batch 128, {st.steps}, rates "
             + ", ".join(f"{_label(o)} {OPTIMIZERS[o][1]:g}" for o in opts) + " (the Runge-Kutta rates doubled, "
             f"§3.4), each multiplied by {GAMMA:g} after {MILESTONES} of training (ours: the paper states no "
             "schedule); initialization seed 0 for every §4.1 run (checked bit for bit) and seed 1 for the second "
             "initialization, one minibatch order throughout. Switched runs: fresh state of the new method, its own "
             f"rate (times the same decay). Exotic initializations: SGD, every {layers} weight and bias drawn from "
             + " and ".join(f"N{e[6:]}" for e in EXOTIC) + " (mean, standard deviation).")
    ctx.note(f"Loss surfaces (lines, planes, rays) are the training loss on {_n(ctx, st)}; functions are compared "
             f"(disagreement, functional distance, errors) on {_n(ctx, st, 'test')}; with batch norm every point's "
             f"statistics are recomputed on "
             f"{'the first ' + str(st.calib_limit) if st.calib_limit else 'all'} training images (bn='recompute'). "
             f"Barrier = max over the line of the loss above the chord between its ends; a barrier counts when > "
             f"{BARRIER_TOL}.")
    ctx.note("Test accuracy of the solutions (initialization 0, with BN / without BN): " + ", ".join(
        f"{_label(o)} {facts['test_acc'][f'bn:{o}@init0']:.4f} / {facts['test_acc'][f'nobn:{o}@init0']:.4f}"
        for o in opts))
    _figures(ctx, out, widths, barriers, disagree, dist_init)
    _figures_new(ctx, st, out, runs, switched, exotic)


def _pass_height(res) -> float:
    """Mountain pass between theta1 and theta2 of ``Barycentric(init, theta1, theta2)``: the lowest loss on the
    grid points with equal weights on theta1 and theta2 (``b = 1/2``), minus the higher of the two corners."""
    c, loss = res.coords, np.asarray(res.loss, dtype=np.float64)
    a_, b_ = c[:, 0], c[:, 1]
    mid = np.isclose(b_, 0.5)
    l1 = loss[np.flatnonzero(np.isclose(a_, 1) & np.isclose(b_, 1))[0]]
    l2 = loss[np.flatnonzero(np.isclose(a_, 1) & np.isclose(b_, 0))[0]]
    return float(loss[mid].min() - max(l1, l2))


def _quad_pass(res) -> float:
    """Mountain pass between the corners (0, 0) and (1, 0) of a bilinear surface inside [0, 1]^2: the lowest loss on
    the midline a = 1/2, b in [0, 1], minus the higher corner."""
    z = res.grid("loss")
    xs, ys = res.axes()
    i0, i1, im = (int(np.argmin(np.abs(xs - v))) for v in (0.0, 1.0, 0.5))
    j0, j1 = int(np.argmin(np.abs(ys))), int(np.argmin(np.abs(ys - 1.0)))
    return float(z[im, j0:j1 + 1].min() - max(z[i0, j0], z[i1, j0]))


def _accuracy_claims(ctx, out, facts, data_note) -> None:
    """§4.2, Fig. 4: training accuracy (a) and test accuracy (b) of every method from every initialization."""
    from scipy import stats

    opts = list(OPTIMIZERS)
    train = {(o, r): 1.0 - _at(out[(True, "init-final", (o, r))], 1.0, "error") for o in opts for r in range(INITS)}
    test = {(o, r): facts["test_acc"][f"bn:{o}@init{r}"] for o in opts for r in range(INITS)}
    facts["train_acc"] = {f"bn:{o}@init{r}": v for (o, r), v in train.items()}
    mean_tr = {o: float(np.mean([train[(o, r)] for r in range(INITS)])) for o in opts}
    order = sorted(opts, key=mean_tr.get)
    top3 = {"adam", "rmsprop", "adadelta"}
    ctx.claim("Training accuracy shows \"stereotypy\": \"SGD finding local minima with the lowest training accuracy "
              "and ADAM, Rmsprop, and Adadelta finding local minima with the highest\"", "§4.2, Fig. 4",
              "mean training accuracy over the initializations, lowest first: "
              + ", ".join(f"{_label(o)} {mean_tr[o]:.4f}" for o in order),
              order[0] == "sgd" and set(order[-3:]) == top3,
              note=f"with batch norm; agrees when SGD is the lowest of the 7 and ADAM, RMSprop, Adadelta the three "
                   f"highest; accuracy on the sweeps' training images (eval mode), {INITS} initializations; "
                   + data_note,
              **{f"train_acc_{o}": mean_tr[o] for o in opts})
    groups = [[test[(o, r)] for r in range(INITS)] for o in opts]
    p_alg = float(stats.f_oneway(*groups).pvalue)
    p_init = float(stats.ttest_rel([test[(o, 0)] for o in opts], [test[(o, 1)] for o in opts]).pvalue)
    p_alg = 1.0 if not np.isfinite(p_alg) else p_alg  # identical groups: no difference at all
    p_init = 1.0 if not np.isfinite(p_init) else p_init
    spread = max(np.mean(g) for g in groups) - min(np.mean(g) for g in groups)
    ctx.claim("\"the generalization accuracy of these different local minima on validation data was not significantly "
              "different between algorithms\"", "§4.2, Fig. 4",
              f"one-way ANOVA of test accuracy over the 7 methods ({INITS} initializations each): p = {p_alg:.3g}; "
              f"range of the methods' mean test accuracy {fmt(float(spread), 4)}",
              p_alg > SIGNIFICANT,
              note=f"with batch norm; not significantly different: p > {SIGNIFICANT} (the paper names no test); "
                   + data_note,
              p_algorithms=p_alg, test_acc_range=float(spread))
    ctx.claim("\"We also did not see a relationship between the weight initialization and the validation accuracy\"",
              "§4.2, Fig. 4",
              f"paired t-test of test accuracy, initialization 0 vs 1 over the 7 methods: p = {p_init:.3g}; mean "
              f"difference {fmt(float(np.mean([test[(o, 1)] - test[(o, 0)] for o in opts])), 4)}",
              p_init > SIGNIFICANT,
              note=f"with batch norm; no relationship: p > {SIGNIFICANT} (the paper names no test); " + data_note,
              p_initialization=p_init)


def _exotic_claims(ctx, out, exotic, data_note) -> None:
    """App. A.5, Fig. 11: SGD from N(-10, 0.01) and N(-1, 1), with and without batch norm."""
    err = {(e, bn): (_at(out[(bn, "exotic", e)], 0.0, "error"), _at(out[(bn, "exotic", e)], 1.0, "error"))
           for e in EXOTIC for bn in (True, False)}
    sgd_err = _at(out[(True, "init-final", ("sgd", 0))], 1.0, "error")
    ctx.facts["exotic_train_error"] = {f"{_tag(bn)}:{e}": err[(e, bn)][1] for e in EXOTIC for bn in (True, False)}
    nobn = [err[(e, False)][1] for e in EXOTIC]
    ctx.claim("With the exotic initializations N(-10, 0.01) and N(-1, 1) the network \"without BN does not train at "
              "all\"", "App. A.5, Fig. 11",
              "training error after training without BN: " + ", ".join(f"N{e[6:]} {fmt(err[(e, False)][1], 3)}"
                                                                       for e in EXOTIC),
              all(np.isfinite(v) and v >= NO_TRAIN for v in nobn),
              note=f"SGD, every {'conv' if ctx.s.model == 'nin' else 'Linear'} weight and bias drawn from the stated "
                   "normal (batch-norm scales 1, shifts 0); "
                   f"does not train: training error still >= {NO_TRAIN} (chance 0.9); {data_note}",
              **{f"error_nobn_{i}": v for i, v in enumerate(nobn)})
    bn_e = [err[(e, True)][1] for e in EXOTIC]
    ctx.claim("With batch norm the exotic initializations \"train slowly over time\" to a minimum that \"was not good "
              "as when the parameters were initialized with small values\"", "App. A.5, Fig. 11",
              "training error with BN: " + ", ".join(f"N{e[6:]} {fmt(err[(e, True)][1], 3)} (from "
                                                     f"{fmt(err[(e, True)][0], 3)})" for e in EXOTIC)
              + f"; SGD from the usual initialization {fmt(sgd_err, 3)}",
              all(np.isfinite(v) and v < min(NO_TRAIN, err[(e, True)][0]) and v > sgd_err
                  for e, v in zip(EXOTIC, bn_e)),
              note=f"with batch norm: trains: the final training error below its start and below {NO_TRAIN}; not as "
                   "good: above SGD's from the usual (He-normal) initialization; 'slowly' is not tested; " + data_note,
              **{f"error_bn_{i}": v for i, v in enumerate(bn_e)}, error_sgd_small_init=sgd_err)
    flat, pas = {}, {}
    for e in EXOTIC:
        lg = _log(exotic[(e, False)])
        l0, l1 = float(lg["train_loss"][0]), float(lg["train_loss"][-1])
        flat[e] = abs(l1 - l0) / max(abs(l0), 1e-12) if np.isfinite(l1) and np.isfinite(l0) else float("inf")
        r = out[(False, "exotic-sgd", e)]
        loss = np.asarray(r.loss, dtype=np.float64)
        pas[e] = float(np.max(loss) - loss[0])  # the largest rise above the initialization's loss
    ctx.claim("Without BN, the region around the exotic initializations is a \"plateau rather than a bad local "
              "minima\"", "App. A.5, Fig. 11",
              "relative change of the training loss over training: " + ", ".join(f"N{e[6:]} {fmt(flat[e], 3)}"
                                                                                 for e in EXOTIC)
              + "; largest rise above the initialization's loss on the line to SGD's solution from the usual "
              "initialization: "
              + ", ".join(f"N{e[6:]} {fmt(pas[e])}" for e in EXOTIC),
              all(flat[e] < FLAT and pas[e] <= BARRIER_TOL for e in EXOTIC),
              note=f"without batch norm; plateau: SGD's minibatch loss moves by less than {FLAT:.0%} over training "
                   f"(no slope to follow); not a local minimum: on the line from it to a good solution the loss never "
                   f"rises more than {BARRIER_TOL} above its value at the initialization; {data_note}",
              **{f"flat_{i}": flat[e] for i, e in enumerate(EXOTIC)},
              **{f"rise_to_sgd_{i}": pas[e] for i, e in enumerate(EXOTIC)})


def _log(run, replicate: int = 0) -> dict[str, np.ndarray]:
    """The training log of a run as arrays ``step``, ``train_acc``, ``train_loss``, ``dist_init``."""
    from lerpfast.train import read_log

    recs = [r for r in read_log(run / f"replicate_{replicate}" / "log.jsonl") if "train_acc" in r]
    return {k: np.array([r[k] for r in recs], dtype=np.float64) for k in ("step", "train_acc", "train_loss",
                                                                           "dist_init")}


def _window(log: dict, lo: float, hi: float, key: str = "train_acc") -> float:
    """Mean of ``log[key]`` over the logged steps in ``(lo, hi]``."""
    m = (log["step"] > lo) & (log["step"] <= hi)
    return float(np.mean(log[key][m])) if m.any() else float("nan")


def _switch_dynamics(ctx, st, runs, switched, data_note) -> None:
    """Fig. 7 left / middle: accuracy and distance from init after a switch (batch norm, the paper's setting)."""
    keys = [k for k in _switches() if k[3]]
    jump, dist = {}, {}
    for key in keys:
        old, new, p, _ = key
        lsw, lold, lnew = _log(switched[key]), _log(runs[(old, True)]), _log(runs[(new, True)])
        total = float(lsw["step"][-1])
        s = p / 100 * total
        lo, hi = s + 0.5 * FEW * total, s + 1.5 * FEW * total  # a window of 5 % of training centred FEW after s
        acc = (_window(lsw, lo, hi), _window(lold, lo, hi), _window(lnew, lo, hi))
        jump[key] = (abs(acc[0] - acc[2]) < abs(acc[0] - acc[1]), *acc)
        at_switch = float(lsw["dist_init"][int(np.argmin(np.abs(lsw["step"] - s)))])
        d = (float(lsw["dist_init"][-1]), float(lold["dist_init"][-1]), float(lnew["dist_init"][-1]), at_switch)
        dist[key] = (abs(d[0] - d[2]) < abs(d[0] - d[1]), *d)
    n_jump = sum(v[0] for v in jump.values())
    ctx.claim("After a switch, \"the training accuracy jumping to the characteristic accuracy for the given method "
              "within a few epochs\"", "§4.3, Fig. 7",
              f"{n_jump}/{len(keys)} switched runs closer to the new method's own training accuracy than to the old "
              f"one's, {FEW:.0%} of training after the switch; " + ", ".join(
                  f"{_label(k[0])}->{_label(k[1])} {k[2]}%: {fmt(jump[k][1], 3)} (old {fmt(jump[k][2], 3)}, new "
                  f"{fmt(jump[k][3], 3)})" for k in keys),
              n_jump == len(keys),
              note=f"with batch norm; a few epochs: {FEW:.0%} of training (10 of the paper's 200 epochs); accuracy: "
                   f"the logged minibatch training accuracy (dropout on) averaged over {FEW:.0%} of training around "
                   f"that point, compared with each method's own run over the same steps; {data_note}",
              switched_closer_to_new=n_jump, **{f"acc_{k[0]}_{k[1]}_{k[2]}": jump[k][1] for k in keys})
    n_dist = sum(v[0] for v in dist.values())
    ctx.claim("The distance from the initial weights \"changes drastically after switching ... this distance is "
              "characteristic per algorithm\"", "§4.3, Fig. 7",
              f"{n_dist}/{len(keys)} switched runs end closer to the new method's own distance from init than to the "
              "old one's; " + ", ".join(f"{_label(k[0])}->{_label(k[1])} {k[2]}%: {fmt(dist[k][1], 2)} (old "
                                        f"{fmt(dist[k][2], 2)}, new {fmt(dist[k][3], 2)})" for k in keys),
              n_dist == len(keys),
              note="with batch norm; characteristic: the final distance ||theta_T - theta_0|| of the switched run is "
                   "nearer the new method's run than the old one's; 'drastically' is not tested; " + data_note,
              switched_distance_closer_to_new=n_dist, **{f"dist_{k[0]}_{k[1]}_{k[2]}": dist[k][1] for k in keys})
    a2s = [k for k in keys if k[:2] == ("adam", "sgd")]
    n_dec = sum(dist[k][1] < dist[k][4] for k in a2s)
    ctx.claim("The distance from the initialization \"starts to decrease when switching from ADAM to SGD\"",
              "§4.3, Fig. 7",
              f"{n_dec}/{len(a2s)} ADAM -> SGD runs end nearer the initialization than at the switch: "
              + ", ".join(f"{k[2]}%: {fmt(dist[k][4], 2)} -> {fmt(dist[k][1], 2)}" for k in a2s),
              n_dec == len(a2s),
              note=f"with batch norm; decrease: the final distance below the distance at the switch; {data_note}",
              adam_to_sgd_decreasing=n_dec, **{f"dist_at_switch_{k[2]}": dist[k][4] for k in a2s},
              **{f"dist_final_{k[2]}": dist[k][1] for k in a2s})
    ctx.facts["switch_train_acc"] = {f"{k[0]}>{k[1]}@{k[2]}": jump[k][1] for k in keys}
    ctx.facts["switch_distance_from_init"] = {f"{k[0]}>{k[1]}@{k[2]}": dist[k][1] for k in keys}


def _unit(res) -> np.ndarray:
    """The training loss of an init -> final sweep on alpha in [0, 1] (Fig. 5a, c; the sweep runs to 2)."""
    return np.asarray(res.loss, dtype=np.float64)[np.asarray(res.alphas) <= 1.0 + 1e-9]


def _n_maxima(values) -> int:
    """Strict interior local maxima of a sampled curve."""
    v = np.asarray(values, dtype=np.float64)
    return int(np.sum((v[1:-1] > v[:-2]) & (v[1:-1] > v[2:])))


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


def _tri_xy(res) -> tuple[np.ndarray, np.ndarray]:
    """Plane coordinates of ``Barycentric(init, A, B)`` points: init at the top, A bottom left, B bottom right."""
    a, b = res.coords[:, 0], res.coords[:, 1]
    w0, w2 = 1 - a, a * (1 - b)
    return w0 * 0.5 + w2 * 1.0, w0 * np.sqrt(3) / 2


def _figures_new(ctx, st, out, runs, switched, exotic) -> None:
    """Table 1's triangles, Fig. 2, Fig. 4, Fig. 10, Fig. 7 (left, middle) and Fig. 11, laid out like the paper's."""
    from matplotlib.figure import Figure
    from matplotlib.tri import Triangulation

    from lerpfast.plot import plot_plane

    opts = list(OPTIMIZERS)
    pairs = list(itertools.combinations(TRIANGLE, 2))
    n = len(TRIANGLE)
    # Table 1 (lower triangle): one triangle (init, A, B) per pair, in an n x n grid of panels
    for bn in (True, False):
        fig = Figure(figsize=(2.3 * (n - 1), 2.1 * (n - 1)), layout="constrained")
        axes = fig.subplots(n - 1, n - 1, squeeze=False)
        vals = np.concatenate([np.log10(np.maximum(out[(bn, "triangle", p)].loss, 1e-8)) for p in pairs])
        lo, hi = float(vals.min()), float(vals.max())
        last = None
        for i in range(n - 1):
            for j in range(n - 1):
                ax = axes[i, j]
                ax.set_axis_off()
                if j > i:
                    continue
                a, b = TRIANGLE[j], TRIANGLE[i + 1]
                r = out[(bn, "triangle", (a, b))]
                x, y = _tri_xy(r)
                z = np.log10(np.maximum(np.asarray(r.loss, dtype=np.float64), 1e-8))
                last = ax.tricontourf(Triangulation(x, y), z, levels=np.linspace(lo, hi + 1e-9, 21), cmap="viridis")
                ax.text(0.5, np.sqrt(3) / 2 + 0.04, "init", ha="center", va="bottom", fontsize=7)
                ax.text(0.0, -0.04, _label(a), ha="center", va="top", fontsize=7)
                ax.text(1.0, -0.04, _label(b), ha="center", va="top", fontsize=7)
                ax.set_xlim(-0.15, 1.15)
                ax.set_ylim(-0.15, 1.0)
                ax.set_aspect("equal")
        if last is not None:
            fig.colorbar(last, ax=axes, shrink=0.6, label="log10 training loss")
        fig.suptitle(f"Table 1: training loss on the triangles (init, A, B), {'with' if bn else 'without'} batch norm")
        ctx.figure(fig, "triangles" + ("_bn" if bn else ""),
                   "Training loss (log10, one colour scale) on the triangle through the shared initialization and two "
                   f"methods' solutions, for every pair of {', '.join(_label(o) for o in TRIANGLE)} (Table 1's lower "
                   f"triangle), {'with' if bn else 'without'} batch norm")
    # Fig. 2: two initializations and their SGD solutions
    for bn in (True, False):
        fig = plot_plane(out[(bn, "quad", None)], "loss", logz=True,
                         title="Fig. 2: (0,0) SGD@init0, (1,0) SGD@init1, (0,1) init0, (1,1) init1"
                               + (" (BN)" if bn else ""))
        ctx.figure(fig, "quadrilateral" + ("_bn" if bn else ""),
                   "Training loss (log10) on the bilinear surface through two initializations and the SGD solutions "
                   f"reached from them (Fig. 2), {'with' if bn else 'without'} batch norm")
    # Fig. 4: training and test accuracy per method, colours: initializations
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for r in range(INITS):
        tr = [ctx.facts["train_acc"][f"bn:{o}@init{r}"] for o in opts]
        te = [ctx.facts["test_acc"][f"bn:{o}@init{r}"] for o in opts]
        axes[0].plot(range(len(opts)), tr, "o", color=f"C{r}", label=f"initialization {r}")
        axes[1].plot(range(len(opts)), te, "o", color=f"C{r}", label=f"initialization {r}")
    for ax, name in zip(axes, ("(a) training accuracy", "(b) test accuracy")):
        ax.set_xticks(range(len(opts)), [_label(o) for o in opts], rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Fig. 4: accuracy of every method's solution (batch norm)")
    ctx.figure(fig, "accuracy", "Training (a) and test (b) accuracy of each method's solution, colours the "
                                "initializations (Fig. 4), with batch norm")
    # Fig. 10: init -> final continued to alpha = 2
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, bn in zip(axes, (True, False)):
        for k, o in enumerate(opts):
            for r in range(INITS):
                res = out[(bn, "init-final", (o, r))]
                ax.plot(res.alphas, res.loss, color=f"C{k}", lw=1.2, ls="-" if r == 0 else "--",
                        label=_label(o) if r == 0 else None)
        ax.axvline(1.0, color="k", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(r"$\alpha$ (0: initialization, 1: solution)")
        ax.set_title(f"{'with' if bn else 'without'} batch norm", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(r"Fig. 10: from the initialization through the solution up to $\alpha$ = 2 (dashed: 2nd init)")
    ctx.figure(fig, "extrapolate", "Training loss on the line from each run's initialization through its solution "
                                   "continued to alpha = 2 (Fig. 10); solid / dashed: the two initializations")
    # Fig. 7 left / middle: training accuracy and distance from init around the switches (batch norm)
    fig = Figure(figsize=(9.0, 6.4), layout="constrained")
    axes = fig.subplots(2, 2)
    groups = ((("sgd", "adam"), ("adam", "sgd")), (("sgd", "adadelta"), ("adadelta", "sgd")))
    for row, (first, second) in enumerate(groups):
        for col, key in enumerate(("train_acc", "dist_init")):
            ax = axes[row, col]
            for k, o in enumerate(dict.fromkeys(first + second)):
                lg = _log(runs[(o, True)])
                ax.plot(lg["step"], _smooth(lg[key]), color="k" if k == 0 else "0.55", lw=1.4, label=_label(o))
            c = 0
            for sw in _switches():
                if sw[3] and sw[:2] in (first, second):
                    lg = _log(switched[sw])
                    ax.plot(lg["step"], _smooth(lg[key]), color=f"C{c}", lw=1.0,
                            label=f"{_label(sw[0])}{sw[2]}-{_label(sw[1])}{100 - sw[2]}")
                    c += 1
            ax.set_xlabel("step")
            ax.set_ylabel("training accuracy (smoothed)" if key == "train_acc" else "distance from init")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, frameon=False, ncol=2)
    fig.suptitle("Fig. 7: switching methods at 25 / 50 / 75 % (batch norm): accuracy (left), distance from init "
                 "(right)")
    ctx.figure(fig, "switch_dynamics", "Training accuracy (smoothed minibatch accuracy) and distance from the "
                                       "initialization of the switched runs and of the methods alone (black / grey), "
                                       "with batch norm (Fig. 7 left and middle)")
    # Fig. 11: exotic initializations
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for k, e in enumerate(EXOTIC):
        for bn, ls in ((True, "-"), (False, "--")):
            lg = _log(exotic[(e, bn)])
            axes[0].plot(lg["step"], _smooth(lg["train_loss"]), color=f"C{k}", ls=ls,
                         label=f"N{e[6:]} {'BN' if bn else 'no BN'}")
            r = out[(bn, "exotic-sgd", e)]
            axes[1].plot(r.alphas, r.loss, color=f"C{k}", ls=ls, label=f"N{e[6:]} {'BN' if bn else 'no BN'}")
    lg = _log(runs[("sgd", True)])
    axes[0].plot(lg["step"], _smooth(lg["train_loss"]), color="k", label="usual init, BN")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (smoothed)")
    axes[1].set_xlabel(r"$\alpha$ (0: exotic initialization, 1: SGD's solution from the usual one)")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Fig. 11: SGD from exotic initializations, with and without batch norm")
    ctx.figure(fig, "exotic", "SGD from N(-10, 0.01) and N(-1, 1) (every Linear weight and bias), with (solid) and "
                              "without (dashed) batch norm: training loss during training, and along the line from "
                              "the initialization to SGD's solution from the usual initialization (App. A.5, Fig. 11)")


def _smooth(v: np.ndarray, k: int = 9) -> np.ndarray:
    """Running mean over ``k`` log records (edges: shorter windows)."""
    v = np.asarray(v, dtype=np.float64)
    if len(v) < k:
        return v
    c = np.convolve(v, np.ones(k), mode="same")
    n = np.convolve(np.ones_like(v), np.ones(k), mode="same")
    return c / n


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
    fig.suptitle("Between the solutions of seven methods from one initialization")
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
                r = out[(bn, kind, (old, new, p))]
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
