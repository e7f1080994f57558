"""Figures of the papers lerpfast reproduces, from :class:`~lerpfast.result.SweepResult` objects or a store.

* :func:`plot_lines` — loss and error against alpha, one colour per starting iteration t, replicate bands
  (Frankle 2020, Fig. 2); ``logy=True`` for Goodfellow et al. (2015), Fig. 3;
* :func:`plot_max_increase` — maximum increase of loss and error against t on a log axis (Frankle, Fig. 3);
* :func:`plot_plane` — contour or 3-D surface of a plane / bilinear / barycentric slice (Im et al., Figs. 2-3);
* :func:`plot_trajectory` — projection onto the init -> final line against the residual, with a random walk
  for comparison (Goodfellow et al., Fig. 13 / Fig. 11);
* :func:`plot_functional` — functional distance and disagreement along a path (Im et al., Table 1);
* :func:`plot_ray` — loss along a ray in absolute distance with the basin width (Im et al., Fig. 6);
* :func:`plot_points` — metrics against the point index (soups, task vectors with one lambda per task);
* :func:`plot_store` — every default figure of every sweep in a result file (what ``lerpfast plot`` does).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot: no global
state, no display needed, the same on a headless server. Save with :func:`save` as PNG, PDF or SVG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lerpfast.analysis import basin_width, max_increase, replicate_stats

__all__ = [
    "plot_lines",
    "plot_max_increase",
    "plot_plane",
    "plot_trajectory",
    "plot_functional",
    "plot_ray",
    "plot_points",
    "plot_store",
    "save",
    "group_replicates",
    "FORMATS",
]

FORMATS = ("png", "pdf", "svg")
METRIC_LABELS = {
    "loss": "loss",
    "error": "error",
    "top5_error": "top-5 error",
    "distance": "functional distance",
    "disagreement": "disagreement",
}
COORD_LABELS = {"alpha": r"$\alpha$", "beta": r"$\beta$", "lambda": r"distance $\lambda$ from $\theta_1$",
                "x": "x", "y": "y", "t": "t along the curve"}


def _label(name: str, mapping=METRIC_LABELS) -> str:
    return mapping.get(name, name)


def _coord_label(res) -> str:
    """Axis label of a sweep's first coordinate (a task-vector lambda is a scale, a ray's lambda a distance)."""
    if res is None:
        return _label("alpha", COORD_LABELS)
    if getattr(res, "kind", None) == "task_vectors":
        return r"task-vector scale $\lambda$"
    return _label(res.coord_names[0], COORD_LABELS)


def save(fig: Figure, path: str | os.PathLike, formats: Sequence[str] | None = None, dpi: int = 150) -> list[Path]:
    """Write a figure in one or more formats.

    Parameters
    ----------
    fig : Figure
    path : str or PathLike
        Target file; its suffix gives the format unless ``formats`` is given, in which case the suffix is
        replaced by each format in turn.
    formats : sequence of {"png", "pdf", "svg"}, optional
    dpi : int
        Resolution of raster output.

    Returns
    -------
    list of Path
        The files written.
    """
    path = Path(path)
    if formats is None:
        fmt = path.suffix.lstrip(".").lower() or "png"
        formats = [fmt]
        path = path.with_suffix("." + fmt)
    out = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}: expected one of {FORMATS}")
        target = path.with_suffix("." + fmt)
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=dpi, bbox_inches="tight")
        out.append(target)
    return out


def _as_replicates(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _curve_of(res, metric: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(res.coords[:, 0], dtype=np.float64), np.asarray(res.metrics[metric], dtype=np.float64)


def plot_lines(curves: Mapping[str, object], metrics: Sequence[str] = ("loss", "error"), *, logy: bool = False,
               title: str | None = None, xlabel: str | None = None, figsize: tuple[float, float] | None = None,
               cmap: str = "viridis") -> Figure:
    """Metrics against the path coordinate, one curve per label, mean +- std bands over replicates.

    Parameters
    ----------
    curves : mapping of str to SweepResult or list of SweepResult
        E.g. ``{"t=0": [rep0, rep1, rep2], "t=128": [...]}``: each label is one line (the mean over its
        replicates, which must share their coordinates), with a band of one std when there are several.
    metrics : sequence of str
        One panel per metric (Frankle's Fig. 2 shows loss and error side by side).
    logy : bool
        Log-scaled y axis for the loss panels (Goodfellow et al.'s Fig. 3).
    title, xlabel : str, optional
    figsize : (float, float), optional
    cmap : str
        Colormap that orders the labels (early t dark, late t light).

    Returns
    -------
    Figure
    """
    n = len(metrics)
    fig = Figure(figsize=figsize or (4.2 * n, 3.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    labels = list(curves)
    colors = _colors(len(labels), cmap)
    for ax, metric in zip(axes, metrics):
        for label, color in zip(labels, colors):
            reps = _as_replicates(curves[label])
            if not reps or metric not in reps[0].metrics:
                continue
            x = np.asarray(reps[0].coords[:, 0], dtype=np.float64)
            mean, std = replicate_stats([r.metrics[metric] for r in reps])
            order = np.argsort(x)
            x, mean, std = x[order], mean[order], std[order]
            tag = label if len(reps) == 1 else f"{label} (n={len(reps)})"
            ax.plot(x, mean, color=color, lw=1.4, label=tag)
            if len(reps) > 1:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25, lw=0)
        if logy and metric not in ("error", "top5_error", "disagreement"):
            ax.set_yscale("log")
        first = _as_replicates(next(iter(curves.values())))[0] if curves else None
        ax.set_xlabel(xlabel or _coord_label(first))
        ax.set_ylabel(_label(metric))
        ax.axvline(0.0, color="0.7", lw=0.6, zorder=0)
        ax.axvline(1.0, color="0.7", lw=0.6, zorder=0)
        ax.grid(alpha=0.3)
    if labels:
        axes[-1].legend(fontsize="small", frameon=False, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def _colors(n: int, cmap: str) -> list:
    from matplotlib import colormaps

    cm = colormaps[cmap]
    return [cm(v) for v in (np.linspace(0.0, 0.85, n) if n > 1 else [0.0])]


def plot_max_increase(ts: Sequence[float], values: Mapping[str, object], *, title: str | None = None,
                      figsize: tuple[float, float] | None = None) -> Figure:
    """Maximum increase along the path t -> final against the starting iteration t (Frankle 2020, Fig. 3).

    Parameters
    ----------
    ts : sequence of float, length T
        Starting iterations (0 allowed: the axis is symmetric-log, linear below 1).
    values : mapping of str to array-like
        Per metric (``"loss"``, ``"error"``), either (T,) values or (R, T) replicates (mean +- std drawn).

    Returns
    -------
    Figure
    """
    t = np.asarray(ts, dtype=np.float64)
    n = len(values)
    fig = Figure(figsize=figsize or (4.2 * n, 3.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (metric, vals) in zip(axes, values.items()):
        v = np.asarray(vals, dtype=np.float64)
        mean, std = replicate_stats(v) if v.ndim == 2 else (v, np.zeros_like(v))
        order = np.argsort(t)
        ax.errorbar(t[order], mean[order], yerr=std[order] if v.ndim == 2 else None, marker="o", ms=3.5, lw=1.2,
                    capsize=2)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=-0.3 if t.min() <= 0 else None)
        ax.set_xlabel("starting iteration t (log scale)")
        ax.set_ylabel(f"max increase of {_label(metric)}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_plane(res, metric: str = "loss", *, kind: str = "contour", levels: int = 30, logz: bool = False,
               title: str | None = None, figsize: tuple[float, float] | None = None) -> Figure:
    """A metric over a 2-D slice: filled contour with the minimum marked, or a 3-D surface.

    Parameters
    ----------
    res : SweepResult
        A grid sweep (``grid_shape`` set): random plane, bilinear or barycentric.
    metric : str
    kind : {"contour", "surface"}
    levels : int
        Contour levels.
    logz : bool
        Plot log10 of the metric (losses far from a minimum span decades).

    Returns
    -------
    Figure
    """
    if res.grid_shape is None or len(res.grid_shape) != 2:
        raise ValueError(f"{res.kind} sweep is not a 2-D grid: plot it with plot_lines")
    z = np.asarray(res.grid(metric), dtype=np.float64)
    if logz:
        z = np.log10(np.maximum(z, np.finfo(np.float64).tiny))
    x = np.asarray(res.coords[:, 0], dtype=np.float64).reshape(res.grid_shape)
    y = np.asarray(res.coords[:, 1], dtype=np.float64).reshape(res.grid_shape)
    names = list(res.coord_names)
    xlabel, ylabel = _label(names[0], COORD_LABELS), _label(names[1], COORD_LABELS)
    zlabel = ("log10 " if logz else "") + _label(metric)
    tri = None
    if res.kind == "barycentric":  # draw the triangle theta0, theta1, theta2 itself, not the (alpha, beta) square
        x, y, z, tri = _barycentric_triangle(x.ravel(), y.ravel(), z.ravel())
        xlabel, ylabel = r"barycentric x ($\theta_0 \to \theta_1$)", "barycentric y"
    fig = Figure(figsize=figsize or (5.0, 4.2), layout="constrained")
    if kind == "contour":
        ax = fig.add_subplot()
        zm = np.ma.masked_invalid(z)
        if tri is not None:
            cs = ax.tricontourf(tri, zm.filled(np.nanmax(z)), levels=levels, cmap="viridis")
            ax.tricontour(tri, zm.filled(np.nanmax(z)), levels=levels, colors="k", linewidths=0.3, alpha=0.4)
            ax.set_aspect("equal")
        else:
            cs = ax.contourf(x, y, zm, levels=levels, cmap="viridis")
            ax.contour(x, y, zm, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
        fig.colorbar(cs, ax=ax, label=zlabel)
        if np.isfinite(z).any():
            i = int(np.nanargmin(z.ravel()))
            ax.plot(np.ravel(x)[i], np.ravel(y)[i], marker="*", color="r", ms=10, label="minimum", clip_on=False,
                    zorder=5)
        _mark_anchors(ax, res)
        ax.legend(fontsize="small", loc="best")
    elif kind == "surface":
        ax = fig.add_subplot(projection="3d")
        if tri is not None:
            ax.plot_trisurf(tri, z, cmap="viridis", linewidth=0, antialiased=True)
        else:
            ax.plot_surface(x, y, np.ma.masked_invalid(z).filled(np.nan), cmap="viridis", linewidth=0,
                            antialiased=True, rstride=1, cstride=1)
        ax.set_zlabel(zlabel)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    else:
        raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.suptitle(title or f"{res.kind}: {_label(metric)}")
    return fig


_TRIANGLE = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3.0) / 2]])  # theta0, theta1, theta2 on the page


def _barycentric_triangle(a: np.ndarray, b: np.ndarray, z: np.ndarray):
    """Map barycentric sweep coordinates onto an equilateral triangle.

    Point (a, b) is ``theta0 + b*a*(theta1 - theta0) + (1-b)*a*(theta2 - theta0)`` (lerpfast.Barycentric), so it
    lands at the same mix of the triangle's corners. All points with a = 0 are theta0: kept once.
    """
    from matplotlib.tri import Triangulation

    p0, p1, p2 = _TRIANGLE
    xy = p0 + (b * a)[:, None] * (p1 - p0) + ((1 - b) * a)[:, None] * (p2 - p0)
    _, first = np.unique(np.round(xy, 12), axis=0, return_index=True)
    first = np.sort(first)
    xy, z = xy[first], z[first]
    return xy[:, 0], xy[:, 1], z, Triangulation(xy[:, 0], xy[:, 1])


def _mark_anchors(ax, res) -> None:
    """The slice's defining points: corners of bilinear / barycentric, the centre of a random plane."""
    if res.kind == "barycentric":
        for i, (px, py) in enumerate(_TRIANGLE):
            ax.plot(px, py, marker="o", color="w", mec="k", ms=6, clip_on=False, zorder=6,
                    label="defining points" if i == 0 else None)
            ax.annotate(rf"$\theta_{i}$", (px, py), textcoords="offset points", xytext=(-12 if i == 0 else 6, 4))
        return
    pts = {"bilinear": [(0, 0), (1, 0), (0, 1), (1, 1)], "random": [(0, 0)]}.get(res.kind, [])
    for i, (a, b) in enumerate(pts):
        ax.plot(a, b, marker="o", color="w", mec="k", ms=6, clip_on=False, zorder=6,
                label="defining points" if i == 0 else None)


def plot_trajectory(proj: Mapping[str, np.ndarray], random_walk: Mapping[str, np.ndarray] | None = None, *,
                    steps: Sequence[float] | None = None, title: str | None = None,
                    figsize: tuple[float, float] | None = None) -> Figure:
    """Projection onto the init -> final line against the distance from it (Goodfellow et al., Fig. 13).

    Parameters
    ----------
    proj : mapping
        Output of :func:`lerpfast.analysis.trajectory_projection`.
    random_walk : mapping, optional
        Output of :func:`lerpfast.analysis.random_walk_projection` with the same step lengths: drawn for
        comparison (their Fig. 11).
    steps : sequence of float, optional
        Training iterations of the checkpoints, used to colour the trajectory.

    Returns
    -------
    Figure
    """
    fig = Figure(figsize=figsize or (5.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    p, r = np.asarray(proj["projection"]), np.asarray(proj["residual"])
    ax.plot(p, r, color="C0", lw=1.2, label="training trajectory")
    sc = ax.scatter(p, r, c=np.log1p(np.asarray(steps, dtype=np.float64)) if steps is not None else np.arange(p.size),
                    cmap="viridis", s=14, zorder=3)
    fig.colorbar(sc, ax=ax, label="log(1 + iteration)" if steps is not None else "checkpoint index")
    if random_walk is not None:
        ax.plot(random_walk["projection"], random_walk["residual"], color="C3", lw=1.0, ls="--",
                label="random walk, same step lengths")
    ax.plot([0, float(proj["line_length"])], [0, 0], color="k", lw=0.8, label="init -> final line")
    ax.set_xlabel("projection onto the init -> final line")
    ax.set_ylabel("norm of the residual")
    ax.legend(fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_checkpoint_trajectory(checkpoints: Mapping[int, str | os.PathLike], *, seed: int = 0,
                               title: str | None = None) -> Figure:
    """:func:`plot_trajectory` of a run's checkpoints ``{step: path}`` (first = init, last = final), with a random
    walk of the same step lengths in the same dimension for comparison (Goodfellow et al., Figs. 11 and 13)."""
    import torch

    from lerpfast.analysis import random_walk_projection, step_norms, trajectory_projection

    if len(checkpoints) < 3:
        raise ValueError(f"a trajectory needs at least 3 checkpoints, got {len(checkpoints)}")
    steps = sorted(checkpoints)
    states = [torch.load(checkpoints[s], map_location="cpu", weights_only=True) for s in steps]
    dim = sum(v.numel() for v in states[0].values() if v.is_floating_point())
    walk = random_walk_projection(step_norms(states), dim=dim, seed=seed)
    return plot_trajectory(trajectory_projection(states), walk, steps=steps, title=title)


def plot_functional(curves: Mapping[str, object], *, title: str | None = None,
                    figsize: tuple[float, float] | None = None) -> Figure:
    """Functional distance and label disagreement to the reference along a path (Im et al., Table 1)."""
    return plot_lines(curves, ("distance", "disagreement"), title=title, figsize=figsize)


def plot_ray(res, metric: str = "loss", *, threshold: float | None = None, relative: bool = True,
             title: str | None = None, figsize: tuple[float, float] | None = None) -> Figure:
    """A metric along a ray in absolute distance, with the basin width at ``threshold`` (Im et al., Fig. 6).

    Parameters
    ----------
    res : SweepResult
        A ray sweep (coordinate: distance lambda).
    threshold : float, optional
        Level bounding the basin (default: the metric at lambda = 0 plus 1.0 for the loss, 0.1 for errors).
    relative : bool
        ``threshold`` is an increase over the value at lambda = 0.
    """
    lam, v = _curve_of(res, metric)
    if threshold is None:
        threshold, relative = (0.1 if "error" in metric or metric == "disagreement" else 1.0), True
    fig = Figure(figsize=figsize or (5.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    order = np.argsort(lam)
    ax.plot(lam[order], v[order], color="C0", lw=1.4)
    try:
        left, right = basin_width(lam, v, threshold, relative=relative, both_sides=True)
    except ValueError:
        left = right = float("nan")
    level = threshold + (np.interp(0.0, lam[order], v[order]) if relative else 0.0)
    ax.axhline(level, color="C3", lw=0.8, ls="--", label=f"threshold {level:.3g}")
    if np.isfinite(right):
        ax.axvspan(-left if np.isfinite(left) else lam.min(), right, color="C2", alpha=0.15,
                   label=f"basin width {right:.3g} (towards $\\theta_0$)")
    ax.set_xlabel(_label(res.coord_names[0], COORD_LABELS))
    ax.set_ylabel(_label(metric))
    ax.legend(fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_points(res, metrics: Sequence[str] = ("loss", "error"), *, title: str | None = None,
                figsize: tuple[float, float] | None = None) -> Figure:
    """Metrics against the point index, for sweeps whose points are neither a line nor a grid (a soup's weight
    rows, task vectors with one lambda per task): one panel per metric, the best point marked.

    Parameters
    ----------
    res : SweepResult
    metrics : one panel per metric (those the sweep recorded).
    """
    metrics = [m for m in metrics if m in res.metrics]
    fig = Figure(figsize=figsize or (4.2 * max(1, len(metrics)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    k = np.arange(res.K)
    for ax, metric in zip(axes, metrics):
        v = np.asarray(res.metrics[metric], dtype=np.float64)
        ax.plot(k, v, "o-", color="C0", lw=1.0, ms=3)
        if np.isfinite(v).any():
            best = int(np.nanargmin(v))
            ax.plot([best], [v[best]], "*", color="C3", ms=10,
                    label="best: " + ", ".join(f"{n}={c:.3g}" for n, c in zip(res.coord_names[:4], res.coords[best]))
                    + (", ..." if len(res.coord_names) > 4 else ""))
            ax.legend(fontsize="x-small", frameon=False)
        ax.set_xlabel("point k")
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{res.kind}: {res.K} points of {len(res.coord_names)} coordinates")
    return fig


# --------------------------------------------------------------------------------------------------
# Figures for a whole store

_REP = re.compile(r"^(?P<label>.+?)[@._-](?:rep|seed|r)(?P<rep>\d+)$")
_T = re.compile(r"(?:^|[^a-z])t=?(?P<t>\d+)(?:$|[^0-9])")


def group_replicates(names: Iterable[str]) -> dict[str, list[str]]:
    """Group sweep names that differ only in a replicate suffix (``@rep0``, ``-seed1``, ``_r2``).

    >>> group_replicates(["t=0@rep0", "t=0@rep1", "t=64@rep0", "plane"])
    {'t=0': ['t=0@rep0', 't=0@rep1'], 't=64': ['t=64@rep0'], 'plane': ['plane']}
    """
    groups: dict[str, list[str]] = {}
    for n in names:
        m = _REP.match(n)
        groups.setdefault(m.group("label") if m else n, []).append(n)
    return groups


def iteration_of(label: str) -> int | None:
    """The starting iteration encoded in a sweep name (``t=128``, ``t128-final``), or None."""
    m = _T.search(label)
    return int(m.group("t")) if m else None


def plot_store(path: str | os.PathLike, out_dir: str | os.PathLike, *, names: Sequence[str] | None = None,
               formats: Sequence[str] = ("png",), logy: bool = False) -> list[Path]:
    """Every default figure for the sweeps in a result file.

    * line sweeps: one overlay of all of them (loss and error, replicates grouped, ``lines.*``), the
      functional distance / disagreement overlay when recorded (``functional.*``), and, when the names
      carry a starting iteration (``t=<int>``), the maximum increase against t (``max_increase.*``);
    * grid sweeps: contour and surface of the loss and contour of the error (``<name>_loss_contour.*``, ...);
    * rays: loss along the ray with the basin width (``<name>_ray.*``);
    * other sweeps of several coordinates (soups, task vectors with one lambda per task): loss and error against
      the point index (``<name>_points.*``).

    Returns
    -------
    list of Path
        The files written.
    """
    from lerpfast.store import ResultStore

    store = ResultStore(path, "r")
    names = list(names) if names else store.names()
    results = {n: store.read(n) for n in names}
    out_dir = Path(out_dir)
    written: list[Path] = []
    lines = {n: r for n, r in results.items() if r.grid_shape is None and r.kind != "ray" and r.coords.shape[1] == 1}
    if lines:
        groups = group_replicates(lines)
        curves = {label: [lines[n] for n in members] for label, members in groups.items()}
        ordered = dict(sorted(curves.items(), key=lambda kv: (iteration_of(kv[0]) is None, iteration_of(kv[0]) or 0,
                                                              kv[0])))
        fig = plot_lines(ordered, logy=logy, title=f"{Path(path).name}: loss and error along the paths")
        written += save(fig, out_dir / "lines", formats)
        if all("distance" in r.metrics and np.isfinite(r.metrics["distance"]).any() for r in lines.values()):
            written += save(plot_functional(ordered, title="distance to the reference along the paths"),
                            out_dir / "functional", formats)
        with_t = {iteration_of(label): reps for label, reps in ordered.items() if iteration_of(label) is not None}
        if len(with_t) >= 2:
            ts = sorted(with_t)
            vals = {}
            for metric in ("loss", "error"):
                reps = max(len(with_t[t]) for t in ts)
                grid = np.full((reps, len(ts)), np.nan)
                for j, t in enumerate(ts):
                    for i, r in enumerate(with_t[t]):
                        grid[i, j] = max_increase(*_curve_of(r, metric))
                vals[metric] = grid
            written += save(plot_max_increase(ts, vals, title="maximum increase along t -> final"),
                            out_dir / "max_increase", formats)
    for n, r in results.items():
        safe = re.sub(r"[^A-Za-z0-9_.=+-]", "_", n)
        if r.grid_shape is not None and len(r.grid_shape) == 2:
            written += save(plot_plane(r, "loss", kind="contour"), out_dir / f"{safe}_loss_contour", formats)
            written += save(plot_plane(r, "loss", kind="surface"), out_dir / f"{safe}_loss_surface", formats)
            if "error" in r.metrics:
                written += save(plot_plane(r, "error", kind="contour"), out_dir / f"{safe}_error_contour", formats)
        elif r.kind == "ray":
            written += save(plot_ray(r), out_dir / f"{safe}_ray", formats)
        elif r.grid_shape is None and r.coords.shape[1] > 1:  # soups, one lambda per task
            written += save(plot_points(r), out_dir / f"{safe}_points", formats)
    return written
