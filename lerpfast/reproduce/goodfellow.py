"""Goodfellow, Vinyals & Saxe (ICLR 2015), "Qualitatively characterizing neural network optimization problems".

The paper evaluates the training objective on straight lines of weight space, ``theta(a) = (1-a) theta_0 + a
theta_1`` (§2). From the initialization to the SGD solution it finds "a simple, approximately convex shape" (§2)
along which the objective "decreases smoothly and monotonically" (App. B), for MLPs on MNIST (§3, Figs. 1-3), also
at 200 values of ``a`` near either end (Fig. 4c/4d); between two solutions from different seeds "each solution is a
different local minimum within this 1-D subspace" (Fig. 5 left); from a random point to a solution "no local minima
besides the SGD solution" (Fig. 5 right). For deep linear regression (§5, Figs. 9-10; the paper's model is the
scalar ``y = w1 w2 x``) the line from a small initialization shows "a flattening of the objective function near the
saddle point at the origin, and only one minimum". App. B finds that SGD "does not actually follow this path", and
that the plot of the trajectory's projection against its residual "converges to a simple geometric shape" in high
dimension for random walks (Fig. 11) and SGD alike (Fig. 12), so its one quantitative reading is the residual
against the norm of the parameter vector: the line "captures at least 2/3 the norm of the parameter vector at all
points in time" (Fig. 13).

``lerpfast reproduce goodfellow`` runs this on real MNIST digits (``mnist5k``: 5,000 of them, split 4,000 / 1,000;
``--dataset fashion-mnist`` takes the first 4,000 Fashion-MNIST training images instead) for one MLP (LeNet-300-100
by default) and a deep linear net, every MLP trained to the paper's "negligible training error" (abstract):

* train the MLP from two seeds (replicates 0 and 1, about 100 checkpoints each for the trajectory), a deep linear
  net (depth 8, width 32, squared loss on one-hot targets of the same images), and the paper's three MLP kinds of
  Figs. 1-3 (maxout and sigmoid with 300-100 hidden units, ReLU with dropout 1200-1200; SGD with momentum), 40
  epochs each in the full run, and check that each reached a training error of at most 0.1 %;
* sweep init -> final (train and test, extrapolated to [-0.5, 1.5]), 200-point windows [0, 0.01] and [0.99, 1]
  on the training set, solution A <-> solution B and random point -> solution (train and test), and the deep linear
  net's init -> final line in float64, on [-0.5, 1.5] and far out on [-3, 4];
* sweep 200 values tiling [0, 1] (Fig. 4a), a random point of large norm -> solution (Fig. 5 right with Fig. 10
  right's "large norm") and init -> final of each of the three MLPs (Figs. 1-3);
* evaluate §5's scalar model ``y = w1 w2 x`` exactly along the three lines of Figs. 9-10 (small initialization ->
  solution, two solutions, a large-norm point -> solution), and App. B's random walks (1,000 unit Gaussian steps,
  the "solution" at step 900) at several dimensions (Fig. 11);
* evaluate the maxout net's training objective after every epoch (SGD's progress over time, Fig. 1 right), and
  run gradient descent with several learning rates and momenta on a synthetic 100,000-dimensional convex quadratic,
  projected onto the line to its true solution (App. B, Fig. 12);
* project both trajectories onto their init -> final lines (residual against the parameter norm, App. B), and a
  random walk with the same step lengths for comparison;
* check each claim of the paper on those numbers (:data:`TOL` says how each word became a threshold), record what
  we add beyond the paper as observations (the test-set line, the random-walk comparison, the deep linear line's
  polynomial degree), and draw the figures.

Sweep names in ``results.h5``: ``init-final@train``, ``init-final@test``, ``zoom-init@train``, ``zoom-final@train``,
``A-B@train``, ``A-B@test``, ``random-final@train``, ``random-final@test``, ``deep-linear@train``,
``deep-linear-wide@train``, ``tile@train``, ``large-random-final@train``, ``act-maxout@train``,
``act-relu+dropout@train``, ``act-sigmoid@train``; the trajectory projections and the per-epoch objective are kept
in ``trajectory/*.npz``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lerpfast.reproduce._common import Context, fmt, threads

__all__ = ["TITLE", "DEFAULTS", "REFERENCES", "Plan", "QUICK", "FULL", "TOL", "polynomial_residuals", "line_shape",
           "scalar_linear_loss", "scalar_linear_descend", "scalar_linear_line", "interior_minima",
           "unit_walk_projection", "walk_limit_shape", "walk_shape_distance", "convex_gd_projection",
           "curve_distance", "run"]

TITLE = ("Goodfellow, Vinyals & Saxe (ICLR 2015), \"Qualitatively characterizing neural network optimization "
         "problems\"")
# The paper's MLPs are trained on MNIST: by default the 5,000 real MNIST digits of ``mnist5k`` (4,000 train / 1,000
# test, lerpfast.data); ``--dataset fashion-mnist`` (its first 4,000 training images) is the offline stand-in.
DEFAULTS = {"model": "lenet_300_100", "dataset": "mnist5k"}
# The paper's own sections, appendices and figures (ICLR 2015 text: §1-6, App. A-B, Figs. 1-13, no tables); every
# claims row cites some of these and nothing else.
REFERENCES = ("abstract", *(f"§{i}" for i in range(1, 7)), "App. A", "App. B", *(f"Fig. {i}" for i in range(1, 14)))

# How each qualitative word of the paper is turned into a yes / no here.
TOL = {
    # "decreases smoothly and monotonically" (App. B): no rise anywhere along [0, 1] above this fraction of the drop
    # L(0) - L(1) (the loss is an exact average over a fixed set, so any rise is real; the tolerance only absorbs
    # fp32 rounding)
    "monotone": 1e-3,
    # "approximately convex" (§2): the curve stays within this fraction of its drop of its lower convex hull
    "convex": 0.05,
    # "does not actually follow this path" (App. B): the largest residual exceeds this fraction of the line's length
    "strays": 0.05,
    # "captures at least 2/3 the norm of the parameter vector at all points in time" (App. B, Fig. 13): the residual
    # is at most this fraction of ||theta_t|| at every checkpoint
    "norm": 1 / 3,
    # observation, ours: SGD's largest residual, in units of its line's length, against the same for a random walk
    # with the same step lengths (about 0.5 in high dimension: a Brownian bridge)
    "walk": 0.5,
    # observation, ours: "a polynomial of degree 2 * depth": on a float64 sweep over [-3, 4] (wide, so that the top
    # coefficient shows), a degree-2d fit leaves an rms residual at rounding level, below this fraction of the
    # curve's range, and a degree-(2d - 1) fit at least 100 times more
    "poly": 1e-12,
    # "a flattening of the objective function near the saddle point at the origin" (§5, Fig. 9): less than this
    # fraction of the drop is done by a = 0.5 (a straight-line fall would do half)
    "flat": 0.5,
    # "negligible training error" (abstract; the point training goes to, §2 "until reaching convergence"): at most
    # this fraction of the images trained on misclassified (1 in 1,000: 4 of mnist5k's 4,000)
    "negligible": 1e-3,
    # "The vast majority of learning happens in the first few epochs" (Fig. 1 right): at least this fraction of the
    # fall of the training objective J(theta_0) - J(theta_final) is done within Plan.few_epochs epochs
    "majority": 0.9,
}


@dataclass(frozen=True)
class Plan:
    """What a run trains and sweeps (:data:`QUICK` on digits, :data:`FULL` on mnist5k or the first 4,000 images of
    another data set)."""

    epochs: int  # MLP training length (SGD, lr 0.1, batch 128: OpenLTH's LeNet setting), to negligible train error
    checkpoints: int  # evenly spaced trajectory checkpoints per replicate (besides steps 1, 2, 4, ...)
    line: str  # init -> final coordinates (extrapolated on both sides)
    zoom: int  # points in each high-resolution window, [0, 0.01] and [0.99, 1]
    pair: str  # A <-> B and random -> final coordinates
    deep_depth: int  # deep linear net: number of linear maps
    deep_width: int
    deep_epochs: int
    deep_lr: float  # SGD with momentum 0.9
    train_limit: int | None = None  # train (and evaluate the train-set curves) on the first N training samples
    test_limit: int | None = None
    zoom_limit: int | None = None  # the zoomed windows on the first N training samples
    tile: int = 200  # Fig. 4a: points tiling [0, 1] (on the zoom windows' images)
    act_epochs: int = 40  # Figs. 1-3: the maxout / sigmoid / ReLU-with-dropout MLPs (SGD with momentum)
    act_limit: int | None = None  # ... trained and swept on the first N training samples
    walk_dims: tuple[int, ...] = (2, 10, 100, 1000, 10_000)  # App. B, Fig. 11: random walks of these dimensions
    walks: int = 3  # walks per dimension
    dropout_widths: tuple[int, ...] = (1200, 1200)  # hidden widths of the ReLU-with-dropout MLP
    few_epochs: int = 5  # Fig. 1 right: "the first few epochs"
    gd_dim: int = 100_000  # App. B, Fig. 12: dimension of the synthetic convex problem


QUICK = Plan(epochs=25, checkpoints=40, line="-0.5:1.5:81", zoom=100, pair="-0.25:1.25:61", deep_depth=8,
             deep_width=32, deep_epochs=30, deep_lr=0.2, train_limit=5000, test_limit=2000, zoom_limit=5000,
             act_epochs=30, walk_dims=(2, 10, 100, 1000, 10_000), dropout_widths=(300, 100), gd_dim=10_000)
# The full run trains every MLP on 4,000 images (all of mnist5k's training split; the first 4,000 of Fashion-MNIST's
# when chosen) for 40 epochs: on mnist5k each reaches zero training mistakes by epoch 15-30 (measured), the paper's
# "negligible training error"; the run checks it (TOL["negligible"]) rather than assuming it.
FULL = Plan(epochs=40, checkpoints=100, line="-0.5:1.5:81", zoom=200, pair="-0.25:1.25:61", deep_depth=8,
            deep_width=32, deep_epochs=40, deep_lr=0.1, train_limit=4000, zoom_limit=4000, act_epochs=40,
            act_limit=4000, walk_dims=(2, 10, 100, 1000, 10_000, 100_000))

BATCH = 128
LABELS = {"init-final": ["init", "final"], "zoom-init": ["init", "final"], "zoom-final": ["init", "final"],
          "A-B": ["solution A", "solution B"], "random-final": ["random point", "final"],
          "deep-linear": ["deep linear init", "deep linear final"],
          "deep-linear-wide": ["deep linear init", "deep linear final"]}
DEEP_WIDE = "-3:4:29"  # the deep linear net's line far past both ends, where the top-degree term of the loss shows
RANDOM_POINT_SEED = 10_000  # the "random point": a fresh draw of the initialization, seeds 0 and 1 being A and B
# A "random point with large norm" (Fig. 10 right; Fig. 5 right says only "a random point in space"): i.i.d. Gaussian
# entries, seed RANDOM_POINT_SEED + 1, the whole vector scaled to LARGE_NORM x ||theta_final||.
LARGE_NORM = 10.0
# Figs. 1-3: the paper's MLPs (maxout; ReLU with dropout; sigmoid) as ``mlp`` options (300-100 hidden units by
# default; the dropout net as wide as Plan.dropout_widths, so that it fits its training set in spite of the dropout)
# and their SGD-with-momentum learning rates (sigmoid units learn slowly at the others' rate)
ACTIVATIONS = {"maxout": "activation='maxout',pieces=5", "relu+dropout": "dropout=0.5",
               "sigmoid": "activation='sigmoid'"}
ACT_LR = {"maxout": 0.01, "relu+dropout": 0.01, "sigmoid": 0.1}
ACT_SOURCES = {"maxout": "§3, Fig. 1 (left), Fig. 3", "relu+dropout": "§3, Fig. 2 (right), Fig. 3",
               "sigmoid": "§3, Fig. 2 (left), Fig. 3"}
# §5's scalar model y = w1 w2 x (Figs. 9-10): a small random initialization (N(0, SMALL^2) per weight, seed 0) and
# its gradient-descent solution; two solutions from |N(0, SCALAR_PAIR^2)| initializations (seeds 1 and 2, both
# weights positive, so on the same branch w1 w2 = 1); a random point of norm SCALAR_LARGE (direction seed 3) -> the
# first solution, and SCALAR_DIRECTIONS more directions (seeds 1000, 1001, ...) to say how typical that line is.
SCALAR_SMALL, SCALAR_PAIR, SCALAR_LARGE, SCALAR_DIRECTIONS = 0.1, 3.0, 10.0, 100
SCALAR_LINE = np.linspace(-0.5, 1.5, 4001)
WALK_STEPS, WALK_SOLUTION = 1000, 900  # App. B, Fig. 11: 1,000 unit Gaussian steps, the "solution" at step 900
PROGRESS_NET = "maxout"  # Fig. 1 right: SGD's progress over time, for the paper's maxout network
# App. B, Fig. 12: gradient descent with learning rate eps and heavy-ball momentum mu on a synthetic convex problem
# (the paper gives only "synthetic, convex" and "100,000 dimensional"; ours: J(x) = 1/2 sum_i lam_i (x_i - x*_i)^2,
# lam_i log-uniform in [GD_LAM_MIN, 1], x* ~ N(0, 1), start x0 ~ N(0, 0.1^2), seed 0, each run until
# ||x - x*|| <= 1e-3 ||x0 - x*||). The settings stay below eps * lam_max = 1 (no step overshoots a coordinate's
# minimum), as "several different hyperparameters" of a well-tuned descent would.
GD_SETTINGS = ((0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (0.1, 0.5), (0.1, 0.9))
GD_LAM_MIN = 0.01


def _mse_onehot(logits, target):
    """Per-sample squared loss of a regression onto one-hot targets (the trainer's ``loss="mse"``: mean over outputs).

    Sweeps keep the class labels as targets, so the error metric still means something.
    """
    import torch

    onehot = torch.nn.functional.one_hot(target.long(), logits.shape[-1]).to(logits.dtype)
    return (logits - onehot).pow(2).mean(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Curve summaries of this paper
# ---------------------------------------------------------------------------------------------------------------------


def polynomial_residuals(alphas, values, degrees) -> dict[int, float]:
    """RMS residual of a least-squares polynomial fit of each degree, as a fraction of the curve's range.

    Chebyshev basis on the sampled interval, so degree 16 on 81 points is well conditioned in float64.
    """
    from numpy.polynomial import Chebyshev

    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    span = float(np.ptp(v)) or 1.0
    return {d: float(np.sqrt(np.mean((Chebyshev.fit(a, v, d)(a) - v) ** 2)) / span) for d in degrees}


def line_shape(alphas, values) -> dict[str, float]:
    """Where along [0, 1] a falling curve does its falling.

    Returns ``drop`` = L(0) - L(1), ``frac25`` / ``frac50`` = the fraction of the drop done by a = 0.25 / 0.5
    (0.25 / 0.5 for a straight fall, less for a curve that starts flat), and ``slope0`` = -L'(0) / drop from
    a cubic fitted to the points with a in [0, 0.1] (1 for a straight fall, about 0 on a plateau).
    """
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(a)
    a, v = a[order], v[order]
    at = lambda x: float(np.interp(x, a, v))
    drop = at(0.0) - at(1.0)
    near = (a >= 0) & (a <= 0.1)
    slope0 = float("nan")
    if near.sum() >= 4:
        p = np.polynomial.Polynomial.fit(a[near], v[near], 3)
        slope0 = -float(p.deriv()(0.0)) / drop if drop else float("nan")
    return {"drop": drop, "frac25": (at(0.0) - at(0.25)) / drop if drop else float("nan"),
            "frac50": (at(0.0) - at(0.5)) / drop if drop else float("nan"), "slope0": slope0}


def _inside(res, lo: float = 0.0, hi: float = 1.0):
    a = np.asarray(res.alphas, dtype=np.float64)
    keep = (a >= lo - 1e-12) & (a <= hi + 1e-12)
    return a[keep], {m: np.asarray(v, dtype=np.float64)[keep] for m, v in res.metrics.items()}


def _at(res, alpha: float, metric: str = "loss") -> float:
    a = np.asarray(res.alphas, dtype=np.float64)
    return float(np.asarray(res.metrics[metric], dtype=np.float64)[int(np.argmin(np.abs(a - alpha)))])


def _bumps(n: int) -> str:
    return f"{n} bump" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------------------------------------------------
# The scalar deep linear model of §5 (y = w1 w2 x, one example x = 1, y = 1) and App. B's unit-step random walks
# ---------------------------------------------------------------------------------------------------------------------


def scalar_linear_loss(w1, w2):
    """The paper's §5 objective: the squared error of ``y = w1 w2 x`` trained to output 1 at ``x = 1``.

    ``J(w1, w2) = (w1 w2 - 1)^2`` (one example, so the mean squared error is this one term). Broadcasts; float64.
    """
    w1, w2 = np.asarray(w1, dtype=np.float64), np.asarray(w2, dtype=np.float64)
    return (w1 * w2 - 1.0) ** 2


def scalar_linear_descend(w0, *, lr: float = 0.05, tol: float = 1e-24, max_steps: int = 1_000_000) -> np.ndarray:
    """Gradient descent on :func:`scalar_linear_loss` from ``w0 = (w1, w2)`` until the loss is below ``tol``.

    Returns the solution ``(w1, w2)`` (float64). Raises ``RuntimeError`` naming ``w0`` when ``max_steps`` do not
    get there (e.g. from the saddle point itself, where the gradient is zero).
    """
    w = np.array(w0, dtype=np.float64).reshape(2)
    for _ in range(max_steps):
        r = w[0] * w[1] - 1.0
        if r * r < tol:
            return w
        w = w - lr * 2.0 * r * w[::-1]
    raise RuntimeError(f"scalar_linear_descend: no solution from w0 = {tuple(w0)} in {max_steps} steps (loss "
                       f"{float(scalar_linear_loss(*w)):.3g})")


def scalar_linear_line(start, end, alphas) -> np.ndarray:
    """:func:`scalar_linear_loss` along ``(1 - a) start + a end`` at each ``a`` of ``alphas`` (float64, exact)."""
    a = np.asarray(alphas, dtype=np.float64)[:, None]
    w = (1.0 - a) * np.asarray(start, dtype=np.float64) + a * np.asarray(end, dtype=np.float64)
    return scalar_linear_loss(w[:, 0], w[:, 1])


def interior_minima(alphas, values, lo: float = -np.inf, hi: float = np.inf) -> np.ndarray:
    """The ``alphas`` in ``[lo, hi]`` (ends of the sampled line excluded) where the curve is below both neighbours."""
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(a)
    a, v = a[order], v[order]
    inner = np.zeros(v.size, dtype=bool)
    inner[1:-1] = (v[1:-1] < v[:-2]) & (v[1:-1] < v[2:])
    return a[inner & (a >= lo - 1e-12) & (a <= hi + 1e-12)]


def unit_walk_projection(dim: int, *, steps: int = 1000, solution: int = 900, seed: int = 0,
                         chunk: int = 1 << 14) -> dict[str, np.ndarray]:
    """App. B's random walk (Fig. 11): projection onto the start -> "solution" axis and the residual's norm.

    The walk starts at the origin and adds a standard Gaussian vector of ``dim`` coordinates at each of ``steps``
    steps; step ``solution`` is the "solution" and the walk goes on past it. Coordinates are independent, so the
    dot products behind the projection and the residual are summed over blocks of ``chunk`` coordinates: memory
    is ``O(steps x chunk)`` whatever ``dim``.

    Returns
    -------
    dict
        ``projection`` and ``residual``, shape ``(steps + 1,)`` (step 0 included), and ``line_length`` =
        ``||x_solution||``; all float64.
    """
    if not 0 < solution <= steps:
        raise ValueError(f"unit_walk_projection: solution={solution} must lie in [1, steps={steps}]")
    if dim < 1:
        raise ValueError(f"unit_walk_projection: dim={dim} must be at least 1")
    rng = np.random.default_rng(seed)
    dot = np.zeros(steps + 1)  # <x_t, x_solution>
    sq = np.zeros(steps + 1)  # ||x_t||^2
    for lo in range(0, dim, chunk):
        x = np.cumsum(rng.standard_normal((steps, min(chunk, dim - lo))), axis=0)
        dot[1:] += x @ x[solution - 1]
        sq[1:] += np.einsum("ij,ij->i", x, x)
    length = math.sqrt(sq[solution])
    proj = dot / length
    return {"projection": proj, "residual": np.sqrt(np.maximum(sq - proj**2, 0.0)), "line_length": length}


def walk_limit_shape(steps: int = 1000, solution: int = 900) -> tuple[np.ndarray, np.ndarray]:
    """The shape :func:`unit_walk_projection` tends to as ``dim`` grows, in units of ``||x_solution||``.

    ``||x_t||^2 / dim -> t`` and ``<x_t, x_s> / dim -> min(t, s)``, so with ``u = t / s`` the projection tends to
    ``min(u, 1)`` and the residual to ``sqrt(u (1 - u))`` up to the solution (a half circle on the line) and
    ``sqrt(u - 1)`` after it.
    """
    u = np.arange(steps + 1, dtype=np.float64) / solution
    return np.minimum(u, 1.0), np.sqrt(np.where(u <= 1.0, u * (1.0 - u), u - 1.0))


def walk_shape_distance(walk: dict, steps: int = 1000, solution: int = 900) -> float:
    """Largest distance, over the walk's steps, between its (projection, residual) in units of ``||x_solution||``
    and :func:`walk_limit_shape` at the same step."""
    p0, r0 = walk_limit_shape(steps, solution)
    n = walk["line_length"]
    return float(np.max(np.hypot(np.asarray(walk["projection"]) / n - p0, np.asarray(walk["residual"]) / n - r0)))


def convex_gd_projection(dim: int, lr: float, momentum: float = 0.0, *, seed: int = 0, lam_min: float = GD_LAM_MIN,
                         tol: float = 1e-3, max_steps: int = 100_000) -> dict[str, np.ndarray]:
    """App. B, Fig. 12: gradient descent on a synthetic convex quadratic, projected onto start -> true solution.

    ``J(x) = 1/2 sum_i lam_i (x_i - x*_i)^2`` with ``lam_i`` log-uniform in ``[lam_min, 1]``, ``x*`` standard
    normal and the start ``x0`` normal with std 0.1, all drawn from ``numpy.random.default_rng(seed)`` (so every
    ``lr`` / ``momentum`` runs on the same problem, towards the same solution). Heavy-ball steps ``v <- mu v - lr
    grad J(x)``, ``x <- x + v``, until ``||x - x*|| <= tol ||x0 - x*||``.

    Returns
    -------
    dict
        ``projection`` and ``residual`` (float64, one entry per step, step 0 included) of ``x_t - x0`` along and
        off the unit vector ``(x* - x0) / ||x* - x0||``, and ``line_length`` = ``||x* - x0||``.

    Raises
    ------
    ValueError
        For ``dim < 1``, ``lr <= 0``, ``momentum`` outside [0, 1), or a run that has not converged after
        ``max_steps`` (diverging or too slow), naming the setting.
    """
    if dim < 1 or lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"convex_gd_projection: need dim >= 1, lr > 0 and momentum in [0, 1), got dim={dim}, "
                         f"lr={lr}, momentum={momentum}")
    rng = np.random.default_rng(seed)
    lam = 10.0 ** rng.uniform(math.log10(lam_min), 0.0, dim)
    target = rng.standard_normal(dim)
    x0 = 0.1 * rng.standard_normal(dim)
    u = target - x0
    length = float(np.linalg.norm(u))
    u /= length
    x, v = x0.copy(), np.zeros(dim)
    proj, res = [0.0], [0.0]
    for _ in range(max_steps):
        v = momentum * v - lr * lam * (x - target)
        x = x + v
        d = x - x0
        p = float(d @ u)
        proj.append(p)
        res.append(math.sqrt(max(float(d @ d) - p * p, 0.0)))
        if np.linalg.norm(x - target) <= tol * length:
            return {"projection": np.asarray(proj), "residual": np.asarray(res), "line_length": length}
    raise ValueError(f"convex_gd_projection: lr={lr}, momentum={momentum} did not reach {tol:g} x the initial "
                     f"distance in {max_steps} steps")


def curve_distance(a, b, points: int = 4000) -> float:
    """Symmetric Hausdorff distance between two plane polylines ``(N, 2)``, each resampled at ``points`` evenly
    spaced arc lengths (so that long, sparse steps count as the segments they draw, not as their end points)."""
    from scipy.spatial.distance import directed_hausdorff

    def dense(c):
        c = np.asarray(c, dtype=np.float64)
        s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(c, axis=0).T))])
        t = np.linspace(0.0, s[-1], points)
        return np.stack([np.interp(t, s, c[:, 0]), np.interp(t, s, c[:, 1])], axis=1)

    a, b = dense(a), dense(b)
    return float(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _plan(ctx: Context) -> Plan:
    return QUICK if ctx.s.quick else FULL


def _checkpoint_list(n_train: int, plan: Plan) -> str:
    """Steps 1, 2, 4, ... up to the first spacing, then ``plan.checkpoints`` evenly spaced ones (0 and the last step
    are always saved): dense enough that the trajectory's projection is a curve, not a handful of points."""
    total = plan.epochs * math.ceil(n_train / BATCH)
    every = max(1, total // plan.checkpoints)
    steps = sorted({2**k for k in range(int(math.log2(every)) + 1) if 2**k < every} | set(range(every, total, every)))
    return ",".join(str(s) for s in steps)


def _tensors(ctx: Context, split: str, limit: int | None):
    import torch

    xs, ys = zip(*ctx.data(split, limit=limit))  # the evaluation loader the sweeps use (cached)
    return torch.cat(xs), torch.cat(ys)


def _random_point(model_name: str, num_classes: int, in_shape) -> dict:
    import torch

    from lerpfast.train import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_POINT_SEED)
        net = models.create(model_name, num_classes, tuple(in_shape))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def run(ctx: Context) -> None:
    """Train, sweep, check the claims and draw the figures (see the module docstring)."""
    import torch

    from lerpfast.train import list_checkpoints, load_model

    s, plan = ctx.s, _plan(ctx)
    train_eval = ctx.data("train", limit=plan.train_limit)
    zoom_eval = ctx.data("train", limit=plan.zoom_limit)
    test_eval = ctx.data("test", limit=plan.test_limit)
    n_train = int(train_eval.num_samples)

    # -- train ---------------------------------------------------------------------------------------------------
    act_eval = ctx.data("train", limit=plan.act_limit)
    with ctx.stage("train", total=2 + len(ACTIVATIONS)) as bar, threads(1):
        mlp_run = ctx.train(model=s.model, dataset=s.dataset, limit=plan.train_limit, optimizer="sgd", lr=0.1,
                            batch_size=BATCH, steps=f"{plan.epochs}ep", replicates=2,
                            checkpoints=_checkpoint_list(n_train, plan))
        bar.update()
        x, y = _tensors(ctx, "train", plan.train_limit)
        onehot = torch.nn.functional.one_hot(y.long(), int(train_eval.num_classes)).to(x.dtype)
        deep_run = ctx.train(data=((x, onehot), None), model="deep_linear",
                             model_options=f"depth={plan.deep_depth},width={plan.deep_width}", dataset=s.dataset,
                             limit=plan.train_limit, loss="mse", optimizer="sgdm", lr=plan.deep_lr, batch_size=BATCH,
                             steps=f"{plan.deep_epochs}ep", checkpoints="none", evaluate="none")
        bar.update()
        act_runs = {}
        for act in ACTIVATIONS:  # Figs. 1-3: SGD with momentum 0.9 (§2: "usually with momentum")
            # maxout keeps a checkpoint per epoch: SGD's progress over time, Fig. 1 right
            act_runs[act] = ctx.train(model="mlp", model_options=_act_options(act, plan), dataset=s.dataset,
                                      limit=plan.act_limit,
                                      optimizer="sgdm", lr=ACT_LR[act], batch_size=BATCH,
                                      steps=f"{plan.act_epochs}ep",
                                      checkpoints="each epoch" if act == PROGRESS_NET else "none", evaluate="none")
            bar.update()

    ck = [list_checkpoints(mlp_run, r) for r in (0, 1)]
    init0, final0, final1 = ck[0][0], ck[0][max(ck[0])], ck[1][max(ck[1])]
    model = load_model(mlp_run).to(s.device)
    random_point = _random_point(s.model, int(train_eval.num_classes), train_eval.input_shape)
    deep_ck = list_checkpoints(deep_run)
    deep_model = load_model(deep_run).to(s.device)
    ppp = dict(points_per_pass=25)  # bounds activation memory (K x batch x 300 floats per layer)
    large_point = _large_norm_point(final0)
    act = {}
    for name, run_dir in act_runs.items():
        c = list_checkpoints(run_dir)
        act[name] = (load_model(run_dir).to(s.device), (c[0], c[max(c)]))

    # -- sweep ---------------------------------------------------------------------------------------------------
    sweeps = {
        "init-final@train": (model, (init0, final0), plan.line, train_eval, ppp),
        "init-final@test": (model, (init0, final0), plan.line, test_eval, ppp),
        "zoom-init@train": (model, (init0, final0), np.linspace(0.0, 0.01, plan.zoom), zoom_eval, ppp),
        "zoom-final@train": (model, (init0, final0), np.linspace(0.99, 1.0, plan.zoom), zoom_eval, ppp),
        "A-B@train": (model, (final0, final1), plan.pair, train_eval, ppp),
        "A-B@test": (model, (final0, final1), plan.pair, test_eval, ppp),
        "random-final@train": (model, (random_point, final0), plan.pair, train_eval, ppp),
        "random-final@test": (model, (random_point, final0), plan.pair, test_eval, ppp),
        "tile@train": (model, (init0, final0), np.linspace(0.0, 1.0, plan.tile), zoom_eval, ppp),
        "large-random-final@train": (model, (large_point, final0), plan.pair, train_eval, ppp),
        **{f"act-{name}@train": (net, ends, plan.line, act_eval, ppp) for name, (net, ends) in act.items()},
        "deep-linear@train": (deep_model, (deep_ck[0], deep_ck[max(deep_ck)]), "-0.5:1.5:81", train_eval,
                              dict(loss_fn=_mse_onehot, precision="fp64")),
        "deep-linear-wide@train": (deep_model, (deep_ck[0], deep_ck[max(deep_ck)]), DEEP_WIDE, train_eval,
                                   dict(loss_fn=_mse_onehot, precision="fp64")),
    }
    res = {}
    with ctx.stage("sweep", total=len(sweeps)) as bar:
        for name, (net, ends, alphas, data, kw) in sweeps.items():
            key = name.split("@")[0]
            res[name] = ctx.sweep(name, net, ends, alphas, data, labels=LABELS.get(key, ["init", "final"]), **kw)
            bar.update()

    # -- trajectory (appendix B) -----------------------------------------------------------------------------------
    with ctx.stage("trajectory", total=2) as bar:
        traj = []
        for r in (0, 1):
            traj.append(_trajectory_cached(ctx, mlp_run, ck[r], seed=r))
            bar.update()

    with ctx.stage("SGD progress"):  # Fig. 1 right: the training objective after each epoch
        progress = _sgd_progress_cached(ctx, act_runs[PROGRESS_NET], act_eval)

    with ctx.stage("random walks", total=len(plan.walk_dims)) as bar:  # App. B, Fig. 11
        walks = {}
        for d in plan.walk_dims:
            walks[d] = [unit_walk_projection(d, steps=WALK_STEPS, solution=WALK_SOLUTION, seed=i)
                        for i in range(plan.walks)]
            bar.update()
    scalar = _scalar_lines()  # §5, Figs. 9-10: analytic, float64
    with ctx.stage("convex gradient descent", total=len(GD_SETTINGS)) as bar:  # App. B, Fig. 12
        gd = {}
        for lr, mu in GD_SETTINGS:
            gd[(lr, mu)] = convex_gd_projection(plan.gd_dim, lr, mu)
            bar.update()

    with ctx.stage("claims and figures"):
        _claims_mlp(ctx, res)
        _claims_trajectory(ctx, traj)
        _claims_deep_linear(ctx, res["deep-linear@train"], res["deep-linear-wide@train"], res["init-final@train"],
                            plan)
        _claims_new(ctx, res, scalar, walks, plan)
        _claims_training(ctx, res, progress, plan)
        _claims_convex_gd(ctx, gd, plan)
        _facts(ctx, res, plan, n_train, int(test_eval.num_samples))
        if ctx.is_writer:
            _figures(ctx, res, traj, plan)
            _figures_new(ctx, res, traj, scalar, walks, plan)
            _figure_progress(ctx, progress)
            _figure_convex_gd(ctx, gd, plan)


def _trajectory_cached(ctx: Context, run_dir, ckpts: dict, seed: int) -> dict:
    """:func:`_trajectory`, kept in ``<out>/trajectory/`` so that a re-run does not load every checkpoint again (the
    checkpoints of a finished run never change; the file is keyed by the run, the steps and the seed)."""
    path = ctx.out / "trajectory" / f"{Path(run_dir).name}_rep{seed}.npz"
    steps = np.asarray(sorted(ckpts))
    if path.is_file():
        with np.load(path) as f:
            if np.array_equal(f["steps"], steps) and "theta_norm" in f.files:  # older files lack the norms
                return {"steps": steps, "proj": {k[5:]: f[k] for k in f.files if k.startswith("proj_")},
                        "walk": {k[5:]: f[k] for k in f.files if k.startswith("walk_")},
                        "path_length": float(f["path_length"]), "dim": int(f["dim"]),
                        "theta_norm": f["theta_norm"]}
    t = _trajectory(ckpts, seed)
    if ctx.is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, steps=t["steps"], path_length=t["path_length"], dim=t["dim"], theta_norm=t["theta_norm"],
                 **{f"proj_{k}": v for k, v in t["proj"].items()}, **{f"walk_{k}": v for k, v in t["walk"].items()})
        os.replace(tmp, path)
    return t


