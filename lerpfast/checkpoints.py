"""Checkpoint loading and validation: every weight-space point of a sweep starts here.

A checkpoint may be an ``nn.Module``, a state dict (or a training wrapper around one), or a path to a
``torch.save`` file (``.pt``/``.pth``/``.bin``/``.ckpt``, loaded with ``weights_only=True``) or a
``.safetensors`` file. :func:`load_state` turns any of them into a flat dict of detached CPU tensors;
:func:`match_to_model` checks that dict against the model the sweep evaluates (keys, shapes, dtypes,
finiteness) and orders it like ``model.state_dict()``. Every failure raises :class:`CheckpointError`,
whose message names the checkpoint and the offending keys, because a sweep that silently interpolated
towards a half-loaded or NaN-poisoned endpoint would produce a plausible but meaningless landscape.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import threading
import time
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "describe", "load_checkpoints", "load_state", "match_to_model", "TensorDigestCache",
           "clear_digest_cache"]

# Keys under which training code commonly nests the model's state dict, tried in this order:
# Lightning and most scripts use 'state_dict'; the PyTorch tutorials 'model_state_dict';
# DeiT/MAE/timm-style scripts 'model'; older CIFAR repositories 'net'.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")

# Prefixes that wrappers add to every key: DataParallel / DistributedDataParallel ('module.'),
# torch.compile's OptimizedModule ('_orig_mod.'), and a LightningModule holding the network as
# ``self.model`` ('model.'). Each is stripped (or added) only when that makes more keys match the model.
KEY_PREFIXES = ("module.", "_orig_mod.", "model.")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

_MAX_SHOWN = 5  # offending keys shown per kind of problem; the rest are counted
_MAX_UNWRAP_DEPTH = 8
_HASH_CHUNK = 1 << 20  # 1 MiB reads when hashing checkpoint files
# A legacy (pre-1.6, non-zip) torch.save file starts with the pickled magic number (protocol 2).
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model.

    The message always names the checkpoint (its label or path) and the offending key(s).
    """


# ----------------------------------------------------------------------------------------------------
# helpers


def _fmt_keys(keys: Sequence[str], limit: int = _MAX_SHOWN) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        shown += f", ... and {len(keys) - limit} more"
    return shown


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))  # '(4,)', '(5, 4)', '()'; torch.Size's repr is longer


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _default_label(source: Any) -> str:
    if _is_path(source):
        return os.fspath(source)
    if isinstance(source, nn.Module):
        return f"model <{type(source).__name__}>"
    return "state_dict"


def _is_torch_save_file(path: Path) -> bool:
    """Whether ``path`` looks like a torch.save file (zip archive or legacy pickle with torch's magic)."""
    try:
        if zipfile.is_zipfile(path):
            return True
        with open(path, "rb") as f:
            return f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC
    except OSError:
        return False


