"""FFCV .beton files: a writer for every lerpfast data set and loaders with ImageNet's pipelines.

FFCV is an optional extra (``pip install 'lerpfast[ffcv]'``, which builds against Debian's pkg-config,
libopencv-dev and libturbojpeg0-dev). It is imported on first use; without it every function here raises
:class:`FFCVNotInstalledError` naming the install command, and the rest of lerpfast is unaffected.

Layout of a lerpfast .beton: fields ``image`` (``RGBImageField``; grayscale sets are stored with the channel
repeated three times) and ``label`` (``IntField``), plus a sidecar ``<file>.beton.json`` with the data set's
name, split, classes, channels and normalization, so a loader needs nothing but the path.

Loaders decode on the CPU with FFCV's JIT-compiled threads (JPEG or raw), move uint8 ``(B, 3, H, W)``
channels_last batches to the device, and convert/normalize there with one torch multiply-add (a GPU kernel
on CUDA; no cupy needed, unlike FFCV's own ``NormalizeImage``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lerpfast.data.registry import canonical_split, get_spec, resolve_root

__all__ = ["FFCVNotInstalledError", "FFCVLoader", "write_beton", "make_loader", "read_meta", "require_ffcv"]

INSTALL_HINT = ("pip install 'lerpfast[ffcv]'  (on Debian/Ubuntu first: apt-get install pkg-config libopencv-dev "
                "libturbojpeg0-dev)")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")


class FFCVNotInstalledError(ImportError):
    """FFCV (the ``ffcv`` extra) is needed for .beton files but is not importable."""


def require_ffcv():
    """Import and return the ``ffcv`` module, or raise :class:`FFCVNotInstalledError` with the install command."""
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        import ffcv.writer  # noqa: F401
    except ImportError as e:  # ffcv itself, or one of its compiled parts / dependencies
        raise FFCVNotInstalledError(f"FFCV is needed for .beton files but cannot be imported ({e}). "
                                    f"Install it with: {INSTALL_HINT}") from e
    return ffcv


def _meta_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def read_meta(path: str | os.PathLike) -> dict:
    """The sidecar metadata written next to a .beton by :func:`write_beton` (``{}`` if there is none)."""
    p = _meta_path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


# ---- sources ---------------------------------------------------------------------------------------------------

class _ArraySource:
    """(N, C, H, W) uint8 arrays -> (H, W, 3) uint8 images for FFCV's RGBImageField."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return _as_hwc3(self.images[i], chw=True), int(self.labels[i])


