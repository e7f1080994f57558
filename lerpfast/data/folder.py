"""ImageFolder data (ImageNet layout) read with PIL and batched by a torch DataLoader.

The pipeline is torchvision's, written with PIL + numpy (torchvision is not a dependency): evaluation
resizes the shorter side to 256 (bilinear) and center-crops 224; training takes a RandomResizedCrop
(scale 0.08-1, aspect 3/4-4/3) resized to 224 and flips with probability 1/2. Workers return uint8
``(3, H, W)`` tensors; conversion to float and normalization happen on the target device, so a GPU
receives a quarter of the bytes. The random crop of sample ``i`` in epoch ``e`` is drawn from
``numpy.random.default_rng([seed, e, i])``: batches do not depend on the number of workers, and
:meth:`FolderLoader.iter_from` resumes exactly.

This is the fallback for ImageNet; the fast path is an FFCV .beton (:mod:`lerpfast.data.ffcv`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lerpfast.data.device import epoch_generator

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolder",
    "FolderLoader",
    "EvalTransform",
    "TrainTransform",
    "resize_shorter",
    "center_crop",
    "random_resized_crop_box",
    "default_workers",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def default_workers() -> int:
    """Decoding processes used when ``num_workers`` is not given: the usable cores, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class ImageFolder:
    """Images in ``root/<class>/<file>`` with labels from the sorted class directory names.

    Parameters
    ----------
    root : str or Path
        Directory with one sub-directory per class.
    transform : callable, optional
        ``transform(image: PIL.Image (RGB), index: int) -> Any``; by default the image comes back as a numpy
        uint8 ``(H, W, 3)`` array (what :func:`lerpfast.data.ffcv.write_beton` stores).

    Attributes
    ----------
    classes : list of str
        Class directory names, sorted; label ``k`` is ``classes[k]``.
    samples : list of (Path, int)
        Every image file with its label, sorted by class then file name.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"ImageFolder: no class directories in {self.root} "
                                    f"(expected {self.root}/<class>/*.JPEG)")
        self.samples: list[tuple[Path, int]] = []
        for k, c in enumerate(self.classes):
            files = sorted(p for p in (self.root / c).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            self.samples.extend((p, k) for p in files)
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder: no images ({', '.join(IMG_EXTENSIONS)}) below {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        """Number of class directories."""
        return len(self.classes)

    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` as an RGB PIL image."""
        with Image.open(self.samples[index][0]) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int):
        image = self.load_image(index)
        label = self.samples[index][1]
        if self.transform is None:
            return np.asarray(image, dtype=np.uint8), label
        return self.transform(image, index), label


# ---- transforms (PIL + numpy) ----------------------------------------------------------------------------------