def _trajectory(ckpts: dict, seed: int) -> dict:
    """Projection onto init -> final and residual of a replicate's checkpoints, the norm of each checkpoint's
    parameter vector (App. B, Fig. 13 compares the residual with it), and a random walk with the same step lengths
    (ours: App. B's walks, Fig. 11, take 1,000 unit Gaussian steps)."""
    import torch

    from lerpfast.analysis import random_walk_projection, step_norms, trajectory_projection

    steps = sorted(ckpts)
    states = [torch.load(ckpts[t], map_location="cpu", weights_only=True) for t in steps]
    keys = [k for k, v in states[0].items() if v.is_floating_point()]
    dim = sum(states[0][k].numel() for k in keys)
    norms = step_norms(states, keys)
    proj = trajectory_projection(states, keys=keys)
    # chunk: O(chunk x T) float64 at a time, ~60 MB for 110 checkpoints instead of 3.7 GB with the default
    walk = random_walk_projection(norms, dim, seed=seed, chunk=1 << 16)
    theta_norm = np.asarray([math.sqrt(sum(float(st[k].double().pow(2).sum()) for k in keys)) for st in states])
    return {"steps": np.asarray(steps), "proj": proj, "walk": walk, "path_length": float(norms.sum()), "dim": dim,
            "theta_norm": theta_norm}


