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

Here LeNet-300-100 with batch norm (BatchNorm1d before each hidden ReLU: the paper's setting, without its dropout)
and without (the §4.4 variant) on Fashion-MNIST, or on scikit-learn's digits with ``--quick``:

* 7 methods x {with, without batch norm} x 2 initializations (seeds 0 and 1, ``seed_policy="init"``: the same
  minibatch order); seed 0 is the shared initialization of §4.1 (for one seed the Linear weights of both models are
  the same);
* SGD switched to Adam (fresh state, Adam's rate) at 25, 50 and 75 % of training, with and without batch norm;
* per batch-norm setting: the 21 lines between the methods' solutions (training loss; on the test set also the
  functional distance and disagreement to the first end), a bilinear surface through SGD+momentum / RMSprop /
  Adadelta / Adam (Fig. 3) and a barycentric one through SGD / RK2 / Adam (ours), the eq.-1 ray from each solution
  towards the initialization and 1/4 of the way past the solution, the init -> final line of every run of both
  initializations (Fig. 5a, c), and the lines from each switched solution to the solutions of SGD alone and Adam
  alone.

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
SWITCH = ("sgd", "adam")                                # from, to
SWITCH_AT = (25, 50, 75)                                # % of training (§4.3)
# How the paper's words become thresholds:
BARRIER_TOL = 0.01  # nats: "a sharp increase" / "separated by high loss": a rise above the chord of more than this
# (lenient: any visible rise counts; the loss is an exact average, not noisy)
THRESHOLD = 1.0     # "the training loss is small" (§4.2): below this (the loss at initialization is ~2.3 = ln 10)
BASIN_DIFF = 1.25   # "varies by optimization algorithm": the widest basin at least this many times the narrowest
THIRD = 1 / 3       # "over 1/3rd" of the maximum possible disagreement (the sum of the two networks' test errors)
MUCH_MORE = 2.0     # "much more dependent on the initialization": the error spread between inits this many times


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
INITS = 2  # initializations per method and batch-norm setting (§4.2: "different initial parameters")


def _label(opt: str) -> str:
    return OPTIMIZERS[opt][0]


def _tag(bn: bool) -> str:
    return "bn" if bn else "nobn"


# ------------------------------------------------------------------------------------------------------------ train


def _config(ctx: Context, opt: str, bn: bool, st: _Setting, **extra) -> dict:
    return dict(model=ctx.s.model, model_options=f"bn={bn}", dataset=ctx.s.dataset, optimizer=opt,
                lr=OPTIMIZERS[opt][1], batch_size=128, steps=st.steps, milestones="", warmup="", weight_decay=0.0,
                checkpoints="none", seed=0, seed_policy="init", resume_every="1000ep", log_every=10, **extra)


def _train_all(ctx: Context, st: _Setting) -> tuple[dict, dict]:
    """Every run; returns ``{(opt, bn): run_dir}`` and ``{(pct, bn): run_dir}`` of the switched runs."""
    runs, switched = {}, {}
    jobs = [("opt", o, bn) for bn in (True, False) for o in OPTIMIZERS]
    jobs += [("switch", p, bn) for bn in (True, False) for p in SWITCH_AT]
    with ctx.stage(f"train: {len(OPTIMIZERS)} methods x {INITS} initializations and 3 switches, with and without "
                   "batch norm", total=len(jobs)) as bar, threads(1):
        for kind, key, bn in jobs:
            if kind == "opt":
                # replicate 1: another initialization (seed 1), the same minibatch order (§4.2)
                runs[(key, bn)] = ctx.train(**_config(ctx, key, bn, st, replicates=INITS))
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

    n_sweeps = 2 * (2 * len(pairs) + 2 + len(opts) + 2 * len(SWITCH_AT) + INITS * len(opts))
    out: dict = {}  # (bn, kind, key) -> SweepResult
    dist_init: dict = {}  # (bn, optimizer) -> ||theta_final - theta_init|| over the parameters
    with ctx.stage(f"sweeps: lines, surfaces, rays, switches ({n_sweeps})", total=n_sweeps) as bar:
        for bn in (True, False):
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
    for o in opts:  # init -> final of every run, each from its own initialization (Fig. 5a, c)
        for r in range(INITS):
            sweep("init-final", (o, r), f"init-final:{o}@init{r}",
                  Line(_init(runs[(o, bn)], r), _final(runs[(o, bn)], r), line))
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
    train_note = f"{st.steps} per run (the paper: 200 epochs), constant rates, no dropout"
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
                       f"any rise above the chord of more than {BARRIER_TOL} nats (lenient); lines only, not the "
                       "paper's triangles through the initialization",
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
                   f"centre more than {BARRIER_TOL} above the highest corner; Fig. 2 (two initializations and their "
                   f"SGD solutions) is not run; {data_note}",
              centre_rise_bilinear=rise_bil, bilinear_corner_minima=k_min, centre_rise_bilinear_nobn=rise_bil0,
              bilinear_corner_minima_nobn=k_min0)

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

    # 5: beyond the solution the loss increases (§3.3, Fig. 10): the first ray point past each solution
    beyond = {}
    for bn in (True, False):
        for o in opts:
            r = out[(bn, "ray", o)]
            lam, loss = np.asarray(r.alphas, dtype=np.float64), np.asarray(r.loss, dtype=np.float64)
            i0 = int(np.argmin(np.abs(lam)))
            past = lam < 0
            beyond[(bn, o)] = float(np.min(loss[past]) - loss[i0]) if past.any() else float("nan")
    rises = sum(v > 0 for v in beyond.values())
    ctx.claim("\"If we interpolate beyond the critical point ... the loss increases\" (minima, not saddle points)",
              "§3.3, Fig. 10",
              f"loss past the solution above the loss at it for {rises}/{len(beyond)} solutions (7 methods, with and "
              f"without BN); smallest rise {fmt(min(beyond.values()))}",
              rises == len(beyond),
              note=f"eq. 1's ray continued 1/4 of the solution's distance from the initialization past the solution "
                   f"(the paper: alpha up to 2); increases: the lowest loss there is above the solution's; {data_note}",
              solutions_rising=rises, min_rise=min(beyond.values()))

    # 6: the same method from different initializations: similar surfaces; different methods: different (Fig. 5)
    curves = {(o, r): np.asarray(out[(True, "init-final", (o, r))].loss, dtype=np.float64) for o in opts
              for r in range(INITS)}
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

    # 9 / 10: switching methods late still ends in a different minimum (§4.3, Fig. 7)
    old, new = SWITCH
    for bn in (True, False):
        b_old = {p: barrier(out[(bn, "switch-old", p)].alphas, out[(bn, "switch-old", p)].loss) for p in SWITCH_AT}
        b_new = {p: barrier(out[(bn, "switch-new", p)].alphas, out[(bn, "switch-new", p)].loss) for p in SWITCH_AT}
        prefix = "" if bn else "Without batch norm: "
        ctx.claim(_sentence(f"{prefix}switching method at 25 / 50 / 75 % of training: \"regardless of how late we "
                            "switch optimization algorithms ... the local minima found were all different\""),
                  "§4.3, Fig. 7",
                  f"{_label(old)} -> {_label(new)}: barrier to {_label(old)} alone "
                  + ", ".join(f"{p}%: {fmt(b_old[p])}" for p in SWITCH_AT) + f"; to {_label(new)} alone "
                  + ", ".join(f"{p}%: {fmt(b_new[p])}" for p in SWITCH_AT),
                  all(b_old[p] > BARRIER_TOL and b_new[p] > BARRIER_TOL for p in SWITCH_AT),
                  note=f"{setting(bn)}; different: a barrier > {BARRIER_TOL} to both unswitched solutions at every "
                       f"switch point; fresh {_label(new)} state at the switch, its own rate; only SGD -> ADAM of the "
                       f"paper's pairs; {data_note}",
                  **{f"barrier_unswitched_{p}": b_old[p] for p in SWITCH_AT},
                  **{f"barrier_{new}_alone_{p}": b_new[p] for p in SWITCH_AT})

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
    facts["beyond_solution_rise"] = {f"{_tag(bn)}:{o}": beyond[(bn, o)] for bn in (True, False) for o in opts}
    ctx.note(f"Training: LeNet-style MLP ({ctx.s.model}) on {ctx.s.dataset}, batch 128, {st.steps}, constant rates "
             + ", ".join(f"{_label(o)} {OPTIMIZERS[o][1]:g}" for o in opts) + " (the Runge-Kutta rates doubled, "
             "§3.4); initialization seed 0 for every §4.1 run (checked bit for bit) and seed 1 for the second "
             "initialization, one minibatch order throughout. No dropout (the paper uses it with batch norm).")
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
