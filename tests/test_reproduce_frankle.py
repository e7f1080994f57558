"""`lerpfast reproduce frankle --quick`: the claims table, the figures, the store, and a re-run from the store.

One quick run (scikit-learn digits: LeNet-300-100 and ResNet-20, 2 replicates each, ResNet-20's lines swept with
both batch-norm policies; about 30 s on one thread) is shared by the tests. The claims themselves are checked in
REPRODUCTIONS.md, not forced true here: these tests check that every row is there with finite numbers.
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
MODERN = [
    "\"loss is roughly monotonically non-increasing",
    "\"loss remains close to its initial value",
    "\"error remains at the level of random chance",
    "interpolating after a little training meets a loss barrier",
    "\"The optimum becomes linearly accessible again",
]
CLAIMS = [
    "MNIST network: Goodfellow et al.'s result holds",
    "MNIST network: the loss \"has a simple, approximately convex shape\"",
    "MNIST network: no loss barrier when interpolating from later iterations",
    "MNIST network: \"After iteration 1000",
    # the paper does not say how batch norm is treated along a line: one row set per policy
    *(f"CIFAR-10 network (bn={bn}): {c}" for bn in ("interpolate", "recompute") for c in MODERN),
]
# our own findings (listed apart, not counted)
OBSERVATIONS = [f"ResNet-20 (bn={bn}): {o}" for bn in ("interpolate", "recompute")
                for o in ("each replicate shows", "the same barrier question in test error")]
FIGURES = ["lenet_300_100_lines", "lenet_300_100_max_increase", "resnet20_lines", "resnet20_max_increase",
           "resnet20-recompute_lines", "resnet20-recompute_max_increase", "resnet20_max_increase_bn", "init_final"]
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
    expected |= {f"{p}:t={t}@rep{r}" for p in ("resnet20", "resnet20-recompute") for t in RESNET_TS for r in range(2)}
    assert expected <= names
    for n in expected:
        done, total = store.progress(n)
        assert done == total == (100 if n.startswith("lenet") else 21), n
    res = store.read("resnet20:t=0@rep1")
    assert res.meta["data"]["num_samples"] == 360 and np.isfinite(res.metrics["error"]).all()
    # the same line under the two policies: recomputed statistics change the interpolated points, not the endpoints
    rec = store.read("resnet20-recompute:t=0@rep1")
    assert np.isfinite(rec.metrics["loss"]).all()
    assert np.abs(rec.loss[1:-1] - res.loss[1:-1]).max() > 1e-3


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


def test_full_run_settings(tmp_path):
    """The default (full) run: LeNet-300-100 with OpenLTH's LeNet recipe on the run's data set (mnist5k by default,
    Fashion-MNIST on request); OpenLTH's whole CIFAR recipe for ResNet-20 on digits at 16x16, every t, 100 points on
    all test images, both batch-norm policies on one training run."""
    import lerpfast.data as ld
    from lerpfast.reproduce import _resolve_dataset, frankle
    from lerpfast.reproduce._common import Context, Settings
    from lerpfast.train import TrainConfig
    from lerpfast.train.schedule import frankle_schedule

    # the full run's data: the paper module's default, real MNIST digits (installed here and in CI)
    assert frankle.DEFAULTS["dataset"] == "mnist5k"
    assert _resolve_dataset(None, False, frankle.DEFAULTS["dataset"]) == "mnist5k"
    assert _resolve_dataset(None, True, frankle.DEFAULTS["dataset"]) == "digits"  # --quick stays on digits

    def settings(dataset):
        ctx = Context(Settings("frankle", tmp_path, dataset, "lenet_300_100"), log=lambda *a: None)
        return dict(frankle._settings(ctx))

    got = settings("mnist5k")
    assert list(got) == ["small", "modern", "modern:recompute"]
    small, modern, recompute = got["small"], got["modern"], got["modern:recompute"]
    assert (small.model, small.dataset, small.steps, small.ts, small.points, small.replicates, small.eval_limit) == \
        ("lenet_300_100", "mnist5k", "40ep", "all", 100, 3, None)
    assert small.train == {} and small.prefix == "lenet_300_100:"
    # OpenLTH's LeNet recipe (models/mnist_lenet.py default_hparams) is the registry's default: SGD without momentum
    # or weight decay, lr 0.1, batch 128, 40 epochs, no lr drops
    cfg = TrainConfig(model="lenet_300_100", dataset="mnist5k", steps=small.steps, **small.train).resolved()
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.milestones) == ("sgd", 0.1, 0.0, 128, "")
    import torch

    from lerpfast.train import optim

    group = optim.create(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))], cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay).param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["lr"]) == (0.0, 0.0, 0.1)  # plain SGD
    # 4,000 training images: 32 iterations per epoch, 1,280 in all; every t of the schedule below the end is swept
    per_epoch = -(-ld.load("mnist5k", "train", limit=None).num_samples // cfg.batch_size)
    total = 40 * per_epoch
    assert (per_epoch, total) == (32, 1280)
    ts = frankle.pick_ts(sorted(frankle_schedule(total) | {total}))
    assert ts == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    # Fashion-MNIST stays available: the same recipe on the run's other data set; ResNet-20 keeps digits
    fashion = settings("fashion-mnist")
    assert (fashion["small"].dataset, fashion["small"].steps) == ("fashion-mnist", "40ep")
    assert fashion["modern"].dataset == modern.dataset == "digits"
    assert (modern.model, modern.dataset, modern.steps, modern.replicates) == ("resnet20", "digits", "160ep", 3)
    assert modern.train == {"milestones": "80ep,120ep", "evaluate": "none", "model_options": "upsample=2"}
    assert modern.ts == "all" and modern.points == 100 and modern.eval_limit is None
    assert (modern.bn, recompute.bn, recompute.calibration) == ("interpolate", "recompute", 256)
    assert recompute.train == modern.train and recompute.steps == modern.steps  # one training run, two sweeps
    assert recompute.prefix != modern.prefix
    # OpenLTH's recipe for ResNet-20 is the model registry's default: SGD momentum 0.9, lr 0.1, wd 1e-4, batch 128
    cfg = TrainConfig(model="resnet20", dataset="digits", steps="160ep", **modern.train).resolved()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.gamma) == \
        ("sgdm", 0.1, 0.9, 1e-4, 128, 0.1)


def test_resnet_upsample_matches_reference():
    """ResNet-20 with upsample=2 is the plain network on the bilinearly enlarged input, and the batched sweep of it
    matches the float64 per-point loop under both batch-norm policies (odd batch and sample counts)."""
    import torch
    import torch.nn.functional as F

    import lerpfast
    from lerpfast.train.models import create

    torch.manual_seed(0)
    up = create("resnet20", num_classes=10, in_shape=(1, 7, 5), upsample=2).eval()
    plain = create("resnet20", num_classes=10, in_shape=(1, 14, 10)).eval()
    plain.load_state_dict(up.state_dict())
    x = torch.randn(5, 1, 7, 5)
    big = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert big.shape == (5, 1, 14, 10)
    torch.testing.assert_close(up(x), plain(big))
    other = create("resnet20", num_classes=10, in_shape=(1, 7, 5), upsample=2)
    with torch.no_grad():  # give the second endpoint its own running statistics
        other.train()(torch.randn(33, 1, 7, 5))
    data = (torch.randn(23, 1, 7, 5), torch.randint(0, 10, (23,)))
    calib = (torch.randn(19, 1, 7, 5), torch.randint(0, 10, (19,)))
    for kw in ({"bn": "interpolate"}, {"bn": "recompute", "bn_data": calib}):
        fast = lerpfast.sweep(up, (up.state_dict(), other.state_dict()), "0:1:5", data, batch_size=8,
                              points_per_pass=3, progress=False, **kw)
        ref = lerpfast.sweep(up, (up.state_dict(), other.state_dict()), "0:1:5", data, batch_size=8,
                             method="loop", precision="fp64", progress=False, **kw)
        np.testing.assert_allclose(fast.loss, ref.loss, rtol=1e-5, atol=1e-5, err_msg=str(kw))
        np.testing.assert_array_equal(fast.error, ref.error)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="upsample must be an integer >= 1"):
            create("resnet20", num_classes=10, in_shape=(1, 8, 8), upsample=bad)