def _monotone(res, lo=0.0, hi=1.0, metric="loss"):
    from lerpfast.analysis import monotonicity

    a, m = _inside(res, lo, hi)
    v = m[metric]
    drop = abs(float(v[0] - v[-1])) or float(np.ptp(v)) or 1.0
    mono = monotonicity(a, v, tol=TOL["monotone"] * drop)
    return mono, drop


def _claims_mlp(ctx: Context, res: dict) -> None:
    from lerpfast.analysis import barrier, convexity_violation

    data_note = _data_note(ctx)
    # 1: init -> final decreases monotonically (the training objective: the paper's J(theta), §1-2)
    r = res["init-final@train"]
    mono, drop = _monotone(r)
    mono_e, _ = _monotone(r, metric="error")
    ctx.claim("init -> final: the training objective \"decreases smoothly and monotonically\"",
              "App. B; §3, Figs. 1-3",
              f"largest rise {fmt(mono.max_rise)} over a drop of {fmt(drop)} ({_bumps(mono.n_bumps)}); train error: "
              f"largest rise {fmt(mono_e.max_rise)}",
              mono.monotonic, note=data_note + f"; monotonically: no rise above {TOL['monotone']:g} x the drop "
                                               "(fp32 rounding) on [0, 1]",
              max_rise=mono.max_rise, drop=drop, bumps=mono.n_bumps, error_max_rise=mono_e.max_rise)
    # 2: approximately convex
    a, m = _inside(r)
    viol, at = convexity_violation(a, m["loss"], return_alpha=True)
    drop = float(m["loss"][0] - m["loss"][-1])
    ctx.claim("init -> final: \"the objective function has a simple, approximately convex shape along this "
              "cross-section\"", "§2; Fig. 1",
              f"largest gap above the lower convex hull {fmt(viol)} = {fmt(viol / drop, 3)} of the drop "
              f"(at alpha = {at:.2f})",
              viol / drop <= TOL["convex"],
              note=f"approximately convex: gap <= {TOL['convex']:g} x the drop on [0, 1]; Fig. 1's caption adds "
                   "\"apart from the flattening near alpha = 0\"",
              convexity_violation=viol, relative=viol / drop, alpha=at)
    # 3: high resolution near init and solution (Fig. 4c / 4d)
    mono_i, drop_i = _monotone(res["zoom-init@train"], 0.0, 0.01)
    mono_f, drop_f = _monotone(res["zoom-final@train"], 0.99, 1.0)
    n = len(res["zoom-final@train"].alphas)
    n_img = res["zoom-final@train"].meta.get("data", {}).get("num_samples", "?")
    ctx.claim("higher resolution near the initialization ([0, .01]) and the solution ([.99, 1]) exposes no small, "
              "difficult structure", "§3, Fig. 4c/4d",
              f"{n} points in [0, 0.01]: largest rise {fmt(mono_i.max_rise)} over a drop of {fmt(drop_i)}; "
              f"in [0.99, 1]: {fmt(mono_f.max_rise)} over {fmt(drop_f)}",
              mono_i.monotonic and mono_f.monotonic,
              note=f"no structure: monotone at the same tolerance; train loss on the first {n_img} training images; "
                   "the paper: 200 values each, ReLU network without dropout (ours has none); Fig. 4a's 200 values "
                   "on [0, 1]: a row of its own",
              init_max_rise=mono_i.max_rise, init_drop=drop_i, final_max_rise=mono_f.max_rise, final_drop=drop_f,
              bumps=mono_i.n_bumps + mono_f.n_bumps)
    # 4: two solutions from different seeds: each is a local minimum of the line between them (Fig. 5 left)
    out = {}
    for split in ("train", "test"):
        r = res[f"A-B@{split}"]
        b, ab = barrier(r.alphas, r.loss, return_alpha=True)
        ends = 0.5 * (_at(r, 0.0) + _at(r, 1.0))
        out[split] = (b, ab, ends, barrier(r.alphas, r.metrics["error"]))
    b, ab, ends, be = out["train"]
    r = res["A-B@train"]
    min_a, min_b = _is_local_min(r, 0.0), _is_local_min(r, 1.0)
    ctx.claim("between two SGD solutions from different seeds \"each solution is a different local minimum within "
              "this 1-D subspace\"", "§3, Fig. 5 (left)",
              f"solution A a local minimum of the train loss along the line: {'yes' if min_a else 'no'}, B: "
              f"{'yes' if min_b else 'no'}; barrier {fmt(b)} above the chord at alpha = {ab:.2f} (endpoints' mean "
              f"loss {fmt(ends)}); test barrier {fmt(out['test'][0])}; train error barrier {fmt(be, 3)}",
              min_a and min_b,
              note="local minimum: the loss at the solution below both neighbouring points of the line "
                   f"(spacing {_spacing(r):g}, the line runs past both ends); seeds 0 and 1 (init and data order; "
                   "the paper also changes dropout masks)",
              a_local_min=float(min_a), b_local_min=float(min_b), barrier=b, relative=b / ends, alpha=ab,
              endpoints_loss=ends, test_barrier=out["test"][0], error_barrier=be)
    # 5: random point -> solution: no other minimum on the way (Fig. 5 right)
    r = res["random-final@train"]
    mono, drop = _monotone(r)
    v = np.asarray(r.loss, dtype=np.float64)
    a = np.asarray(r.alphas, dtype=np.float64)
    interior = np.zeros(len(v), dtype=bool)
    interior[1:-1] = (v[1:-1] < v[:-2]) & (v[1:-1] < v[2:])
    on_path = (a >= -1e-9) & (a < 1.0 - 1e-9)  # the interpolation from the random point up to the solution
    others = int(np.sum(interior & on_path))
    past = [f"{x:g}" for x in a[interior & (a > 1.0 + 1e-9)]]
    ctx.claim("from a random point to an SGD solution \"we find no local minima besides the SGD solution\"",
              "§3, Fig. 5 (right)",
              f"train: {others} local minima on [0, 1) (the path before the solution); largest rise on [0, 1] "
              f"{fmt(mono.max_rise)} over a drop of {fmt(drop)}"
              + (f"; past the solution (extrapolated): a minimum at alpha = {', '.join(past)}" if past else ""),
              others == 0,
              note=f"random point: a fresh draw of the initialization (seed {RANDOM_POINT_SEED}), not a point of "
                   "large norm; local minimum: below both neighbouring points",
              local_minima=others, max_rise=mono.max_rise, drop=drop)
    # observation: the test-set line (the paper plots the training objective and says nothing of the test curve)
    r = res["init-final@test"]
    mono, drop = _monotone(r)
    ctx.observe("init -> final: the test loss falls monotonically too", "ours (Figs. 1-3 show the training "
                "objective; Fig. 4's caption: the validation objective is \"too widely separated\")",
                f"largest rise {fmt(mono.max_rise)} over a drop of {fmt(drop)} ({_bumps(mono.n_bumps)})",
                mono.monotonic, note=f"same tolerance as the training curve; {data_note}",
                max_rise=mono.max_rise, drop=drop, bumps=mono.n_bumps)


