"""``lerpfast reproduce im --quick``: Im, Tao & Branson (2016) end to end on scikit-learn's digits.

One quick run (module fixture, about a minute on one CPU thread) and a second run on the same folder. The tests
check that the summary has every claim row with finite numbers and every figure, and that the second run trains
and sweeps nothing; whether the claims agree is REPRODUCTIONS.md's business, not the tests'.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import lerpfast.evaluate as evaluate_mod
import lerpfast.train.trainer as trainer_mod
from lerpfast.reproduce import reproduce

# (words every matching claim contains, how many rows, value keys each must carry)
CLAIMS = [
    ("six optimizers reach different minima", 2, ("pairs_with_barrier", "barrier_min", "barrier_median",
                                                  "barrier_max")),
    ("compute different functions", 1, ("disagreement_median", "error_difference_median",
                                        "functional_distance_median")),
    ("separate basin around each solution", 1, ("centre_rise_barycentric", "centre_rise_bilinear",
                                                "bilinear_corner_minima")),
    ("Re-runs of the same optimizer", 1, ("optimizers_closer", "within_median", "between_median")),
    ("depends on the optimizer", 1, ("width_ratio", "width_sgd", "width_sgdm", "width_rmsprop", "width_adadelta",
                                     "width_adam", "width_rk_sgd_heun")),
    ("larger basin than SGD", 1, ("width_adam", "width_sgd")),
    ("different basin from the run that never switched", 2, ("barrier_unswitched_25", "barrier_unswitched_50",
                                                            "barrier_unswitched_75")),
    ("apart from the minimum that Adam alone reaches", 2, ("barrier_adam_alone_25", "barrier_adam_alone_50",
                                                          "barrier_adam_alone_75")),
    ("Batch norm changes the surface", 1, ("basins_narrower_with_bn", "median_width_nobn", "median_width_bn",
                                           "median_barrier_nobn", "median_barrier_bn")),
]
FIGURES = ["pairs", "barycentric", "bilinear", "barycentric_bn", "bilinear_bn", "rays", "switch", "functional"]


def _run(out):
    t0 = time.perf_counter()
    # the test session's thread count (tests/conftest.py), not reproduce's default of 2
    res = reproduce("im", quick=True, out=out, progress=False, threads=torch.get_num_threads(),
                    log=lambda *a, **k: None)
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce_im")
    res, seconds = _run(out)
    return out, res, seconds


def test_summary_files_and_claim_rows(quick):
    out, res, _ = quick
    assert (out / "summary.md").is_file() and (out / "results.h5").is_file()
    record = json.loads((out / "summary.json").read_text())
    assert record["paper"] == "im" and record["quick"] and record["dataset"] == "digits"
    claims = record["claims"]
    assert len(claims) == sum(n for _, n, _ in CLAIMS) == len(res["claims"])
    md = (out / "summary.md").read_text()
    for words, n, keys in CLAIMS:
        rows = [c for c in claims if words in c["claim"]]
        assert len(rows) == n, words
        for c in rows:
            assert c["source"] and c["ours"] and c["agrees"] in (True, False), c
            assert c["claim"] in md
            for k in keys:
                assert k in c["values"] and math.isfinite(c["values"][k]), (words, k, c["values"])
    assert sum(c["claim"].startswith("With batch norm") for c in claims) == 3
    # the setting the claims rest on: every run of a batch-norm setting started from the same weights
    assert record["facts"]["same_initialization"] == {"nobn": True, "bn": True}
    assert len(record["facts"]["basin_width"]) == 12 and len(record["facts"]["barrier"]) == 30


def test_figures_are_pngs(quick):
    out, _, _ = quick
    record = json.loads((out / "summary.json").read_text())
    assert sorted(f["path"] for f in record["figures"]) == sorted(f"figs/{n}.png" for n in FIGURES)
    for name in FIGURES:
        data = (out / "figs" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_rerun_trains_and_sweeps_nothing(quick, monkeypatch):
    out, res, first = quick
    steps, points = [], []
    save, run_chunks = trainer_mod._atomic_save, evaluate_mod._run_chunks

    def counting_save(obj, path):  # checkpoints and resume state: only written while training
        steps.append(path)
        return save(obj, path)

    def counting_chunks(ev, aff, ref, batches, todo, *args, **kwargs):
        points.append(len(todo))
        return run_chunks(ev, aff, ref, batches, todo, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "_atomic_save", counting_save)
    monkeypatch.setattr(evaluate_mod, "_run_chunks", counting_chunks)
    again, seconds = _run(out)
    assert steps == []
    assert len(points) == 130 and sum(points) == 0  # every sweep read back from results.h5
    assert [c.values for c in again["claims"]] == [c.values for c in res["claims"]]
    assert seconds < first / 2
