"""`lerpfast demo --quick` end to end: train on real digits, sweep t -> final, results, figures, table."""

from __future__ import annotations

import numpy as np

import lerpfast.store as store_mod
from lerpfast.cli import main
from lerpfast.store import ResultStore


def test_demo_quick_end_to_end_and_rerun_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--threads", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "max increase along theta_t -> theta_final" in printed and "digits" in printed
    table = (out / "table.txt").read_text().splitlines()
    ts = [int(line.split()[0]) for line in table[2:]]
    assert ts == [0, 4, 16, 64, 256]  # Frankle's schedule, thinned to powers of 4
    for line in table[2:]:  # t, loss at t, max increase of loss +- std, error at t, max increase of error +- std
        cols = line.split()
        loss_at, loss_increase, error_at, error_increase = map(float, (cols[1], cols[2], cols[5], cols[6]))
        assert loss_at > 0 and loss_increase >= 0 and 0 <= error_at <= 1 and 0 <= error_increase <= 1

    for name in ("lines.png", "max_increase.png", "trajectory.png", "functional.png"):
        assert (out / name).stat().st_size > 10_000, name
    store = ResultStore(out / "results.h5", "r")
    names = store.names()
    assert len(names) == 5 * 2 and "t=0@rep0" in names and "t=256@rep1" in names
    res = store.read("t=0@rep0")
    assert res.K == 100 and store.progress("t=0@rep0") == (100, 100)
    assert res.meta["data"]["num_samples"] == 360 and np.isfinite(res.metrics["loss"]).all()
    assert res.metrics["error"][-1] < 0.2  # the trained network classifies digits

    # a second run re-uses the training run and computes no point again
    written = []
    write = store_mod.SweepHandle.write
    monkeypatch.setattr(store_mod.SweepHandle, "write", lambda self, idx, m: (written.append(len(idx)),
                                                                               write(self, idx, m))[1])
    assert main(["demo", "--quick", "--out", str(out), "--threads", "1", "--device", "cpu"]) == 0
    assert written == []
    assert (out / "table.txt").read_text().splitlines() == table
