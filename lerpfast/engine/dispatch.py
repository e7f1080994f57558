"""Per-layer choice of the fastest correct implementation of the multi-point ops.

The multi-point layers call :func:`lerp_linear`, :func:`lerp_conv` and :func:`point_metrics` here with the
signatures of :mod:`lerpfast.engine.functional`. Backends:

``torch``        the functional path: materialize the K weights of the layer (fp32 combine), then cuBLAS bmm /
                 cuDNN grouped conv with the points folded into channels. Always available; the only path for
                 CPU tensors in automatic mode.
``triton``       fused kernels of :mod:`lerpfast.kernels` (weights built in registers, shared-input basis form).
                 Linear; conv2d with groups = 1; J <= 3; float32 / bfloat16 activations.
``cuda``         the C++ extension ``lerpfast._C`` (``torch.ops.lerpfast``): its CUDA kernels on CUDA tensors,
                 its CPU kernels on CPU tensors. Linear only.

Automatic choice (CUDA tensors): on the first call with a new shape key (op, shapes, dtypes, flags, tf32 setting)
the triton candidate's kernels are described without running them (:func:`lerpfast.kernels.launch.recording`) and
compiled in background threads; until they are ready, calls with that key run torch, so no sweep waits on compiling
a candidate that may lose. Once every candidate is ready, each is run, checked against the torch path (max error
within 2e-2 relative for bf16/tf32, 1e-4 for fp32; the metrics kernel per output, :data:`_METRIC_TOL`) and timed
(CUDA events around back-to-back calls behind a spin kernel, so launch gaps that a CUDA graph removes are not
counted; best of 5 interleaved rounds after a warm-up); the fastest correct one is cached for that key and stored in
the per-device table ``$LERPFAST_CACHE/dispatch-<device>.json`` (default ``~/.cache/lerpfast``; versions of
lerpfast, torch and triton are part of it), which later processes read instead of measuring (a stored triton choice
still compiles in the background first). A candidate that raises, fails to compile or is wrong is dropped with one
warning. Non-finite values must match torch's exactly (NaN where torch has NaN); a measurement on an output with NaN
or inf values decides for the moment but is repeated on the next call and never written to the table. Out of memory
(:func:`lerpfast.engine.oom.is_oom`) is never held against a candidate: it propagates to the sweep, which halves its
points per pass, and the shape is measured again. Compiles run in daemon threads: a process exits without waiting
for the ones it no longer needs. Nothing is measured while a CUDA graph is being captured or torch.compile is
tracing: those calls use the cached choice or torch. ``LERPFAST_DISPATCH_TABLE=0`` turns the table off.

``LERPFAST_BACKEND=triton|cuda|torch`` forces a backend: it raises :class:`BackendUnavailable` when that
backend cannot run on this machine (no triton / no GPU without ``TRITON_INTERPRET=1`` / extension not built);
for an op or shape it does not implement (e.g. conv3d on triton) the op runs on torch and :func:`report`
counts it. ``LERPFAST_BACKEND=auto`` (or unset) is the automatic choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import torch

from lerpfast.engine import functional as F
from lerpfast.engine.functional import ParamSlice, Points
from lerpfast.engine.oom import is_oom
from lerpfast.kernels._ref import bn_fold, epilogue_ref

__all__ = ["BackendUnavailable", "lerp_linear", "lerp_conv", "lerp_linear_fused", "lerp_conv_fused",
           "point_metrics", "point_metrics_torch", "bn_fold", "forced_backend", "report", "reset", "pending", "wait",
           "planning"]

BACKENDS = ("triton", "cuda", "torch")
_CACHE: dict[tuple, str] = {}  # shape key -> chosen backend
_USED: Counter = Counter()  # (op, backend) -> calls, for report()
_WARNED: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A backend forced with LERPFAST_BACKEND cannot run here."""


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def forced_backend() -> str | None:
    """The backend named by ``LERPFAST_BACKEND``, or None for the automatic choice."""
    name = os.environ.get("LERPFAST_BACKEND", "auto").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"LERPFAST_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


def report() -> dict[str, dict[str, int]]:
    """Calls per op and backend since the last :func:`reset` (what the sweep reports as 'which path ran')."""
    out: dict[str, dict[str, int]] = {}
    for (op, backend), n in _USED.items():
        out.setdefault(op, {})[backend] = n
    return out