def _spacing(res) -> float:
    a = np.sort(np.asarray(res.alphas, dtype=np.float64))
    return float(np.round(np.min(np.diff(a)), 6))


def _is_local_min(res, alpha: float) -> bool:
    """Whether the sampled loss at ``alpha`` is below both neighbouring samples (False at either end of the line)."""
    a = np.asarray(res.alphas, dtype=np.float64)
    order = np.argsort(a)
    a, v = a[order], np.asarray(res.loss, dtype=np.float64)[order]
    i = int(np.argmin(np.abs(a - alpha)))
    return 0 < i < len(a) - 1 and bool(v[i] < v[i - 1] and v[i] < v[i + 1])


def _claims_trajectory(ctx: Context, traj: list) -> None:
    rows = []
    for t in traj:
        p, w = t["proj"], t["walk"]
        rows.append({
            "sgd": float(np.max(p["residual"]) / p["line_length"]),  # how far it strays, in units of its own line
            "walk": float(np.max(w["residual"]) / w["line_length"]),
            "norm": float(np.max(np.asarray(p["residual"]) / np.asarray(t["theta_norm"]))),  # residual / ||theta_t||
            "sgd_straight": float(p["line_length"]) / t["path_length"],  # line length / path length
            "walk_straight": float(w["line_length"]) / t["path_length"],
        })
    sgd = [r["sgd"] for r in rows]
    ctx.claim("\"Stochastic gradient descent does not actually follow this path\" (it matches it at the beginning "
              "and at the end)", "App. B, Fig. 13",
              f"largest residual / line length {' / '.join(fmt(v, 3) for v in sgd)} (seeds 0 / 1); the line is "
              f"{' / '.join(fmt(r['sgd_straight'], 3) for r in rows)} of the path's length",
              min(sgd) > TOL["strays"],
              note=f"does not follow: the largest residual above {TOL['strays']:g} x the line's length in both seeds",
              seed0=sgd[0], seed1=sgd[1], line_over_path=rows[0]["sgd_straight"])
    norm = [r["norm"] for r in rows]
    ctx.claim("\"our linear subspace captures at least 2/3 the norm of the parameter vector at all points in time\"",
              "App. B, Fig. 13",
              f"largest residual / ||theta_t|| over the trajectory {' / '.join(fmt(v, 3) for v in norm)} (seeds 0 / "
              f"1; {len(traj[0]['steps'])} checkpoints each)",
              max(norm) <= TOL["norm"],
              note="captures at least 2/3: the residual (L2 norm, not squared, as in Fig. 13) is at most 1/3 of "
                   "||theta_t|| at every checkpoint; the paper's network is a maxout MLP",
              seed0=norm[0], seed1=norm[1])
    ratio = [r["sgd"] / r["walk"] for r in rows]
    ctx.observe("SGD strays from its line less than half as far as a random walk with the same step lengths, each "
                "in units of its own line", "ours (App. B, Figs. 11-12: in high dimension the projection-residual "
                "plot takes one generic shape, so the paper draws no such comparison)",
                f"SGD over walk {' / '.join(fmt(v, 3) for v in ratio)} (walk: {fmt(rows[0]['walk'], 3)}; the walk's "
                f"line is {fmt(rows[0]['walk_straight'], 3)} of its path)",
                max(ratio) < TOL["walk"],
                note=f"the walk takes the checkpoints' {len(traj[0]['steps']) - 1} step lengths in "
                     f"{traj[0]['dim']:,} dimensions (App. B's walks: 1,000 unit Gaussian steps, 'solution' at 900)",
                seed0=ratio[0], seed1=ratio[1], walk_relative=rows[0]["walk"],
                walk_line_over_path=rows[0]["walk_straight"])


