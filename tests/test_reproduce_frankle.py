"""`lerpfast reproduce frankle --quick`: the claims table, the figures, the store, and a re-run from the store.

One quick run (scikit-learn digits: LeNet-300-100 and ResNet-20, 2 replicates each; about 40 s on one thread)
is shared by the tests. The claims themselves are checked in REPRODUCTIONS.md, not forced true here: these tests
check that every row is there with finite numbers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lerpfast.store as store_mod
import lerpfast.train.trainer as trainer_mod
from lerpfast.reproduce import reproduce
from lerpfast.reproduce.frankle import half_drop_alpha, pick_ts
from lerpfast.store import ResultStore

# the start of each claim of the table, in order (the paper's statements)
CLAIMS = [
    "MNIST network: Goodfellow et al.'s result holds",
    "MNIST network: the loss \"has a simple, approximately convex shape\"",
    "MNIST network: no loss barrier when interpolating from later iterations",
    "MNIST network: \"After iteration 1000",
    "CIFAR-10 network: \"loss is roughly monotonically non-increasing",
    "CIFAR-10 network: \"loss remains close to its initial value",
    "CIFAR-10 network: \"error remains at the level of random chance",
    "CIFAR-10 network: interpolating after a little training meets a loss barrier",
    "CIFAR-10 network: \"The optimum becomes linearly accessible again",
]
# our own findings (listed apart, not counted)
OBSERVATIONS = ["ResNet-20: each replicate shows", "ResNet-20: the same barrier question in test error"]
FIGURES = ["lenet_300_100_lines", "lenet_300_100_max_increase", "resnet20_lines", "resnet20_max_increase",
           "init_final"]
LENET_TS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]  # Frankle's schedule below the final iteration (360) on digits
RESNET_TS = [0, 4, 16, 64]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("frankle")
    # one thread: on a shared 2-core machine two threads per process slow the small convolutions down several-fold
    res = reproduce("frankle", quick=True, out=out, progress=False, threads=1, device="cpu")
    return out, res


def test_summary_has_every_claim_with_numbers(quick):
    out, res = quick
    assert (out / "summary.md").is_file() and (out / "summary.json").is_file()
    record = json.loads((out / "summary.json").read_text())
    assert record["paper"] == "frankle" and record["quick"] and record["dataset"] == "digits"
    claims = record["claims"]
    assert len(claims) == len(CLAIMS) == len(res["claims"])
    md = (out / "summary.md").read_text()
    for start, c in zip(CLAIMS, claims):
        assert c["claim"].startswith(start), (start, c["claim"])
        assert c["source"] and c["ours"] and c["agrees"] in (True, False, None)
        assert c["values"], c["claim"]
        # every row has numbers, also a row that is not checkable in this setting (agrees None)
        assert all(isinstance(v, float) and math.isfinite(v) for v in c["values"].values()), c
        assert c["claim"].split(":")[0] in md
    assert [o["claim"][:len(s)] for o, s in zip(record["observations"], OBSERVATIONS)] == OBSERVATIONS
    assert md.index("## Observations") > max(md.index(c["claim"].replace("|", "\\|")) for c in claims)
    for key in ("lenet_300_100_final_test_error", "resnet20_final_test_error"):
        assert 0 <= record["facts"][key] < 0.2  # both networks learn digits
    assert record["facts"]["lenet_300_100_ts"] == LENET_TS and record["facts"]["resnet20_ts"] == RESNET_TS
    # the max-increase table: mean and std over the 2 replicates of every t, all finite and >= 0
    for row in record["facts"]["lenet_300_100_table"] + record["facts"]["resnet20_table"]:
        for m in ("loss", "error"):
            mean, std = row[m]
            assert mean >= 0 and std >= 0 and math.isfinite(mean + std)


def test_every_row_cites_the_paper(quick):
    """Every claims row cites Frankle's own sections / figures (frankle.REFERENCES), nothing the paper lacks."""
    from lerpfast.reproduce import frankle
    from lerpfast.reproduce._common import check_sources

    _, res = quick
    assert check_sources(res["claims"], frankle.REFERENCES) == []
    assert set(frankle.REFERENCES) == {"abstract", "§1", "§2", "§3", "§4", "§5", "Fig. 1", "Fig. 2", "Fig. 3"}
    # the check itself: a free-text source and a section the paper does not have are both flagged
    bad = check_sources([{"source": "surfaces between the solutions"}, {"source": "§3.1, Fig. 4"}],
                        frankle.REFERENCES)
    assert len(bad) == 3 and "cites no section" in bad[0] and "'§3.1'" in bad[1] and "'Fig. 4'" in bad[2]


def test_figures_are_pngs(quick):
    out, _ = quick
    for name in FIGURES:
        path = out / "figs" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 10_000, name
        assert f"figs/{name}.png" in (out / "summary.md").read_text()


def test_store_holds_every_line(quick):
    out, _ = quick
    store = ResultStore(out / "results.h5", "r")
    names = set(store.names())
    expected = {f"lenet_300_100:t={t}@rep{r}" for t in LENET_TS for r in range(2)}
    expected |= {f"resnet20:t={t}@rep{r}" for t in RESNET_TS for r in range(2)}
    assert expected <= names
    for n in expected:
        done, total = store.progress(n)
        assert done == total == (100 if n.startswith("lenet") else 21), n
    res = store.read("resnet20:t=0@rep1")
    assert res.meta["data"]["num_samples"] == 360 and np.isfinite(res.metrics["error"]).all()


def test_rerun_trains_and_sweeps_nothing(quick, monkeypatch):
    out, first = quick
    before = (out / "summary.json").read_text()
    counts = {"write": 0, "optimizer": 0}
    write, make_opt = store_mod.SweepHandle.write, trainer_mod._make_optimizer

    def counting_write(self, idx, metrics):
        counts["write"] += 1
        return write(self, idx, metrics)

    def counting_optimizer(*a, **k):
        counts["optimizer"] += 1
        return make_opt(*a, **k)

    monkeypatch.setattr(store_mod.SweepHandle, "write", counting_write)
    monkeypatch.setattr(trainer_mod, "_make_optimizer", counting_optimizer)
    second = reproduce("frankle", quick=True, out=out, progress=False, threads=1, device="cpu")
    assert counts == {"write": 0, "optimizer": 0}
    assert second["seconds"] < first["seconds"]
    assert [c.values for c in second["claims"]] == [c.values for c in first["claims"]]
    assert json.loads((out / "summary.json").read_text())["claims"] == json.loads(before)["claims"]


def test_pick_ts_and_half_drop_alpha():
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2000, 3000, 4000, 4690]
    assert pick_ts(steps) == steps[:-1]
    assert pick_ts(steps, "thin") == [0, 4, 16, 64, 256, 1024, 4000]
    assert pick_ts(steps, [0, 64]) == [0, 64]
    with pytest.raises(ValueError, match="no checkpoint at t=\\[5\\]"):
        pick_ts(steps, [0, 5])
    a = np.linspace(0, 1, 11)
    assert half_drop_alpha(a, 1 - a) == pytest.approx(0.5)  # a straight line falls half way at its middle
    assert half_drop_alpha(a, (1 - a) ** 4) < 0.2  # convex: falls early
    assert half_drop_alpha(a, 1 - a ** 6) > 0.85  # stays high until close to the end
    assert math.isnan(half_drop_alpha(a, a))  # never falls