def pending() -> int:
    """Shape keys whose candidates are still compiling in the background (their calls run torch meanwhile)."""
    return len(_PENDING)


def wait(timeout: float | None = None) -> bool:
    """Block until every background compile started so far has finished (True), or ``timeout`` seconds passed.

    The next call of each pending shape key then measures and settles its choice. For benchmarks that time the
    steady state after a first call, and for tests.
    """
    import concurrent.futures as cf

    with _LOCK:
        futs = list(_COMPILING.values())
    done, not_done = cf.wait(futs, timeout=timeout)
    return not not_done


def reset() -> None:
    """Forget the measured choices and the call counts (e.g. after changing torch's tf32 setting)."""
    _CACHE.clear()
    _USED.clear()
    _PENDING.clear()
    _TABLES.clear()


# ------------------------------------------------------------------------------------------ availability


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_ok(device: torch.device) -> str | None:
    """None when triton kernels can run on ``device``, else the reason."""
    from lerpfast.kernels import triton_available

    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpret():
        return None
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device.type}"


def _cuda_ext_ok(device: torch.device) -> str | None:
    from lerpfast.kernels import ext

    if not ext.available():
        return "the C++ extension lerpfast._C is not built (python setup.py build_ext --inplace)"
    if device.type == "cuda" and not ext.has_cuda_kernels():
        return "lerpfast._C was built without CUDA kernels (no CUDA toolkit at build time)"
    if device.type not in ("cuda", "cpu"):
        return f"lerpfast._C has no kernels for {device.type}"
    return None


_AVAILABLE = {"triton": _triton_ok, "cuda": _cuda_ext_ok}


def _unavailable(backend: str, device: torch.device) -> str | None:
    check = _AVAILABLE.get(backend)
    return None if check is None else check(device)


def _in_capture_or_trace() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------------------ choice


def _bench(fn: Callable[[], torch.Tensor], reps: int = 1) -> float:
    """GPU milliseconds of one call of ``fn`` (mean of ``reps`` back-to-back calls), without launch gaps.

    The stream is first held busy by a spin kernel (``torch.cuda._sleep``) while the calls are enqueued, so the
    events time the kernels back to back: what a CUDA graph replays. Timed naively, the host's launch overhead
    between the events would favour the candidate with fewer launches even where graphs make launches free.
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(4_000_000)  # ~2-3 ms at GPU clocks: longer than enqueueing one layer's kernels
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _bench_all(fns: dict[str, Callable[[], torch.Tensor]], rounds: int = 5) -> dict[str, float]:
    """Best time of each function over ``rounds`` interleaved rounds, after one warm-up call each.

    The order rotates from round to round, so no candidate always runs first (cold caches, clock ramp-up) or
    always after the same neighbour.
    """
    for fn in fns.values():
        fn()  # warm-up (kernels are compiled before measuring; LERPFAST_AUTOTUNE=1 tunes here)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    names = list(fns)
    best = {n: float("inf") for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            best[n] = min(best[n], _bench(fns[n]))
    return best


# Tolerances of the metrics kernel's outputs against the float64 torch path, per output: sums of losses and
# squared distances (fp32 accumulation of at most a batch of samples), and counts, where a tie between two logits
# broken differently may move one sample (0.2 % of the count).
_METRIC_TOL = {"loss": 1e-5, "distance": 1e-5, "error": 2e-3, "top5_error": 2e-3, "disagreement": 2e-3}


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float | None = None) -> bool:
    """Whether a candidate's output agrees with the torch path's.

    Non-finite values must match exactly (NaN where torch has NaN, the same infinities): a point whose weights
    give NaN logits (an extrapolated batch norm with a negative running variance) is not a disagreement when
    both paths say NaN, and a kernel that turns torch's NaN into a finite number is wrong. The finite values are
    compared relative to the largest finite magnitude of the reference.
    """
    if isinstance(out, dict):
        return set(out) == set(ref) and all(_close(out[k], ref[k], _METRIC_TOL.get(k)) for k in ref)
    if out.shape != ref.shape:
        return False
    if tol is None:  # tf32 / bf16 paths are compared with the same-precision torch path: both carry ~1e-3 error
        tol = 1e-4 if (out.dtype == torch.float32 and not _tf32_on()) else 2e-2
    o, r = out.double(), ref.double()
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    if not torch.equal(fin_o, fin_r):
        return False
    if not bool(fin_r.all()):
        nan_o, nan_r = torch.isnan(o), torch.isnan(r)
        if not torch.equal(nan_o, nan_r) or not torch.equal(o[~fin_r & ~nan_r], r[~fin_r & ~nan_r]):
            return False
        o, r = o[fin_r], r[fin_r]
        if r.numel() == 0:
            return True
    scale = r.abs().max().clamp_min(1.0)
    return bool(((o - r).abs().max() / scale) <= tol)


def _finite(out) -> bool:
    """Whether every value of a torch-path output is finite (a measurement on it is conclusive)."""
    if isinstance(out, dict):
        return all(_finite(v) for v in out.values())
    return bool(torch.isfinite(out).all())


def _tf32_on() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


# ------------------------------------------------------------------------------------------ planning


_PLAN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lerpfast_dispatch_plan", default=None)


@contextlib.contextmanager
def planning(autocast: torch.dtype | None = None):
    """Run the ops as a first sweep on a GPU would, without a GPU (:func:`lerpfast.kernels.warmup.plan`).

    Inside, ops on ``meta`` tensors take the path a CUDA device takes in automatic mode: the triton candidate is
    called — to be recorded, inside ``lerpfast.kernels.launch.recording(dry=True)`` — or, where there is none,
    the torch path; ``autocast`` stands for the bf16 autocast a sweep enters on the GPU (autocast does not apply
    to meta tensors).
    """
    token = _PLAN.set({"autocast": autocast})
    try:
        yield
    finally:
        _PLAN.reset(token)


def planned(device: torch.device) -> bool:
    """Whether ops on ``device`` are being planned (inside :func:`planning`, on ``meta``): they take a GPU's path."""
    return _planned(device) is not None


