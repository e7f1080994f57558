"""HDF5 result store: many named sweeps per file, resumable, crash-safe, followable while it runs.

Layout of one file (h5py, ``libver="latest"`` so readers can follow with SWMR)::

    /<sweep name>/                 group, attrs = everything that reproduces the sweep
        coords        (K, D) float64   user coordinates of the K points (alpha, or (x, y), ...)
        done          (K,)   uint8     1 once point k's metrics are written
        metrics/<m>   (K,)   float64   per-point metric, NaN until computed

Why a ``done`` mask next to the NaN fill: a computed loss can itself be NaN or inf (a line extrapolated
to alpha = 10 diverges), and a NaN-only test would recompute such points on every resume, forever.

Concurrency and crashes
-----------------------
* One writer per file. The writer holds an open-file-description lock (``F_OFD_SETLK``) on the file
  for its whole life; a second writer gets :class:`StoreBusyError` naming the file. HDF5's own
  ``flock`` is not used for this because a SWMR writer gives it up as soon as it enters SWMR mode.
* Every :meth:`SweepHandle.write` ends with a flush, so a SIGKILL loses at most the chunk in flight.
  A killed writer leaves HDF5's "file open for write" flags in the superblock; the next lerpfast
  writer, holding the lock (so no other lerpfast writer is live) and finding no HDF5 ``flock`` on the
  file, clears those flags itself (what ``h5clear -s`` does) and carries on.
* Readers (``mode="r"``) open the file per call in SWMR-read mode, so ``lerpfast show`` and
  :meth:`ResultStore.read` see a running sweep's progress. SWMR forbids creating objects, so the writer
  leaves SWMR mode (close + reopen) just long enough to create a new sweep's datasets.
* A file that is not HDF5, or whose HDF5 structure is damaged, raises :class:`StoreCorruptError`
  naming the file; the store never deletes, renames or rewrites a file it cannot read.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "ResultStore",
    "SweepHandle",
    "StoreError",
    "StoreBusyError",
    "StoreCorruptError",
    "DamagedPointsError",
    "SweepMismatchError",
    "sweep_fingerprint",
    "VOLATILE_ATTRS",
]

STORE_FORMAT = 1  # bump when the on-disk layout changes

# Attributes that describe *where and when* a sweep ran, not *what* it computes: resuming on another
# device or with a newer lerpfast continues the same sweep.
VOLATILE_ATTRS = frozenset({
    "time", "created", "device", "host", "hostname", "lerpfast_version", "torch_version", "versions",
    "fingerprint", "backend", "dispatch", "module_paths", "elapsed_s", "points_per_pass", "batch_size",
    "num_workers", "checkpoint_paths", "probe",
})

_RESERVED = ("lerpfast_sweep", "lerpfast_store_format", "coord_names", "metric_names", "grid_shape",
             "_json_keys", "created")


class StoreError(Exception):
    """Base class of result-store errors; ``path`` is the file concerned."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class StoreBusyError(StoreError):
    """Another process is writing the file."""


class StoreCorruptError(StoreError):
    """The file is not a readable HDF5 result store."""


class DamagedPointsError(StoreCorruptError):
    """Checksums of stored values failed: ``damaged`` maps sweep name -> sorted point indices that are unreadable.

    The rest of the file is intact; ``ResultStore.repair()`` (``sweep(..., repair=True)``, ``lerpfast repair FILE``)
    marks exactly those points as not computed, so the next run of the sweep recomputes them.
    """

    def __init__(self, message: str, path, damaged: dict[str, list[int]]):
        super().__init__(message, path)
        self.damaged = damaged