def _claims_deep_linear(ctx: Context, r, wide, mlp, plan: Plan) -> None:
    from lerpfast.analysis import monotonicity

    d = plan.deep_depth
    a, m = _inside(r)
    shape = line_shape(a, m["loss"])
    mono = monotonicity(a, m["loss"], tol=TOL["monotone"] * abs(shape["drop"]))
    ctx.claim("deep linear regression, small initialization -> solution: \"a flattening of the objective function "
              "near the saddle point at the origin, and only one minimum within this 1-D subspace\"", "§5, Fig. 9",
              f"fraction of the drop done by alpha = 0.25: {fmt(shape['frac25'], 3)}, by 0.5: "
              f"{fmt(shape['frac50'], 3)} (straight fall: 0.25, 0.5); slope at alpha = 0 / mean slope "
              f"{fmt(shape['slope0'], 3)}; largest rise {fmt(mono.max_rise)}",
              shape["frac50"] < TOL["flat"] and mono.monotonic,
              note=f"the paper's model is the scalar y = w1 w2 x; ours depth {d}, width {plan.deep_width}, squared "
                   "loss on one-hot targets, PyTorch's default initialization (each layer shrinks its input about "
                   "sqrt(3)-fold, so the initial map is small); flattening: less than half the drop by alpha = 0.5; "
                   "one minimum: monotone on [0, 1]; the paper's own scalar model and Fig. 10: the rows below",
              **shape, max_rise=mono.max_rise)
    fit = polynomial_residuals(wide.alphas, wide.loss, (2 * d - 2, 2 * d - 1, 2 * d))
    narrow = polynomial_residuals(r.alphas, r.loss, (2 * d - 1, 2 * d))
    mlp_fit = polynomial_residuals(mlp.alphas, mlp.loss, (2 * d,))[2 * d]
    lo, hi = float(np.min(wide.alphas)), float(np.max(wide.alphas))
    ctx.observe(f"deep linear net: the loss along a line is a polynomial in alpha of degree 2 x depth = {2 * d}",
                "ours (§5 says only that the interpolation \"can be carried out analytically\")",
                f"rms residual / range of a degree-{2 * d} fit {fmt(fit[2 * d], 2)}; degree {2 * d - 1}: "
                f"{fmt(fit[2 * d - 1], 2)}, {2 * d - 2}: {fmt(fit[2 * d - 2], 2)}; the MLP's init -> final on "
                f"[-0.5, 1.5], degree {2 * d}: {fmt(mlp_fit, 2)}",
                fit[2 * d] < TOL["poly"] and fit[2 * d - 1] > 100 * fit[2 * d],
                note=f"{len(wide.alphas)} points in [{lo:g}, {hi:g}], float64 sweep; degree-{2 * d} residual below "
                     f"{TOL['poly']:g}, degree {2 * d - 1} 100 x higher (on [-0.5, 1.5] alone the top coefficient "
                     f"hardly shows: {fmt(narrow[2 * d], 2)} vs {fmt(narrow[2 * d - 1], 2)})",
                residual=fit[2 * d], residual_lower=fit[2 * d - 1], residual_lower2=fit[2 * d - 2], degree=2 * d,
                mlp_residual=mlp_fit, narrow_residual=narrow[2 * d], narrow_residual_lower=narrow[2 * d - 1])


def _data_note(ctx: Context) -> str:
    where = {"fashion-mnist": "Fashion-MNIST for MNIST", "digits": "scikit-learn digits (8x8) for MNIST",
             "mnist5k": "real MNIST, mnist5k's 5,000 digits (4,000 train / 1,000 test) for the full 60,000 / 10,000"}
    model = {"lenet_300_100": "LeNet-300-100 (ReLU) for their maxout / ReLU MLPs"}
    return "; ".join(x for x in (where.get(ctx.s.dataset, f"{ctx.s.dataset} for MNIST"),
                                 model.get(ctx.s.model, f"{ctx.s.model} for their MLPs")) if x)


def _facts(ctx: Context, res: dict, plan: Plan, n_train: int, n_test: int) -> None:
    from lerpfast.analysis import argmin

    f = ctx.facts
    for split in ("train", "test"):
        r = res[f"init-final@{split}"]
        f[f"final_{split}_loss"] = _at(r, 1.0)
        f[f"final_{split}_error"] = _at(r, 1.0, "error")
        f[f"init_{split}_loss"] = _at(r, 0.0)
        (amin,), lmin = argmin(r.alphas, r.loss)
        f[f"argmin_alpha_{split}"] = float(amin)
        f[f"min_{split}_loss"] = lmin
    f["plan"] = dict(plan.__dict__)
    f["train_samples"], f["test_samples"] = n_train, n_test
    ctx.note(f"Setting: {_data_note(ctx)}; {plan.epochs} epochs of SGD (lr 0.1, batch {BATCH}, no momentum) from "
             f"seeds 0 and 1 on {n_train:,} training images, reaching {100 * f['final_train_error']:.2f} % train "
             f"({round(f['final_train_error'] * n_train)} mistakes) and {100 * f['final_test_error']:.1f} % test "
             f"error; curves on those {n_train:,} training and {n_test:,} test images. Training goes to the point "
             "the paper describes: \"negligible training error\" (abstract), SGD run \"until reaching convergence "
             "(usually some early stopping criterion)\" (§2). Criterion here: at most "
             f"{100 * TOL['negligible']:g} % of the images trained on misclassified at the end of a fixed number of "
             "epochs (chosen in advance: every MLP gets there on mnist5k), checked, not assumed: the last claims row "
             "gives each network's measured training error.")
    ctx.note(f"init -> final: the train loss is lowest at alpha = {f['argmin_alpha_train']:.3f} "
             f"({fmt(f['min_train_loss'])} vs {fmt(f['final_train_loss'])} at alpha = 1), the test loss at alpha = "
             f"{f['argmin_alpha_test']:.3f} ({fmt(f['min_test_loss'])} vs {fmt(f['final_test_loss'])}).")
    ctx.note(f"Deep linear net: depth {plan.deep_depth}, width {plan.deep_width}, no biases, squared loss onto one-hot "
             f"labels of the same training images, SGD with momentum 0.9 (lr {plan.deep_lr}) for "
             f"{plan.deep_epochs} epochs from PyTorch's default initialization.")


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------


