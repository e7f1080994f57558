"""Data for lerpfast: named data sets, device-resident batches, ImageFolder and FFCV loaders.

Quick start::

    import lerpfast.data as ld
    test = ld.load("fashion-mnist", "test", device="cuda", batch_size=10000)   # (x, y) batches, on the GPU
    train = ld.load("cifar10", "train", device="cuda", batch_size=128, train=True, seed=0)
    for x, y in train.iter_from(epoch=3, batch=17): ...                        # exact resume

See docs/data.md for where to put each data set and the FFCV commands. ``lerpfast.data.ffcv`` (FFCV .beton
writer and loaders) imports FFCV on first use and needs the ``ffcv`` extra; ``lerpfast.data.cli`` holds the
``lerpfast data ...`` commands.
"""

from lerpfast.data import ffcv  # FFCV itself is imported only when a .beton is written or read
from lerpfast.data.api import load
from lerpfast.data.device import DeviceLoader, epoch_generator
from lerpfast.data.folder import FolderLoader, ImageFolder
from lerpfast.data.readers import (
    next_token_pairs,
    read_arrays,
    read_cifar_batches,
    read_digits,
    read_idx,
    read_mnist5k,
    write_idx,
)
from lerpfast.data.registry import REGISTRY, DataNotFoundError, DatasetSpec, available, get_spec, resolve_root

__all__ = [
    "load",
    "available",
    "get_spec",
    "resolve_root",
    "REGISTRY",
    "DatasetSpec",
    "DataNotFoundError",
    "DeviceLoader",
    "FolderLoader",
    "ImageFolder",
    "ffcv",
    "epoch_generator",
    "read_arrays",
    "read_idx",
    "write_idx",
    "read_cifar_batches",
    "read_digits",
    "read_mnist5k",
    "next_token_pairs",
]
