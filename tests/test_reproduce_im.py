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

# (words every matching claim contains, how many rows, value keys each must carry): the paper's statements
CLAIMS = [
    ("\"For every pair of optimization algorithms", 2, ("pairs_with_barrier", "barrier_min", "barrier_median",
                                                      "barrier_max")),
    ("On the surface through four methods' solutions", 1, ("centre_rise_bilinear", "bilinear_corner_minima")),
    ("\"over 1/3rd\"", 1, ("ratio_median", "disagreement_median", "error_median", "functional_distance_median")),
    ("interpolate beyond the critical point", 1, ("solutions_rising", "min_rise")),
    ("strikingly similar for different runs", 1, ("methods_closer", "within_median", "between_median")),
    ("ADAM and ADAM&RK2 are larger than those found by SGD and RK2", 1,
     ("alpha_width_adam", "alpha_width_rk_adam_heun", "alpha_width_sgd", "alpha_width_rk_sgd_heun")),
    ("varies by optimization algorithm", 1, ("width_ratio", "width_sgd", "width_sgdm", "width_rmsprop",
                                             "width_adadelta", "width_adam", "width_rk_sgd_heun",
                                             "width_rk_adam_heun")),
    ("regardless of how late we switch", 2, ("switched_different", "barrier_unswitched_25", "barrier_unswitched_50",
                                              "barrier_unswitched_75", "barrier_adam_alone_75")),
    ("On the surfaces through the initialization and two methods' solutions", 1,
     ("triangles_separated", "pass_min", "pass_median")),
    ("two initializations and the SGD solutions", 1, ("quad_pass", "quad_pass_nobn")),
    ("Training accuracy shows \"stereotypy\"", 1, tuple(f"train_acc_{o}" for o in (
        "sgd", "sgdm", "rmsprop", "adadelta", "adam", "rk_sgd_heun", "rk_adam_heun"))),
    ("not significantly different between algorithms", 1, ("p_algorithms", "test_acc_range")),
    ("relationship between the weight initialization and the validation", 1, ("p_initialization",)),
    ("the training accuracy jumping to the characteristic accuracy", 1,
     ("switched_closer_to_new", "acc_sgd_adam_75", "acc_adam_sgd_75", "acc_adadelta_adam_50")),
    ("this distance is characteristic per algorithm", 1,
     ("switched_distance_closer_to_new", "dist_sgd_adam_25", "dist_adam_adadelta_50")),
    ("starts to decrease when switching from ADAM to SGD", 1,
     ("adam_to_sgd_decreasing", "dist_at_switch_25", "dist_final_75")),
    ("without BN does not train at all", 1, ("error_nobn_0", "error_nobn_1")),
    ("train slowly over time", 1, ("error_bn_0", "error_bn_1", "error_sgd_small_init")),
    ("plateau rather than a bad local minima", 1, ("flat_0", "flat_1", "rise_to_sgd_0", "rise_to_sgd_1")),
    ("much more dependent on the initialization", 1, ("spread_nobn", "spread_bn")),
    ("sharp unimodal jumps", 1, ("unimodal_bn", "unimodal_nobn")),
]
OBSERVATIONS = ["The triangle through the SGD, RK2 and Adam solutions", "With batch norm the basins along eq. 1"]
FIGURES = ["pairs", "barycentric", "bilinear", "barycentric_bn", "bilinear_bn", "rays", "switch", "functional",
           "triangles", "triangles_bn", "quadrilateral", "quadrilateral_bn", "accuracy", "extrapolate",
           "switch_dynamics", "exotic"]


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
            assert c["source"] and c["ours"] and c["agrees"] in (True, False, None), c
            assert c["claim"] in md
            for k in keys:
                assert k in c["values"] and math.isfinite(c["values"][k]), (words, k, c["values"])
    assert sum(c["claim"].startswith("Without batch norm") for c in claims) == 2  # BN is the paper's main setting
    # the setting the claims rest on: every run of a batch-norm setting started from the same weights
    assert record["facts"]["same_initialization"] == {"nobn": True, "bn": True}
    assert len(record["facts"]["basin_width"]) == 14 and len(record["facts"]["barrier"]) == 42
    assert len(record["facts"]["beyond_solution_rise"]) == 28 and len(record["facts"]["train_acc"]) == 14
    assert len(record["facts"]["switch_train_acc"]) == 10 and len(record["facts"]["exotic_train_error"]) == 4
    # observations: a list of their own, after the claims, not in the tally
    assert [o["claim"][:len(w)] for o, w in zip(record["observations"], OBSERVATIONS)] == OBSERVATIONS
    assert len(record["observations"]) == len(OBSERVATIONS)
    head, _, tail = md.partition("## Observations")
    assert all(o["claim"] in tail and o["claim"] not in head for o in record["observations"])


