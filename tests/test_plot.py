"""Each figure renders from a result store, with labelled axes, in PNG / PDF / SVG."""

from __future__ import annotations

import numpy as np
import pytest

from lerpfast.analysis import random_walk_projection, trajectory_projection
from lerpfast.plot import (
    group_replicates,
    iteration_of,
    plot_functional,
    plot_lines,
    plot_max_increase,
    plot_plane,
    plot_ray,
    plot_store,
    plot_trajectory,
    save,
)
from lerpfast.store import ResultStore

TS = (0, 16, 128, 1024)
ALPHAS = np.linspace(-0.25, 1.25, 61)


def _line_metrics(t, rep):
    rng = np.random.default_rng(100 * t + rep)
    bump = 1.5 / (1 + t / 16)  # earlier starts cross a higher barrier, as in Frankle's Fig. 2
    loss = 0.3 + 2.0 * (ALPHAS - 1) ** 2 * 0.2 + bump * np.exp(-((ALPHAS - 0.5) ** 2) / 0.02) + 0.02 * rng.random(61)
    error = np.clip(0.05 + 0.3 * bump * np.exp(-((ALPHAS - 0.5) ** 2) / 0.03) + 0.01 * rng.random(61), 0, 1)
    return {"loss": loss, "error": error, "distance": np.abs(ALPHAS) * 0.4, "disagreement": np.abs(ALPHAS) * 0.2}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "results.h5"
    with ResultStore(path) as store:
        for t in TS:
            for rep in range(3):
                m = _line_metrics(t, rep)
                h = store.open_sweep(f"t={t}@rep{rep}", coords=ALPHAS[:, None], coord_names=["alpha"],
                                     metric_names=list(m), attrs={"slice": {"kind": "line"}, "t": t, "rep": rep})
                h.write(np.arange(ALPHAS.size), m)
        xs, ys = np.linspace(-1, 1, 21), np.linspace(-1, 1, 17)
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        coords = np.stack([gx.ravel(), gy.ravel()], 1)
        loss = 0.2 + (coords[:, 0] - 0.2) ** 2 + 2 * (coords[:, 1] + 0.1) ** 2 + 0.3 * np.sin(3 * coords[:, 0])
        h = store.open_sweep("plane", coords=coords, coord_names=["x", "y"], metric_names=["loss", "error"],
                             attrs={"slice": {"kind": "random"}}, grid_shape=(21, 17))
        h.write(np.arange(len(coords)), {"loss": loss, "error": np.clip(loss / 4, 0, 1)})
        lam = np.linspace(-3, 6, 46)
        h = store.open_sweep("ray", coords=lam[:, None], coord_names=["lambda"], metric_names=["loss", "error"],
                             attrs={"slice": {"kind": "ray"}})
        h.write(np.arange(lam.size), {"loss": 0.1 + 0.2 * lam**2, "error": np.clip(0.02 * lam**2, 0, 1)})
    return path


def labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_lines_with_replicate_bands(store_path, tmp_path):
    store = ResultStore(store_path, "r")
    curves = {f"t={t}": [store.read(f"t={t}@rep{r}") for r in range(3)] for t in TS}
    fig = plot_lines(curves, title="Frankle Fig. 2")
    assert labels(fig) == [(r"$\alpha$", "loss"), (r"$\alpha$", "error")]
    assert len(fig.axes[0].lines) == 4 + 2 and len(fig.axes[0].collections) == 4  # 4 means (+ 2 guides), 4 bands
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == [f"t={t} (n=3)" for t in TS]
    logfig = plot_lines(curves, logy=True)
    assert logfig.axes[0].get_yscale() == "log" and logfig.axes[1].get_yscale() == "linear"
    files = save(fig, tmp_path / "lines", ["png", "pdf", "svg"])
    assert [f.suffix for f in files] == [".png", ".pdf", ".svg"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files[1].read_bytes()[:4] == b"%PDF"
    assert b"<svg" in files[2].read_bytes()[:2000]


def test_max_increase_on_log_axis(tmp_path):
    reps = np.array([[1.5, 0.9, 0.2, 0.01], [1.4, 1.0, 0.25, 0.0], [1.6, 0.8, 0.15, 0.02]])
    fig = plot_max_increase(TS, {"loss": reps, "error": reps / 5})
    assert labels(fig) == [("starting iteration t (log scale)", "max increase of loss"),
                           ("starting iteration t (log scale)", "max increase of error")]
    assert fig.axes[0].get_xscale() == "symlog"
    assert save(fig, tmp_path / "mi.png")[0].stat().st_size > 1000


def test_plane_contour_and_surface(store_path, tmp_path):
    res = ResultStore(store_path, "r").read("plane")
    fig = plot_plane(res, "loss")
    assert labels(fig)[0] == ("x", "y")
    assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() == "loss" for ax in fig.axes)
    surf = plot_plane(res, "loss", kind="surface", logz=True)
    ax3d = surf.axes[0]
    assert (ax3d.get_xlabel(), ax3d.get_ylabel(), ax3d.get_zlabel()) == ("x", "y", "log10 loss")
    assert save(surf, tmp_path / "surface.svg")[0].exists()
    with pytest.raises(ValueError, match="not a 2-D grid"):
        plot_plane(ResultStore(store_path, "r").read("ray"))


