"""Summaries of loss-landscape sweeps: the numbers the papers report.

Curves along a path (``alphas`` (K,), ``values`` (K,)), e.g. the loss along init -> final:

* :func:`max_increase`  — max_a L(a) - L(0), Frankle (2020) Fig. 3;
* :func:`barrier`  — max_a L(a) - [(1-a) L(0) + a L(1)], the height above the chord between the endpoints;
* :func:`monotonicity`  — is the curve non-increasing, and the heights of its bumps (Lucas et al. 2021);
* :func:`convexity_violation`  — how far the curve rises above its lower convex hull;
* :func:`argmin`  — where the minimum lies;
* :func:`basin_width`  — absolute distance along a ray until the loss crosses a threshold (Im et al. Fig. 6).

Trajectories (a series of checkpoints theta_t):

* :func:`trajectory_projection`  — projection onto the init -> final line and norm of the residual
  (Goodfellow et al. 2015, appendix B / Fig. 13);
* :func:`random_walk_projection`  — the same numbers for a random walk with the trajectory's step lengths,
  a baseline after their Fig. 11, whose point is that in high dimension this plot takes one generic shape for
  random walks and SGD alike (App. B); the paper's reading is the residual against ||theta_t|| (Fig. 13).

Replicates: :func:`replicate_stats` (mean and std over seeds, Frankle's bands).

Every function takes numpy arrays (or anything ``np.asarray`` accepts), ignores NaN (points not computed
yet) where that is meaningful, and works in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "max_increase",
    "barrier",
    "monotonicity",
    "Monotonicity",
    "Bump",
    "convexity_violation",
    "argmin",
    "basin_width",
    "trajectory_projection",
    "random_walk_projection",
    "step_norms",
    "replicate_stats",
    "flatten_state",
]


def _curve(alphas, values) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by alpha, NaN points dropped."""
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.shape != v.shape:
        raise ValueError(f"alphas {a.shape} and values {v.shape} differ in length")
    keep = ~np.isnan(v)
    a, v = a[keep], v[keep]
    order = np.argsort(a, kind="stable")
    return a[order], v[order]


def _value_at(a: np.ndarray, v: np.ndarray, x: float) -> float:
    """The curve's value at ``x``: the sample there, or linear interpolation between neighbours."""
    if a.size == 0:
        return float("nan")
    hit = np.flatnonzero(a == x)
    if hit.size:
        return float(v[hit[0]])
    if x < a[0] or x > a[-1]:
        raise ValueError(f"the curve has no point at alpha={x} (it spans [{a[0]}, {a[-1]}])")
    return float(np.interp(x, a, v))


def max_increase(alphas, values, *, start: float = 0.0, stop: float = 1.0) -> float:
    """Largest increase along a path over its starting value: ``max_{start <= a <= stop} L(a) - L(start)``.

    Frankle (2020), Fig. 3 plots this for the loss and the error of the line from the checkpoint at
    iteration t (alpha = 0) to the final weights (alpha = 1), against t. It is 0 for a curve that never
    rises above its start.

    Parameters
    ----------
    alphas : array-like, shape (K,)
        Path coordinates (any order; NaN values are ignored).
    values : array-like, shape (K,)
        Loss or error at each alpha.
    start, stop : float
        The part of the path considered; ``L(start)`` is interpolated when not sampled.

    Returns
    -------
    float
        The maximum increase (>= 0), NaN when no point of ``[start, stop]`` is computed.
    """
    a, v = _curve(alphas, values)
    inside = (a >= start) & (a <= stop)
    if not inside.any():
        return float("nan")
    return float(max(np.max(v[inside]) - _value_at(a, v, start), 0.0))


def barrier(alphas, values, *, return_alpha: bool = False) -> float | tuple[float, float]:
    """Height of the curve above the chord between its endpoints, ``max_a L(a) - [(1-a) L(0) + a L(1)]``.

    The usual "loss barrier" of linear mode connectivity; 0 when the curve never rises above the chord.
    Only points with 0 <= alpha <= 1 count.

    Parameters
    ----------
    alphas, values : array-like, shape (K,)
        The curve; it must contain (or bracket) alpha = 0 and alpha = 1.
    return_alpha : bool
        Also return the alpha where the barrier is reached.

    Returns
    -------
    float or (float, float)
        The barrier (>= 0), and optionally its alpha.
    """
    a, v = _curve(alphas, values)
    l0, l1 = _value_at(a, v, 0.0), _value_at(a, v, 1.0)
    inside = (a >= 0) & (a <= 1)
    excess = v[inside] - ((1 - a[inside]) * l0 + a[inside] * l1)
    i = int(np.argmax(excess))
    height = float(max(excess[i], 0.0))
    return (height, float(a[inside][i])) if return_alpha else height