def _figures(ctx: Context, res: dict, traj: list, plan: Plan) -> None:
    from matplotlib.figure import Figure

    from lerpfast.plot import plot_lines, plot_trajectory

    s = ctx.s
    fig = plot_lines({"train": res["init-final@train"], "test": res["init-final@test"]}, ("loss", "error"),
                     logy=True, title=f"{s.model}, {s.dataset}: init -> final, extrapolated", cmap="coolwarm")
    ctx.figure(fig, "init_final", "Loss (log axis) and error along init -> final on the train and test sets "
                                  "(their Figs. 1-3 show the training objective)")

    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    for ax, name, lo, hi in zip(fig.subplots(1, 2), ("zoom-init@train", "zoom-final@train"), (0.0, 0.99),
                                (0.01, 1.0)):
        r = res[name]
        ax.plot(r.alphas, r.loss, ".-", ms=2, lw=0.8, color="C0")
        ax.set_xlim(lo, hi)
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel("train loss")
        ax.set_title(f"{len(r.alphas)} points in [{lo:g}, {hi:g}]", fontsize="medium")
        ax.grid(alpha=0.3)
    fig.suptitle("init -> final at high resolution")
    ctx.figure(fig, "zoom", "The train loss near the initialization and near the solution, 200 points each "
                              "(their Fig. 4c/4d)")

    fig = Figure(figsize=(8.4, 5.6), layout="constrained")
    axes = fig.subplots(2, 2, sharex="col")
    pairs = (("A-B", "solution A (seed 0) -> solution B (seed 1)"), ("random-final", "random point -> solution"))
    for j, (key, title) in enumerate(pairs):
        for split, color in (("train", "C0"), ("test", "C3")):
            r = res[f"{key}@{split}"]
            axes[0, j].plot(r.alphas, r.loss, color=color, lw=1.3, label=split)
            axes[1, j].plot(r.alphas, r.error, color=color, lw=1.3, label=split)
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(title, fontsize="medium")
        axes[0, j].set_ylabel("loss")
        axes[1, j].set_ylabel("error")
        axes[1, j].set_xlabel(r"$\alpha$")
        for ax in axes[:, j]:
            ax.axvline(0, color="0.7", lw=0.6, zorder=0)
            ax.axvline(1, color="0.7", lw=0.6, zorder=0)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small", frameon=False)
    ctx.figure(fig, "solutions", "Between two solutions from different seeds, and from a random point to a solution "
                                  "(their Fig. 5)")

    t = traj[0]
    fig = plot_trajectory(t["proj"], t["walk"], steps=t["steps"],
                          title=f"seed 0: SGD ({len(t['steps'])} checkpoints) vs a random walk")
    ctx.figure(fig, "trajectory", "Projection of the training trajectory onto init -> final against the residual, "
                                  "and a random walk with the same step lengths (their App. B, Fig. 13; the walk is "
                                  "ours)")

    from numpy.polynomial import Chebyshev

    r, wide, d = res["deep-linear@train"], res["deep-linear-wide@train"], plan.deep_depth
    a, v = np.asarray(r.alphas), np.asarray(r.loss)
    aw, vw = np.asarray(wide.alphas), np.asarray(wide.loss)
    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2)
    ax0.plot(a, v, "o", ms=3, color="C0", label="sweep (float64)")
    fine = np.linspace(a.min(), a.max(), 400)
    ax0.plot(fine, Chebyshev.fit(aw, vw, 2 * d)(fine), color="C1", lw=1.0,
             label=f"degree-{2 * d} fit on [{aw.min():g}, {aw.max():g}]")
    ax0.set_yscale("log")
    ax0.set_xlabel(r"$\alpha$")
    ax0.set_ylabel("train loss (squared)")
    ax0.axvline(0, color="0.7", lw=0.6, zorder=0)
    ax0.axvline(1, color="0.7", lw=0.6, zorder=0)
    ax0.legend(fontsize="small", frameon=False)
    ax0.grid(alpha=0.3)
    floor = 1e-18  # below float64 rounding of the curve's range: where an exact fit lands
    for deg, color in ((2 * d - 2, "C2"), (2 * d - 1, "C3"), (2 * d, "C1")):
        gap = np.abs(Chebyshev.fit(aw, vw, deg)(aw) - vw) / np.ptp(vw)
        ax1.semilogy(aw, np.maximum(gap, floor), "o-", ms=3, lw=0.6, color=color, label=f"degree {deg}")
    ax1.set_ylim(floor / 3, 1e-4)
    ax1.set_xlabel(r"$\alpha$")
    ax1.set_ylabel("|loss - fit| / range of the loss")
    ax1.set_title(f"polynomial fits, {len(aw)} points", fontsize="medium")
    ax1.legend(fontsize="small", frameon=False, ncol=3, loc="upper center")
    ax1.grid(alpha=0.3)
    fig.suptitle(f"deep linear net, depth {d}: init -> final")
    ctx.figure(fig, "deep_linear", f"Deep linear net (depth {d}): the loss along init -> final and polynomial fits "
                                   "(their §5 uses the scalar y = w1 w2 x; the degree is ours)")


# ---------------------------------------------------------------------------------------------------------------------
# Figs. 1-5 at the paper's settings, §5's scalar model (Figs. 9-10), App. B's random walks (Fig. 11)
# ---------------------------------------------------------------------------------------------------------------------


def _act_options(name: str, plan: Plan) -> str:
    """``mlp`` options of one of the Figs. 1-3 networks."""
    if name == "relu+dropout":
        return f"widths=({','.join(str(w) for w in plan.dropout_widths)}),{ACTIVATIONS[name]}"
    return ACTIVATIONS[name]