def _planned(device: torch.device) -> dict | None:
    plan = _PLAN.get()
    return plan if (plan is not None and device.type == "meta") else None


def _run_planned(plan: dict, candidates: dict[str, Callable | None], torch_fn: Callable):
    fn = candidates.get("triton")
    if fn is not None:
        return fn()
    out = torch_fn()
    ac = plan["autocast"]
    if ac is not None and torch.is_tensor(out) and out.dtype == torch.float32:
        out = out.to(ac)  # what the matmul / conv of the torch path returns under autocast
    return out


# ------------------------------------------------------------------------------------------ background compile


_PENDING: dict[tuple, dict] = {}  # full key -> {"futures": {backend: [Future]}, "failed": set(), "stored": choice}
_COMPILING: dict[tuple, Future] = {}  # kernel variant (Launch.key()) -> its compile, shared by all shape keys
_EXECUTOR: _DaemonPool | None = None
_LOCK = threading.Lock()


class _DaemonPool:
    """A minimal thread pool whose workers are daemon threads.

    ``concurrent.futures.ThreadPoolExecutor`` joins its (non-daemon) workers at interpreter exit after running
    every queued item, so a script that finished its sweep would sit in ``exit`` until all background kernel
    compiles it no longer needs were done. Here queued compiles are dropped at exit and a running one is
    abandoned: it only fills Triton's on-disk cache, which writes each entry atomically (a ptxas child process
    finishes on its own).
    """

    def __init__(self, workers: int):
        import queue

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"lerpfast-compile-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            fut, fn, args = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(exc)

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut


def compile_threads_started() -> bool:
    """Whether this process has background compile threads (forking it is then unsafe: see data.folder)."""
    return _EXECUTOR is not None


def _executor() -> _DaemonPool:
    global _EXECUTOR
    if _EXECUTOR is None:
        n = int(os.environ.get("LERPFAST_COMPILE_THREADS", 0)) or min(8, os.cpu_count() or 1)
        _EXECUTOR = _DaemonPool(n)
    return _EXECUTOR


def _compile_variant(ln, device: torch.device) -> None:
    """Compile one kernel variant into the JIT cache of ``device`` (runs in a background thread)."""
    from lerpfast.kernels import launch

    res = launch.warm([ln], workers=1, device=device)[0]
    if res["error"]:
        raise RuntimeError(res["error"])