@dataclass
class Bump:
    """One rise of a curve: from a local minimum at ``start`` up to the next local maximum at ``peak``."""

    start: float
    peak: float
    height: float


@dataclass
class Monotonicity:
    """Monotonic-linear-interpolation summary of a curve (Lucas et al. 2021).

    Attributes
    ----------
    monotonic : bool
        True when the curve never rises by more than ``tol`` from one point to a later one.
    max_rise : float
        ``max_{i<j} L(a_j) - L(a_i)`` (>= 0): the largest rise anywhere along the path, Lucas et al.'s
        measure of how badly monotonicity fails.
    bumps : list of Bump
        Every rise higher than ``tol``, in path order.
    """

    monotonic: bool
    max_rise: float
    bumps: list[Bump] = field(default_factory=list)

    @property
    def n_bumps(self) -> int:
        return len(self.bumps)

    @property
    def max_bump(self) -> float:
        """Height of the highest single bump (0 when monotonic)."""
        return max((b.height for b in self.bumps), default=0.0)


def monotonicity(alphas, values, *, tol: float = 0.0) -> Monotonicity:
    """Whether a curve decreases monotonically along the path, and its bumps if not.

    Lucas, Bae, Zhang, Fort, Zemel & Grosse (2021) call the loss along init -> final *monotonic* when it
    never increases; a curve that does is summarised by the heights of its bumps.

    Parameters
    ----------
    alphas, values : array-like, shape (K,)
        The curve (NaN values ignored).
    tol : float
        Rises up to ``tol`` are noise, not bumps (e.g. 1e-4 for a loss measured on a finite set).

    Returns
    -------
    Monotonicity
    """
    a, v = _curve(alphas, values)
    if v.size < 2:
        return Monotonicity(True, 0.0, [])
    running_min = np.minimum.accumulate(v)
    max_rise = float(max(np.max(v - running_min), 0.0))
    bumps: list[Bump] = []
    i, n = 0, v.size
    while i < n - 1:
        if v[i + 1] > v[i]:  # a rise starts at local minimum i; climb to the local maximum
            j = i + 1
            while j < n - 1 and v[j + 1] >= v[j]:
                j += 1
            if v[j] - v[i] > tol:
                bumps.append(Bump(float(a[i]), float(a[j]), float(v[j] - v[i])))
            i = j
        else:
            i += 1
    return Monotonicity(max_rise <= tol, max_rise, bumps)


