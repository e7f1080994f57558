"""The HDF5 result store: resume, crash safety, concurrency and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from lerpfast.store import (
    ResultStore,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    SweepMismatchError,
    _lookup3,
    sweep_fingerprint,
)

K = 24
ALPHAS = np.linspace(-0.5, 1.5, K)
ATTRS = {
    "kind": "line",
    "model": "mlp",
    "checkpoints": [{"path": "a.pt", "sha256": "ab" * 32}, {"path": "b.pt", "sha256": "cd" * 32}],
    "bn_policy": "interpolate",
    "precision": "fp32",
    "data": {"name": "digits", "split": "test", "size": 360},
    "device": "cpu",
}


def fake_metrics(idx):
    idx = np.asarray(idx, dtype=np.float64)
    return {"loss": np.sin(idx) + 2.0, "error": idx / K}


def open_line(store, name="init-final", attrs=ATTRS):
    return store.open_sweep(name, coords=ALPHAS[:, None], coord_names=["alpha"], metric_names=["loss", "error"],
                            attrs=attrs)


# A fake sweep process: writes its missing points in chunks of 4, optionally SIGKILLs itself before
# chunk number `kill_at`, optionally waits for a line on stdin before each chunk (for SWMR tests).
WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import ResultStore, open_line, fake_metrics
    path, kill_at, stepped = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    store = ResultStore(path)
    h = open_line(store)
    missing = h.missing()
    print("missing", " ".join(map(str, missing)), flush=True)
    for n, start in enumerate(range(0, len(missing), 4)):
        if stepped:
            sys.stdin.readline()
        if n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        chunk = missing[start:start + 4]
        h.write(chunk, fake_metrics(chunk))
        print("wrote", len(chunk), flush=True)
    store.close()
    print("closed", flush=True)
""").format(tests=os.path.dirname(os.path.abspath(__file__)))


def run_writer(path, kill_at=-1, stepped=False, **kw):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(kill_at), "1" if stepped else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_roundtrip_attrs_and_progress(tmp_path):
    path = tmp_path / "r.h5"
    with ResultStore(path) as store:
        h = open_line(store)
        assert h.created and h.K == K
        assert h.missing().tolist() == list(range(K))
        h.write([5, 3, 4], fake_metrics([5, 3, 4]))  # unordered indices
        h.write(np.arange(10, 14), fake_metrics(np.arange(10, 14)))
        assert store.progress("init-final") == (7, K)
        assert h.missing().tolist() == [0, 1, 2] + list(range(6, 10)) + list(range(14, K))
        got = h.read_metrics()
        np.testing.assert_array_equal(got["loss"][[3, 4, 5]], fake_metrics([3, 4, 5])["loss"])
        assert np.isnan(got["loss"][0]) and np.isnan(got["error"][20])
        attrs = store.attrs("init-final")
        assert attrs["checkpoints"] == ATTRS["checkpoints"]  # nested values survive as JSON
        assert attrs["data"] == ATTRS["data"] and attrs["precision"] == "fp32"
        assert attrs["fingerprint"] == sweep_fingerprint(ALPHAS[:, None], ["alpha"], ["loss", "error"], ATTRS)
        assert "time" in attrs
    # what another HDF5 tool sees: plain datasets
    with h5py.File(path, "r") as f:
        assert f["init-final/coords"].shape == (K, 1)
        assert f["init-final/metrics/loss"].dtype == np.float64


def test_resume_same_sweep_in_process(tmp_path):
    path = tmp_path / "r.h5"
    with ResultStore(path) as store:
        open_line(store).write(range(8), fake_metrics(range(8)))
    # a resumed sweep may run on another device: volatile attributes do not change its identity
    with ResultStore(path) as store:
        h = open_line(store, attrs={**ATTRS, "device": "cuda:0", "time": "later"})
        assert not h.created
        assert h.missing().tolist() == list(range(8, K))


def test_nan_metric_counts_as_done(tmp_path):
    # a diverged loss (alpha far outside [0, 1]) is a result, not a missing point
    with ResultStore(tmp_path / "r.h5") as store:
        h = open_line(store)
        h.write([0, 1], {"loss": [np.nan, np.inf], "error": [1.0, 1.0]})
        assert 0 not in h.missing() and 1 not in h.missing()


def test_write_validates(tmp_path):
    with ResultStore(tmp_path / "r.h5") as store:
        h = open_line(store)
        with pytest.raises(ValueError, match="records metrics"):
            h.write([0], {"loss": [1.0], "top5": [1.0]})
        with pytest.raises(IndexError):
            h.write([K], fake_metrics([K]))
        with pytest.raises(ValueError, match="repeated"):
            h.write([1, 1], fake_metrics([1, 1]))
        with pytest.raises(ValueError, match="without '/'"):
            store.open_sweep("a/b", coords=ALPHAS, coord_names=["alpha"], metric_names=["loss"])
        assert h.missing().size == K  # nothing was half-written