def _submit(ln, device: torch.device) -> Future:
    """The compile of kernel variant ``ln`` on ``device``: started once, shared by every shape key that needs it."""
    k = (str(device),) + ln.key()
    with _LOCK:
        fut = _COMPILING.get(k)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = _executor().submit(_compile_variant, ln, device)
            _COMPILING[k] = fut
        return fut


def _prepare(name: str, fn: Callable, device: torch.device) -> list[Future]:
    """Start compiling what candidate ``fn`` launches (described by a dry run) in the background."""
    from lerpfast.kernels import launch

    if name != "triton":
        return []  # prebuilt kernels: nothing to compile
    with launch.recording(dry=True) as rec:
        fn()
    return [_submit(ln, device) for ln in launch.unique(rec.launches)]


def _pending_state(op: str, full_key: tuple, device: torch.device, candidates: dict[str, Callable | None],
                   stored: str | None) -> dict:
    state = {"futures": {}, "failed": set(), "stored": stored}
    for name, fn in candidates.items():
        if fn is None or _unavailable(name, device) is not None:
            continue
        if stored is not None and name != stored:
            continue
        try:
            state["futures"][name] = _prepare(name, fn, device)
        except Exception as exc:
            _warn_once(f"{op}:{name}:err", f"lerpfast: {op} on {name} failed ({exc!r}); falling back")
            state["failed"].add(name)
    return state


def _ready(op: str, state: dict) -> bool:
    """True when every candidate's kernels have compiled (failed ones are dropped with a warning)."""
    for name, futs in list(state["futures"].items()):
        if not all(f.done() for f in futs):
            return False
        errs = [f.exception() for f in futs if f.exception() is not None]
        if errs:
            _warn_once(f"{op}:{name}:compile", f"lerpfast: compiling {op} on {name} failed ({errs[0]!r}); not used")
            state["failed"].add(name)
            del state["futures"][name]
    return True


# ------------------------------------------------------------------------------------------ per-device table


_TABLES: dict[str, dict] = {}


def _table_enabled() -> bool:
    return os.environ.get("LERPFAST_DISPATCH_TABLE", "1").strip().lower() not in ("0", "false", "no", "off")


def _table_path(device: torch.device):
    from lerpfast.kernels.tiles import cache_dir, device_tag

    return cache_dir() / f"dispatch-{device_tag(device)}.json"


def _versions() -> dict:
    from lerpfast._version import __version__

    out = {"lerpfast": __version__, "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _table(device: torch.device) -> dict:
    path = str(_table_path(device))
    if path not in _TABLES:
        entries = {}
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("versions") == _versions():
                entries = data.get("choices", {})
        except (OSError, ValueError):
            pass
        _TABLES[path] = entries
    return _TABLES[path]


def _stored_choice(device: torch.device, full_key: tuple) -> str | None:
    if not _table_enabled():
        return None
    choice = _table(device).get(repr(full_key))
    return choice if choice in BACKENDS else None


def _store_choice(device: torch.device, full_key: tuple, choice: str) -> None:
    if not _table_enabled():
        return
    try:
        path = _table_path(device)
        with _LOCK:
            table = _table(device)
            table[repr(full_key)] = choice
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"versions": _versions(), "choices": table}, indent=1, sort_keys=True))
            os.replace(tmp, path)
    except OSError as exc:
        _warn_once("table", f"lerpfast: cannot write the dispatch table ({exc}); choices are not kept")


# ------------------------------------------------------------------------------------------ running an op


#: device types on which the automatic mode measures (the tests add "cpu", with fake timings)
_MEASURED = ("cuda",)


