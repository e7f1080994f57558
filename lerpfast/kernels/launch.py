"""Kernel launches: records of what is launched, and compiling them ahead of time (or without a GPU).

Every Triton launch of the engine goes through :func:`launch`. That is where three things happen that the
first sweep on a GPU depends on:

* **One launch config per launch** (:class:`Tile`, chosen by :mod:`lerpfast.kernels.tiles` from the shape):
  no autotuner, so a kernel variant is one compile, not one per candidate config.
* **Recording.** Inside :func:`recording`, each launch is also described as a :class:`Launch` (kernel, the
  arguments as the JIT sees them, constexprs, config); with ``dry=True`` nothing runs. The planner
  (:mod:`lerpfast.kernels.warmup`) runs the engine this way on meta tensors to list the kernels a sweep
  compiles; the dispatcher runs a triton candidate this way to compile it in the background.
* **Compiling ahead.** :func:`warm` compiles a list of launches with Triton's own JIT path
  (``JITFunction.warmup``), in parallel threads (Triton releases the GIL while it compiles and ptxas is a
  subprocess), into the JIT's in-memory cache and Triton's on-disk cache (``TRITON_CACHE_DIR``). Inside
  :func:`cross_compile` it compiles for another GPU target (e.g. sm_90) on a machine without a GPU.

A compiled variant is keyed by what the JIT specializes on (:meth:`Launch.key`): the constexprs, the launch
config, pointer dtypes and 16-byte alignment, and for integer arguments the type, ``== 1`` and divisibility
by 16 — except the integers a kernel lists in :func:`kernel` (sizes such as the batch or the image height
that do not enter an address: specializing on them would only multiply compiles).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import triton

from lerpfast.kernels._common import INTERPRET, launch_options

__all__ = ["Tile", "Launch", "kernel", "launch", "recording", "warm", "cross_compile", "unique", "compile_kernel"]

_NO_SPECIALIZE: dict[str, tuple[str, ...]] = {}  # "module:name" -> integer args never specialized
_ARG_NAMES: dict[str, tuple[str, ...]] = {}


def kernel(*no_specialize: str):
    """``triton.jit`` with ``do_not_specialize=no_specialize``; registers the kernel for launch records."""

    def deco(fn):
        name = f"{fn.__module__}:{fn.__name__}"
        _NO_SPECIALIZE[name] = tuple(no_specialize)
        _ARG_NAMES[name] = tuple(inspect.signature(fn).parameters)
        return triton.jit(fn, do_not_specialize=list(no_specialize))

    return deco


@dataclass(frozen=True)
class Tile:
    """Launch config of one launch: block sizes (constexprs), warps, software-pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 2, **blocks: int) -> Tile:
        return cls(tuple(sorted(blocks.items())), num_warps, num_stages)

    def kwargs(self) -> dict:
        return dict(self.blocks)

    def __str__(self) -> str:
        blocks = ",".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in self.blocks)
        return f"{blocks},w{self.num_warps},s{self.num_stages}"


def _arg_spec(v) -> tuple:
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, float):
        return ("float", v)
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        return ("ptr", str(v.dtype).replace("torch.", ""), v.data_ptr() % 16 == 0)
    raise TypeError(f"cannot describe a kernel argument of type {type(v).__name__}")


def _int_type(v: int) -> str:
    if -(2 ** 31) <= v < 2 ** 31:
        return "i32"
    return "i64" if -(2 ** 63) <= v < 2 ** 63 else "u64"