def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bilinear, antialiased as PIL does), keeping the aspect ratio."""
    w, h = image.size
    if min(w, h) == size:
        return image
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image.resize(new, Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size x size`` square (torchvision's rounding of the offsets)."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop box ``(top, left, h, w)``: area fraction in ``scale``, log-uniform aspect ``ratio``.

    Ten tries, then the central crop clamped to ``ratio`` (the rule torchvision and FFCV both use).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_chw_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())  # (3, H, W)


class EvalTransform:
    """Resize the shorter side to ``resize``, center-crop ``crop``; return uint8 ``(3, crop, crop)``."""

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        self.resize, self.crop = resize, crop

    def __call__(self, image: Image.Image, index: int = 0) -> torch.Tensor:
        return _to_chw_uint8(center_crop(resize_shorter(image, self.resize), self.crop))


class TrainTransform:
    """RandomResizedCrop to ``size`` and a horizontal flip with probability 1/2; uint8 ``(3, size, size)``.

    Sample ``index`` of epoch ``epoch`` draws from ``numpy.random.default_rng([seed, epoch, index])``.
    """

    def __init__(self, size: int = 224, seed: int = 0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.seed, self.epoch, self.scale, self.ratio = size, seed, 0, scale, ratio

    def __call__(self, image: Image.Image, index: int = 0) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        top, left, h, w = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        out = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_chw_uint8(out)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, folder: ImageFolder, n: int) -> None:
        self.folder, self.n = folder, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.folder[index]


def _worker_context(num_workers: int) -> str | None:
    """How DataLoader workers are started: ``forkserver`` once lerpfast's kernel-compile threads exist.

    Forking copies only the calling thread; a lock another thread held at that instant (Python's import lock
    while a background compile imports a module, say) stays locked in the child forever, and the worker hangs
    at its first lazy import (PIL loads its decoders on first use). Workers started from a fork server never
    inherit those threads. Before any compile thread exists, the platform's default (fork on Linux, cheapest).
    """
    if num_workers <= 0:
        return None
    from lerpfast.engine import dispatch

    return "forkserver" if dispatch.compile_threads_started() else None


class FolderLoader:
    """Batches ``(x, y)`` of an :class:`ImageFolder` from a torch DataLoader, normalized on ``device``.

    Parameters
    ----------
    root : str or Path
        ``root/<class>/*.JPEG``.
    batch_size : int
        Samples per batch.
    train : bool
        RandomResizedCrop(``size``) + flip, else resize(``resize``) + center crop(``size``).
    shuffle : bool, optional
        Default: ``train``.
    seed : int
        Seed of the order (per epoch, :func:`~lerpfast.data.device.epoch_generator`) and of the crops.
    limit : int, optional
        First ``limit`` images (in class/file order).
    drop_last : bool
        Drop the last incomplete batch.
    num_workers : int, optional
        DataLoader processes (default :func:`default_workers`; 0 decodes in this process).
    device : str or torch.device
        Where ``x`` is converted to float and normalized.
    mean, std : sequence of float
        Normalization on the [0, 1] scale (ImageNet's by default).
    size, resize : int
        Output side and the evaluation resize of the shorter side.
    channels_last : bool
        Return ``x`` in ``torch.channels_last`` memory format.
    name, split : str
        Recorded for sweeps' metadata.
    """

    def __init__(self, root: str | Path, *, batch_size: int = 256, train: bool = False, shuffle: bool | None = None,
                 seed: int = 0, limit: int | None = None, drop_last: bool = False, num_workers: int | None = None,
                 device: str | torch.device = "cpu", mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), size: int = 224, resize: int = 256,
                 channels_last: bool = False, name: str = "imagenet", split: str = "") -> None:
        self.transform = TrainTransform(size, seed) if train else EvalTransform(resize, size)
        self.folder = ImageFolder(root, self.transform)
        self.batch_size, self.train, self.drop_last = int(batch_size), train, drop_last
        self.seed = int(seed)
        self.shuffle = train if shuffle is None else bool(shuffle)
        self._n = min(len(self.folder), limit) if limit is not None else len(self.folder)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_t)).float().view(1, 3, 1, 1).to(self.device)
        self._shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).float().view(1, 3, 1, 1).to(self.device)
        self.channels_last = channels_last
        self.name, self.split = name, split
        self.num_classes = self.folder.num_classes
        self.input_shape = (3, size, size)
        self.epoch = 0

    @property
    def seed(self) -> int:
        """Seed of the order and the crops; writable (a trainer sets each replicate's data seed)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)
        if isinstance(self.transform, TrainTransform):
            self.transform.seed = self._seed

    @property
    def num_samples(self) -> int:
        """Number of images (``limit`` applied)."""
        return self._n

    @property
    def classes(self) -> list[str]:
        """Class directory names; label ``k`` is ``classes[k]``."""
        return self.folder.classes

    def __len__(self) -> int:
        n, b = self._n, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield epoch ``epoch`` from batch index ``batch`` on (the same batches as an uninterrupted run)."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch must be in [0, {len(self)}], got {batch}")
        self.epoch = int(epoch) + 1
        return self._generate(int(epoch), int(batch))

    def _generate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.transform, TrainTransform):
            self.transform.epoch = epoch  # workers are started below, after this, so they see the epoch
        order = torch.randperm(self._n, generator=epoch_generator(self.seed, epoch)) if self.shuffle \
            else torch.arange(self._n)
        order = order[start * self.batch_size:].tolist()
        loader = torch.utils.data.DataLoader(
            _Subset(self.folder, self._n), batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
            drop_last=self.drop_last, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.num_workers > 0 else None,
            multiprocessing_context=_worker_context(self.num_workers),
        )
        for x, y in loader:  # x: (B, 3, H, W) uint8
            x = x.to(self.device, non_blocking=True)
            out = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, y.to(self.device, non_blocking=True)