class SweepMismatchError(StoreError):
    """A different sweep already exists under the requested name."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, name: str = "",
                 fields: Sequence[str] = ()):
        super().__init__(message, path)
        self.name = name
        self.fields = list(fields)


# --------------------------------------------------------------------------------------------------
# attrs <-> HDF5


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _write_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    json_keys = []
    for key, value in attrs.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, np.generic):
            value = value.item()
        # exact base types: h5py cannot convert subclasses such as torch's TorchVersion (a str)
        if isinstance(value, bool):
            obj.attrs[key] = bool(value)
        elif isinstance(value, str):
            obj.attrs[key] = str(value)
        elif isinstance(value, int):
            obj.attrs[key] = int(value)
        elif isinstance(value, float):
            obj.attrs[key] = float(value)
        else:
            obj.attrs[key] = json.dumps(_jsonable(value), sort_keys=True)
            json_keys.append(key)
    obj.attrs["_json_keys"] = json.dumps(json_keys)


def _read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    json_keys = set(json.loads(obj.attrs.get("_json_keys", "[]")))
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if key == "_json_keys":
            continue
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if key in json_keys or key in ("coord_names", "metric_names", "grid_shape"):
            value = json.loads(value)
        out[key] = value
    return out


def sweep_fingerprint(coords: np.ndarray, coord_names: Sequence[str], metric_names: Sequence[str],
                      attrs: Mapping[str, Any], grid_shape: Sequence[int] | None = None) -> str:
    """Hash of everything that decides a sweep's numbers (not where or when it ran).

    Parameters
    ----------
    coords : ndarray, shape (K, D)
        Coordinates of the points.
    coord_names, metric_names : sequence of str
        Names of the coordinate columns and of the metrics.
    attrs : mapping
        The sweep's attributes; keys in :data:`VOLATILE_ATTRS` are ignored.
    grid_shape : sequence of int, optional
        Grid shape of a plane.

    Returns
    -------
    str
        A sha256 hex digest.
    """
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    ident = {k: _jsonable(v) for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    h = hashlib.sha256()
    h.update(json.dumps({"coord_names": list(coord_names), "metric_names": list(metric_names),
                         "grid_shape": None if grid_shape is None else list(grid_shape),
                         "shape": list(coords.shape), "attrs": ident}, sort_keys=True).encode())
    h.update(coords.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# file-level helpers: locking, stale-flag recovery, error classification


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum HDF5 puts on version-2/3 superblocks."""
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & mask
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & mask
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & mask
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & mask
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702 - the mix, one line a step
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
        i += 12
    tail = data[i:]
    if not tail:
        return c
    tail = tail + bytes(12 - len(tail))
    a = (a + int.from_bytes(tail[0:4], "little")) & mask
    b = (b + int.from_bytes(tail[4:8], "little")) & mask
    c = (c + int.from_bytes(tail[8:12], "little")) & mask
    c ^= b; c = (c - rot(b, 14)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & mask  # noqa: E702
    return c


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _clear_status_flags(fd: int) -> bool:
    """Zero the "open for write / SWMR write" flags of a version-3 superblock (``h5clear -s``).

    Only called while this process holds the writer lock and no HDF5 ``flock`` is held on the file,
    i.e. when the flags can only have been left by a writer that died. Returns False (and changes
    nothing) when no version-3 superblock with a valid checksum is found.
    """
    size = os.fstat(fd).st_size
    offset = 0
    while offset + 12 <= size:  # the superblock sits at 0, 512, 1024, 2048, ... (after a user block)
        head = os.pread(fd, 12, offset)
        if head[:8] == _SIGNATURE:
            version, size_of_offsets = head[8], head[9]
            if version < 2:
                return False
            end = 12 + 4 * size_of_offsets
            raw = bytearray(os.pread(fd, end + 4, offset))
            if len(raw) < end + 4 or int.from_bytes(raw[end:end + 4], "little") != _lookup3(bytes(raw[:end])):
                return False
            if raw[11] == 0:
                return True
            raw[11] = 0
            raw[end:end + 4] = _lookup3(bytes(raw[:end])).to_bytes(4, "little")
            os.pwrite(fd, bytes(raw), offset)
            os.fsync(fd)
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


def _superblock_eof(path: Path) -> int | None:
    """End-of-file address stored in a version-2/3 superblock at offset 0, or None."""
    with open(path, "rb") as f:
        head = f.read(12 + 4 * 8)
    if len(head) < 12 or head[:8] != _SIGNATURE or head[8] < 2:
        return None
    o = head[9]
    if len(head) < 12 + 3 * o:
        return None
    return int.from_bytes(head[12 + 2 * o:12 + 3 * o], "little")


def _lock_fd(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on ``fd``; False when another holder has it.

    Open-file-description locks (Linux >= 3.15) belong to this descriptor only: unlike POSIX
    ``lockf`` locks they are not dropped when h5py closes its own descriptor of the same file, and
    they live in a different table from the ``flock`` locks HDF5 takes, so the two never collide.
    """
    ofd = getattr(fcntl, "F_OFD_SETLK", None)
    try:
        if ofd is not None:
            # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid;} padded to 32 bytes
            lock = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            fcntl.fcntl(fd, ofd, lock)
        else:  # pragma: no cover - non-Linux fallback
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if e.errno == errno.EINVAL and ofd is not None:  # pragma: no cover - kernel without OFD locks
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        raise
    return True


def _hdf5_flock_held(fd: int) -> bool:
    """True when some process (a non-lerpfast HDF5 writer) holds a ``flock`` on the file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _is_open_for_write_error(e: BaseException) -> bool:
    return "already open for" in str(e)


def _corrupt(path: Path, e: BaseException | None = None, what: str = "") -> StoreCorruptError:
    why = what or (str(e).split("(")[0].strip() if e is not None else "unreadable")
    return StoreCorruptError(
        f"{path}: not a readable lerpfast result store ({why}). The file was left as it is; "
        f"move it aside or choose another --store path.", path)


def _os_error(path: Path, e: OSError) -> StoreError:
    """A file-system refusal as a StoreError naming the store and the cause."""
    if e.errno == errno.ENOSPC:
        why = "no space left on the device: free some space (the finished sweeps are intact) and run again"
    elif e.errno == errno.EROFS:
        why = "read-only file system: choose a --store path on a writable disk"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST) and not path.parent.is_dir():
        why = f"{path.parent} is not a folder (a file is in the way)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = e.strerror or str(e)
    return StoreError(f"{path}: cannot create or open the result store ({why})", path)


def _is_space_error(e: BaseException) -> bool:
    """True for an HDF5 / OS error caused by a full disk (HDF5 reports the errno inside its message)."""
    text = str(e)
    return (getattr(e, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text
            or "slist already enabled" in text or "len not positive after adjustment for EOA" in text)


def _sweep_bytes(k: int, d: int, n_metrics: int, attrs: Mapping[str, Any]) -> int:
    """A generous estimate of what creating a sweep adds to the file: its chunks (allocated whole), twice, plus
    the attributes and 64 KiB of HDF5 metadata (object headers, chunk indexes, free-space bookkeeping)."""
    points = -(-max(k, 1) // CHUNK_POINTS) * CHUNK_POINTS if k > CHUNK_POINTS else max(k, 1)
    data = points * (8 * d + 1 + 8 * n_metrics)
    return 2 * data + len(json.dumps(attrs, default=str)) + 65536


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"sweep name must be a non-empty string without '/', got {name!r}")
    return name


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------


class SweepHandle:
    """Write access to one sweep of a :class:`ResultStore` (returned by :meth:`ResultStore.open_sweep`).

    Attributes
    ----------
    name : str
        The sweep's name in the file.
    coords : ndarray, shape (K, D)
        Coordinates of the points.
    coord_names, metric_names : list of str
        Coordinate column names and metric names.
    created : bool
        True when this call created the sweep, False when it resumed an existing one.
    """

    def __init__(self, store: ResultStore, name: str, created: bool):
        self._store = store
        self.name = name
        self.created = created
        group = self._group
        self.coords = np.asarray(group["coords"][...])
        attrs = _read_attrs(group)
        self.coord_names = list(attrs["coord_names"])
        self.metric_names = list(attrs["metric_names"])

    @property
    def _group(self) -> h5py.Group:
        # Looked up on every call: the store reopens its h5py.File when a new sweep is added.
        return self._store._file()[self.name]

    @property
    def K(self) -> int:  # noqa: N802 - the number of points, as everywhere in lerpfast
        return int(self.coords.shape[0])

    def done_mask(self) -> np.ndarray:
        """Boolean (K,) mask of the points whose metrics are written."""
        return np.asarray(self._group["done"][...], dtype=bool)

    def missing(self) -> np.ndarray:
        """Indices (int64, ascending) of the points not yet computed."""
        return np.flatnonzero(~self.done_mask()).astype(np.int64)

    def progress(self) -> tuple[int, int]:
        """``(done, total)`` point counts."""
        done = self.done_mask()
        return int(done.sum()), int(done.size)

    def write(self, indices: Sequence[int] | np.ndarray, metrics: Mapping[str, np.ndarray]) -> None:
        """Write the metrics of some points and flush them to disk.

        Parameters
        ----------
        indices : array-like of int, shape (n,)
            Point indices in ``[0, K)``, any order, no repeats.
        metrics : mapping of str to array-like, shape (n,)
            One value per index for some or all metrics of the sweep (``metric_names``); a metric left
            out stays NaN at these points (e.g. top-5 error with fewer than 5 classes).

        Notes
        -----
        Metrics go to disk first, then the ``done`` flags, then a flush: a SIGKILL in between leaves
        the points marked missing, so they are recomputed, never half-recorded.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.K:
            raise IndexError(f"sweep {self.name!r}: point indices must lie in [0, {self.K}), "
                             f"got {idx.min()}..{idx.max()}")
        unknown = set(metrics) - set(self.metric_names)
        if unknown or not metrics:
            raise ValueError(f"sweep {self.name!r} records metrics {self.metric_names}; write() got {sorted(metrics)}")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        if np.any(np.diff(sidx) == 0):
            raise ValueError(f"sweep {self.name!r}: repeated point indices in write()")
        # A contiguous run (the common case: one chunk of points) is one hyperslab, not n point selections.
        contiguous = sidx[-1] - sidx[0] + 1 == sidx.size
        sel: slice | np.ndarray = slice(int(sidx[0]), int(sidx[-1]) + 1) if contiguous else sidx
        group = self._group
        for key in metrics:
            values = np.asarray(metrics[key], dtype=np.float64).reshape(-1)
            if values.shape != idx.shape:
                raise ValueError(f"sweep {self.name!r}: metric {key!r} has {values.size} values for {idx.size} indices")
            group["metrics"][key][sel] = values[order]
        group["done"][sel] = np.ones(sidx.size, dtype=np.uint8)
        self._store._file().flush()

    def read_metrics(self) -> dict[str, np.ndarray]:
        """Current per-point metrics (NaN where not computed)."""
        group = self._group
        return {k: np.asarray(group["metrics"][k][...]) for k in self.metric_names}

    def __repr__(self) -> str:
        done, total = self.progress()
        return f"SweepHandle({self.name!r}, {done}/{total} points done)"


class ResultStore:
    """An HDF5 file of named sweeps.

    Parameters
    ----------
    path : str or PathLike
        The ``.h5`` file. Created (with its parent folder) in mode ``"a"`` when absent.
    mode : {"a", "r"}
        ``"a"``: the single writer (may also read). ``"r"``: read-only; every call opens the file
        afresh in SWMR-read mode, so it follows a sweep that another process is writing.

    Raises
    ------
    StoreBusyError
        Mode ``"a"`` and another process is writing the file.
    StoreCorruptError
        The file exists but is not a readable HDF5 file.
    FileNotFoundError
        Mode ``"r"`` and the file does not exist.

    Examples
    --------
    >>> with ResultStore("results.h5") as store:                       # doctest: +SKIP
    ...     h = store.open_sweep("init-final", coords=alphas[:, None], coord_names=["alpha"],
    ...                          metric_names=["loss", "error"], attrs={"kind": "line"})
    ...     for chunk in np.array_split(h.missing(), 4):
    ...         h.write(chunk, evaluate(chunk))
    ...     res = store.read("init-final")
    """

    def __init__(self, path: str | os.PathLike, mode: str = "a"):
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' (writer) or 'r' (reader), got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._h5: h5py.File | None = None
        self._lock_fd: int | None = None
        self._swmr = False
        self._verified = False  # a reader reads the whole file once (its first open), not on every call
        if mode == "r":
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no such result store")
            with self._reader():  # fail now, not at first use, on a corrupt file
                pass
            return
        self._open_writer()

    # ---------------------------------------------------------------- opening and closing

    def _open_writer(self) -> None:
        path = self.path
        try:
            if path.is_dir():
                raise StoreCorruptError(f"{path}: is a folder, not a result store file", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                self._create_file(path)
            fd = os.open(path, os.O_RDWR)
        except StoreError:
            raise
        except OSError as e:
            raise _os_error(path, e) from None
        try:
            if not _lock_fd(fd):
                raise StoreBusyError(
                    f"{path}: file in use: another process is writing this result store. Wait for it to "
                    f"finish, or write to another file (--store).", path)
            if os.fstat(fd).st_size == 0:  # (a store is never empty: it is created complete, then linked in place)
                raise _corrupt(path, what="empty file")
            self._h5 = self._open_existing(fd)
        except BaseException:
            if self._h5 is not None:
                self._h5.close()
                self._h5 = None
            os.close(fd)
            raise
        self._lock_fd = fd
        self._enter_swmr()

    @staticmethod
    def _create_file(path: Path) -> None:
        """Create an empty store atomically: written under a private name, then hard-linked into place.

        Two processes creating the same store at once both succeed or one finds the other's complete file; no one
        ever sees an empty or half-written file at ``path``.
        """
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            h5py.File(tmp, "w", libver="latest", locking=False).close()
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _open_existing(self, fd: int) -> h5py.File:
        path = self.path
        if not h5py.is_hdf5(path):
            raise _corrupt(path, what="not an HDF5 file")
        for attempt in range(2):
            try:
                h5 = h5py.File(path, "r+", libver="latest", locking=False)
            except OSError as e:
                if _is_open_for_write_error(e) and attempt == 0:
                    # We hold the lerpfast writer lock, so no lerpfast writer is live. A non-lerpfast HDF5
                    # writer would hold a flock; without one, the flags were left by a killed writer.
                    if _hdf5_flock_held(fd):
                        raise StoreBusyError(f"{path}: file in use: another HDF5 program has it open for "
                                             f"writing.", path) from None
                    if _clear_status_flags(fd):
                        continue
                raise _corrupt(path, e) from None
            try:
                _verify(h5, path)
            except BaseException:
                h5.close()
                raise
            return h5
        raise AssertionError("unreachable")

    @staticmethod
    def repair(path: str | os.PathLike) -> dict[str, list[int]]:
        """Mark the points whose stored values fail their checksums as not computed; returns them per sweep.

        Each damaged chunk of a sweep's ``done`` flags and metrics is rewritten whole (flags 0, metrics NaN), so
        the next run of that sweep recomputes exactly those points; every other point keeps its value. A store
        with damaged metadata (group structure, attributes) or coordinates cannot be repaired this way: that is a
        StoreCorruptError. Takes the writer lock: a store being written is StoreBusyError.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such result store")
        fd = os.open(path, os.O_RDWR)
        try:
            if not _lock_fd(fd):
                raise StoreBusyError(f"{path}: file in use: another process is writing this result store; repair "
                                     f"it when that process has finished.", path)
            try:
                h5 = h5py.File(path, "r+", libver="latest", locking=False)
            except OSError as e:
                raise _corrupt(path, e) from None
            repaired: dict[str, set[int]] = {}
            try:
                try:
                    _verify(h5, path)
                    return {}
                except DamagedPointsError as e:
                    damaged = e.damaged
                for name in damaged:
                    group = h5[name]
                    if _damaged_ranges(group["coords"]):
                        raise _corrupt(path, what=f"the coordinates of sweep {name!r} are damaged; it cannot be "
                                                  f"repaired, only run again under another name")
                    datasets = [group["done"]] + [group["metrics"][m] for m in group["metrics"]]
                    ranges = sorted({r for ds in datasets for r in _damaged_ranges(ds)})
                    for lo, hi in ranges:
                        _rewrite_chunk(group["done"], lo, 0)
                        for m in group["metrics"]:
                            _rewrite_chunk(group["metrics"][m], lo, np.nan)
                        repaired.setdefault(name, set()).update(range(lo, hi))
                h5.flush()
                _verify(h5, path)
            finally:
                h5.close()
            return {n: sorted(v) for n, v in repaired.items()}
        finally:
            os.close(fd)

    def _enter_swmr(self) -> None:
        try:
            self._h5.swmr_mode = True
            self._swmr = True
        except RuntimeError as e:
            if not _is_space_error(e):
                raise
            self.close()  # starting SWMR writes the superblock: on a full disk, give up before anything else
            raise _os_error(self.path, OSError(errno.ENOSPC, "No space left on device")) from None
        except (ValueError, OSError):  # a file written with an old format (superblock < v3): no followers
            self._swmr = False

    def _reopen_plain(self) -> None:
        """Leave SWMR mode (close + reopen) so new groups and datasets can be created."""
        if self._h5 is not None:
            self._h5.close()
        self._h5 = h5py.File(self.path, "r+", libver="latest", locking=False)
        self._swmr = False

    def _file(self) -> h5py.File:
        if self.mode == "r":
            raise RuntimeError("a read-only ResultStore has no open file; use read() / progress()")
        if self._h5 is None:
            raise StoreError(f"{self.path}: store is closed", self.path)
        return self._h5

    class _ReaderCtx:
        def __init__(self, store: ResultStore):
            self.store = store
            self.h5: h5py.File | None = None

        def __enter__(self) -> h5py.File:
            path = self.store.path
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such result store")
            if path.is_dir() or not h5py.is_hdf5(path):
                raise _corrupt(path, what="not an HDF5 file")
            # SWMR readers skip HDF5's truncation check and retry failed metadata reads for a long time, so a
            # truncated file would hang them: check the stored end of file first (twice, in case a writer
            # is mid-flush).
            for attempt in range(3):
                eof, size = _superblock_eof(path), path.stat().st_size
                if eof is None or size >= eof:
                    break
                if attempt == 2:
                    raise _corrupt(path, what=f"truncated: {size} of {eof} bytes")
                time.sleep(0.1)
            # First (once per reader) a plain, non-SWMR open: it fails at once on damaged metadata, where SWMR
            # retries for minutes. It is refused while a writer holds the file in SWMR mode; the file is then
            # being written, and a SWMR reader follows it.
            if not self.store._verified:
                try:
                    plain = h5py.File(path, "r", locking=False)
                except OSError as e:
                    if not _is_open_for_write_error(e):
                        raise _corrupt(path, e) from None
                    plain = None
                if plain is not None:
                    try:
                        _verify(plain, path)
                    finally:
                        plain.close()
                    self.store._verified = True
            try:
                self.h5 = h5py.File(path, "r", libver="latest", swmr=True, locking=False)
            except OSError:
                # Not SWMR-capable (old format), or a writer is between SWMR sessions: a plain read.
                try:
                    self.h5 = h5py.File(path, "r", locking=False)
                except OSError as e:
                    if _is_open_for_write_error(e):
                        raise StoreBusyError(
                            f"{path}: another program has this file open for writing (not through lerpfast, which "
                            f"lets readers follow its sweeps). Close it in that program, then read again.",
                            path) from None
                    raise _corrupt(path, e) from None
            return self.h5

        def __exit__(self, *exc) -> None:
            if self.h5 is not None:
                self.h5.close()

    def _reader(self) -> ResultStore._ReaderCtx:
        return ResultStore._ReaderCtx(self)

    def _with_file(self, fn):
        """Run ``fn(h5file)`` on the writer's file, or on a fresh SWMR reader in mode "r"."""
        try:
            if self.mode == "a":
                return fn(self._file())
            with self._reader() as h5:
                return fn(h5)
        except (KeyError, StoreError, FileNotFoundError, ValueError):
            raise
        except (OSError, RuntimeError) as e:
            raise _corrupt(self.path, e) from None

    def close(self) -> None:
        """Close the file and release the writer lock (idempotent)."""
        try:
            if self._h5 is not None:
                h5, self._h5 = self._h5, None
                try:
                    h5.close()
                except RuntimeError as e:  # after a failed write (full disk) HDF5 cannot flush; the lock must go
                    if not _is_space_error(e):
                        raise
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases its OFD lock
                self._lock_fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r}, mode={self.mode!r})"

    # ---------------------------------------------------------------- sweeps

    @staticmethod
    def _sweep_names(h5: h5py.File) -> list[str]:
        return sorted(k for k, v in h5.items() if isinstance(v, h5py.Group) and "lerpfast_sweep" in v.attrs)

    def names(self) -> list[str]:
        """Names of the sweeps in the file, sorted."""
        return self._with_file(self._sweep_names)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def _group_of(self, h5: h5py.File, name: str) -> h5py.Group:
        if name not in h5 or "lerpfast_sweep" not in h5[name].attrs:
            have = ", ".join(self._sweep_names(h5)) or "none"
            raise KeyError(f"{self.path}: no sweep named {name!r} (sweeps: {have})")
        return h5[name]

    def open_sweep(self, name: str, *, coords: np.ndarray, coord_names: Sequence[str],
                   metric_names: Sequence[str], attrs: Mapping[str, Any] | None = None,
                   grid_shape: Sequence[int] | None = None) -> SweepHandle:
        """Create a sweep, or reopen the same sweep to resume it.

        Parameters
        ----------
        name : str
            The sweep's name in the file (no ``/``).
        coords : array-like, shape (K, D) or (K,)
            Coordinates of the K points.
        coord_names : sequence of str, length D
            Coordinate names, e.g. ``["alpha"]`` or ``["x", "y"]``.
        metric_names : sequence of str
            Metrics recorded per point, e.g. ``["loss", "error"]``.
        attrs : mapping, optional
            Everything that reproduces the sweep (model, checkpoints and sha256, ``kind``, BN policy,
            precision, data set / split / size, version, device, time). Nested values are stored as
            JSON. ``attrs["fingerprint"]`` identifies the sweep; when absent it is computed with
            :func:`sweep_fingerprint`.
        grid_shape : sequence of int, optional
            For planes: the grid the K points fill, row-major.

        Returns
        -------
        SweepHandle

        Raises
        ------
        SweepMismatchError
            A sweep with another fingerprint exists under ``name``; the message names the file, the
            sweep and the fields that differ.
        """
        if self.mode != "a":
            raise StoreError(f"{self.path}: opened read-only (mode='r'); open with mode='a' to write", self.path)
        _check_name(name)
        coords = np.asarray(coords, dtype=np.float64)
        if coords.ndim == 1:
            coords = coords[:, None]
        if coords.ndim != 2:
            raise ValueError(f"coords must be (K, D), got shape {coords.shape}")
        coord_names, metric_names = [str(c) for c in coord_names], [str(m) for m in metric_names]
        if len(coord_names) != coords.shape[1]:
            raise ValueError(f"{len(coord_names)} coord_names for {coords.shape[1]} coordinate columns")
        if len(set(metric_names)) != len(metric_names) or not metric_names:
            raise ValueError(f"metric_names must be distinct and non-empty, got {metric_names}")
        if grid_shape is not None:
            grid_shape = [int(g) for g in grid_shape]
            if int(np.prod(grid_shape)) != coords.shape[0]:
                raise ValueError(f"grid_shape {grid_shape} does not hold K={coords.shape[0]} points")
        attrs = dict(attrs or {})
        bad = [k for k in attrs if k in _RESERVED]
        if bad:
            raise ValueError(f"attrs may not use the store's own keys {bad}")
        if "fingerprint" not in attrs:
            attrs["fingerprint"] = sweep_fingerprint(coords, coord_names, metric_names, attrs, grid_shape)
        h5 = self._file()
        aborted = name in h5 and _aborted_create(h5[name])
        if name in h5 and not aborted:
            self._check_same(h5[name], name, coords, coord_names, metric_names, attrs, grid_shape)
            return SweepHandle(self, name, created=False)
        self._create(name, coords, coord_names, metric_names, attrs, grid_shape, replace=aborted)
        return SweepHandle(self, name, created=True)

    def _create(self, name, coords, coord_names, metric_names, attrs, grid_shape, replace=False) -> None:
        # A new sweep is the only write that grows the file (its chunks are allocated whole here; point writes
        # overwrite them). HDF5 failing half-way through on a full disk leaves a file it can never extend again,
        # so the space is reserved first, at the file's end where HDF5 allocates (it trims what it leaves unused).
        self._reserve(name, _sweep_bytes(coords.shape[0], coords.shape[1], len(metric_names), attrs))
        if self._swmr:
            self._reopen_plain()
        h5 = self._h5
        try:
            if replace:  # a writer died while creating this sweep: nothing in it was ever computed
                del h5[name]
            group = h5.create_group(name)
            k = coords.shape[0]
            group.create_dataset("coords", data=coords, **_checked(coords.shape))
            group.create_dataset("done", data=np.zeros(k, dtype=np.uint8), **_checked((k,)))
            metrics = group.create_group("metrics")
            for m in metric_names:
                metrics.create_dataset(m, data=np.full(k, np.nan, dtype=np.float64), **_checked((k,)))
            meta = dict(attrs)
            meta.setdefault("time", _now())
            _write_attrs(group, meta)
            group.attrs["coord_names"] = json.dumps(coord_names)
            group.attrs["metric_names"] = json.dumps(metric_names)
            group.attrs["grid_shape"] = json.dumps(grid_shape)
            group.attrs["created"] = _now()
            group.attrs["lerpfast_store_format"] = STORE_FORMAT
            group.attrs["lerpfast_sweep"] = 1  # written last: a half-created group is not a sweep
            h5.flush()
        except BaseException as e:
            if _is_space_error(e):  # HDF5's state is broken after a failed write: drop the handle, keep the file
                self.close()
                raise _os_error(self.path, OSError(errno.ENOSPC, "No space left on device")) from None
            if name in h5:
                del h5[name]
            h5.flush()
            self._enter_swmr()
            raise
        self._enter_swmr()

    def _reserve(self, name: str, need: int) -> None:
        """Allocate ``need`` bytes past the end of the file, or raise a StoreError saying the disk is full."""
        fd = self._lock_fd
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, size, need)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                if os.fstat(fd).st_size > size:  # some file systems keep what they managed to allocate
                    os.ftruncate(fd, size)
                raise StoreError(f"{self.path}: no space left on the device for sweep {name!r} (needs about "
                                 f"{-(-need // 1024)} KiB): free some space and run again; the finished sweeps are "
                                 f"intact and the store stays writable", self.path) from None
            # EOPNOTSUPP, EINVAL...: a file system without preallocation; HDF5 will find out the usual way

    def _check_same(self, group, name, coords, coord_names, metric_names, attrs, grid_shape) -> None:
        if "lerpfast_sweep" not in group.attrs:
            raise StoreError(f"{self.path}: {name!r} exists but is not a lerpfast sweep; choose another name",
                             self.path)
        old = _read_attrs(group)
        if old.get("fingerprint") == attrs["fingerprint"]:
            self._check_probe(name, old.get("probe"), attrs.get("probe"))
            return
        diffs = []
        old_coords = np.asarray(group["coords"][...])
        if old_coords.shape != coords.shape:
            diffs.append(f"coords (stored shape {old_coords.shape}, now {coords.shape})")
        elif not np.array_equal(old_coords, coords):
            diffs.append(f"coords (max |difference| {np.max(np.abs(old_coords - coords)):.3g})")
        for key, new in (("coord_names", coord_names), ("metric_names", metric_names), ("grid_shape", grid_shape)):
            if old.get(key) != new:
                diffs.append(f"{key} (stored {old.get(key)!r}, now {new!r})")
        for key in sorted((set(old) | set(attrs)) - set(_RESERVED) - VOLATILE_ATTRS):
            a, b = _jsonable(old.get(key)), _jsonable(attrs.get(key))
            if a != b:
                diffs.append(f"{key} (stored {_short(a)}, now {_short(b)})")
        if not diffs:
            diffs.append("fingerprint")
        fields = [d.split(" ")[0] for d in diffs]
        raise SweepMismatchError(
            f"{self.path}: sweep {name!r} exists with different settings: {'; '.join(diffs)}. "
            f"Use another sweep name (--name) or another file to keep both.",
            self.path, name, fields)

    def _check_probe(self, name: str, stored, now) -> None:
        """Same settings, but does the model still compute the same thing? (:mod:`lerpfast.probe`)"""
        if not isinstance(stored, Mapping) or not isinstance(now, Mapping):
            return  # a sweep stored before probes existed, or a caller without one: nothing to compare
        from lerpfast import probe

        diffs = probe.compare(stored, now)
        if diffs:
            raise SweepMismatchError(
                f"{self.path}: sweep {name!r} exists with the same settings, but its first point on the first batch "
                f"now gives other numbers ({'; '.join(diffs)}): {probe.describe(diffs)} may differ from the stored "
                f"run. Use another sweep name (--name) or another file to keep both.", self.path, name, ["probe"])

    # ---------------------------------------------------------------- reading

    def progress(self, name: str) -> tuple[int, int]:
        """``(done, total)`` point counts of a sweep."""

        def fn(h5):
            ds = self._group_of(h5, name)["done"]
            if self.mode == "r" and ds.id.valid and getattr(h5, "swmr_mode", False):
                ds.refresh()
            done = np.asarray(ds[...], dtype=bool)
            return int(done.sum()), int(done.size)

        return self._with_file(fn)

    def attrs(self, name: str) -> dict[str, Any]:
        """The stored attributes of a sweep (JSON values decoded)."""
        return self._with_file(lambda h5: _read_attrs(self._group_of(h5, name)))

    def read(self, name: str) -> Any:
        """Read a sweep as a :class:`lerpfast.result.SweepResult`.

        Points not yet computed hold NaN in every metric; ``meta["done"]`` is the boolean mask of
        computed points and ``meta["progress"]`` the ``(done, total)`` counts.
        """
        from lerpfast.result import SweepResult

        def fn(h5):
            group = self._group_of(h5, name)
            swmr = self.mode == "r" and getattr(h5, "swmr_mode", False)
            datasets = [group["coords"], group["done"]] + [group["metrics"][m] for m in group["metrics"]]
            if swmr:
                for ds in datasets:
                    ds.refresh()
            meta = _read_attrs(group)
            coords = np.asarray(group["coords"][...])
            done = np.asarray(group["done"][...], dtype=bool)
            metrics = {m: np.asarray(group["metrics"][m][...]) for m in meta["metric_names"]}
            return coords, done, metrics, meta

        coords, done, metrics, meta = self._with_file(fn)
        coord_names = meta.pop("coord_names")
        grid_shape = meta.pop("grid_shape")
        meta.pop("lerpfast_sweep", None)
        meta.update(name=name, file=str(self.path), done=done, progress=(int(done.sum()), int(done.size)))
        kind = _kind_of(meta)
        return SweepResult(kind=str(kind), coords=coords, coord_names=tuple(coord_names), metrics=metrics,
                           meta=meta, grid_shape=None if grid_shape is None else tuple(grid_shape))

    def summary(self) -> list[dict[str, Any]]:
        """One row per sweep: name, kind, points done / total, metric names, created time."""

        def fn(h5):
            rows = []
            for n in self._sweep_names(h5):
                g = h5[n]
                if self.mode == "r" and getattr(h5, "swmr_mode", False):
                    g["done"].refresh()
                a = _read_attrs(g)
                done = np.asarray(g["done"][...], dtype=bool)
                rows.append({"name": n, "kind": _kind_of(a), "done": int(done.sum()), "total": int(done.size),
                             "metrics": a.get("metric_names", []), "created": a.get("created", "")})
            return rows

        return self._with_file(fn)