@dataclass(frozen=True)
class Launch:
    """One kernel launch, as the JIT sees it.

    ``args``: the positional (non-constexpr) arguments, each ``("ptr", dtype, aligned16)``, ``("int", v)``,
    ``("bool", v)`` or ``("float", v)``; ``constexprs``: sorted ``(name, value)`` pairs including the block
    sizes; ``grid``: the launch grid (not part of the compiled variant).
    """

    kernel: str
    args: tuple
    constexprs: tuple
    num_warps: int
    num_stages: int
    grid: tuple = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    def key(self) -> tuple:
        """What the compiled variant depends on (Triton's JIT specialization, mirrored; see the module doc)."""
        names = _ARG_NAMES.get(self.kernel) or ()
        fixed = set(_NO_SPECIALIZE.get(self.kernel, ()))
        spec = []
        for i, a in enumerate(self.args):
            kind = a[0]
            if kind == "ptr":
                spec.append(("*" + a[1], a[2]))
            elif kind == "int":
                v = a[1]
                if i < len(names) and names[i] in fixed:
                    spec.append((_int_type(v),))
                elif v == 1:
                    spec.append(("1",))
                else:
                    spec.append((_int_type(v), v % 16 == 0))
            else:
                spec.append((kind,))
        return (self.kernel, tuple(spec), self.constexprs, self.num_warps, self.num_stages)

    def describe(self) -> str:
        """One line: kernel, constexprs, tile, pointer dtypes other than fp32 / int64."""
        c = dict(self.constexprs)
        blocks = ",".join(f"{k[6:]}{v}" for k, v in sorted(c.items()) if k.startswith("BLOCK_"))
        rest = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(c.items())
                        if not k.startswith("BLOCK_") and k != "EMULATE_BF16")
        dts = sorted({a[1] for a in self.args if a[0] == "ptr" and a[1] not in ("float32", "int64")})
        return (f"{self.name.strip('_')}[{rest}] {blocks + ',' if blocks else ''}w{self.num_warps},s{self.num_stages}"
                + (f" {'+'.join(dts)}" if dts else ""))

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "args": [list(a) for a in self.args], "constexprs": [list(c) for c in
                self.constexprs], "num_warps": self.num_warps, "num_stages": self.num_stages,
                "grid": list(self.grid)}

    @classmethod
    def from_json(cls, d: dict) -> Launch:
        return cls(d["kernel"], tuple(tuple(a) for a in d["args"]), tuple(tuple(c) for c in d["constexprs"]),
                   int(d["num_warps"]), int(d["num_stages"]), tuple(d.get("grid", ())))


def _fn_name(fn) -> str:
    f = getattr(fn, "fn", fn)
    return f"{f.__module__}:{f.__name__}"


class Recorder:
    """Launches seen inside :func:`recording`; ``dry``: describe them only, run nothing."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.launches: list[Launch] = []


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("lerpfast_launch_recorder",
                                                                              default=None)


@contextlib.contextmanager
def recording(dry: bool = False):
    """Record every :func:`launch` of this thread (context) in ``recorder.launches``; ``dry``: do not launch."""
    rec = Recorder(dry)
    token = _RECORDER.set(rec)
    try:
        yield rec
    finally:
        _RECORDER.reset(token)


def dry_run() -> bool:
    """True inside ``recording(dry=True)``: kernels are described, not run (outputs stay uninitialized)."""
    rec = _RECORDER.get()
    return rec is not None and rec.dry


def _run(fn, grid, args, constexprs, tile: Tile) -> None:
    # The interpreter runs the GPU's tiles too (numpy over whole tiles: larger tiles are faster there), so what
    # runs under TRITON_INTERPRET=1 is what a GPU would launch.
    blocks = tile.kwargs()
    fn[grid(blocks)](*args, **constexprs, **blocks, num_warps=tile.num_warps, num_stages=tile.num_stages,
                     **launch_options())


def _tile(choice, fn, grid, args, constexprs, dry: bool) -> Tile:
    from lerpfast.kernels import tiles

    if isinstance(choice, Tile):
        return choice
    if INTERPRET or not tiles.autotune_enabled():
        return choice.default
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if dry or dev is None or dev.type != "cuda":
        return tiles.persisted(choice, dev) or choice.default
    return tiles.tuned(choice, lambda t: _run(fn, grid, args, constexprs, t), dev)


def launch(fn, grid, args: Sequence, constexprs: dict, choice) -> None:
    """``fn[grid(blocks)](*args, **constexprs, **blocks)`` with the tile of ``choice`` (a :class:`Tile`, or a
    :class:`lerpfast.kernels.tiles.Choice`: its heuristic tile, or under ``LERPFAST_AUTOTUNE=1`` its autotuned one)
    and the engine's compile options; recorded inside :func:`recording`. ``grid`` maps the block sizes (a dict) to
    the launch grid."""
    rec = _RECORDER.get()
    tile = _tile(choice, fn, grid, args, constexprs, rec is not None and rec.dry)
    if rec is not None:
        consts = tuple(sorted({**constexprs, **tile.kwargs()}.items()))
        rec.launches.append(Launch(_fn_name(fn), tuple(_arg_spec(a) for a in args), consts, tile.num_warps,
                                   tile.num_stages, tuple(grid(tile.kwargs()))))
        if rec.dry:
            return
    _run(fn, grid, args, constexprs, tile)


# ------------------------------------------------------------------------------------------ compiling ahead


class _Ptr:
    """A pointer argument for ``JITFunction.warmup``: dtype and 16-byte alignment, no memory."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype = dtype
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr

    @staticmethod
    def ptr_range() -> int:
        return 0


