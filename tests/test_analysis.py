"""Analyses on curves with known answers: hand-made curves and the deep linear model y = w1 * w2 * x."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lerpfast.analysis import (
    argmin,
    barrier,
    basin_width,
    convexity_violation,
    max_increase,
    monotonicity,
    random_walk_projection,
    replicate_stats,
    step_norms,
    trajectory_projection,
)

ALPHAS = np.linspace(0, 1, 101)  # Frankle's 100-interval grid; 0.5 is on it


def deep_linear_loss(alphas, w_init, w_final, target=1.0, x2_mean=1.0):
    """Loss of y = w1 * w2 * x against y = target * x along the line: (p(a) - target)^2 E[x^2], closed form."""
    w1 = (1 - alphas) * w_init[0] + alphas * w_final[0]
    w2 = (1 - alphas) * w_init[1] + alphas * w_final[1]
    return (w1 * w2 - target) ** 2 * x2_mean


def test_deep_linear_between_two_solutions():
    # (-1, -1) and (1, 1) both solve w1 * w2 = 1; halfway, w = 0 and the loss is E[x^2] = 2.5.
    # L(a) = 2.5 * ((2a - 1)^2 - 1)^2 = 40 a^2 (1 - a)^2: zero at the ends, a single bump of 2.5 at a = 0.5.
    loss = deep_linear_loss(ALPHAS, (-1.0, -1.0), (1.0, 1.0), x2_mean=2.5)
    np.testing.assert_allclose(loss, 40 * ALPHAS**2 * (1 - ALPHAS) ** 2, atol=1e-12)
    assert max_increase(ALPHAS, loss) == pytest.approx(2.5)
    h, a = barrier(ALPHAS, loss, return_alpha=True)
    assert h == pytest.approx(2.5) and a == pytest.approx(0.5)
    mono = monotonicity(ALPHAS, loss)
    assert not mono.monotonic and mono.n_bumps == 1
    assert mono.max_rise == pytest.approx(2.5) and mono.bumps[0].peak == pytest.approx(0.5)
    assert mono.bumps[0].start == 0.0
    v, a = convexity_violation(ALPHAS, loss, return_alpha=True)  # lower hull is L = 0
    assert v == pytest.approx(2.5) and a == pytest.approx(0.5)
    c, m = argmin(ALPHAS, loss)
    assert m == 0.0 and c[0] in (0.0, 1.0)


def test_deep_linear_from_near_saddle_is_monotonic():
    # From (0.1, -0.1) to (1, 1): p(a) = (0.1 + 0.9a)(-0.1 + 1.1a) rises (p' = 0.02 + 1.98a > 0) from -0.01 to 1,
    # so the loss (p - 1)^2 falls monotonically from 1.0201 to 0: no increase and no bump. It stays flat near
    # the saddle first (Goodfellow et al.'s plateau), so it lies *above* its chord: a barrier without a bump.
    loss = deep_linear_loss(ALPHAS, (0.1, -0.1), (1.0, 1.0))
    assert loss[0] == pytest.approx(1.0201)
    assert max_increase(ALPHAS, loss) == 0.0
    fine = np.linspace(0, 1, 100_001)
    excess = deep_linear_loss(fine, (0.1, -0.1), (1.0, 1.0)) - (1 - fine) * 1.0201
    assert barrier(ALPHAS, loss) == pytest.approx(excess.max(), abs=1e-4)
    assert barrier(ALPHAS, loss, return_alpha=True)[1] == pytest.approx(fine[excess.argmax()], abs=0.01)
    mono = monotonicity(ALPHAS, loss)
    assert mono.monotonic and mono.n_bumps == 0 and mono.max_rise == 0.0
    assert argmin(ALPHAS, loss)[0][0] == 1.0


def test_deep_linear_through_engine_matches_closed_form():
    # The same closed form, evaluated by lerpfast.sweep on a real two-layer linear network.
    import lerpfast

    torch.manual_seed(0)
    x = torch.randn(200, 1, dtype=torch.float64)
    y = 1.0 * x
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)).double()
    f64 = torch.float64
    ends = [{"0.weight": torch.tensor([[w1]], dtype=f64), "1.weight": torch.tensor([[w2]], dtype=f64)}
            for w1, w2 in ((-1.0, -1.0), (1.0, 1.0))]
    res = lerpfast.sweep(model, tuple(ends), ALPHAS, (x, y), precision="fp64", reference=None,
                         loss_fn=lambda out, t: (out.reshape(-1) - t) ** 2, progress=False)
    expect = deep_linear_loss(ALPHAS, (-1.0, -1.0), (1.0, 1.0), x2_mean=float((x**2).mean()))
    np.testing.assert_allclose(res.loss, expect, rtol=1e-9, atol=1e-12)
    assert barrier(res.alphas, res.loss) == pytest.approx(float((x**2).mean()), rel=1e-9)


def test_max_increase_is_relative_to_the_start():
    a = np.linspace(0, 1, 5)
    assert max_increase(a, [2.0, 2.5, 3.0, 1.0, 0.5]) == pytest.approx(1.0)
    assert max_increase(a, [2.0, 1.0, 0.5, 0.2, 0.1]) == 0.0
    # unsorted input, NaN (not yet computed) points ignored, a window of the path
    assert max_increase(a[::-1], [0.5, 1.0, np.nan, 2.5, 2.0]) == pytest.approx(0.5)
    assert max_increase(a, [2.0, 2.5, 3.0, 1.0, 0.5], stop=0.25) == pytest.approx(0.5)
    # error curves (fractions) work the same way
    assert max_increase(a, [0.9, 0.91, 0.5, 0.2, 0.1]) == pytest.approx(0.01)


def test_barrier_above_the_chord_not_the_start():
    a = np.linspace(0, 1, 11)
    line = 3 - 2 * a  # a straight line is its own chord
    assert barrier(a, line) == pytest.approx(0.0, abs=1e-12)
    bump = line + np.where(np.isclose(a, 0.3), 0.7, 0.0)
    h, at = barrier(a, bump, return_alpha=True)
    assert h == pytest.approx(0.7) and at == pytest.approx(0.3)
    # extrapolated points (alpha outside [0, 1]) are not part of the barrier
    ext = np.concatenate([[-0.5], a, [1.5]])
    assert barrier(ext, np.concatenate([[100.0], line, [100.0]])) == pytest.approx(0.0, abs=1e-12)


def test_max_increase_small_bump():
    a = np.linspace(0, 1, 11)
    curve = 3 - 2 * a + np.where(np.isclose(a, 0.3), 0.7, 0.0)  # 2.4 + 0.7 = 3.1 at a = 0.3
    assert max_increase(a, curve) == pytest.approx(0.1)


def test_monotonicity_bumps_and_tolerance():
    a = np.arange(9.0)
    v = [5, 4, 4.5, 3, 2, 2.001, 1, 1.5, 0]  # rises of 0.5 (1 -> 2), 0.001 (4 -> 5) and 0.5 (6 -> 7)
    mono = monotonicity(a, v)
    assert not mono.monotonic and mono.n_bumps == 3
    assert [b.height for b in mono.bumps] == pytest.approx([0.5, 0.001, 0.5])
    assert [(b.start, b.peak) for b in mono.bumps] == [(1, 2), (4, 5), (6, 7)]
    assert mono.max_rise == pytest.approx(0.5)
    loose = monotonicity(a, v, tol=0.01)
    assert loose.n_bumps == 2 and not loose.monotonic
    # the largest rise between any two points, not only neighbours: 1 -> 1.2 -> 1.4 is one rise of 0.4
    assert monotonicity([0, 1, 2, 3], [1.0, 1.2, 1.1, 1.4]).max_rise == pytest.approx(0.4)
    assert monotonicity([0, 1], [1.0, 1.0]).monotonic


def test_convexity_violation_known_answers():
    a = np.linspace(0, 1, 101)
    assert convexity_violation(a, (a - 0.3) ** 2) == pytest.approx(0.0, abs=1e-12)
    assert convexity_violation(a, np.abs(a - 0.5)) == pytest.approx(0.0, abs=1e-12)
    # -a^2: hull is the chord -a, largest gap a - a^2 = 0.25 at a = 0.5
    v, at = convexity_violation(a, -(a**2), return_alpha=True)
    assert v == pytest.approx(0.25) and at == pytest.approx(0.5)


def test_argmin_on_a_plane():
    xs, ys = np.meshgrid(np.linspace(-1, 1, 21), np.linspace(-1, 1, 11), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    loss = (coords[:, 0] - 0.3) ** 2 + (coords[:, 1] + 0.4) ** 2 + 1.0
    loss[0] = np.nan
    c, m = argmin(coords, loss)
    np.testing.assert_allclose(c, [0.3, -0.4], atol=1e-12)
    assert m == pytest.approx(1.0)
    with pytest.raises(ValueError):
        argmin(coords, np.full(len(coords), np.nan))


def test_basin_width_in_absolute_distance():
    lam = np.linspace(-2, 4, 61)
    loss = 0.5 * lam**2  # a quadratic basin: L = 0.5 crossing at |l| = 1, L(0) + 2 at |l| = 2
    assert basin_width(lam, loss, 0.5) == pytest.approx(1.0)
    assert basin_width(lam, loss, 2.0, relative=True) == pytest.approx(2.0)
    left, right = basin_width(lam, 0.5 * lam**2 * np.where(lam < 0, 4.0, 1.0), 0.5, both_sides=True)
    assert left == pytest.approx(0.5) and right == pytest.approx(1.0)
    # a crossing between samples is interpolated linearly; never crossing gives inf
    assert basin_width([0, 1, 2], [0.0, 0.2, 1.2], 0.7) == pytest.approx(1.5)
    assert basin_width([0, 1, 2], [0.0, 0.1, 0.2], 0.7) == np.inf
    assert np.isnan(basin_width([0, 1], [1.0, 2.0], 0.5))


def test_trajectory_projection_known_geometry():
    torch.manual_seed(0)
    init = {"w": torch.zeros(3, 4), "b": torch.zeros(2), "steps": torch.tensor(0)}
    u = torch.randn(14, dtype=torch.float64)
    u /= u.norm()
    v = torch.randn(14, dtype=torch.float64)
    v -= (v @ u) * u
    v /= v.norm()  # orthonormal to u

    def at(p, r):
        flat = (p * u + r * v).float()
        return {"w": flat[:12].reshape(3, 4), "b": flat[12:], "steps": torch.tensor(1)}

    length = 5.0
    traj = [init, at(1.0, 0.5), at(2.5, 1.5), at(4.0, 0.25), at(length, 0.0)]
    out = trajectory_projection(traj)
    np.testing.assert_allclose(out["projection"], [0, 1, 2.5, 4, 5], atol=1e-6)
    np.testing.assert_allclose(out["alpha"], [0, 0.2, 0.5, 0.8, 1], atol=1e-6)
    np.testing.assert_allclose(out["residual"], [0, 0.5, 1.5, 0.25, 0], atol=1e-6)
    np.testing.assert_allclose(out["distance"], np.hypot([0, 1, 2.5, 4, 5], [0, 0.5, 1.5, 0.25, 0]), atol=1e-6)
    assert out["line_length"] == pytest.approx(length, abs=1e-6)
    np.testing.assert_allclose(step_norms(traj), np.hypot(np.diff([0, 1, 2.5, 4, 5]), np.diff([0, .5, 1.5, .25, 0])),
                               atol=1e-6)
    # the integer buffer ("steps") is not part of the weights
    assert trajectory_projection(traj, keys=["w", "b"])["residual"] == pytest.approx(out["residual"])


def test_random_walk_is_a_brownian_bridge():
    # T equal steps of length 1 in 20,000 dimensions: ||x_T||^2 ~ T and E r_t^2 = t (T - t) / T.
    T = 16
    out = random_walk_projection(np.ones(T), dim=20_000, seed=3, chunk=7_000)
    t = np.arange(T + 1)
    assert out["line_length"] == pytest.approx(np.sqrt(T), rel=0.05)
    np.testing.assert_allclose(out["residual"] ** 2, t * (T - t) / T, atol=0.15)
    np.testing.assert_allclose(out["alpha"][[0, -1]], [0, 1], atol=1e-12)
    # chunked generation is deterministic
    again = random_walk_projection(np.ones(T), dim=20_000, seed=3, chunk=7_000)
    np.testing.assert_array_equal(out["residual"], again["residual"])


def test_replicate_stats():
    curves = [[1.0, 2.0, np.nan], [3.0, 2.0, 5.0], [2.0, 2.0, 7.0]]
    mean, std = replicate_stats(curves)
    np.testing.assert_allclose(mean, [2.0, 2.0, 6.0])
    np.testing.assert_allclose(std, [1.0, 0.0, np.sqrt(2.0)])
    mean1, std1 = replicate_stats([[1.0, 2.0]])
    np.testing.assert_array_equal(std1, [0.0, 0.0])
    _, std0 = replicate_stats(curves, ddof=0)
    assert std0[0] == pytest.approx(np.sqrt(2 / 3))