def test_every_row_cites_the_paper(quick):
    """Every claims row cites Im et al.'s own sections / figures / tables (im.REFERENCES), nothing else."""
    from lerpfast.reproduce import im
    from lerpfast.reproduce._common import check_sources

    _, res, _ = quick
    assert check_sources(res["claims"], im.REFERENCES) == []
    assert {"§4.1", "§4.4", "Table 1", "Table 3", "Fig. 15", "App. A.6", "eq. 1"} <= set(im.REFERENCES)
    assert "Fig. 16" not in im.REFERENCES and "Table 4" not in im.REFERENCES


def test_settings_follow_the_paper():
    """§3.2: seven methods including ADAM&RK2; §3.4: the Runge-Kutta rates doubled, rates from the paper's grids."""
    from lerpfast.reproduce.im import OPTIMIZERS

    assert len(OPTIMIZERS) == 7 and "rk_adam_heun" in OPTIMIZERS
    assert OPTIMIZERS["rk_sgd_heun"][1] == 2 * OPTIMIZERS["sgd"][1]
    assert OPTIMIZERS["rk_adam_heun"][1] == 2 * OPTIMIZERS["adam"][1]
    for name in ("sgd", "sgdm"):
        assert OPTIMIZERS[name][1] in (0.2, 0.1, 0.05, 0.01), name
    for name in ("rmsprop", "adam"):
        assert OPTIMIZERS[name][1] in (0.002, 0.001, 0.0005, 0.0001), name


def test_settings_batch_norm_dropout_decay_and_switches():
    """§3.4: batch norm and dropout in the main setting; a decaying rate, so that the 75 % switch comes after the
    decay (the "minimization" phase, §4.3); the switches of §4.3 / App. A.6 in both directions."""
    from lerpfast.reproduce import im
    from lerpfast.train.schedule import lr_factor, parse_steps

    assert 0 < im.DROPOUT < 1 and im.GAMMA < 1
    total = 1000
    drop = [parse_steps(m, 100, total) for m in im.MILESTONES.split(",")]
    assert lr_factor(parse_steps("75%", 100, total), drop, im.GAMMA, 0) < lr_factor(0, drop, im.GAMMA, 0)
    pairs = {(a, b) for a, b, _, _ in im._switches()}
    assert {("sgd", "adam"), ("adam", "sgd"), ("sgd", "adadelta"), ("adadelta", "sgd"), ("adam", "adadelta"),
            ("adadelta", "adam")} == pairs
    assert {p for a, b, p, _ in im._switches() if (a, b) == ("adam", "sgd")} == {25, 50, 75}


@pytest.mark.parametrize("bn", [False, True])
def test_exotic_initialization_draws_every_weight_and_bias(bn):
    """App. A.5's N(mean, std) initialization: every Linear weight and bias, checked against float64 moments; batch
    norm left at scale 1, shift 0; a malformed spec is an error naming it."""
    from lerpfast.train import models

    torch.manual_seed(3)
    m = models.create("mlp", num_classes=10, in_shape=(1, 8, 8), widths=(301, 97), bn=bn, dropout=0.3,
                      init="normal(-1,0.5)")
    for name, p in m.named_parameters():
        v = p.detach().double()
        if name.startswith(("hidden", "out")):
            assert abs(v.mean().item() + 1) < 6 * 0.5 / v.numel() ** 0.5 + 1e-3, name
            if v.numel() > 50:
                assert abs(v.std().item() - 0.5) < 0.15, name
        else:
            assert torch.all(v == (1.0 if name.endswith("weight") else 0.0)), name
    for bad in ("normal(-1)", "normal(0,-1)", "normal(a,b)"):
        with pytest.raises(ValueError, match="normal"):
            models.create("mlp", num_classes=10, in_shape=(1, 8, 8), init=bad)


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
    assert len(points) == 178 and sum(points) == 0  # every sweep read back from results.h5
    assert [c.values for c in again["claims"]] == [c.values for c in res["claims"]]
    assert seconds < first / 2
