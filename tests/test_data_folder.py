"""ImageFolder reader, PIL eval/train transforms, FolderLoader (ImageNet without FFCV), the data CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lerpfast.data as ld
from lerpfast.data import cli
from lerpfast.data.folder import (
    EvalTransform,
    FolderLoader,
    ImageFolder,
    TrainTransform,
    center_crop,
    random_resized_crop_box,
    resize_shorter,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def smooth_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Random, smooth, never-zero RGB content (a 5x6 random grid upsampled bicubically)."""
    small = Image.fromarray(rng.integers(30, 226, (5, 6, 3), dtype=np.uint8))
    return small.resize((w, h), Image.BICUBIC)


def write_folder(root: Path, classes=("n01", "n02", "n03"), per_class: int = 3, seed: int = 0, ext: str = ".png"):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 61)), int(rng.integers(40, 61))
            smooth_image(rng, h, w).save(root / c / f"img{i}{ext}")
    return root


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("LERPFAST_DATA", raising=False)


def test_image_folder_scan(tmp_path):
    write_folder(tmp_path / "val")
    (tmp_path / "val" / "n02" / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path / "val")
    assert folder.classes == ["n01", "n02", "n03"] and len(folder) == 9
    assert [k for _, k in folder.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, label = folder[4]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and label == 1
    with pytest.raises(FileNotFoundError, match="no class directories"):
        ImageFolder(tmp_path / "val" / "n01")


def test_eval_transform_matches_pil_reference():
    rng = np.random.default_rng(1)
    im = smooth_image(rng, 47, 59)
    out = EvalTransform(resize=36, crop=32)(im)
    ref = im.resize((45, 36), Image.BILINEAR)  # shorter side 47 -> 36, 59 * 36 / 47 = 45.2 -> 45
    ref = np.asarray(ref)[2:34, 6:38]  # round((36-32)/2) = 2, round((45-32)/2) = 6 (6.5 rounds to even)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), ref)
    assert resize_shorter(im, 47) is im and center_crop(im, 20).size == (20, 20)


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 45, rng)
        assert 0 <= top and top + h <= 45 and 0 <= left and left + w <= 60
        assert 0.08 * 60 * 45 * 0.8 <= h * w <= 60 * 45
    assert random_resized_crop_box(1000, 10, rng) == (0, 493, 10, 13)  # too wide: central crop at aspect 4/3


def test_train_transform_is_a_function_of_seed_epoch_index():
    im = smooth_image(np.random.default_rng(2), 50, 40)
    t = TrainTransform(size=16, seed=3)
    a, b = t(im, 5), t(im, 5)
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    t.epoch = 1
    assert not torch.equal(a, t(im, 5))


def test_folder_loader_eval_values(tmp_path):
    write_folder(tmp_path / "val")
    loader = FolderLoader(tmp_path / "val", batch_size=4, size=32, resize=36, num_workers=0)
    assert (len(loader), loader.num_samples, loader.num_classes, loader.input_shape) == (3, 9, 3, (3, 32, 32))
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    folder = ImageFolder(tmp_path / "val", EvalTransform(36, 32))
    raw = torch.stack([folder[i][0] for i in range(9)]).float() / 255
    want = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and y.dtype == torch.int64


def test_folder_loader_train_resume_and_workers(tmp_path):
    write_folder(tmp_path / "train", per_class=4)
    make = lambda w: FolderLoader(tmp_path / "train", batch_size=5, train=True, size=16, seed=1, num_workers=w)
    ref = make(0)
    epochs = [list(ref), list(ref)]
    assert not torch.equal(torch.cat([y for _, y in epochs[0]]), torch.cat([y for _, y in epochs[1]]))
    resumed = make(0)
    tail = list(resumed.iter_from(1, 1))
    assert len(tail) == 2
    for (x, y), (rx, ry) in zip(tail, epochs[1][1:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    reseeded = make(0)
    reseeded.seed = 2  # a trainer sets each replicate's data seed after construction: order and crops follow
    other = FolderLoader(tmp_path / "train", batch_size=5, train=True, size=16, seed=2, num_workers=0)
    assert all(torch.equal(x, ox) for (x, _), (ox, _) in zip(reseeded, other))
    assert not torch.equal(next(iter(other))[0], epochs[0][0][0])
    with_workers = make(2)  # crops are seeded per (seed, epoch, index): same batches with worker processes
    for (x, y), (rx, ry) in zip(with_workers, epochs[0]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_load_imagenet_from_folder(tmp_path):
    write_folder(tmp_path / "imagenet" / "val", ext=".jpg")
    data = ld.load("imagenet", "val", root=tmp_path, batch_size=4, backend="folder", limit=6, num_workers=0,
                   channels_last=True)
    x, y = next(iter(data))
    assert x.shape == (4, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
    assert data.num_samples == 6 and len(data) == 2 and data.split == "test"
    with pytest.raises(ld.DataNotFoundError, match="train/<wnid>"):
        ld.load("imagenet", "train", root=tmp_path, backend="folder")
    with pytest.raises(ld.DataNotFoundError, match="val.beton"):
        ld.load("imagenet", "val", root=tmp_path, backend="ffcv")


# ---- CLI (no FFCV needed) ------------------------------------------------------------------------------------

def test_cli_list_and_info(tmp_path, capsys):
    assert cli.main(["list", "--json", "--root", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mnist"]["found"] == {"train": "missing", "test": "missing"}
    assert rows["digits"]["found"]["test"].startswith("bundled")
    assert cli.main(["info", "digits", "--load", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loaded_samples"] == 360 and info["first_batch_x"] == [256, 1, 8, 8]
    assert cli.main(["info", "cifar10", "--root", str(tmp_path), "--load"]) == 1
    assert "test_batch" in capsys.readouterr().err
    assert cli.main(["info", "svhn"]) == 1
    assert cli.main([]) == 2


def test_cli_add_parser_wires_into_a_parent():
    import argparse

    parser = argparse.ArgumentParser(prog="lerpfast")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["data", "write-ffcv", "cifar10", "out.beton", "--write-mode", "jpg",
                              "--max-resolution", "256", "--jpeg-quality", "85"])
    assert args.func is cli.run and args.data_cmd == "write-ffcv"
    assert (args.write_mode, args.max_resolution, args.jpeg_quality, args.split) == ("jpg", 256, 85, "train")


def test_workers_start_from_a_fork_server_once_compile_threads_exist(tmp_path, monkeypatch):
    """A process with background compile threads never forks DataLoader workers (a lock held by such a thread
    at fork time would hang the worker); before any exist, the default start method is kept."""
    from lerpfast.data import folder as folder_mod
    from lerpfast.engine import dispatch

    write_folder(tmp_path / "val", per_class=2)
    monkeypatch.setattr(dispatch, "_EXECUTOR", None)
    assert folder_mod._worker_context(2) is None and folder_mod._worker_context(0) is None
    ref = [y for _, y in FolderLoader(tmp_path / "val", batch_size=4, size=16, resize=20, num_workers=0)]
    dispatch._executor()  # what the first GPU sweep does
    assert folder_mod._worker_context(1) == "forkserver"
    got = [y for _, y in FolderLoader(tmp_path / "val", batch_size=4, size=16, resize=20, num_workers=1)]
    assert [t.tolist() for t in got] == [t.tolist() for t in ref]