def test_name_clash_is_refused_with_the_differing_fields(tmp_path):
    path = tmp_path / "r.h5"
    with ResultStore(path) as store:
        open_line(store).write([0], fake_metrics([0]))
        other = {**ATTRS, "precision": "bf16", "checkpoints": [{"path": "a.pt", "sha256": "ef" * 32}]}
        with pytest.raises(SweepMismatchError) as exc:
            open_line(store, attrs=other)
        msg = str(exc.value)
        assert str(path) in msg and "'init-final'" in msg
        assert "precision" in msg and "checkpoints" in msg and "bf16" in msg
        assert set(exc.value.fields) == {"precision", "checkpoints"}
        with pytest.raises(SweepMismatchError, match="coords"):
            store.open_sweep("init-final", coords=np.linspace(0, 1, K)[:, None], coord_names=["alpha"],
                             metric_names=["loss", "error"], attrs=ATTRS)
        # the stored sweep is untouched; another name holds the new one
        assert store.progress("init-final") == (1, K)
        open_line(store, name="init-final-bf16", attrs=other)
        assert store.names() == ["init-final", "init-final-bf16"]


def test_many_sweeps_and_old_handles_survive_reopen(tmp_path):
    with ResultStore(tmp_path / "r.h5") as store:
        h1 = open_line(store, "a")
        h1.write([0], fake_metrics([0]))
        h2 = store.open_sweep("plane", coords=np.zeros((6, 2)), coord_names=["x", "y"], metric_names=["loss"],
                              attrs={"kind": "plane"}, grid_shape=(2, 3))
        h1.write([1], fake_metrics([1]))  # adding a sweep reopened the file; h1 still works
        h2.write(range(6), {"loss": np.arange(6.0)})
        assert store.progress("a") == (2, K) and store.progress("plane") == (6, 6)
        with pytest.raises(KeyError, match="no sweep named 'nope'"):
            store.progress("nope")
    reader = ResultStore(tmp_path / "r.h5", "r")
    assert reader.names() == ["a", "plane"]
    assert {r["name"]: (r["done"], r["total"]) for r in reader.summary()} == {"a": (2, K), "plane": (6, 6)}


def test_read_returns_sweep_result(tmp_path):
    pytest.importorskip("lerpfast.result")
    path = tmp_path / "r.h5"
    with ResultStore(path) as store:
        h = open_line(store)
        h.write(range(K), fake_metrics(range(K)))
    res = ResultStore(path, "r").read("init-final")
    assert res.kind == "line" and list(res.coord_names) == ["alpha"]
    np.testing.assert_array_equal(res.coords[:, 0], ALPHAS)
    np.testing.assert_array_equal(res.metrics["loss"], fake_metrics(range(K))["loss"])
    assert res.meta["model"] == "mlp" and res.meta["progress"] == (K, K)


def test_second_writer_gets_file_in_use(tmp_path):
    path = tmp_path / "r.h5"
    proc = run_writer(path, stepped=True)
    try:
        assert proc.stdout.readline().startswith("missing")  # the writer holds the file now
        with pytest.raises(StoreBusyError, match="file in use") as exc:
            ResultStore(path)
        assert str(path) in str(exc.value)
        # in-process too: the lock belongs to a descriptor, not to the process
        with ResultStore(tmp_path / "own.h5"):
            with pytest.raises(StoreBusyError):
                ResultStore(tmp_path / "own.h5")
        # readers are welcome while the writer runs
        assert ResultStore(path, "r").progress("init-final") == (0, K)
    finally:
        out, err = proc.communicate("go\n" * 10, timeout=60)
    assert proc.returncode == 0, err
    assert ResultStore(path, "r").progress("init-final") == (K, K)


def test_reader_follows_a_running_sweep(tmp_path):
    path = tmp_path / "r.h5"
    proc = run_writer(path, stepped=True)
    seen = []
    try:
        assert proc.stdout.readline().startswith("missing")
        reader = ResultStore(path, "r")
        for _ in range(3):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("wrote")
            seen.append(reader.progress("init-final")[0])
            np.testing.assert_array_equal(reader.attrs("init-final")["metric_names"], ["loss", "error"])
        assert proc.poll() is None  # the writer is still running
    finally:
        proc.communicate("go\n" * 10, timeout=60)
    assert seen == [4, 8, 12]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"
    proc = run_writer(killed, kill_at=3)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9 and out.count("wrote") == 3
    # the killed writer left HDF5's "open for write" flags; the next writer recovers the file
    proc = run_writer(killed)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == "missing " + " ".join(map(str, range(12, K)))  # only the lost points
    assert run_writer(clean).wait(timeout=60) == 0
    a, b = ResultStore(killed, "r"), ResultStore(clean, "r")
    with h5py.File(killed, "r") as fa, h5py.File(clean, "r") as fb:
        for m in ("loss", "error"):
            np.testing.assert_array_equal(fa[f"init-final/metrics/{m}"][...], fb[f"init-final/metrics/{m}"][...])
    assert a.progress("init-final") == b.progress("init-final") == (K, K)