class _GenericSource:
    """Any indexable of (image, label): PIL images, (H, W[, C]) numpy arrays or (C, H, W) uint8 tensors."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        if isinstance(image, torch.Tensor):
            return _as_hwc3(image.cpu().numpy(), chw=True), int(label)
        return _as_hwc3(np.asarray(image), chw=False), int(label)


def _as_hwc3(image: np.ndarray, chw: bool) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"write_beton: images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    elif chw:
        image = image.transpose(1, 2, 0)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[2] != 3:
        raise ValueError(f"write_beton: images need 1 or 3 channels, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _resolve_source(dataset_or_name: Any, split: str, root, limit: int | None) -> tuple[Any, dict]:
    """Return (indexable of (HWC uint8, label), metadata) for a name, an ImageFolder path or a dataset."""
    meta: dict = {}
    is_name = False
    if isinstance(dataset_or_name, str):
        try:
            get_spec(dataset_or_name)
            is_name = True
        except KeyError:
            if not Path(dataset_or_name).is_dir():
                raise
    if not is_name and isinstance(dataset_or_name, str | os.PathLike) and Path(dataset_or_name).is_dir():
        from lerpfast.data.folder import ImageFolder

        folder = ImageFolder(dataset_or_name)
        meta.update(name=Path(dataset_or_name).name, classes=folder.classes, num_classes=folder.num_classes,
                    channels=3, source=str(Path(dataset_or_name).resolve()))
        src: Any = _GenericSource(folder, len(folder))
    elif is_name:
        spec = get_spec(dataset_or_name)
        split = canonical_split(split)
        meta.update(name=spec.name, split=split, num_classes=spec.num_classes, channels=spec.input_shape[0],
                    mean=list(spec.mean), std=list(spec.std), max_value=spec.max_value)
        if spec.name == "imagenet":
            from lerpfast.data.folder import ImageFolder
            from lerpfast.data.registry import missing_error

            folder_path = resolve_root(root) / spec.subdir / ("train" if split == "train" else "val")
            if not folder_path.is_dir():
                raise missing_error(spec, split, [folder_path.parent], [f"{folder_path.name}/<wnid>/*.JPEG"])
            folder = ImageFolder(folder_path)
            meta.update(classes=folder.classes, source=str(folder_path))
            src = _GenericSource(folder, len(folder))
        else:
            from lerpfast.data.readers import read_arrays

            images, labels = read_arrays(spec.name, split, root)
            src = _ArraySource(images, labels)
    else:
        src = _GenericSource(dataset_or_name, len(dataset_or_name))
        for key in ("classes", "num_classes", "mean", "std", "name"):
            if hasattr(dataset_or_name, key):
                meta[key] = getattr(dataset_or_name, key)
    n = len(src) if limit is None else min(limit, len(src))
    if isinstance(src, _ArraySource):
        src = _ArraySource(src.images[:n], src.labels[:n])
    else:
        src.n = n
    meta["num_samples"] = n
    return src, meta


def write_beton(dataset_or_name: Any, path: str | os.PathLike, *, max_resolution: int | None = None,
                jpeg_quality: int = 90, write_mode: str = "raw", num_workers: int | None = None, split: str = "train",
                root: str | os.PathLike | None = None, limit: int | None = None, compress_probability: float = 0.5,
                smart_threshold: int | None = None, chunksize: int = 100) -> Path:
    """Write a data set to an FFCV .beton file (and its ``.beton.json`` sidecar).

    Parameters
    ----------
    dataset_or_name : str, PathLike or indexable
        A registry name (``"cifar10"``, ``"fashion-mnist"``, ``"imagenet"``, ... read from ``root``), an
        ImageFolder directory (``dir/<class>/*.JPEG``), or any object with ``len()`` and ``[i] -> (image, label)``
        where ``image`` is a PIL image, an ``(H, W)``/``(H, W, C)`` uint8 array or a ``(C, H, W)`` uint8 tensor.
        Grayscale images are stored as RGB (channel repeated).
    path : str or PathLike
        Output file (conventionally ``*.beton``).
    max_resolution : int, optional
        Downscale (cv2 INTER_AREA) images whose longer side exceeds this; ImageNet is usually written at 256-512.
    jpeg_quality : int
        JPEG quality for ``jpg``/``smart``/``proportion`` modes.
    write_mode : {"raw", "jpg", "smart", "proportion"}
        ``raw`` stores uint8 pixels (bit-exact); ``jpg`` JPEG-compresses every image; ``smart`` compresses images
        larger than ``smart_threshold`` bytes; ``proportion`` compresses a random ``compress_probability`` share.
    num_workers : int, optional
        Writer processes (default: the usable cores, at most 8).
    split : str
        Split of a registry name.
    root : str or PathLike, optional
        Data root for a registry name.
    limit : int, optional
        Write only the first ``limit`` samples.
    compress_probability, smart_threshold : float, int
        See ``write_mode``.
    chunksize : int
        Samples per writer task.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FFCVNotInstalledError
        Without FFCV.
    DataNotFoundError
        If a registry data set's files are missing.
    """
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from lerpfast.data.folder import default_workers

    src, meta = _resolve_source(dataset_or_name, split, root, limit)
    if meta["num_samples"] == 0:
        raise ValueError("write_beton: the data set is empty")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if num_workers is None else max(1, int(num_workers))
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=int(jpeg_quality),
                               smart_threshold=smart_threshold, compress_probability=compress_probability),
        "label": IntField(),
    }
    writer = DatasetWriter(str(path), fields, num_workers=workers)
    writer.from_indexed_dataset(src, chunksize=chunksize)
    from lerpfast._version import __version__

    meta.update(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=int(jpeg_quality),
                lerpfast_version=__version__, format="lerpfast-beton-1")
    _meta_path(path).write_text(json.dumps(meta, indent=1))
    return path


# ---- loading ---------------------------------------------------------------------------------------------------

def _image_sizes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from ffcv.reader import Reader

    reader = Reader(str(path))
    fix = reader.field_names.index("image")
    md = reader.metadata[f"f{fix}"]
    return np.asarray(md["height"]), np.asarray(md["width"])


class FFCVLoader:
    """Batches ``(x, y)`` from an FFCV .beton, normalized on ``device``; see :func:`make_loader`.

    Attributes ``num_samples``, ``num_classes``, ``input_shape``, ``name``, ``split``, ``decoder`` and ``loader`` (the
    underlying ``ffcv.loader.Loader``). ``iter()`` yields the next epoch; ``iter_from(epoch, batch)`` yields epoch
    ``epoch`` from batch ``batch`` on. The sample order of an epoch depends only on ``(seed, epoch)``; FFCV's random
    crops and flips are drawn inside its JIT threads and are not reproducible across runs.
    """

    def __init__(self, loader: Any, *, device: torch.device, channels: int, mean: Sequence[float],
                 std: Sequence[float], max_value: int, channels_last: bool, dtype: torch.dtype, num_samples: int,
                 num_classes: int | None, input_shape: tuple[int, int, int], name: str, split: str,
                 decoder: str) -> None:
        self.loader, self.device, self.channels = loader, device, channels
        self.mean, self.std, self.max_value = tuple(mean), tuple(std), max_value
        std_t = torch.tensor(self.std, dtype=torch.float64)
        self._scale = (1.0 / (max_value * std_t)).float().view(1, -1, 1, 1).to(device)
        self._shift = (-torch.tensor(self.mean, dtype=torch.float64) / std_t).float().view(1, -1, 1, 1).to(device)
        self.channels_last, self.dtype = channels_last, dtype
        self.num_samples, self.num_classes, self.input_shape = num_samples, num_classes, input_shape
        self.name, self.split, self.decoder = name, split, decoder
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def seed(self) -> int:
        """Order seed (epoch ``e`` is a permutation drawn from ``seed + e``); writable."""
        return int(self.loader.seed)

    @seed.setter
    def seed(self, value: int) -> None:
        self.loader.seed = int(value)
        self.loader.traversal_order.seed = int(value)  # FFCV's order object keeps its own copy

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` yields."""
        return int(self.loader.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch``."""
        self.loader.next_epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield epoch ``epoch`` from batch index ``batch`` on (the skipped batches are decoded and dropped)."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch must be in [0, {len(self)}], got {batch}")
        self.loader.next_epoch = int(epoch)
        return self._generate(iter(self.loader), int(batch))

    def _generate(self, it, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(it):
            if i < skip:
                continue
            # x: (B, 3, H, W) uint8, channels_last, on self.device; FFCV reuses its buffers, so copy out now.
            if self.channels == 1:
                x = x[:, :1]
            out = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
            if self.dtype != torch.float32:
                out = out.to(self.dtype)
            out = out.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield out, y.to(torch.int64).clone().view(-1)

    def raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the decoded uint8 ``(B, 3, H, W)`` batches and labels as FFCV returns them (copied)."""
        for x, y in self.loader:
            yield x.clone(), y.to(torch.int64).clone().view(-1)


def make_loader(path: str | os.PathLike, *, batch_size: int = 256, train: bool = False,
                device: str | torch.device = "cpu", shuffle: bool | None = None, seed: int = 0,
                num_workers: int | None = None, drop_last: bool = False, limit: int | None = None,
                resolution: int | None = None, decoder: str = "auto", crop_ratio: float = 224 / 256,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, max_value: int | None = None,
                channels_last: bool = True, dtype: torch.dtype = torch.float32, os_cache: bool = True,
                name: str | None = None, split: str | None = None, num_classes: int | None = None,
                batches_ahead: int = 2) -> FFCVLoader:
    """FFCV loader of a .beton with ImageNet's train or eval pipeline, normalized on ``device``.

    Parameters
    ----------
    path : str or PathLike
        The .beton (its ``.json`` sidecar, when present, supplies name, classes, channels and normalization).
    batch_size : int
        Samples per batch.
    train : bool
        Train pipeline: RandomResizedCrop(``resolution``, scale 0.08-1, aspect 3/4-4/3) + horizontal flip
        (constant-size small images, e.g. CIFAR: flip + 4-pixel random translation). Eval: center crop of
        ``crop_ratio`` times the shorter side resized to ``resolution`` (224/256: ImageNet's resize 256, crop 224).
    device : str or torch.device
        Where batches go and are normalized (on CUDA the uint8 batch is copied non-blocking, then normalized by the
        GPU).
    shuffle : bool, optional
        Random order per epoch (default ``train``); seeded by ``seed`` and the epoch.
    seed : int
        Order seed.
    num_workers : int, optional
        FFCV decoding threads (default: usable cores, at most 8).
    drop_last : bool
        Drop the last incomplete batch.
    limit : int, optional
        Use only the first ``limit`` samples.
    resolution : int, optional
        Output side. Default: 224 for variable-size images, the stored size for constant-size ones.
    decoder : {"auto", "simple", "center_crop", "random_resized_crop"}
        ``simple`` returns images as stored (constant size only; bit-exact for raw). ``auto``: ``simple`` when all
        images have one size and ``resolution`` is unset or equal to it, else the ImageNet pipeline.
    crop_ratio : float
        Eval crop side / shorter image side.
    mean, std, max_value : optional
        Normalization (default: sidecar, else ImageNet's).
    channels_last : bool
        Return ``x`` in channels_last memory format (FFCV's native layout; no copy).
    dtype : torch.dtype
        dtype of ``x``.
    os_cache : bool
        Let the OS page cache hold the file (best when it fits in RAM).
    name, split, num_classes : optional
        Override the sidecar's values.
    batches_ahead : int
        Batches FFCV prepares in advance.

    Returns
    -------
    FFCVLoader
        Re-iterable of ``(x, y)``.
    """
    require_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import (
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
        SimpleRGBImageDecoder,
    )
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

    from lerpfast.data.folder import default_workers

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .beton at {path}; write one with `lerpfast data write-ffcv NAME {path}`")
    meta = read_meta(path)
    heights, widths = _image_sizes(path)
    n_total = len(heights)
    n = n_total if limit is None else min(int(limit), n_total)
    constant = bool((heights[:n] == heights[0]).all() and (widths[:n] == widths[0]).all())
    if decoder == "auto":
        if constant and (resolution is None or (resolution == heights[0] == widths[0])):
            decoder = "simple"
        else:
            decoder = "random_resized_crop" if train else "center_crop"
    if decoder not in ("simple", "center_crop", "random_resized_crop"):
        raise ValueError(f"unknown decoder {decoder!r}")
    if decoder == "simple" and not constant:
        raise ValueError(f"{path}: images differ in size; use decoder='center_crop' or 'random_resized_crop'")
    dev = torch.device(device)
    if decoder == "simple":
        res_hw = (int(heights[0]), int(widths[0]))
        img_ops: list = [SimpleRGBImageDecoder()]
        if train:  # small constant-size images (CIFAR): the standard flip + 4-pixel translation
            img_ops += [RandomHorizontalFlip(), RandomTranslate(padding=4)]
    else:
        side = int(resolution or 224)
        res_hw = (side, side)
        if decoder == "random_resized_crop":
            img_ops = [RandomResizedCropRGBImageDecoder(res_hw), RandomHorizontalFlip()]
        else:
            img_ops = [CenterCropRGBImageDecoder(res_hw, ratio=crop_ratio)]
    img_ops += [ToTensor(), ToDevice(dev, non_blocking=True), ToTorchImage(channels_last=True)]
    label_ops = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(dev, non_blocking=True)]
    shuffle = train if shuffle is None else shuffle
    loader = Loader(str(path), batch_size=int(batch_size),
                    num_workers=default_workers() if num_workers is None else int(num_workers),
                    os_cache=os_cache, order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
                    seed=int(seed), indices=None if n == n_total else np.arange(n), drop_last=drop_last,
                    pipelines={"image": img_ops, "label": label_ops}, batches_ahead=batches_ahead)
    channels = int(meta.get("channels", 3))
    mean = tuple(mean if mean is not None else meta.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std if std is not None else meta.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} channels, got {len(mean)}/{len(std)}")
    return FFCVLoader(
        loader, device=dev, channels=channels, mean=mean, std=std,
        max_value=int(max_value if max_value is not None else meta.get("max_value", 255)),
        channels_last=channels_last, dtype=dtype, num_samples=n,
        num_classes=num_classes if num_classes is not None else meta.get("num_classes"),
        input_shape=(channels, *res_hw), name=name or meta.get("name", path.stem),
        split=split or meta.get("split", ""), decoder=decoder,
    )