def _large_norm_point(final_path) -> dict:
    """A random point of large norm: i.i.d. Gaussian entries (seed ``RANDOM_POINT_SEED + 1``) scaled so that the
    whole vector's norm is ``LARGE_NORM`` x the solution's."""
    import torch

    final = torch.load(final_path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(RANDOM_POINT_SEED + 1)
    keys = [k for k, v in final.items() if v.is_floating_point()]
    draw = {k: torch.randn(final[k].shape, generator=gen, dtype=torch.float64) for k in keys}
    norm_f = math.sqrt(sum(float(final[k].double().pow(2).sum()) for k in keys))
    norm_d = math.sqrt(sum(float(v.pow(2).sum()) for v in draw.values()))
    point = {k: v.clone() for k, v in final.items()}
    for k in keys:
        point[k] = (draw[k] * (LARGE_NORM * norm_f / norm_d)).to(final[k].dtype)
    return point


def _scalar_lines() -> dict:
    """§5's ``y = w1 w2 x``: the three lines of Figs. 9-10 (float64, exact), with their end points."""
    rng = np.random.default_rng(0)
    small = rng.normal(0.0, SCALAR_SMALL, 2)
    sol = scalar_linear_descend(small)
    a_init = np.abs(np.random.default_rng(1).normal(0.0, SCALAR_PAIR, 2))
    b_init = np.abs(np.random.default_rng(2).normal(0.0, SCALAR_PAIR, 2))
    sol_a, sol_b = scalar_linear_descend(a_init), scalar_linear_descend(b_init)
    angle = np.random.default_rng(3).uniform(0.0, 2 * np.pi)
    far = SCALAR_LARGE * np.array([np.cos(angle), np.sin(angle)])
    a = SCALAR_LINE
    # how typical the one large-norm line is: other minima on [0, 1) over more random directions, split into global
    # ones (the line crosses the other branch of w1 w2 = 1: loss below 1e-3) and others
    crossing = other = 0
    for k in range(SCALAR_DIRECTIONS):
        t = np.random.default_rng(1000 + k).uniform(0.0, 2 * np.pi)
        line = scalar_linear_line(SCALAR_LARGE * np.array([np.cos(t), np.sin(t)]), sol, a)
        found = interior_minima(a, line, 0.0, 1.0 - 1e-9)
        low = [float(line[np.argmin(np.abs(a - x))]) < 1e-3 for x in found]
        crossing += any(low)
        other += not all(low)
    return {"alphas": a, "directions": {"crossing": crossing, "other": other, "n": SCALAR_DIRECTIONS},
            "small": {"start": small, "end": sol, "loss": scalar_linear_line(small, sol, a)},
            "pair": {"start": sol_a, "end": sol_b, "loss": scalar_linear_line(sol_a, sol_b, a),
                     "inits": (a_init, b_init)},
            "far": {"start": far, "end": sol, "loss": scalar_linear_line(far, sol, a)}}


def _claims_new(ctx: Context, res: dict, scalar: dict, walks: dict, plan: Plan) -> None:
    from lerpfast.analysis import convexity_violation

    # Fig. 4a/4b: 200 values tiling [0, 1]
    r = res["tile@train"]
    mono, drop = _monotone(r)
    n_img = r.meta.get("data", {}).get("num_samples", "?")
    ctx.claim("tiling [0, 1] with 200 values of alpha: \"increased resolution did not expose any small, difficult "
              "structures\"", "§3, Fig. 4a/4b",
              f"{len(r.alphas)} points in [0, 1]: largest rise {fmt(mono.max_rise)} over a drop of {fmt(drop)} "
              f"({_bumps(mono.n_bumps)})",
              mono.monotonic,
              note=f"no structure: monotone at {TOL['monotone']:g} x the drop; train loss on the first {n_img} "
                   "training images; the paper's Fig. 4 network: ReLU without dropout (as ours)",
              max_rise=mono.max_rise, drop=drop, bumps=mono.n_bumps)
    # Fig. 5 right with a random point of large norm (Fig. 10 right's wording)
    r = res["large-random-final@train"]
    mono, drop = _monotone(r)
    found = interior_minima(r.alphas, r.loss, 0.0, 1.0 - 1e-9)
    ctx.claim("from a random point of large norm to an SGD solution: \"no local minima besides the SGD solution\"",
              "§3, Fig. 5 (right); §5, Fig. 10 (right)",
              f"train: {len(found)} local minima on [0, 1); loss {fmt(_at(r, 0.0))} at the random point, "
              f"{fmt(_at(r, 1.0))} at the solution; largest rise on [0, 1] {fmt(mono.max_rise)}",
              len(found) == 0,
              note=f"random point: i.i.d. Gaussian entries scaled to {LARGE_NORM:g} x ||theta_final|| (Fig. 5 says "
                   "\"a random point in space\", Fig. 10 right \"a random point with large norm\"); local minimum: "
                   "below both neighbouring points",
              local_minima=len(found), max_rise=mono.max_rise, drop=drop, start_loss=_at(r, 0.0))
    # Figs. 1-3: maxout, ReLU with dropout, sigmoid
    for name in ACTIVATIONS:
        r = res[f"act-{name}@train"]
        mono, drop = _monotone(r)
        err = _at(r, 1.0, "error")
        a, m = _inside(r)
        viol = convexity_violation(a, m["loss"])
        ctx.claim(f"{name} MLP, init -> final: the 1-D subspace \"contains no difficult, exotic structures\"",
                  ACT_SOURCES[name],
                  f"train error at the solution {100 * err:.2f} %; largest rise on [0, 1] {fmt(mono.max_rise)} over "
                  f"a drop of {fmt(drop)} ({_bumps(mono.n_bumps)}); gap above the convex hull "
                  f"{fmt(viol / drop, 3)} of the drop",
                  mono.monotonic,
                  note=f"no exotic structure: monotone at {TOL['monotone']:g} x the drop on [0, 1]; mlp "
                       f"({_act_options(name, plan)}), SGD with momentum 0.9, lr {ACT_LR[name]:g}, "
                       f"{plan.act_epochs} epochs "
                       "(the paper: pylearn2's configurations, App. A)",
                  max_rise=mono.max_rise, drop=drop, bumps=mono.n_bumps, train_error=err, convexity=viol / drop)
    r = res["act-maxout@train"]
    a, m = _inside(r)
    shape = line_shape(a, m["loss"])
    late = a >= 0.1
    viol = convexity_violation(a[late], m["loss"][late]) / shape["drop"]
    ctx.claim("maxout: \"Apart from the flattening near alpha = 0, it appears nearly convex in this subspace\"",
              "Fig. 1",
              f"slope at alpha = 0 / mean slope {fmt(shape['slope0'], 3)}; gap above the convex hull on [0.1, 1] "
              f"{fmt(viol, 3)} of the drop",
              shape["slope0"] < 0.5 and viol <= TOL["convex"],
              note=f"flattening: the slope at alpha = 0 (cubic fit on [0, 0.1]) under half the mean slope; nearly "
                   f"convex: gap <= {TOL['convex']:g} x the drop on [0.1, 1]",
              slope0=shape["slope0"], convexity=viol, frac25=shape["frac25"])

    # §5, Figs. 9-10: y = w1 w2 x
    a = scalar["alphas"]
    sm = scalar["small"]
    shape = line_shape(a, sm["loss"])
    minima = interior_minima(a, sm["loss"])
    ctx.claim("y = w1 w2 x, small random initialization -> solution: \"a flattening of the objective function near "
              "the saddle point at the origin, and only one minimum within this 1-D subspace\"", "§5, Fig. 9",
              f"fraction of the drop done by alpha = 0.5: {fmt(shape['frac50'], 3)} (straight fall: 0.5); slope at "
              f"alpha = 0 / mean slope {fmt(shape['slope0'], 3)}; local minima on [-0.5, 1.5]: "
              f"{', '.join(f'alpha = {x:.3f}' for x in minima) or 'none'}",
              shape["frac50"] < TOL["flat"] and len(minima) == 1,
              note=f"init N(0, {SCALAR_SMALL:g}^2) per weight (seed 0) = ({sm['start'][0]:.3f}, {sm['start'][1]:.3f}), "
                   f"gradient descent to ({sm['end'][0]:.3f}, {sm['end'][1]:.3f}); the loss (w1 w2 - 1)^2, exact in "
                   f"float64 at {len(a)} points; flattening: less than half the drop by alpha = 0.5; one minimum: "
                   "one local minimum on the plotted [-0.5, 1.5] (the loss is a quartic in alpha: its second zero, "
                   "if any, lies outside)",
              **shape, minima=len(minima))
    pr = scalar["pair"]
    inside = (a >= 0) & (a <= 1)
    top = float(np.max(pr["loss"][inside]))
    at = float(a[inside][int(np.argmax(pr["loss"][inside]))])
    ends = max(float(pr["loss"][np.argmin(np.abs(a))]), float(pr["loss"][np.argmin(np.abs(a - 1))]))
    ctx.claim("y = w1 w2 x, two solutions: \"the straight line between them encounters a barrier of higher cost\"",
              "§5, Fig. 10 (left)",
              f"highest loss on [0, 1] {fmt(top)} at alpha = {at:.3f}; at the solutions {fmt(ends, 2)}",
              top - ends > 1e-9,
              note=f"solutions ({pr['start'][0]:.3f}, {pr['start'][1]:.3f}) and ({pr['end'][0]:.3f}, "
                   f"{pr['end'][1]:.3f}), by gradient descent from |N(0, {SCALAR_PAIR:g}^2)| draws (seeds 1, 2; "
                   "the same branch w1 w2 = 1, w1, w2 > 0); barrier: any rise above the solutions' loss beyond "
                   "float64 rounding (1e-9)",
              barrier=top - ends, alpha=at)
    fa, dirs = scalar["far"], scalar["directions"]
    found = interior_minima(a, fa["loss"], 0.0, 1.0 - 1e-9)
    where = ", ".join(f"alpha = {x:.3f} (loss {fmt(float(fa['loss'][np.argmin(np.abs(a - x))]), 2)})" for x in found)
    ctx.claim("y = w1 w2 x, a random point with large norm -> a solution: \"this search does not encounter any "
              "minima other than the solution used to initialize the search\"", "§5, Fig. 10 (right)",
              f"local minima on [0, 1): {len(found)}{': ' + where if where else ''}; over {dirs['n']} more random "
              f"directions: {dirs['crossing']} lines cross the other branch of w1 w2 = 1 (another global minimum), "
              f"{dirs['other']} meet a minimum that is not global",
              len(found) == 0,
              note=f"random point of norm {SCALAR_LARGE:g} (direction seed 3) = ({fa['start'][0]:.2f}, "
                   f"{fa['start'][1]:.2f}) -> the Fig. 9 solution; local minimum: below both neighbouring points",
              local_minima=len(found), crossing=dirs["crossing"], other=dirs["other"])

    # App. B, Fig. 11: unit-step random walks converge to one shape as the dimension grows
    dev = {d: float(np.mean([walk_shape_distance(w, WALK_STEPS, WALK_SOLUTION) for w in ws]))
           for d, ws in walks.items()}
    dims = sorted(dev)
    falling = all(dev[b] < dev[a] for a, b in zip(dims, dims[1:]))
    ctx.claim("random walks: the projection-residual plot \"converges to a simple geometric shape as the "
              "dimensionality of a random walk increases\"", "App. B, Fig. 11",
              "largest distance from the limit shape (units of the solution's norm), mean of "
              f"{plan.walks} walks: " + ", ".join(f"{fmt(dev[d], 3)} (d = {d:,})" for d in dims),
              falling and dev[dims[-1]] < 0.05,
              note=f"{WALK_STEPS} steps of a unit Gaussian, the \"solution\" at step {WALK_SOLUTION}; the limit: "
                   "projection min(t/900, 1), residual sqrt(u (1 - u)) before and sqrt(u - 1) after it (u = t/900); "
                   "converges: the distance falls at every larger dimension and ends below 0.05",
              **{f"d{d}": dev[d] for d in dims})
    ctx.facts["walk_distance"] = {str(d): dev[d] for d in dims}


def _figures_new(ctx: Context, res: dict, traj: list, scalar: dict, walks: dict, plan: Plan) -> None:
    from matplotlib.figure import Figure

    # Fig. 4a / 4b
    r = res["tile@train"]
    fig = Figure(figsize=(8.4, 3.0), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2)
    for ax in (ax0, ax1):
        ax.plot(r.alphas, r.loss, ".-", ms=2, lw=0.8, color="C0")
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
    ax0.set_title(f"a) {len(r.alphas)} values tiling [0, 1]", fontsize="medium")
    a, v = np.asarray(r.alphas), np.asarray(r.loss)
    keep = a >= 0.6
    ax1.set_xlim(0.6, 1.0)
    ax1.set_ylim(float(v[keep].min()) * 0.95, float(v[keep].max()) * 1.05)
    ax1.set_title("b) zoomed in", fontsize="medium")
    ctx.figure(fig, "tile", "The train loss at 200 values tiling [0, 1] and a zoomed-in view (their Fig. 4a/4b)")

    # Figs. 1-3: the three activations on one log axis, and their error
    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2)
    for i, name in enumerate(ACTIVATIONS):
        r = res[f"act-{name}@train"]
        ax0.plot(r.alphas, r.loss, color=f"C{i}", lw=1.3, label=name)
        ax1.plot(r.alphas, r.error, color=f"C{i}", lw=1.3, label=name)
    ax0.set_yscale("log")
    ax0.set_ylabel("train loss")
    ax1.set_ylabel("train error")
    for ax in (ax0, ax1):
        ax.set_xlabel(r"$\alpha$")
        ax.axvline(0, color="0.7", lw=0.6, zorder=0)
        ax.axvline(1, color="0.7", lw=0.6, zorder=0)
        ax.grid(alpha=0.3)
    ax0.legend(fontsize="small", frameon=False)
    fig.suptitle(f"{ctx.s.dataset}: init -> final, three MLPs")
    ctx.figure(fig, "activations", "Maxout, ReLU with dropout and sigmoid MLPs: init -> final on one log axis "
                                   "(their Fig. 3; Figs. 1-2 show each alone)")

    # Fig. 5 right with a large-norm random point
    r = res["large-random-final@train"]
    fig = Figure(figsize=(4.6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(r.alphas, r.loss, color="C0", lw=1.3)
    ax.set_yscale("log")
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel("train loss")
    ax.axvline(0, color="0.7", lw=0.6, zorder=0)
    ax.axvline(1, color="0.7", lw=0.6, zorder=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"random point ({LARGE_NORM:g} x the solution's norm) -> solution", fontsize="medium")
    ctx.figure(fig, "large_norm", "From a random point of large norm to a solution (their Fig. 5 right; Fig. 10 "
                                  "right's large norm)")

    # App. B, Fig. 13: the residual against the parameter norm
    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    axes = fig.subplots(1, len(traj))
    for seed, (ax, t) in enumerate(zip(np.atleast_1d(axes), traj)):
        p, res_, nrm = (np.asarray(t["proj"]["projection"]), np.asarray(t["proj"]["residual"]),
                        np.asarray(t["theta_norm"]))
        ax.plot(p, res_, color="C0", lw=1.2, label="residual")
        ax.plot(p, nrm, color="k", lw=1.0, ls="--", label=r"$\|\theta_t\|$")
        ax.plot(p, nrm / 3, color="C3", lw=0.8, ls=":", label=r"$\|\theta_t\| / 3$")
        ax.set_xlabel("projection onto init -> final")
        ax.set_ylabel("L2 norm")
        ax.set_title(f"seed {seed}: residual / norm at most {np.max(res_ / nrm):.3f}", fontsize="medium")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize="small", frameon=False)
    ctx.figure(fig, "trajectory_norm", "The residual of the trajectory's projection against the norm of the "
                                       "parameter vector (their App. B, Fig. 13)")

    # §5, Figs. 9-10
    a = scalar["alphas"]
    fig = Figure(figsize=(8.4, 6.4), layout="constrained")
    (ax, ax9), (ax10l, ax10r) = fig.subplots(2, 2)
    ends = np.array([scalar[k][e] for k in ("small", "pair", "far") for e in ("start", "end")])
    lo, hi = min(-2.0, float(ends.min()) - 0.5), max(2.0, float(ends.max()) + 0.5)
    g = np.linspace(lo, hi, 301)
    w1, w2 = np.meshgrid(g, g)
    cs = ax.contourf(w1, w2, np.log10(scalar_linear_loss(w1, w2) + 1e-3), levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=r"$\log_{10}(J + 10^{-3})$")
    for key, color, label in (("small", "C1", "Fig. 9"), ("pair", "C3", "Fig. 10 left"), ("far", "w", "Fig. 10 right")):
        st, en = scalar[key]["start"], scalar[key]["end"]
        ax.plot([st[0], en[0]], [st[1], en[1]], color=color, lw=1.5, label=label)
        ax.plot(*st, "o", color=color, ms=3)
        ax.plot(*en, "s", color=color, ms=3)
    ax.plot(0, 0, "x", color="w", ms=6)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("$w_1$")
    ax.set_ylabel("$w_2$")
    ax.set_title(r"$J = (w_1 w_2 - 1)^2$", fontsize="medium")
    ax.legend(fontsize="x-small", loc="upper left")
    for axc, key, title in ((ax9, "small", "Fig. 9: small init -> solution"),
                            (ax10l, "pair", "Fig. 10 left: two solutions"),
                            (ax10r, "far", "Fig. 10 right: large-norm point -> solution")):
        axc.plot(a, scalar[key]["loss"], color="C0", lw=1.3)
        axc.set_xlabel(r"$\alpha$")
        axc.set_ylabel("J")
        axc.set_title(title, fontsize="medium")
        axc.axvline(0, color="0.7", lw=0.6, zorder=0)
        axc.axvline(1, color="0.7", lw=0.6, zorder=0)
        axc.grid(alpha=0.3)
    ax10r.set_yscale("symlog", linthresh=1.0)
    ax10r.set_ylim(bottom=0)
    fig.suptitle("deep linear regression y = w1 w2 x (one example, x = y = 1)")
    ctx.figure(fig, "scalar_linear", "The scalar deep linear model of §5: its loss surface and the three lines of "
                                     "Figs. 9 and 10")

    # App. B, Fig. 11
    dims = sorted(walks)
    fig = Figure(figsize=(2.1 * len(dims), 2.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(dims), sharey=True))
    p0, r0 = walk_limit_shape(WALK_STEPS, WALK_SOLUTION)
    for ax, d in zip(axes, dims):
        for i, w in enumerate(walks[d]):
            n = w["line_length"]
            ax.plot(np.asarray(w["projection"]) / n, np.asarray(w["residual"]) / n, lw=0.7, color=f"C{i}")
        ax.plot(p0, r0, color="k", lw=0.8, ls="--")
        ax.set_title(f"d = {d:,}", fontsize="medium")
        ax.set_xlabel("projection / ||x_900||")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("residual / ||x_900||")
    ctx.figure(fig, "random_walks", f"Random walks of {WALK_STEPS} unit Gaussian steps, the \"solution\" at step "
                                    f"{WALK_SOLUTION}, at several dimensions; dashed: the limit shape (their App. B, "
                                    "Fig. 11)")


# ---------------------------------------------------------------------------------------------------------------------
# Training: SGD's progress over epochs (Fig. 1 right) and the training error reached (abstract)
# ---------------------------------------------------------------------------------------------------------------------


def _sgd_progress_cached(ctx: Context, run_dir, data) -> dict:
    """:func:`_sgd_progress`, kept in ``<out>/trajectory/`` (keyed by the run and its checkpoint steps)."""
    from lerpfast.train import list_checkpoints

    ck = list_checkpoints(run_dir)
    steps = np.asarray(sorted(ck))
    path = ctx.out / "trajectory" / f"{Path(run_dir).name}_progress.npz"
    if path.is_file():
        with np.load(path) as f:
            if np.array_equal(f["steps"], steps) and int(f["samples"]) == int(data.num_samples):
                return {k: f[k] for k in f.files}
    out = _sgd_progress(run_dir, ck, data, ctx.s.device)
    if ctx.is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **out)
        os.replace(tmp, path)
    return out