def _weights_only_reason(err: BaseException) -> str:
    """The one line of torch's long weights_only message that says what was refused."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", str(err))
    reason = match.group(1).strip() if match else ""
    reason = reason.split(" was not an allowed global")[0]  # 'Unsupported global: GLOBAL __main__.Foo'
    return reason[:200]


def _load_file(path: Path, name: str) -> Any:
    """Read a checkpoint file into Python objects; every failure becomes a CheckpointError naming ``name``."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {name}: file not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {name}: is a directory, expected a checkpoint file "
                              f"({', '.join(TORCH_SUFFIXES)} or {SAFETENSORS_SUFFIX})")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {name}: not a readable .safetensors file (corrupt or another "
                                  f"format): {err}") from err
    # Any other suffix (.pt, .pth, .bin, .ckpt, but also .tar from the ImageNet example) goes through
    # torch.load; weights_only=True never executes code from the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_torch_save_file(path):
            raise CheckpointError(f"checkpoint {name}: not a torch.save file (corrupt, truncated or another "
                                  f"format)") from err
        reason = _weights_only_reason(err)
        raise CheckpointError(
            f"checkpoint {name}: torch.load(weights_only=True) refused it"
            + (f" ({reason})" if reason else "")
            + ": the file pickles objects other than tensors and plain containers. Re-save it as a plain "
            "state_dict: torch.save(model.state_dict(), path); or, if you trust the file, load it yourself "
            "with torch.load(path, weights_only=False) and pass the resulting module or state dict."
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {name}: could not be read (corrupt, truncated or not a "
                              f"torch.save file): {detail}") from err


def _unwrap(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """Descend through training wrappers to the flat name -> tensor mapping; does not copy tensors."""
    trail = ""
    for _ in range(_MAX_UNWRAP_DEPTH):
        if isinstance(obj, nn.Module):
            # the parameter and buffer objects themselves (not detached copies): their identity is what the
            # digest cache of describe() recognizes them by; every caller detaches or copies them
            return dict(obj.state_dict(keep_vars=True))
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint {name}{trail}: holds a {type(obj).__name__}, expected a state "
                                  f"dict (a mapping of names to tensors), a wrapper around one, or an nn.Module")
        if not obj:
            raise CheckpointError(f"checkpoint {name}{trail}: is empty, no tensors to load")
        not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if not not_tensors:
            not_str = [k for k in obj if not isinstance(k, str)]
            if not_str:
                raise CheckpointError(f"checkpoint {name}{trail}: keys must be strings, found "
                                      f"{_fmt_keys([repr(k) for k in not_str])}")
            return dict(obj)
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if wrapper is None:
            raise CheckpointError(
                f"checkpoint {name}{trail}: {_plural(len(not_tensors), 'non-tensor entry', 'non-tensor entries')} "
                f"({_fmt_keys(not_tensors)}) and no wrapper key ({', '.join(map(repr, WRAPPER_KEYS))}) holding "
                f"a state dict; pass the model's state dict itself")
        obj = obj[wrapper]
        trail += f"[{wrapper!r}]"
    raise CheckpointError(f"checkpoint {name}{trail}: wrappers nested deeper than {_MAX_UNWRAP_DEPTH} levels")


def _hash_state(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors in key order: per tensor a JSON header [key, dtype, shape, nbytes], then the
    raw bytes of its contiguous CPU copy. Depends on values only, not on memory layout or insertion order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header = json.dumps([key, str(t.dtype).removeprefix("torch."), list(t.shape), len(data)])
        h.update(header.encode())
        h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# digest caches: a sweep fingerprints its checkpoints and data on every call; hashing them again is the largest
# fixed cost of a small sweep (LeNet-300-100: 1.2 ms for two in-memory checkpoints, 30-40 ms for 10k images)


def _tensor_id(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def _probe(t: torch.Tensor, size: int) -> torch.Tensor:
    """The raw bytes of up to ``size`` evenly spaced elements of ``t`` (a copy), as uint8."""
    flat = t.detach().reshape(-1)
    if flat.numel() > size:
        # integer arithmetic: a float32 linspace rounds past the end beyond 2**24 elements (60k MNIST images)
        idx = torch.arange(size, device=flat.device, dtype=torch.int64) * (flat.numel() - 1) // max(size - 1, 1)
        flat = flat[idx]
    else:
        flat = flat.clone()
    return flat.to(torch.uint8) if flat.dtype == torch.bool else flat.reshape(-1, 1).view(torch.uint8).reshape(-1)


class TensorDigestCache:
    """Digests of tensors, reused while every tensor is unchanged.

    A tensor counts as unchanged while it is the same live object (weak reference) with the same storage, layout and
    version counter (torch bumps it on every in-place op, ``optimizer.step()`` and ``load_state_dict`` included),
    and a probe of up to ``probe`` evenly spaced elements still reads the same bytes: that also catches most writes
    torch does not count (through ``.data`` or a numpy view), though not a write that misses every probed element.
    Inference tensors have no version counter and are hashed every time. ``stats`` counts hashes and reuses.
    """

    def __init__(self, probe: int, maxsize: int = 32):
        self.probe, self.maxsize = probe, maxsize
        self.entries: OrderedDict = OrderedDict()  # key -> (weak refs, probes, digest)
        self.stats = {"hashes": 0, "reuses": 0}
        self.lock = threading.RLock()  # sweeps may run in threads; weak-reference callbacks only pop

    def clear(self) -> None:
        self.entries.clear()

    def digest(self, tensors: Sequence[torch.Tensor], compute: Callable[[], str], extra: Any = ()) -> str:
        """``compute()`` (the digest of ``tensors`` and ``extra``), or its value from an earlier call."""
        if any(t.is_inference() for t in tensors):
            self.stats["hashes"] += 1
            return compute()
        key = (extra, tuple(_tensor_id(t) for t in tensors))
        with self.lock:
            hit = self.entries.get(key)
        if hit is not None:
            refs, probes, digest = hit
            if all(r() is t for r, t in zip(refs, tensors)) and torch.equal(probes, self._probes(tensors)):
                with self.lock:
                    if key in self.entries:
                        self.entries.move_to_end(key)
                    self.stats["reuses"] += 1
                return digest
        probes = self._probes(tensors)  # taken before hashing: a write during the hash makes the entry miss later
        digest = compute()
        entries = self.entries

        def forget(_, key=key):
            entries.pop(key, None)

        with self.lock:
            self.stats["hashes"] += 1
            entries[key] = ([weakref.ref(t, forget) for t in tensors], probes, digest)
            while len(entries) > self.maxsize:
                entries.popitem(last=False)
        return digest

    def _probes(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [_probe(t, self.probe) for t in tensors]
        devices = {p.device for p in parts}
        if len(devices) > 1:
            parts = [p.cpu() for p in parts]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)  # one comparison, one sync


_STATE_DIGESTS = TensorDigestCache(probe=256)
_FILE_DIGESTS: OrderedDict = OrderedDict()  # (path, stat fields) -> sha256 of the file
_FILE_STATS = {"hashes": 0, "reuses": 0}
_RACY_NS = 2_000_000_000  # a file written this recently may change again within its timestamp: not cached


def clear_digest_cache() -> None:
    """Forget the cached checkpoint digests of :func:`describe`."""
    _STATE_DIGESTS.clear()
    _FILE_DIGESTS.clear()


def _file_digest(path: Path) -> str:
    """sha256 of the file's bytes, reused while its stat fields (device, inode, size, mtime and ctime in ns) are
    unchanged, as git's index does; a file modified within the last 2 s is hashed every time (git's racy check)."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _FILE_DIGESTS.get(key)
    if digest is not None:
        _FILE_DIGESTS.move_to_end(key)
        _FILE_STATS["reuses"] += 1
        return digest
    _FILE_STATS["hashes"] += 1
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _FILE_DIGESTS[key] = digest
        while len(_FILE_DIGESTS) > 256:
            _FILE_DIGESTS.popitem(last=False)
    return digest


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A finite sum proves it (a NaN or an Inf term makes every partial sum that includes it
    NaN or Inf), and one sum reads the tensor 20x faster than ``isfinite(t).all()`` on a CPU; only a non-finite
    sum (a bad value, or an overflow) takes the elementwise check."""
    return t.numel() == 0 or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def _prefix_chains() -> list[str]:
    """'' and every ordered chain of one or two distinct wrapper prefixes ('module._orig_mod.', ...)."""
    singles = list(KEY_PREFIXES)
    return ["", *singles, *(a + b for a in singles for b in singles if a != b)]


def _align_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from the checkpoint's keys and/or add them (when the model itself is wrapped),
    choosing the fewest prefix changes that make the most keys match the model."""
    if expected.issuperset(state):
        return state
    chains = sorted(_prefix_chains(), key=len)
    strips = [c for c in chains if all(k.startswith(c) for k in state)]
    adds = [c for c in chains if all(k.startswith(c) for k in expected)]
    best, best_overlap = state, len(expected.intersection(state))
    for strip, add in sorted(((s, a) for s in strips for a in adds), key=lambda sa: len(sa[0]) + len(sa[1])):
        candidate = {add + k[len(strip):]: v for k, v in state.items()}
        overlap = len(expected.intersection(candidate))
        if overlap > best_overlap:
            best, best_overlap = candidate, overlap
    return best


# ----------------------------------------------------------------------------------------------------
# public API


def load_state(source: Any, *, label: str | None = None, copy: bool = True) -> dict[str, torch.Tensor]:
    """Load a checkpoint into a new flat dict of detached CPU tensors.

    Parameters
    ----------
    source : nn.Module, Mapping, str or os.PathLike
        An ``nn.Module`` (its ``state_dict()`` is taken); a state dict, or a wrapper around one
        (``{'state_dict': ...}``, ``{'model_state_dict': ...}``, ``{'model': ...}``, ``{'net': ...}``, nested
        to any depth, e.g. a Lightning checkpoint); or a path. ``.safetensors`` files are read with
        ``safetensors.torch.load_file``; every other file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ...) with
        ``torch.load(path, map_location="cpu", weights_only=True)``, which never executes code from the file.
    label : str, optional
        Name used in error messages. Default: the path, or ``"model <Class>"`` / ``"state_dict"``.
    copy : bool
        Clone tensors taken from a module or an in-memory mapping (default). False lets CPU tensors alias the
        source, for a caller that only reads them and copies what it keeps (``sweep``: the slice is built from
        them by ``torch.stack``), saving one pass over the weights per call.

    Returns
    -------
    dict[str, torch.Tensor]
        Detached CPU tensors in the checkpoint's own key order, prefixes untouched (see
        :func:`match_to_model`). Tensors taken from a module or an in-memory mapping are cloned (unless
        ``copy=False``), so the result never aliases a module's live parameters.

    Raises
    ------
    CheckpointError
        The file is missing, unreadable or corrupt, ``weights_only=True`` refuses its pickle (the message
        says how to re-save it as a plain state dict), or it holds no state dict.
    TypeError
        ``source`` is none of the accepted types.
    """
    if _is_path(source):
        path = Path(source).expanduser()
        name = repr(label) if label is not None else repr(os.fspath(source))
        if label is not None and label != os.fspath(source):
            name += f" ({os.fspath(source)})"
        state = _unwrap(_load_file(path, name), name)
        # Freshly loaded tensors are owned by nobody else: no copy needed (saves one pass over memory).
        return {k: v.detach().cpu() for k, v in state.items()}
    if not isinstance(source, (nn.Module, Mapping)):
        raise TypeError(f"checkpoint {label or ''!r}: expected an nn.Module, a state dict (Mapping) or a path, "
                        f"got {type(source).__name__}")
    name = repr(label if label is not None else _default_label(source))
    state = _unwrap(source, name)
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise CheckpointError(f"checkpoint {name}: {_plural(len(on_meta), 'tensor')} on the meta device hold no "
                              f"data: {_fmt_keys(on_meta)}")
    return {k: v.detach().to("cpu", copy=copy) for k, v in state.items()}


def match_to_model(state: Mapping[str, torch.Tensor], model: nn.Module, *, label: str) -> dict[str, torch.Tensor]:
    """Check a loaded state dict against ``model`` and order it like ``model.state_dict()``.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        A flat state dict, typically from :func:`load_state`. Wrapper prefixes ``'module.'``
        (DataParallel/DDP), ``'_orig_mod.'`` (torch.compile) and ``'model.'`` (Lightning) are stripped, or
        added when the model itself is wrapped, whenever that makes more keys match.
    model : nn.Module
        The model the checkpoint is for. Only ``model.state_dict()`` is read; the model is not modified.
    label : str
        Name of the checkpoint in error messages.

    Returns
    -------
    dict[str, torch.Tensor]
        The same tensor objects (not copied), keyed and ordered exactly like ``model.state_dict()``.
        Entries naming the model's non-persistent buffers are dropped (they are not state). A missing
        BatchNorm ``num_batches_tracked`` (checkpoints from torch < 0.4.1) is filled with the model's own
        value, as ``load_state_dict`` does; it is an integer counter that evaluation never reads.

    Raises
    ------
    CheckpointError
        Missing or unexpected keys, shape or dtype mismatches (all reported together, up to 5 keys per
        kind with expected vs found), or NaN/Inf in a floating tensor (naming the tensor and the count).
    """
    name = repr(label)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {name}: expected a state dict (Mapping), got {type(state).__name__}")
    reference = model.state_dict()
    lazy = [k for k, v in reference.items() if isinstance(v, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise CheckpointError(f"checkpoint {name}: the model has uninitialized lazy parameters "
                              f"({_fmt_keys(lazy)}); run one forward pass before loading checkpoints")
    expected = set(reference)
    state = _align_prefixes({str(k): v for k, v in state.items()}, expected)

    ignored = _non_persistent_buffers(model)
    missing = [k for k in reference if k not in state]
    for k in [k for k in missing if k.endswith("num_batches_tracked")]:
        state[k] = reference[k].detach().cpu().clone()
        missing.remove(k)
    unexpected = [k for k in state if k not in expected and k not in ignored]
    not_tensors = [k for k in reference if k in state and not isinstance(state[k], torch.Tensor)]
    shape_bad = [k for k in reference if k in state and k not in not_tensors and state[k].shape != reference[k].shape]
    dtype_bad = [k for k in reference  # a wrong shape is reported once, as a shape mismatch
                 if k in state and k not in not_tensors and k not in shape_bad and state[k].dtype != reference[k].dtype]

    problems = []
    if missing:
        problems.append(f"{_plural(len(missing), 'missing key')} (in the model, not in the checkpoint): "
                        f"{_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')} (in the checkpoint, not in the model): "
                        f"{_fmt_keys(unexpected)}")
    if not_tensors:
        problems.append(f"{_plural(len(not_tensors), 'non-tensor entry', 'non-tensor entries')}: "
                        f"{_fmt_keys(not_tensors)}")
    if shape_bad:
        detail = "; ".join(f"{k!r}: model {_shape(reference[k])}, checkpoint {_shape(state[k])}"
                           for k in shape_bad[:_MAX_SHOWN])
        more = f"; ... and {len(shape_bad) - _MAX_SHOWN} more" if len(shape_bad) > _MAX_SHOWN else ""
        problems.append(f"{_plural(len(shape_bad), 'shape mismatch', 'shape mismatches')}: {detail}{more}")
    if dtype_bad:
        detail = "; ".join(f"{k!r}: model {reference[k].dtype}, checkpoint {state[k].dtype}"
                           for k in dtype_bad[:_MAX_SHOWN])
        more = f"; ... and {len(dtype_bad) - _MAX_SHOWN} more" if len(dtype_bad) > _MAX_SHOWN else ""
        problems.append(f"{_plural(len(dtype_bad), 'dtype mismatch', 'dtype mismatches')}: {detail}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {name} does not match the model {type(model).__name__}: "
                              + "; ".join(problems))

    out = {k: state[k] for k in reference}
    nonfinite = []
    for k, t in out.items():
        if (t.is_floating_point() or t.is_complex()) and not _all_finite(t):
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(t).sum())
                nonfinite.append((k, n_nan, int((~finite).sum()) - n_nan, t.numel()))
    if nonfinite:
        k, n_nan, n_inf, numel = nonfinite[0]
        counts = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if s)
        others = ""
        if len(nonfinite) > 1:
            others = f"; also non-finite: {_fmt_keys([e[0] for e in nonfinite[1:]])}"
        raise CheckpointError(f"checkpoint {name}: tensor {k!r} has {counts} of {numel} values{others}")
    return out


def load_checkpoints(
    sources: Sequence[Any], model: nn.Module, labels: Sequence[str] | None = None, *, copy: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Load every checkpoint and check it against ``model``.

    Parameters
    ----------
    sources : Sequence
        Modules, state dicts (or wrappers) and paths, in any mix (see :func:`load_state`).
    model : nn.Module
        The model every checkpoint must fit (see :func:`match_to_model`).
    labels : Sequence[str], optional
        Names for error messages, one per source. Default: the path for a path, ``"model[i]"`` for a
        module, ``"checkpoint[i]"`` for a mapping.
    copy : bool
        As for :func:`load_state`.

    Returns
    -------
    list[dict[str, torch.Tensor]]
        One new dict of detached CPU tensors per source, ordered like ``model.state_dict()``.

    Raises
    ------
    CheckpointError
        The first checkpoint that cannot be read or does not fit the model.
    """
    labels = default_labels(sources, labels)
    return [match_to_model(load_state(s, label=lab, copy=copy), model, label=lab) for s, lab in zip(sources, labels)]


def default_labels(sources: Sequence[Any], labels: Sequence[str] | None = None) -> list[str]:
    """``labels`` checked against ``sources`` (one per source), or the default names of :func:`load_checkpoints`."""
    if _is_path(sources) or isinstance(sources, (Mapping, nn.Module)) or not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a sequence of checkpoints (e.g. a list), got {type(sources).__name__}")
    if labels is None:
        return [os.fspath(s) if _is_path(s) else f"model[{i}]" if isinstance(s, nn.Module) else f"checkpoint[{i}]"
                for i, s in enumerate(sources)]
    if isinstance(labels, str) or len(labels) != len(sources):
        raise ValueError(f"labels must be a sequence with one label per source ({len(sources)}), got {labels!r}")
    return list(labels)


def describe(source: Any) -> dict[str, Any]:
    """JSON-serializable provenance of a checkpoint, for a sweep's metadata.

    Parameters
    ----------
    source : nn.Module, Mapping, str or os.PathLike
        As for :func:`load_state`.

    Returns
    -------
    dict
        For a file: ``{"path": absolute path, "sha256": hex digest of the file's bytes, "bytes": size}``.
        Otherwise ``{"type": "module" | "state_dict", "sha256": hex}``, hashed over the (unwrapped) state
        dict's tensors in sorted key order, each as a JSON header ``[key, dtype, shape, nbytes]`` followed
        by its raw contiguous bytes. It depends on names and values only, so it is the same across runs,
        processes and memory layouts.

    Digests are cached: a file's while its stat fields are unchanged, a module's or state dict's while each tensor
    is unchanged (:class:`TensorDigestCache`). :func:`clear_digest_cache` forgets them.

    Raises
    ------
    CheckpointError
        The file is missing or is a directory, or the mapping holds no state dict.
    """
    if _is_path(source):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "file not found"
            raise CheckpointError(f"checkpoint {os.fspath(source)!r}: {what}")
        return {"path": str(path), "sha256": _file_digest(path), "bytes": path.stat().st_size}
    if not isinstance(source, (nn.Module, Mapping)):
        raise TypeError(f"expected an nn.Module, a state dict (Mapping) or a path, got {type(source).__name__}")
    kind = "module" if isinstance(source, nn.Module) else "state_dict"
    state = _unwrap(source, repr(_default_label(source)))
    keys = sorted(state)
    digest = _STATE_DIGESTS.digest([state[k] for k in keys], lambda: _hash_state(state), extra=tuple(keys))
    return {"type": kind, "sha256": digest}