CHUNK_POINTS = 256  # points per checksummed chunk: a damaged chunk costs at most this many recomputed points


def _checked(shape: tuple) -> dict:
    """Dataset options: chunks of CHUNK_POINTS points, each with a Fletcher32 checksum verified on every read."""
    chunks = (max(1, min(CHUNK_POINTS, int(shape[0]))),) + tuple(int(n) for n in shape[1:])
    return {"chunks": chunks, "fletcher32": True}


def _chunk_ranges(ds: h5py.Dataset) -> list[tuple[int, int]]:
    n = int(ds.shape[0])
    step = ds.chunks[0] if ds.chunks else max(n, 1)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _damaged_ranges(ds: h5py.Dataset) -> list[tuple[int, int]]:
    """Point ranges of ``ds`` whose chunks fail to read (checksum or filter errors)."""
    bad = []
    for lo, hi in _chunk_ranges(ds):
        try:
            ds[lo:hi]
        except (OSError, RuntimeError):
            bad.append((lo, hi))
    return bad


def _rewrite_chunk(ds: h5py.Dataset, lo: int, fill) -> None:
    """Replace the chunk of ``ds`` starting at point ``lo`` by ``fill`` without reading it (it may be damaged).

    A partial chunk write would make HDF5 read the old chunk first; a direct chunk write does not. The new chunk's
    bytes, checksum included, are made by HDF5 itself in an in-memory file with the same chunking and filters.
    """
    with h5py.File(f"lerpfast-chunk-{id(ds)}", "w", driver="core", backing_store=False) as mem:
        tmp = mem.create_dataset("c", shape=ds.chunks, dtype=ds.dtype, chunks=ds.chunks, fletcher32=ds.fletcher32)
        tmp[...] = np.full(ds.chunks, fill, dtype=ds.dtype)
        mask, raw = tmp.id.read_direct_chunk((0,) * ds.ndim)
    ds.id.write_direct_chunk((lo,) + (0,) * (ds.ndim - 1), raw, filter_mask=mask)