@pytest.mark.parametrize("content", [b"not an hdf5 file\n" * 10, b"", "truncated"])
def test_corrupt_file_is_reported_and_left_alone(tmp_path, content):
    path = tmp_path / "results.h5"
    if content == "truncated":
        with ResultStore(path) as store:
            open_line(store).write(range(K), fake_metrics(range(K)))
        data = path.read_bytes()
        content = data[: len(data) // 3]
    path.write_bytes(content)
    (tmp_path / "other.txt").write_text("keep me")
    before = sorted(os.listdir(tmp_path))
    for mode in ("a", "r"):
        with pytest.raises(StoreCorruptError) as exc:
            ResultStore(path, mode).names()
        assert str(path) in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == before
    assert path.read_bytes() == content


def test_reader_of_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such result store"):
        ResultStore(tmp_path / "nope.h5", "r")
    assert not (tmp_path / "nope.h5").exists()


def test_lookup3_matches_hdf5_superblock_checksum(tmp_path):
    path = tmp_path / "x.h5"
    h5py.File(path, "w", libver="latest").close()
    raw = path.read_bytes()[:48]
    end = 12 + 4 * raw[9]
    assert _lookup3(raw[:end]) == int.from_bytes(raw[end:end + 4], "little")


# ---------------------------------------------------------------------------------------------------------------
# lerpfast.sweep(store=...) killed with SIGKILL, then resumed

SWEEP_K, SWEEP_P = 24, 4


def digits_problem():
    """A small MLP, two endpoints and 300 real digits: everything a sweep needs, built deterministically."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:300] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:300])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    theta1 = {k: v + 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}
    return model, (theta0, theta1), (x, y)


def run_sweep(path, name="line"):
    import lerpfast

    model, ends, data = digits_problem()
    return lerpfast.sweep(model, ends, f"-0.5:1.5:{SWEEP_K}", data, store=str(path), name=name,
                          points_per_pass=SWEEP_P, progress=False)


KILLED_SWEEP = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import lerpfast.store as store_mod
    from test_store import run_sweep
    kill_at, calls = int(sys.argv[2]), [0]
    write = store_mod.SweepHandle.write
    def write_then_die(self, idx, metrics):
        if calls[0] == kill_at:  # die with this chunk in flight
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        write(self, idx, metrics)
    store_mod.SweepHandle.write = write_then_die
    run_sweep(sys.argv[1])
""").format(tests=os.path.dirname(os.path.abspath(__file__)))


def test_sweep_sigkill_resume_recomputes_only_missing(tmp_path, monkeypatch):
    import lerpfast.store as store_mod

    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"
    proc = subprocess.run([sys.executable, "-c", KILLED_SWEEP, str(killed), "2"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    assert ResultStore(killed, "r").progress("line") == (2 * SWEEP_P, SWEEP_K)  # the chunk in flight is lost

    written = []
    write = store_mod.SweepHandle.write
    monkeypatch.setattr(store_mod.SweepHandle, "write",
                        lambda self, idx, m: (written.extend(np.asarray(idx).tolist()), write(self, idx, m))[1])
    resumed = run_sweep(killed)
    assert sorted(written) == list(range(2 * SWEEP_P, SWEEP_K))  # only the missing points were computed
    assert resumed.meta["points_computed"] == SWEEP_K - 2 * SWEEP_P
    monkeypatch.undo()

    whole = run_sweep(clean)
    for m in ("loss", "error", "distance", "disagreement"):
        np.testing.assert_array_equal(resumed.metrics[m], whole.metrics[m])
        np.testing.assert_array_equal(ResultStore(killed, "r").read("line").metrics[m], whole.metrics[m])


def test_sweep_whose_creation_was_killed_is_recreated(tmp_path):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w", libver="latest") as f:  # what a writer killed inside open_sweep leaves behind
        g = f.create_group("init-final")
        g.create_dataset("coords", data=ALPHAS[:, None])
        f.create_group("user-data").attrs["note"] = "not ours"
    with ResultStore(path) as store:
        assert store.names() == []
        h = open_line(store)
        assert h.created and h.missing().size == K
        with pytest.raises(StoreError, match="not a lerpfast sweep"):
            store.open_sweep("user-data", coords=ALPHAS, coord_names=["alpha"], metric_names=["loss"])
    with h5py.File(path, "r") as f:
        assert f["user-data"].attrs["note"] == "not ours"  # never touched
