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

# (claim text start, keys of `values` that must be finite numbers)
EXPECTED = [
    ("the train loss falls monotonically along init -> final", ("max_rise", "drop", "bumps")),
    ("the test loss falls monotonically along init -> final", ("max_rise", "drop", "bumps")),
    ("the train loss along init -> final has a simple, approximately convex", ("convexity_violation", "relative")),
    ("at high resolution near the initialization and the solution", ("init_max_rise", "final_max_rise")),
    ("between two solutions from different seeds", ("barrier", "relative", "test_barrier")),
    ("from a random point to the solution", ("max_rise", "local_minima")),
    ("SGD does not travel along the init -> final line", ("seed0", "seed1")),
    ("...but far less than a random walk", ("seed0", "seed1", "absolute_ratio")),
    ("deep linear net: the loss along a line is a polynomial", ("residual", "residual_lower", "mlp_residual")),
    ("deep linear net: from a small initialization", ("frac25", "frac50", "slope0", "max_rise")),
]
FIGURES = ("init_final", "zoom", "solutions", "trajectory", "deep_linear")


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


def test_numbers_are_what_the_claims_say(quick):
    _, res = quick
    poly = next(c.values for c in res["claims"] if "polynomial" in c.claim)
    assert poly["degree"] == 2 * gvs.QUICK.deep_depth
    assert poly["residual"] < 1e-9  # float64 sweep of a degree-16 polynomial: exact up to rounding
    assert poly["mlp_residual"] > 1e3 * poly["residual"]  # the MLP's loss along its line is no such polynomial
    shape = next(c.values for c in res["claims"] if "starts flat" in c.claim)
    assert 0 < shape["frac25"] < shape["frac50"] < 1
    walk = next(c.values for c in res["claims"] if c.claim.startswith("...but"))
    assert 0.4 < walk["walk_relative"] < 0.6  # a high-dimensional random walk: a Brownian bridge, half its chord


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
                "random-final@train", "random-final@test", "deep-linear@train", "deep-linear-wide@train"}
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