def _verify(h5: h5py.File, path: Path) -> None:
    """Read every object, attribute and stored value of the file once, without SWMR.

    HDF5 answers a metadata checksum failure at once outside SWMR mode, while a SWMR reader or writer retries the
    read for minutes: damage is found here, before any SWMR access. Raises StoreCorruptError naming the object
    for damaged metadata, DamagedPointsError naming each sweep and its unreadable points for damaged values.
    """
    damaged: dict[str, set[int]] = {}
    names = []
    try:
        names = list(h5.keys())
        for name in names:
            group = h5[name]
            if not isinstance(group, h5py.Group):
                continue
            dict(group.attrs)
            for sub in group.keys():
                obj = group[sub]
                items = [obj] if isinstance(obj, h5py.Dataset) else [obj[m] for m in obj.keys()]
                for ds in items:
                    dict(ds.attrs)
                    for lo, hi in _damaged_ranges(ds):
                        damaged.setdefault(name, set()).update(range(lo, hi))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise _corrupt(path, e, what=f"damaged HDF5 metadata ({str(e).split('(')[-1].rstrip(')')})") from None
    if damaged:
        pts = {n: sorted(v) for n, v in damaged.items()}
        desc = "; ".join(f"sweep {n!r}: points {_ranges_text(v)}" for n, v in pts.items())
        raise DamagedPointsError(
            f"{path}: stored values fail their checksums ({desc}). Nothing else in the file is affected: "
            f"`lerpfast repair {path}` (or sweep(..., repair=True)) marks exactly these points for recomputation.",
            path, pts)


def _ranges_text(points: list[int]) -> str:
    out, start = [], None
    for i, p in enumerate(points):
        if start is None:
            start = p
        if i + 1 == len(points) or points[i + 1] != p + 1:
            out.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ", ".join(out)


def _aborted_create(group: h5py.Group) -> bool:
    """True for a sweep group whose creation never finished (its writer died before the final marker).

    Such a group holds at most our own empty datasets, no computed point, and is recreated on the next open.
    """
    if not isinstance(group, h5py.Group) or "lerpfast_sweep" in group.attrs:
        return False
    # "coords" is created first; a group without it, or with anything else in it, is someone else's
    return "coords" in group and set(group.keys()) <= {"coords", "done", "metrics"}


def _kind_of(meta: Mapping[str, Any]) -> str:
    """The slice kind: ``meta["kind"]``, or ``meta["slice"]["kind"]`` as ``lerpfast.sweep`` writes it."""
    sl = meta.get("slice")
    kind = meta.get("kind") or (sl.get("kind") if isinstance(sl, Mapping) else sl) or meta.get("slice_kind")
    return str(kind) if kind else "line"


def _short(v: Any, width: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= width else s[: width - 3] + "..."