def _run(op: str, key: tuple, device: torch.device, candidates: dict[str, Callable | None],
         torch_fn: Callable):
    """Run ``op`` on the backend chosen for ``key``; ``candidates`` maps backend -> thunk (None: unsupported)."""
    plan = _planned(device)
    if plan is not None:
        return _run_planned(plan, candidates, torch_fn)
    forced = forced_backend()
    if forced is not None:
        why = _unavailable(forced, device)
        if why is not None:
            raise BackendUnavailable(f"LERPFAST_BACKEND={forced}: {why}")
        fn = candidates.get(forced)
        if fn is None:
            _USED[(op, "torch")] += 1
            return torch_fn()
        _USED[(op, forced)] += 1
        return fn()
    if device.type not in _MEASURED:
        _USED[(op, "torch")] += 1
        return torch_fn()
    full_key = (op, _tf32_on(), _autocast_dtype(device)) + key
    choice = _CACHE.get(full_key)
    if choice is None:
        if _in_capture_or_trace():
            _USED[(op, "torch")] += 1
            return torch_fn()
        state = _PENDING.get(full_key)
        if state is None:
            stored = _stored_choice(device, full_key)
            if stored == "torch" or (stored is not None and candidates.get(stored) is None):
                state = None
                choice = "torch"
            else:
                state = _pending_state(op, full_key, device, candidates, stored)
                _PENDING[full_key] = state
        if choice is None:
            if not _ready(op, state):
                _USED[(op, "torch")] += 1  # kernels still compiling: torch meanwhile
                return torch_fn()
            usable = {n: (f if n not in state["failed"] else None) for n, f in candidates.items()}
            if state["stored"] is not None and usable.get(state["stored"]) is not None:
                choice = state["stored"]
            else:
                # An out-of-memory error propagates (the sweep halves its points per pass) and leaves the key
                # pending, so the next call measures again at the smaller size: it never becomes a torch choice.
                choice, conclusive = _measure(op, device, usable, torch_fn)
                if not conclusive:
                    # non-finite values in torch's output: the candidates agreed or not on NaN points, which says
                    # little about ordinary data. Decide for this call only and measure again on the next one,
                    # up to three times, then keep the choice for this process without writing it to the table.
                    state["inconclusive"] = state.get("inconclusive", 0) + 1
                    if state["inconclusive"] < 3:
                        fn = torch_fn if choice == "torch" else usable[choice]
                        _USED[(op, choice)] += 1
                        return fn()
                else:
                    _store_choice(device, full_key, choice)
            del _PENDING[full_key]
        _CACHE[full_key] = choice
    fn = torch_fn if choice == "torch" else candidates[choice]
    try:
        out = fn()
    except Exception as exc:
        if choice == "torch" or is_oom(exc):
            raise  # out of memory is the sweep's to handle (it halves the points per pass), not a wrong kernel
        # a kernel that passed measurement failing later: fall back for good
        _warn_once(f"{op}:{choice}:late", f"lerpfast: {op} on {choice} failed ({exc!r}); using torch")
        _CACHE[full_key] = "torch"
        choice, out = "torch", torch_fn()
    _USED[(op, choice)] += 1
    return out


def _measure(op: str, device: torch.device, candidates: dict[str, Callable | None],
             torch_fn: Callable) -> tuple[str, bool]:
    """Check every candidate against torch and time it; returns ``(fastest correct backend, conclusive)``.

    Not conclusive when torch's output holds non-finite values (the choice is then not written to the table).
    Out-of-memory errors propagate: a candidate is never dropped for running out of memory.
    """
    ref = torch_fn()
    fns = {"torch": torch_fn}
    for name, fn in candidates.items():
        if fn is None:
            continue
        why = _unavailable(name, device)
        if why is not None:
            _warn_once(f"avail:{name}", f"lerpfast: backend {name} unavailable ({why}); using the others")
            continue
        try:
            if not _close(fn(), ref):
                _warn_once(f"{op}:{name}:wrong", f"lerpfast: {op} on {name} disagrees with torch; not used")
                continue
            fns[name] = fn
        except Exception as exc:
            if is_oom(exc):
                raise
            _warn_once(f"{op}:{name}:err", f"lerpfast: {op} on {name} failed ({exc!r}); falling back")
    timings = _bench_all(fns)
    return min(timings, key=timings.get), _finite(ref)


def _shape_key(*tensors) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.is_contiguous()) for t in tensors)


def _dirs(p: ParamSlice | None):
    return None if p is None else p.dirs


def _anchors(p: ParamSlice | None):
    return None if p is None else p.anchors


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device`` (the sweep's bf16 mode), or None (meta tensors while
    :func:`planning`: the autocast the plan stands for)."""
    plan = _planned(device)
    if plan is not None:
        return plan["autocast"]
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError):  # torch < 2.4: only the CUDA queries exist
        if device.type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the fused kernels should see it: under bf16 autocast the layer computes (and returns) bf16,
    exactly as the torch path's matmul / conv would under autocast."""
    if x.dtype == torch.float32 and _autocast_dtype(x.device) == torch.bfloat16:
        return x.to(torch.bfloat16)
    return x