def test_trajectory_against_random_walk(tmp_path):
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(500)
    traj = [np.outer(np.linspace(0, 1, 9), direction)[i] + 0.1 * np.sin(i) * rng.standard_normal(500)
            for i in range(9)]
    proj = trajectory_projection(traj)
    walk = random_walk_projection(np.linalg.norm(np.diff(traj, axis=0), axis=1), dim=500)
    fig = plot_trajectory(proj, walk, steps=[0, 1, 2, 4, 8, 16, 32, 64, 128])
    assert labels(fig)[0] == ("projection onto the init -> final line", "norm of the residual")
    assert save(fig, tmp_path / "traj.pdf")[0].read_bytes()[:4] == b"%PDF"


def test_functional_and_ray(store_path):
    store = ResultStore(store_path, "r")
    fig = plot_functional({"t=0": [store.read(f"t=0@rep{r}") for r in range(3)]})
    assert labels(fig) == [(r"$\alpha$", "functional distance"), (r"$\alpha$", "disagreement")]
    ray = plot_ray(store.read("ray"))
    assert labels(ray) == [(r"distance $\lambda$ from $\theta_1$", "loss")]
    assert any("basin width" in t.get_text() for t in ray.axes[0].get_legend().get_texts())


def test_plot_store_writes_every_default_figure(store_path, tmp_path):
    files = plot_store(store_path, tmp_path / "figs", formats=["png"])
    names = sorted(f.name for f in files)
    assert names == sorted(["lines.png", "functional.png", "max_increase.png", "plane_loss_contour.png",
                            "plane_loss_surface.png", "plane_error_contour.png", "ray_ray.png"])
    assert all(f.stat().st_size > 5000 for f in files)


def test_name_grouping():
    assert group_replicates(["t=0@rep0", "t=0@rep1", "t=8-seed2", "layer3", "plane"]) == {
        "t=0": ["t=0@rep0", "t=0@rep1"], "t=8": ["t=8-seed2"], "layer3": ["layer3"], "plane": ["plane"]}
    assert [iteration_of(s) for s in ("t=128", "t64-final", "init-final", "first")] == [128, 64, None, None]


def test_barycentric_is_drawn_as_the_triangle(tmp_path):
    a, b = np.meshgrid(np.linspace(0, 1, 11), np.linspace(0, 1, 11), indexing="ij")
    coords = np.stack([a.ravel(), b.ravel()], 1)
    # loss = distance on the page from the midpoint of theta1 and theta2 (a = 1, b = 0.5) -> (0.75, sqrt(3)/4)
    x = coords[:, 0] * (coords[:, 1] * 1.0 + (1 - coords[:, 1]) * 0.5)
    y = coords[:, 0] * (1 - coords[:, 1]) * np.sqrt(3) / 2
    loss = np.hypot(x - 0.75, y - np.sqrt(3) / 4)
    path = tmp_path / "b.h5"
    with ResultStore(path) as store:
        h = store.open_sweep("tri", coords=coords, coord_names=["alpha", "beta"], metric_names=["loss"],
                             attrs={"slice": {"kind": "barycentric"}}, grid_shape=(11, 11))
        h.write(np.arange(len(coords)), {"loss": loss})
    res = ResultStore(path, "r").read("tri")
    fig = plot_plane(res)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("barycentric x") and ax.get_ylabel() == "barycentric y"
    star = next(line for line in ax.lines if line.get_label() == "minimum")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx((0.75, np.sqrt(3) / 4))
    assert [t.get_text() for t in ax.texts] == [r"$\theta_0$", r"$\theta_1$", r"$\theta_2$"]
    assert plot_plane(res, kind="surface").axes[0].get_zlabel() == "loss"
