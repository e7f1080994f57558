"""Damaged, busy and unwritable result stores (issue 18 §4): checksums on every stored value, damage named by sweep
and point and repaired on request, never a hang, busy is not corrupt, creation is atomic."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import lerpfast
from lerpfast.store import DamagedPointsError, ResultStore, StoreBusyError, StoreError


def _store(path, K=600):
    with ResultStore(path) as s:
        h = s.open_sweep("a", coords=np.linspace(0, 1, K), coord_names=["alpha"], metric_names=["loss", "error"],
                         attrs={"kind": "line"})
        h.write(np.arange(K), {"loss": np.arange(K, dtype=float), "error": np.ones(K)})


def _chunk_offset(path, dataset, chunk=0):
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_chunk_info(chunk).byte_offset


def _scribble(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("data", [os.urandom(64), bytes(80)], ids=["random", "zeros"])
def test_damaged_values_are_named_and_repaired(tmp_path, data):
    p = tmp_path / "s.h5"
    _store(p)
    _scribble(p, _chunk_offset(p, "a/metrics/loss", chunk=1) + 8, data)  # points 256..511
    for mode in ("a", "r"):
        with pytest.raises(DamagedPointsError, match=r"sweep 'a': points 256-511") as info:
            ResultStore(p, mode).read("a") if mode == "r" else ResultStore(p, mode)
        assert info.value.damaged == {"a": list(range(256, 512))}
    assert ResultStore.repair(p) == {"a": list(range(256, 512))}
    res = ResultStore(p, "r").read("a")
    assert res.meta["progress"] == (344, 600)
    np.testing.assert_array_equal(res.metrics["loss"][:256], np.arange(256.0))
    assert np.isnan(res.metrics["loss"][256:512]).all()
    assert ResultStore.repair(p) == {}


def test_sweep_recomputes_exactly_the_damaged_points(tmp_path):
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    data = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    p = tmp_path / "s.h5"
    first = lerpfast.sweep(a, (a, b), "0:1:300", data, store=p, name="l", precision="fp64")
    _scribble(p, _chunk_offset(p, "l/metrics/error", chunk=1) + 16, os.urandom(32))  # points 256..299
    with pytest.raises(DamagedPointsError, match="lerpfast repair"):
        lerpfast.sweep(a, (a, b), "0:1:300", data, store=p, name="l", precision="fp64")
    with pytest.warns(UserWarning, match="l: 256-299"):
        again = lerpfast.sweep(a, (a, b), "0:1:300", data, store=p, name="l", precision="fp64", repair=True)
    assert again.meta["points_computed"] == 44
    for k, v in first.metrics.items():
        np.testing.assert_array_equal(again.metrics[k], v, err_msg=k)


@pytest.mark.parametrize("where", [0.02, 0.97])
def test_damaged_metadata_is_an_error_not_a_hang(tmp_path, where):
    p = tmp_path / "s.h5"
    _store(p)
    _scribble(p, int(os.path.getsize(p) * where), os.urandom(64))
    script = textwrap.dedent(f"""
        from lerpfast.store import ResultStore, StoreError
        for mode in ("a", "r"):
            try:
                with ResultStore({str(p)!r}, mode) as s:
                    s.read("a")
                print(mode, "read")
            except StoreError as e:
                print(mode, type(e).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert lines[0] == "a" and lines[2] == "r"  # both answered (a hang is the timeout above)
    assert lines[1] in ("StoreCorruptError", "DamagedPointsError") and lines[3] == lines[1]


def test_file_open_for_writing_in_another_program_is_busy_not_corrupt(tmp_path):
    p = tmp_path / "s.h5"
    _store(p)
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, sys; f = h5py.File({str(p)!r}, 'a'); "
                               "print('open', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        for mode in ("a", "r"):
            with pytest.raises(StoreBusyError, match="open for writing"):
                ResultStore(p, mode).read("a")
    finally:
        holder.communicate("", timeout=30)
    assert ResultStore(p, "r").read("a").meta["progress"] == (600, 600)  # the file was good all along


def test_unwritable_store_paths_name_the_cause(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="afile is not a folder"):
        ResultStore(tmp_path / "afile" / "s.h5")
    real = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a)

    monkeypatch.setattr(h5py.File, "__init__", lambda self, *a, **k: read_only(a[0], 0))
    with pytest.raises(StoreError, match="read-only file system"):
        ResultStore(tmp_path / "new.h5")


def _create(path, barrier, out):
    barrier.wait()
    try:
        with ResultStore(path, "a"):
            pass
        out.put("ok")
    except StoreBusyError:
        out.put("busy")
    except Exception as e:  # noqa: BLE001
        out.put(f"{type(e).__name__}: {e}")


def test_concurrent_creation_never_leaves_a_dead_store(tmp_path):
    ctx = mp.get_context("fork")
    for trial in range(20):
        p = tmp_path / f"s{trial}.h5"
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_create, args=(p, barrier, out)) for _ in range(2)]
        for q in procs:
            q.start()
        for q in procs:
            q.join(30)
        got = sorted(out.get(timeout=5) for _ in procs)
        assert all(g in ("ok", "busy") for g in got), got
        with ResultStore(p, "a") as s:  # the path is a valid, writable store
            assert s.names() == []
    assert not list(tmp_path.glob(".*.tmp"))