def _used(pts: Points, shared_input: bool):
    """The points' distinct anchors and each point's position among them (cached on the Points), for the shared-input
    form of the kernels."""
    if not shared_input or not hasattr(pts, "used_anchors"):
        return None
    return pts.used_anchors()


def _triton_shape_ok(x: torch.Tensor, w: ParamSlice, pts: Points) -> bool:
    J = pts.J if w.dirs is not None else 0
    return (x.dtype in (torch.float32, torch.bfloat16) and w.anchors.dtype == torch.float32 and J <= 3
            and (w.dirs is None or w.dirs.dtype == torch.float32))


def _epilogue(y: torch.Tensor, bn, residual, relu: bool, channel_dim: int = -1) -> torch.Tensor:
    """:func:`epilogue_ref` on the torch paths. A bf16 / fp16 output (autocast) gets the epilogue in fp32 and one
    rounding at the end, as the fused kernels do on their fp32 accumulator (and as batch norm does internally):
    rounding the BN scale to bf16 first would add an error the unfused model does not have."""
    if bn is None and residual is None and not relu:
        return y
    if y.dtype in (torch.bfloat16, torch.float16) and (bn is not None or residual is not None):
        return epilogue_ref(y.float(), bn, residual, relu, channel_dim).to(y.dtype)
    if F._owned_outputs():  # y is the op's fresh output: the same arithmetic in place, no (K, N, ...) temporaries
        return epilogue_ref(y, bn, residual, relu, channel_dim, inplace=True)
    return epilogue_ref(y, bn, residual, relu, channel_dim)


# ------------------------------------------------------------------------------------------ ops


def lerp_linear(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points,
                shared_input: bool = False) -> torch.Tensor:
    """Multi-point linear, dispatched; same contract as :func:`lerpfast.engine.functional.lerp_linear`."""
    return lerp_linear_fused(x, w, b, pts, shared_input)


def lerp_linear_fused(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points, shared_input: bool = False,
                      *, bn: tuple[torch.Tensor, torch.Tensor] | None = None, residual: torch.Tensor | None = None,
                      relu: bool = False) -> torch.Tensor:
    """:func:`lerp_linear` followed by the per-point BN affine ``bn`` (from :func:`bn_fold`), + residual, ReLU.

    On the triton backend the epilogue runs inside the GEMM (no extra pass over the (K, N, out) output).
    """

    def torch_fn():
        return _epilogue(F.lerp_linear(x, w, b, pts, shared_input), bn, residual, relu)

    candidates: dict[str, Callable | None] = {"triton": None, "cuda": None}
    if _triton_shape_ok(x, w, pts):
        def triton_fn():
            from lerpfast.kernels.lerp_linear import lerp_linear as kernel

            return kernel(_kernel_input(x), w.anchors, w.dirs, pts.anchor_idx, pts.coefs, _anchors(b), _dirs(b),
                          shared_input=shared_input, bn=bn, residual=residual, relu=relu, used=_used(pts, shared_input))

        candidates["triton"] = triton_fn

    def cuda_fn():
        from lerpfast.kernels import ext

        ext.load()
        y = torch.ops.lerpfast.lerp_linear(x, w.anchors, w.dirs, _anchors(b), _dirs(b), pts.anchor_idx, pts.coefs,
                                           shared_input)
        return _epilogue(y, bn, residual, relu)

    candidates["cuda"] = cuda_fn
    key = _shape_key(x, w.anchors, w.dirs, _anchors(b), pts.coefs, residual) + (shared_input, bn is not None, relu)
    return _run("lerp_linear", key, x.device, candidates, torch_fn)


def lerp_conv(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points, stride, padding, dilation,
              groups: int, shared_input: bool = False) -> torch.Tensor:
    """Multi-point convolution, dispatched; same contract as :func:`lerpfast.engine.functional.lerp_conv`."""
    return lerp_conv_fused(x, w, b, pts, stride, padding, dilation, groups, shared_input)