def _sgd_progress(run_dir, ckpts: dict, data, device) -> dict:
    """The training objective J (mean cross-entropy, eval mode) and error on ``data`` at each checkpoint of a run
    that kept one per epoch (Fig. 1 right: "the progress of the actual SGD algorithm over time").

    Returns ``steps``, ``epochs`` (step / steps per epoch), ``loss``, ``error`` (float64 arrays) and ``samples``.
    """
    import torch

    from lerpfast.train import load_model

    steps = sorted(ckpts)
    per_epoch = steps[1] if len(steps) > 1 else 1
    net = load_model(run_dir).to(device).eval()
    loss, error = [], []
    with torch.no_grad():
        for t in steps:
            net.load_state_dict(torch.load(ckpts[t], map_location=device, weights_only=True))
            total = wrong = n = 0.0
            for x, y in data:
                out = net(x)
                total += float(torch.nn.functional.cross_entropy(out.double(), y, reduction="sum"))
                wrong += float((out.argmax(-1) != y).sum())
                n += len(y)
            loss.append(total / n)
            error.append(wrong / n)
    return {"steps": np.asarray(steps), "epochs": np.asarray(steps, dtype=np.float64) / per_epoch,
            "loss": np.asarray(loss), "error": np.asarray(error), "samples": np.asarray(int(n))}


def _claims_training(ctx: Context, res: dict, progress: dict, plan: Plan) -> None:
    # Fig. 1 right: most of the fall of the training objective in the first few epochs
    ep, J = progress["epochs"], progress["loss"]
    k = int(np.argmin(np.abs(ep - plan.few_epochs)))
    drop = float(J[0] - J[-1])
    frac = float(J[0] - J[k]) / drop
    one = float(J[0] - J[min(1, len(J) - 1)]) / drop
    ctx.claim("SGD's progress over time: \"The vast majority of learning happens in the first few epochs. "
              "Thereafter, the algorithm struggles to make progress\"", "Fig. 1 (right)",
              f"{PROGRESS_NET} MLP: {fmt(frac, 3)} of the fall of the training objective ({fmt(float(J[0]))} -> "
              f"{fmt(float(J[-1]))}) done in the first {ep[k]:g} of {ep[-1]:g} epochs ({fmt(one, 3)} in the first); "
              f"the other {ep[-1] - ep[k]:g} epochs: {fmt(1 - frac, 3)}; train error {100 * progress['error'][k]:.2f} "
              f"% after epoch {ep[k]:g}, {100 * progress['error'][-1]:.2f} % at the end",
              frac >= TOL["majority"],
              note=f"vast majority: at least {TOL['majority']:g} of J(theta_0) - J(theta_final); first few: "
                   f"{plan.few_epochs} epochs; J: mean cross-entropy over the {int(progress['samples']):,} images "
                   "trained on, exact at a checkpoint after every epoch (the paper plots the same objective for its "
                   "maxout net, trained with dropout for much longer)",
              fraction=frac, first_epoch=one, loss_start=float(J[0]), loss_end=float(J[-1]), epochs=float(ep[-1]))
    # abstract: negligible training error with SGD alone
    errs = {"LeNet-300-100 seed 0": _at(res["init-final@train"], 1.0, "error"),
            "seed 1": _at(res["A-B@train"], 1.0, "error"),
            **{name: _at(res[f"act-{name}@train"], 1.0, "error") for name in ACTIVATIONS}}
    n_main = res["init-final@train"].meta.get("data", {}).get("num_samples", 0)
    n_act = res[f"act-{PROGRESS_NET}@train"].meta.get("data", {}).get("num_samples", 0)
    ctx.claim("\"modern neural networks are able to achieve negligible training error ... using only direct training "
              "with stochastic gradient descent\"", "abstract; §2",
              "train error at the end of training: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in errs.items())
              + f" (of {n_main:,} / {n_act:,} images)",
              max(errs.values()) <= TOL["negligible"],
              note=f"negligible: at most {100 * TOL['negligible']:g} % of the images trained on misclassified, for "
                   f"every MLP here; plain SGD (LeNet, {plan.epochs} epochs) and SGD with momentum (the Figs. 1-3 "
                   f"MLPs, {plan.act_epochs} epochs), fixed lengths; the paper trains \"until reaching convergence "
                   "(usually some early stopping criterion)\" (§2)",
              worst=max(errs.values()), **{k.replace(" ", "_").replace("-", "_").replace("+", "_"): v
                                           for k, v in errs.items()})


def _figure_progress(ctx: Context, progress: dict) -> None:
    from matplotlib.figure import Figure

    ep = progress["epochs"]
    fig = Figure(figsize=(8.4, 3.0), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2)
    ax0.plot(ep, progress["loss"], "o-", ms=2.5, lw=1.0, color="C0")
    ax0.set_ylabel("training objective J")
    ax1.semilogy(ep, progress["loss"], "o-", ms=2.5, lw=1.0, color="C0", label="J")
    ax1.semilogy(ep, np.maximum(progress["error"], 1e-4), "s-", ms=2.5, lw=1.0, color="C3",
                 label="train error (floored at 1e-4)")
    ax1.legend(fontsize="small", frameon=False)
    for ax in (ax0, ax1):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{ctx.s.dataset}: the {PROGRESS_NET} MLP's SGD over time")
    ctx.figure(fig, "sgd_progress", f"The training objective after each epoch of SGD, {PROGRESS_NET} MLP, linear and "
                                    "log axes (their Fig. 1 right)")


# ---------------------------------------------------------------------------------------------------------------------
# App. B, Fig. 12: gradient descent with several learning rates and momenta on a synthetic convex problem
# ---------------------------------------------------------------------------------------------------------------------


def _gd_summary(gd: dict) -> dict:
    """Heights (largest residual / line length) of the Fig. 12 curves and the largest distance between any two of
    them, raw (both axes in units of the line's length) and with each residual divided by its own maximum."""
    keys = list(gd)
    curves = {k: np.stack([gd[k]["projection"], gd[k]["residual"]], axis=1) / gd[k]["line_length"] for k in keys}
    height = {k: float(curves[k][:, 1].max()) for k in keys}
    raw = shape = 0.0
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            raw = max(raw, curve_distance(curves[a], curves[b]))
            na, nb = curves[a] / [1.0, height[a]], curves[b] / [1.0, height[b]]
            shape = max(shape, curve_distance(na, nb))
    return {"height": height, "raw": raw, "shape": shape, "spread": max(height.values()) / min(height.values())}


def _claims_convex_gd(ctx: Context, gd: dict, plan: Plan) -> None:
    g = _gd_summary(gd)
    hs = ", ".join(f"eps {lr:g} mu {mu:g}: {fmt(h, 3)}" for (lr, mu), h in g["height"].items())
    ctx.claim("gradient descent with several learning rates and momenta on a synthetic convex problem: \"the curves "
              "all have a very simple shape, and the primary quantity distinguishing them is the maximum norm of the "
              "residual\"", "App. B, Fig. 12",
              f"largest residual / line length {hs} (spread x{fmt(g['spread'], 3)}); largest distance between two "
              f"curves {fmt(g['raw'], 3)}, {fmt(g['shape'], 3)} once each residual is divided by its maximum",
              g["spread"] - 1 > g["shape"],
              note=f"{plan.gd_dim:,} dimensions, J = 1/2 sum lam_i (x_i - x*_i)^2, lam_i log-uniform in "
                   f"[{GD_LAM_MIN:g}, 1], the true solution x* as every run's end point (the paper names no "
                   "problem); primary quantity: the heights differ by more (max / min - 1) than the height-normalized "
                   "curves do (Hausdorff distance of the polylines, projection in units of the line's length, "
                   "residual in units of its own maximum)",
              spread=g["spread"], shape_distance=g["shape"], raw_distance=g["raw"],
              **{f"height_lr{lr:g}_mu{mu:g}": h for (lr, mu), h in g["height"].items()})
    ctx.facts["convex_gd_steps"] = {f"lr={lr:g},mu={mu:g}": int(len(v["projection"]) - 1) for (lr, mu), v in gd.items()}


def _figure_convex_gd(ctx: Context, gd: dict, plan: Plan) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2)
    for i, ((lr, mu), v) in enumerate(gd.items()):
        p, r = np.asarray(v["projection"]) / v["line_length"], np.asarray(v["residual"]) / v["line_length"]
        label = rf"$\epsilon$ = {lr:g}, $\mu$ = {mu:g} ({len(p) - 1} steps)"
        ax0.plot(p, r, lw=1.1, color=f"C{i}", label=label)
        ax1.plot(p, r / r.max(), lw=1.1, color=f"C{i}")
    ax0.set_ylabel("residual / ||x* - x0||")
    ax1.set_ylabel("residual / its maximum")
    for ax in (ax0, ax1):
        ax.set_xlabel("projection / ||x* - x0||")
        ax.grid(alpha=0.3)
    ax0.legend(fontsize="x-small", frameon=False)
    fig.suptitle(f"gradient descent on a {plan.gd_dim:,}-dimensional convex quadratic")
    ctx.figure(fig, "convex_gd", "Projection onto start -> true solution against the residual, gradient descent with "
                                 "several learning rates and momenta; right: each residual divided by its maximum "
                                 "(their App. B, Fig. 12)")
