"""The `lerpfast` command end to end on small real data (scikit-learn digits), exit codes and messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lerpfast.cli import EXIT_DATA, EXIT_STORE, EXIT_USAGE, main
from lerpfast.store import ResultStore


def lerpfast_cmd(*args, **kw):
    """The installed console script (falls back to ``python -m lerpfast.cli``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = shutil.which("lerpfast")
    cmd = [exe] if exe else [sys.executable, "-m", "lerpfast.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real training run: LeNet-300-100 on digits, 40 iterations, Frankle's checkpoints (via `lerpfast train`)."""
    out = tmp_path_factory.mktemp("runs")
    rc = main(["train", "--model", "lenet_300_100", "--dataset", "digits", "--steps", "40it", "--out_dir", str(out),
               "--device", "cpu", "--evaluate", "none", "--no-progress"])
    assert rc == 0
    (run,) = list(out.glob("train_*"))
    return run


def test_help_teaches_and_is_a_console_script():
    r = lerpfast_cmd("--help")
    assert r.returncode == 0
    for word in ("sweep", "show", "plot", "train", "data", "bench", "demo", "lerpfast demo", "exit codes"):
        assert word in r.stdout
    r = lerpfast_cmd("sweep", "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "--bn" in r.stdout and "--points-per-pass" in r.stdout
    assert "bilinear" in r.stdout and "computes only the missing points" in r.stdout.replace("\n", " ")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "nonsense", "a.pt"])
    assert exc.value.code == EXIT_USAGE
    assert main([]) == EXIT_USAGE
    assert main(["sweep", "line", "only-one.pt", "--model", "mlp", "--data", "digits"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "takes 2 checkpoints" in err and "Traceback" not in err


def test_sweep_show_plot_resume_end_to_end(run_dir, tmp_path, capsys):
    store = tmp_path / "results.h5"
    base = ["sweep", "line", "--run", str(run_dir), "init", "final", "--store", str(store), "--alphas", "0:1:11",
            "--device", "cpu", "--name", "init-final"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "init-final" in out and "computed 11 points" in out and "max increase" in out
    res = ResultStore(store, "r").read("init-final")
    assert res.K == 11 and np.isfinite(res.metrics["loss"]).all()
    assert res.meta["data"]["num_samples"] == 360  # digits' test split
    # the same command again: nothing left to compute
    assert main(base) == 0
    assert "computed 0 points" in capsys.readouterr().out
    # engine options reach the sweep and its metadata
    assert main([*base[:-1], "unfused", "--fuse", "false", "--alphas", "0:1:3"]) == 0
    capsys.readouterr()
    stored = ResultStore(store, "r").read("unfused").meta
    assert stored["fuse"] is False and stored["compile"] is False and stored["method"] == "engine"
    # a plane around the final weights, and a ray, into the same file
    assert main(["sweep", "plane", "--run", str(run_dir), "final", "--store", str(store), "--xs=-1:1:5", "--ys=-1:1:4",
                 "--device", "cpu", "--name", "plane"]) == 0
    assert main(["sweep", "ray", "--run", str(run_dir), "final", "init", "--store", str(store), "--device", "cpu",
                 "--name", "ray", "--lambdas", "0:3:7", "--reference", "none"]) == 0
    capsys.readouterr()
    assert main(["show", str(store)]) == 0
    table = capsys.readouterr().out
    assert "init-final" in table and "11/11" in table and "plane" in table and "20/20" in table and "ray" in table
    assert main(["show", str(store), "--attrs", "init-final"]) == 0
    assert '"precision": "fp32"' in capsys.readouterr().out
    assert main(["plot", str(store), "--out", str(tmp_path / "figs"), "--format", "png,svg"]) == 0
    made = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"lines.png", "lines.svg", "plane_loss_contour.png", "plane_loss_surface.png", "ray_ray.png"} <= made
    # --run adds the training trajectory (Goodfellow et al.) from the run's checkpoints
    figs2 = tmp_path / "figs2"
    assert main(["plot", str(store), "--out", str(figs2), "--names", "init-final", "--run", str(run_dir)]) == 0
    assert {p.name for p in figs2.iterdir()} >= {"lines.png", "trajectory.png"}


def test_expected_errors_have_codes_and_one_line(run_dir, tmp_path, capsys):
    store = tmp_path / "r.h5"
    common = ["--store", str(store), "--device", "cpu", "--name", "x"]
    # data / checkpoint problems: 3
    assert main(["sweep", "line", "--run", str(run_dir), "init", "7777", *common]) == EXIT_DATA
    assert "no checkpoint at step 7777" in capsys.readouterr().err
    assert main(["sweep", "line", "missing.pt", "other.pt", "--model", "mlp", "--data", "digits", *common]) == EXIT_DATA
    assert "no such file" in capsys.readouterr().err
    # a bad value: 2
    assert main(["sweep", "line", "--run", str(run_dir), "init", "final", "--alphas", "0:1", *common]) == EXIT_USAGE
    assert "start:stop:num" in capsys.readouterr().err
    line = ["sweep", "line", "--run", str(run_dir), "init", "final"]
    assert main([*line, "--fuse", "maybe", *common]) == EXIT_USAGE
    assert "fuse='maybe'" in capsys.readouterr().err
    assert main([*line, "--compile", "cudagraphs", *common]) == EXIT_USAGE
    assert "needs a CUDA device" in capsys.readouterr().err
    # store problems: 4
    assert main(["sweep", "line", "--run", str(run_dir), "init", "final", "--alphas", "0:1:5", *common]) == 0
    capsys.readouterr()
    assert main(["sweep", "line", "--run", str(run_dir), "init", "final", "--alphas", "0:1:6", *common]) == EXIT_STORE
    err = capsys.readouterr().err
    assert "exists with different settings" in err and "coords" in err and err.count("\n") == 1
    same = ["sweep", "line", "--run", str(run_dir), "init", "final", "--alphas", "0:1:5", *common]
    with ResultStore(store):  # another writer holds the file
        assert main(same) == EXIT_STORE
    assert "file in use" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nope.h5")]) == EXIT_STORE
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main(["show", str(bad)]) == EXIT_STORE
    err = capsys.readouterr().err
    assert "not a readable lerpfast result store" in err and "Traceback" not in err
    assert bad.read_text() == "not hdf5"


def test_console_script_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\0" * 100)
    r = lerpfast_cmd("show", str(bad))
    assert r.returncode == EXIT_STORE
    assert r.stderr.startswith("lerpfast: error:") and r.stderr.count("\n") == 1


def test_data_and_bench_are_wired(capsys):
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    assert "digits" in listed and "mnist5k" in listed and "mnist_5k.csv.gz" in listed
    assert main(["bench", "--list"]) == 0
    assert "sweep" in capsys.readouterr().out
    assert main(["bench", "no-such-benchmark"]) == EXIT_USAGE


@pytest.mark.parametrize("flag,value,code,words", [
    ("--device", "tpu", EXIT_USAGE, ["--device", "'tpu'"]),
    ("--device", "cuda", EXIT_USAGE, ["--device", "'cuda'", "no CUDA"]),
    ("--data", "nosuch", EXIT_USAGE, ["--data", "'nosuch'", "digits"]),
    ("--threads", "-1", EXIT_USAGE, ["--threads", "-1"]),
    ("--points-per-pass", "-3", EXIT_USAGE, ["--points-per-pass", "-3"]),
])
def test_sweep_bad_option_values_are_one_line_errors(tmp_path, capsys, monkeypatch, flag, value, code, words):
    """Issue 18 section 2: each bad value gets `lerpfast: error:` on one line and exit 2, before any checkpoint
    is read (the checkpoints here are empty files, which would be exit 3)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.touch()
    b.touch()
    rc = main(["sweep", "line", str(a), str(b), "--model", "mlp", "--data", "digits", flag, value])
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("lerpfast: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("flag,value,words", [
    ("--device", "tpu", ["--device", "'tpu'"]),
    ("--threads", "-1", ["--threads", "-1"]),
    ("--dataset", "nosuch", ["--dataset", "'nosuch'", "digits"]),
])
def test_train_bad_option_values_are_one_line_errors(tmp_path, capsys, flag, value, words):
    rc = main(["train", "--model", "mlp", "--dataset", "digits", "--out-dir", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    assert err.startswith("lerpfast: error: ") and err.count("\n") == 1
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("flag,value,words", [
    ("--device", "tpu", ["--device", "'tpu'"]),
    ("--device", "cuda", ["--device", "'cuda'", "no CUDA"]),
    ("--threads", "-1", ["--threads", "-1"]),
    ("--dataset", "nosuch", ["--dataset", "'nosuch'", "digits"]),
    ("--model", "nosuch", ["--model", "'nosuch'", "lenet_300_100"]),
])
def test_reproduce_bad_option_values_are_one_line_errors(tmp_path, capsys, monkeypatch, flag, value, words):
    """Checked before anything is trained or written (the out folder stays absent)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "repro"
    rc = main(["reproduce", "goodfellow", "--quick", "--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    assert err.startswith("lerpfast: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()