def _explicit_padding(padding, w: ParamSlice, dilation):
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    ks = w.anchors.shape[3:]
    dil = (dilation,) * len(ks) if isinstance(dilation, int) else tuple(dilation)
    tot = [d * (k - 1) for d, k in zip(dil, ks)]
    if any(t % 2 for t in tot):
        return None  # asymmetric 'same' padding: leave it to torch
    return tuple(t // 2 for t in tot)


def lerp_conv_fused(x: torch.Tensor, w: ParamSlice, b: ParamSlice | None, pts: Points, stride, padding, dilation,
                    groups: int, shared_input: bool = False, *, bn: tuple[torch.Tensor, torch.Tensor] | None = None,
                    residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """:func:`lerp_conv` followed by per-point BN affine (channel axis 2), + residual (K, N, O, *sp), ReLU."""

    def torch_fn():
        if x.device.type == "cpu" and not shared_input and x.dtype in (torch.float32, torch.float64):
            return F.conv_per_point(x, w, b, pts, stride, padding, dilation, groups, bn=bn, residual=residual,
                                    relu=relu)
        y = F.lerp_conv(x, w, b, pts, stride, padding, dilation, groups, shared_input)
        return _epilogue(y, bn, residual, relu, channel_dim=2)

    candidates: dict[str, Callable | None] = {"triton": None, "cuda": None}
    pad = _explicit_padding(padding, w, dilation)
    if w.anchors.dim() == 5 and groups == 1 and pad is not None and _triton_shape_ok(x, w, pts):
        def triton_fn():
            from lerpfast.kernels.lerp_conv import lerp_conv2d

            return lerp_conv2d(_kernel_input(x), w.anchors, w.dirs, pts.anchor_idx, pts.coefs, _anchors(b), _dirs(b),
                               stride, pad, dilation, shared_input=shared_input, bn=bn, residual=residual, relu=relu,
                               used=_used(pts, shared_input))

        candidates["triton"] = triton_fn
    key = _shape_key(x, w.anchors, w.dirs, _anchors(b), pts.coefs, residual) + (
        str(stride), str(padding), str(dilation), groups, shared_input, bn is not None, relu)
    return _run("lerp_conv", key, x.device, candidates, torch_fn)


def point_metrics_torch(logits: torch.Tensor, target: torch.Tensor,
                        ref_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Torch path of :func:`point_metrics` (float64; the definitions of :mod:`lerpfast.kernels.point_metrics`)."""
    z = logits.to(torch.float64)
    K, N, C = z.shape
    t = target.long().view(1, N, 1).expand(K, N, 1)
    zt = z.gather(2, t)
    loss = (torch.logsumexp(z, -1, keepdim=True) - zt).sum((1, 2))
    cols = torch.arange(C, device=z.device).view(1, 1, C)
    rank = ((z > zt) | ((z == zt) & (cols < t))).sum(2)
    out = {"loss": loss, "error": (rank >= 1).sum(1).double(), "top5_error": (rank >= 5).sum(1).double()}
    if ref_logits is not None:
        r = ref_logits.to(torch.float64)
        out["distance"] = ((torch.softmax(z, -1) - torch.softmax(r, -1)[None]) ** 2).sum((1, 2))
        out["disagreement"] = (z.argmax(-1) != r.argmax(-1)[None]).sum(1).double()
    else:
        out["distance"] = torch.zeros(K, dtype=torch.float64, device=z.device)
        out["disagreement"] = torch.zeros(K, dtype=torch.float64, device=z.device)
    return out


def point_metrics(logits: torch.Tensor, target: torch.Tensor,
                  ref_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-point sums over one batch: cross-entropy loss, top-1 / top-5 errors, squared softmax distance and
    disagreement with ``ref_logits``.

    Parameters
    ----------
    logits : (K, N, C); target : (N,) class indices; ref_logits : (N, C) or None.

    Returns
    -------
    dict of float64 (K,) tensors ``loss, error, top5_error, distance, disagreement`` (sums, not means; zeros
    for distance / disagreement without a reference).
    """

    def torch_fn():
        return point_metrics_torch(logits, target, ref_logits)

    candidates: dict[str, Callable | None] = {"triton": None, "cuda": None}
    if logits.shape[-1] <= 8192:
        def triton_fn():
            from lerpfast.kernels.point_metrics import point_metrics as kernel

            return kernel(logits, target, ref_logits)

        candidates["triton"] = triton_fn
    key = _shape_key(logits, ref_logits)
    return _run("point_metrics", key, logits.device, candidates, torch_fn)