def _lower_hull(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Values at ``a`` of the lower convex hull of the points (a, v), a sorted ascending."""
    hull: list[int] = []
    for k in range(a.size):
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            # drop j when it lies on or above the segment i -> k
            if (v[j] - v[i]) * (a[k] - a[i]) >= (v[k] - v[i]) * (a[j] - a[i]):
                hull.pop()
            else:
                break
        hull.append(k)
    return np.interp(a, a[hull], v[hull])


def convexity_violation(alphas, values, *, return_alpha: bool = False) -> float | tuple[float, float]:
    """How far a curve rises above the largest convex function below it.

    For a convex curve every point lies on or below every chord, and this is 0. Otherwise it is
    ``max_{i<k<j} L(a_k) - chord_ij(a_k)``, which equals the largest gap between the curve and its lower
    convex hull (the hull at a_k is a chord between two of its vertices, and no chord lies below the hull).

    Parameters
    ----------
    alphas, values : array-like, shape (K,)
        The curve (NaN values ignored).
    return_alpha : bool
        Also return the alpha of the largest violation.

    Returns
    -------
    float or (float, float)
    """
    a, v = _curve(alphas, values)
    if a.size < 3:
        return (0.0, float("nan")) if return_alpha else 0.0
    gap = v - _lower_hull(a, v)
    i = int(np.argmax(gap))
    height = float(max(gap[i], 0.0))
    return (height, float(a[i])) if return_alpha else height


def argmin(coords, values) -> tuple[np.ndarray, float]:
    """Coordinates and value of the smallest computed value.

    Parameters
    ----------
    coords : array-like, shape (K,) or (K, D)
        Point coordinates (alpha, or (x, y) for a plane).
    values : array-like, shape (K,)

    Returns
    -------
    (ndarray of shape (D,), float)
        The coordinates of the minimum and the minimum itself.
    """
    c = np.asarray(coords, dtype=np.float64)
    c = c[:, None] if c.ndim == 1 else c
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(v).all():
        raise ValueError("no computed value (all NaN)")
    i = int(np.nanargmin(v))
    return c[i].copy(), float(v[i])


def basin_width(lambdas, values, threshold: float, *, relative: bool = False,
                both_sides: bool = False) -> float | tuple[float, float]:
    """Distance from a solution, along a ray, at which the loss first exceeds a threshold.

    Im, Tao & Branson (2016, Fig. 6) measure basin size along ``theta(l) = theta1 + l * u`` with
    ``u = (theta0 - theta1) / ||theta0 - theta1||``, so l is an absolute distance in weight space
    (``lerpfast.Ray``). The crossing is linearly interpolated between samples.

    Parameters
    ----------
    lambdas : array-like, shape (K,)
        Distances along the ray; 0 is the solution.
    values : array-like, shape (K,)
        Loss (or error) at each distance.
    threshold : float
        The level that bounds the basin; with ``relative=True`` it is added to the loss at l = 0.
    relative : bool
        Interpret ``threshold`` as an increase over ``L(0)``.
    both_sides : bool
        Also walk towards negative l; return ``(left, right)`` widths (both >= 0).

    Returns
    -------
    float or (float, float)
        The width; ``inf`` when the loss stays below the threshold over the whole swept range
        (widen the sweep), NaN when ``L(0)`` itself is above it.
    """
    a, v = _curve(lambdas, values)
    l0 = _value_at(a, v, 0.0)
    level = l0 + threshold if relative else threshold

    def walk(sign: int) -> float:
        if l0 > level:
            return float("nan")
        side = a * sign >= 0
        d, w = np.abs(a[side]), v[side]
        order = np.argsort(d, kind="stable")
        d, w = d[order], w[order]
        if d.size == 0 or d[0] != 0.0:
            d, w = np.concatenate([[0.0], d]), np.concatenate([[l0], w])
        above = np.flatnonzero(w > level)
        if above.size == 0:
            return float("inf")
        k = int(above[0])
        d0, d1, w0, w1 = d[k - 1], d[k], w[k - 1], w[k]
        return float(d0 + (level - w0) * (d1 - d0) / (w1 - w0))

    return (walk(-1), walk(+1)) if both_sides else walk(+1)


# --------------------------------------------------------------------------------------------------
# Trajectories


def flatten_state(state, keys: Sequence[str] | None = None) -> torch.Tensor:
    """One float64 vector of a checkpoint's floating-point tensors.

    Parameters
    ----------
    state : mapping of str to Tensor, Tensor or ndarray
        A state dict (its floating-point entries, in ``keys`` order) or an already flat vector.
    keys : sequence of str, optional
        Which entries, in which order (default: all floating-point entries in the dict's order).

    Returns
    -------
    torch.Tensor, shape (P,), float64
    """
    if isinstance(state, Mapping):
        if keys is None:
            keys = [k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point()]
        return torch.cat([torch.as_tensor(state[k]).detach().reshape(-1).to("cpu", torch.float64) for k in keys])
    return torch.as_tensor(state).detach().reshape(-1).to("cpu", torch.float64)


def _projection(points: Iterable, init: torch.Tensor, final: torch.Tensor) -> dict[str, np.ndarray]:
    u = final - init
    norm_u = float(torch.linalg.vector_norm(u))
    if norm_u == 0.0:
        raise ValueError("init and final are the same point: the line is undefined")
    unit = u / norm_u
    proj, resid, dist = [], [], []
    for theta in points:
        d = theta - init
        p = float(d @ unit)
        r = float(torch.linalg.vector_norm(d - p * unit))
        proj.append(p)
        resid.append(r)
        dist.append(float(torch.linalg.vector_norm(d)))
    proj_a = np.asarray(proj)
    return {"projection": proj_a, "alpha": proj_a / norm_u, "residual": np.asarray(resid),
            "distance": np.asarray(dist), "line_length": np.float64(norm_u)}


def trajectory_projection(checkpoints: Sequence, init=None, final=None,
                          keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Where a training trajectory lies relative to the straight line from init to final.

    Goodfellow, Vinyals & Saxe (2015, appendix B, Fig. 13) plot, for each checkpoint theta_t, its
    projection onto the line through theta_init and theta_final against the norm of the residual:
    ``p_t = <theta_t - theta_init, u>`` with ``u`` the unit vector along ``theta_final - theta_init``,
    ``r_t = ||theta_t - theta_init - p_t u||``.

    Parameters
    ----------
    checkpoints : sequence of state dicts (or flat tensors)
        The trajectory, in training order. Loaded one at a time; may be a lazy sequence.
    init, final : state dict or tensor, optional
        The line's ends (default: the first and the last checkpoint).
    keys : sequence of str, optional
        State-dict entries to use (default: every floating-point entry of the first checkpoint).

    Returns
    -------
    dict
        ``projection`` (T,) distance along the line from init; ``alpha`` (T,) the same in units of the
        line's length (0 at init, 1 at final); ``residual`` (T,) distance from the line; ``distance`` (T,)
        distance from init; ``line_length`` ||final - init||.
    """
    ckpts = list(checkpoints) if init is None or final is None else checkpoints
    first = ckpts[0] if init is None else init
    if keys is None and isinstance(first, Mapping):
        keys = [k for k, t in first.items() if torch.is_tensor(t) and t.is_floating_point()]
    theta0 = flatten_state(first, keys)
    theta1 = flatten_state(ckpts[-1] if final is None else final, keys)
    return _projection((flatten_state(c, keys) for c in ckpts), theta0, theta1)


def random_walk_projection(step_norms, dim: int, *, seed: int = 0, chunk: int = 1 << 22) -> dict[str, np.ndarray]:
    """Projection and residual of an isotropic random walk with given step lengths.

    The baseline of Goodfellow et al.'s Fig. 11: a random walk in ``dim`` dimensions whose t-th step has
    length ``step_norms[t]`` (e.g. the distances between successive checkpoints), measured against the line
    from its own start to its own end exactly as :func:`trajectory_projection` measures a trajectory. In high
    dimension the walk is a Brownian bridge around its chord: ``E r_t^2 ~ S_t (S_T - S_t) / S_T`` with
    ``S_t`` the summed squared step lengths (App. B: the shape is generic in high dimension, so it does not by
    itself tell SGD apart from a random walk).

    Parameters
    ----------
    step_norms : array-like, shape (T,)
        Length of each step.
    dim : int
        Dimension of the space (the number of parameters).
    seed : int
        Seed of the step directions.
    chunk : int
        Coordinates generated at a time (memory is O(chunk * T), never O(dim * T)).

    Returns
    -------
    dict
        Same keys as :func:`trajectory_projection`, for the T + 1 points of the walk (start included).
    """
    s = np.asarray(step_norms, dtype=np.float64).reshape(-1)
    steps_count = s.size

    # Step directions: g_t / ||g_t|| with g_t ~ N(0, I). Coordinates come in chunks from one seeded generator,
    # so two passes (norms, then positions) see the same numbers without holding T x dim values.
    def chunks():
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, dim, chunk):
            n = min(chunk, dim - start)
            yield torch.randn(steps_count, n, generator=gen, dtype=torch.float64)

    sq = torch.zeros(steps_count, dtype=torch.float64)
    for g in chunks():
        sq += (g * g).sum(1)
    scale = torch.as_tensor(s) / sq.sqrt()  # (T,)
    # Positions x_t = sum_{i<t} scale_i g_i; accumulate the Gram quantities the projection needs.
    gram = torch.zeros(steps_count + 1, steps_count + 1, dtype=torch.float64)
    for g in chunks():
        x = torch.cat([torch.zeros(1, g.shape[1], dtype=torch.float64), torch.cumsum(scale[:, None] * g, 0)])
        gram += x @ x.T
    # With x_0 = 0 and u = x_T: p_t = <x_t, u>/||u||, r_t^2 = ||x_t||^2 - p_t^2.
    norm_u = float(gram[-1, -1].sqrt())
    p = (gram[:, -1] / norm_u).numpy()
    sqn = torch.diagonal(gram).numpy()
    r = np.sqrt(np.maximum(sqn - p * p, 0.0))
    return {"projection": p, "alpha": p / norm_u, "residual": r, "distance": np.sqrt(sqn),
            "line_length": np.float64(norm_u)}


def step_norms(checkpoints: Sequence, keys: Sequence[str] | None = None) -> np.ndarray:
    """Distances between successive checkpoints (the step lengths for :func:`random_walk_projection`)."""
    out, prev = [], None
    for c in checkpoints:
        theta = flatten_state(c, keys)
        if prev is not None:
            out.append(float(torch.linalg.vector_norm(theta - prev)))
        prev = theta
    return np.asarray(out)


# --------------------------------------------------------------------------------------------------
# Replicates


def replicate_stats(curves, *, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over replicates (seeds), point by point.

    Parameters
    ----------
    curves : array-like, shape (R, ...) or sequence of R arrays of equal shape
        One row per replicate; NaN entries (not computed) are left out of that point's statistics.
    ddof : int
        Delta degrees of freedom of the std (1: the sample std, as error bands usually show). With a
        single replicate the std is 0.

    Returns
    -------
    (ndarray, ndarray)
        Mean and std, each of shape ``curves.shape[1:]``.
    """
    x = np.asarray([np.asarray(c, dtype=np.float64) for c in curves])
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("replicate_stats needs at least one replicate")
    count = np.sum(~np.isnan(x), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(x, axis=0) / count
        dev = np.where(np.isnan(x), 0.0, x - mean)
        var = np.sum(dev * dev, axis=0) / np.maximum(count - ddof, 1)
    std = np.where(count > 1, np.sqrt(var), 0.0)
    mean = np.where(count > 0, mean, np.nan)
    return mean, std