def test_files_written_before_checksums_still_read_and_resume(tmp_path):
    """The layout of earlier versions: contiguous datasets, no checksums."""
    p = tmp_path / "old.h5"
    with h5py.File(p, "w", libver="latest") as f:
        g = f.create_group("a")
        g.create_dataset("coords", data=np.linspace(0, 1, 5)[:, None])
        g.create_dataset("done", data=np.array([1, 1, 0, 0, 0], dtype=np.uint8))
        m = g.create_group("metrics")
        m.create_dataset("loss", data=np.array([0.5, 0.6, np.nan, np.nan, np.nan]))
        for k, v in {"coord_names": '["alpha"]', "metric_names": '["loss"]', "grid_shape": "null",
                     "kind": "line", "fingerprint": "f", "lerpfast_store_format": 1, "lerpfast_sweep": 1}.items():
            g.attrs[k] = v
    with ResultStore(p) as s:
        h = s.open_sweep("a", coords=np.linspace(0, 1, 5), coord_names=["alpha"], metric_names=["loss"],
                         attrs={"kind": "line", "fingerprint": "f"})
        assert list(h.missing()) == [2, 3, 4]
        h.write([2, 3, 4], {"loss": [0.7, 0.8, 0.9]})
    np.testing.assert_array_equal(ResultStore(p, "r").read("a").metrics["loss"], [0.5, 0.6, 0.7, 0.8, 0.9])


def test_cli_repair(tmp_path, capsys):
    from lerpfast.cli import main

    p = tmp_path / "s.h5"
    _store(p)
    _scribble(p, _chunk_offset(p, "a/metrics/error", chunk=2) + 8, os.urandom(16))
    assert main(["show", str(p)]) == 4
    assert "points 512-599" in capsys.readouterr().err
    assert main(["repair", str(p)]) == 0
    assert "88 points marked for recomputation (512-599)" in capsys.readouterr().out
    assert main(["repair", str(p)]) == 0 and "nothing to repair" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ the resume probe


class _Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 3), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _probe_problem():
    torch.manual_seed(0)
    a, b = _Net(torch.relu), _Net(torch.relu)
    g = torch.Generator().manual_seed(1)
    return a, b, torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)


def test_resume_with_another_activation_is_a_mismatch(tmp_path):
    """Same class, same parameters, same settings: only the forward differs. The stored numbers are not returned."""
    a, b, x, y = _probe_problem()
    p = tmp_path / "s.h5"
    lerpfast.sweep(a, (a, b.state_dict()), "0:1:7", (x, y), store=p, name="l")
    again = lerpfast.sweep(a, (a, b.state_dict()), "0:1:7", (x, y), store=p, name="l", method="loop")
    assert again.meta["points_computed"] == 0  # the same model on another method resumes fine
    tanh = _Net(torch.tanh)
    tanh.load_state_dict(a.state_dict())
    with pytest.raises(lerpfast.store.SweepMismatchError, match="model's code or the data"):
        lerpfast.sweep(tanh, (a, b.state_dict()), "0:1:7", (x, y), store=p, name="l")


def test_resume_with_permuted_labels_or_another_loss_is_a_mismatch(tmp_path):
    a, b, x, y = _probe_problem()
    p = tmp_path / "s.h5"
    loader = lambda labels: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=10)  # noqa: E731
    ce = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none")  # noqa: E731
    lerpfast.sweep(a, (a, b), "0:1:5", loader(y), store=p, name="l", loss_fn=ce)
    with pytest.raises(lerpfast.store.SweepMismatchError, match="labels"):
        lerpfast.sweep(a, (a, b), "0:1:5", loader(y[torch.randperm(30, generator=torch.Generator().manual_seed(3))]),
                       store=p, name="l", loss_fn=ce)
    ce100 = lambda z, t: 100 * torch.nn.functional.cross_entropy(z, t, reduction="none")  # noqa: E731
    with pytest.raises(lerpfast.store.SweepMismatchError, match="loss function"):
        lerpfast.sweep(a, (a, b), "0:1:5", loader(y), store=p, name="l", loss_fn=ce100)
    assert lerpfast.sweep(a, (a, b), "0:1:5", loader(y), store=p, name="l", loss_fn=ce).meta["points_computed"] == 0


_FULL_DISK_CHILD = """
import resource, signal, sys
import numpy as np
from lerpfast.store import ResultStore, StoreError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then an EFBIG error, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    with ResultStore(sys.argv[1]) as s:
        s.open_sweep("b", coords=np.linspace(0, 1, 600), coord_names=["alpha"], metric_names=["loss"])
    print("created")
except StoreError as e:
    print("StoreError:", e)
"""


def test_full_disk_is_a_store_error_and_the_store_stays_writable(tmp_path):
    """The file cannot grow (a file-size limit in a child process: the kernel's refusal HDF5 gets on a full disk)."""
    p = tmp_path / "s.h5"
    _store(p)
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(p), str(os.path.getsize(p) + 2048)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"StoreError: {p}: no space left on the device for sweep 'b'"), proc.stdout
    assert ResultStore(p, "r").read("a").meta["progress"] == (600, 600)  # the finished sweep is intact
    with ResultStore(p) as s:  # and with room the same store takes a new sweep
        h = s.open_sweep("b", coords=np.linspace(0, 1, 600), coord_names=["alpha"], metric_names=["loss"])
        h.write(np.arange(600), {"loss": np.zeros(600)})
    assert ResultStore(p, "r").read("b").meta["progress"] == (600, 600)