def _jit(name: str):
    mod, attr = name.split(":")
    fn = getattr(importlib.import_module(mod), attr)
    return getattr(fn, "fn", fn) if not hasattr(fn, "warmup") else fn


def _warm_args(ln: Launch) -> list:
    out = []
    for a in ln.args:
        if a[0] == "ptr":
            out.append(_Ptr(getattr(torch, a[1]), bool(a[2])))
        else:
            out.append(a[1])
    return out


def unique(launches: Iterable[Launch]) -> list[Launch]:
    """One launch per compiled variant (first occurrence kept, order preserved)."""
    seen, out = set(), []
    for ln in launches:
        k = ln.key()
        if k not in seen:
            seen.add(k)
            out.append(ln)
    return out


def compile_kernel(ln: Launch):
    """Compile (or load from the caches) the variant of ``ln`` for the current (or cross) target.

    Returns ``(compiled, seconds)``: Triton's ``CompiledKernel`` (``.asm`` holds its ptx and cubin, ``.metadata``
    its shared memory, warps and stages; :func:`lerpfast.kernels.quality.analyze` reads them) and the seconds taken.
    """
    if INTERPRET:
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (the kernels are interpreted functions)")
    t0 = time.perf_counter()
    fn = _jit(ln.kernel)
    consts = dict(ln.constexprs)
    compiled = fn.warmup(*_warm_args(ln), grid=(1,), num_warps=ln.num_warps, num_stages=ln.num_stages, **consts,
                         **launch_options())
    return compiled, time.perf_counter() - t0


def compile_one(ln: Launch) -> float:
    """Compile (or load from the caches) the variant of ``ln`` for the current (or cross) target; seconds."""
    return compile_kernel(ln)[1]


_ALONE = threading.Lock()


def warm(launches: Iterable[Launch], workers: int | None = None, device: torch.device | None = None,
         on_done=None) -> list[dict]:
    """Compile every distinct variant of ``launches`` in ``workers`` threads (default: CPU count, at most 16).

    On a GPU (``device``) the kernels land in the JIT's in-memory cache of that device and in Triton's disk
    cache; inside :func:`cross_compile` they are compiled for the cross target. Returns one dict per variant:
    ``{"launch", "seconds", "error", "compiled"}`` (``compiled``: Triton's ``CompiledKernel``, None on error);
    ``on_done(result)`` is called as each finishes.
    """
    todo = unique(launches)
    if workers is None:
        workers = min(16, os.cpu_count() or 1)

    def one(ln):
        ctx = torch.cuda.device(device) if (device is not None and device.type == "cuda") else contextlib.nullcontext()
        err, sec, compiled = None, float("nan"), None
        with ctx:
            try:
                compiled, sec = compile_kernel(ln)
            except Exception:  # noqa: BLE001
                # Once more, alone: Python 3.11's ast module is not thread-safe ("SystemError: AST constructor
                # recursion depth mismatch", or a CompilationError pointing at a valid line, when two threads
                # parse kernels at once); an error that repeats alone is the kernel's and is reported.
                with _ALONE:
                    try:
                        compiled, sec = compile_kernel(ln)
                    except Exception as exc:  # noqa: BLE001 - reported per variant
                        err = f"{type(exc).__name__}: {str(exc)[:300]}"
        res = {"launch": ln, "seconds": sec, "error": err, "compiled": compiled}
        if on_done is not None:
            on_done(res)
        return res

    if workers <= 1 or len(todo) <= 1:
        return [one(ln) for ln in todo]
    with ThreadPoolExecutor(max_workers=min(workers, len(todo)), thread_name_prefix="lerpfast-compile") as ex:
        return list(ex.map(one, todo))


class _CrossDriver:
    """The part of a Triton driver the JIT needs to compile (not launch) for a fixed target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"lerpfast-cross-sm{arch}"  # its own JIT cache slot, never a real device's

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


_CROSS_LOCK = threading.Lock()


@contextlib.contextmanager
def cross_compile(arch: int = 90):
    """Compile for ``sm_<arch>`` (CUDA) without a GPU: Triton's active driver is replaced while inside.

    Process-wide (Triton has one active driver): use it in a process that launches nothing meanwhile, e.g.
    ``benchmarks/bench_compile.py`` or ``lerpfast warmup`` on a machine without a GPU.
    """
    from triton.runtime import driver

    with _CROSS_LOCK:
        previous = driver._active
        driver.set_active(_CrossDriver(arch))
        try:
            yield
        finally:
            driver._active = previous
