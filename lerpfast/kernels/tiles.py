"""Launch configs of the Triton kernels: one per kernel and shape class by default, autotuning as an opt-in.

Default (no autotuning): :func:`conv2d`, :func:`linear` and :func:`mix` pick one :class:`Tile` from the shape
and the MMA precision. The classes are few on purpose: every distinct tile of a kernel is one more compile on
a sweep's first batch (4-30 s each for sm_90 on a CPU, see docs/kernels.md), and autotuning compiled every
candidate of every variant — 8 configs per conv variant, which is how ResNet-20's first call on an H200 ran out
of time inside the autotuner. The tiles are those that compile fastest among the sensible ones for Hopper
(measured with ``benchmarks/bench_compile.py``; smaller tiles and 2 pipeline stages compile several times faster
than 128x128 tiles with 4 stages, and fp32 without tensor cores compiles its dot as unrolled FMAs, so its tiles
are smallest).

``LERPFAST_AUTOTUNE=1`` opts into autotuning on CUDA: the first launch of a (kernel, shape class) times each
candidate of :func:`candidates` (``triton.testing.do_bench``) and keeps the fastest; the winners are stored per
device in ``$LERPFAST_CACHE/autotune-<device>.json`` (default ``~/.cache/lerpfast``) and reused by later
processes, by the planner and by ``lerpfast warmup``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from lerpfast.kernels.launch import Tile

__all__ = ["Choice", "conv2d", "linear", "mix", "candidates", "autotune_enabled", "cache_dir", "device_tag", "tuned",
           "persisted", "table_path"]

DOT_IEEE, DOT_TF32, DOT_BF16 = 0, 1, 2


@dataclass(frozen=True)
class Choice:
    """The tile for one launch: ``default`` (the heuristic's), ``key`` (its shape class, the autotuning key)."""

    kernel: str
    key: str
    default: Tile


def _o_block(co: int) -> int:
    """Output-channel block: 16 / 32 / 64 covering ``co`` (a 16-channel layer, ResNet-20's first stage, does not pay
    for a 64-wide MMA), 64 above."""
    for b in (16, 32, 64):
        if co <= b:
            return b
    return 64


# Register budget (sm_90 compile, read from the cubins by benchmarks/bench_compile.py; tests/test_kernel_quality.py
# fails on any spill). The kernels keep int64 row indices and a pointer per element of each tile, so the per-thread
# share of a tile, not the fp32 accumulator, is what fills the 255 registers:
# * fp32 (FMA dot): 64 x 64 x 16 with 4 warps spilled 12-52 B (255 registers); 32 rows: 96-184 registers, 2-3 CTAs
#   per SM, no spill.
# * tf32 / bf16 (wgmma): 128 x 128 with 8 warps spilled 8-120 B (254-255 registers) and 128 x 64 with 4 warps 28-360
#   B (the ResNet-50 stem: 3 channels padded to 16, shared input); 128 x 64 with 8 warps (two warp groups of m64 x n64)
#   needs 110-220 registers: 1-2 CTAs of 8 warps per SM, as many resident warps as 2 CTAs of 4 before.


def _tc_tile(rows: str, red: str, bo: int, bc: int) -> Tile:
    return Tile.of(8 if bo == 64 else 4, 3, **{rows: 128, "BLOCK_O": bo, red: bc})


def conv2d(NP: int, C: int, CO: int, taps: int, dot: int) -> Choice:  # noqa: N803 - the kernels' names
    """Implicit-GEMM conv: rows = output pixels (NP), columns = CO, reduction = C per filter tap (``taps`` and NP do
    not change the tile: the grid covers them)."""
    bo = _o_block(CO)
    if dot == DOT_IEEE:  # fp32 without tensor cores: the dot is unrolled FMAs, 32 x bo x 16 per step
        tile = Tile.of(4, 2, BLOCK_M=32, BLOCK_O=bo, BLOCK_C=16)
    else:  # tf32 / bf16 tensor cores (wgmma on Hopper: 64-row multiples per warp group)
        tile = _tc_tile("BLOCK_M", "BLOCK_C", bo, 16 if C <= 16 else 32)
    return Choice("conv2d", f"dot{dot}-o{bo}-c{16 if C <= 16 else 32}", tile)


def linear(N: int, IN: int, OUT: int, dot: int) -> Choice:  # noqa: N803
    """Grouped GEMM: rows = N, columns = OUT, reduction = IN."""
    bo = _o_block(OUT)
    if dot == DOT_IEEE:
        tile = Tile.of(4, 2, BLOCK_N=32, BLOCK_O=bo, BLOCK_I=16)
    else:
        tile = _tc_tile("BLOCK_N", "BLOCK_I", bo, 32)
    return Choice("linear", f"dot{dot}-o{bo}", tile)


def mix(R: int, OUT: int) -> Choice:  # noqa: N803
    """Elementwise mixing of basis products: 4096 outputs per program, wide along the contiguous output axis."""
    bo = 128 if OUT > 64 else 64 if OUT > 32 else 32
    return Choice("mix", f"o{bo}", Tile.of(4, 1, BLOCK_R=4096 // bo, BLOCK_O=bo))


def candidates(choice: Choice) -> list[Tile]:
    """Tiles tried under ``LERPFAST_AUTOTUNE=1``: the default first, then the usual GEMM shapes (output block at
    most the default's, so a 16-channel layer is not tried with 128-wide tiles)."""
    d = choice.default
    bo_max = d.kwargs()["BLOCK_O"]
    out = [d]
    if choice.kernel in ("conv2d", "linear"):
        m, o, c = ("BLOCK_M", "BLOCK_O", "BLOCK_C") if choice.kernel == "conv2d" else ("BLOCK_N", "BLOCK_O", "BLOCK_I")
        if choice.key.startswith(f"dot{DOT_IEEE}"):
            grid = [(32, 64, 16, 4, 2), (64, 32, 32, 4, 2), (128, 64, 16, 8, 2), (64, 64, 8, 4, 3)]
        else:
            grid = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3),
                    (64, 128, 32, 4, 3), (256, 64, 32, 8, 3), (128, 32, 32, 4, 4)]
        for bm, bo, bc, w, st in grid:
            out.append(Tile.of(w, st, **{m: bm, o: min(bo, bo_max), c: bc}))
    else:
        out += [Tile.of(4, 1, BLOCK_R=br, BLOCK_O=bo) for br, bo in ((32, 128), (64, 64), (16, 256), (8, 512))]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------- opt-in autotuning


def autotune_enabled() -> bool:
    return os.environ.get("LERPFAST_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """``$LERPFAST_CACHE``, else ``$XDG_CACHE_HOME/lerpfast`` or ``~/.cache/lerpfast``."""
    env = os.environ.get("LERPFAST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lerpfast"


def device_tag(device=None) -> str:
    """File-name tag of a device: its CUDA name (``nvidia-h200``), or ``cpu``."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return dev.type
    name = torch.cuda.get_device_name(dev) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def table_path(device=None) -> Path:
    """The autotuning table of ``device``: ``cache_dir() / autotune-<device>.json``."""
    return cache_dir() / f"autotune-{device_tag(device)}.json"


_LOCK = threading.Lock()
_TABLES: dict[str, dict] = {}


def _table(path: Path) -> dict:
    key = str(path)
    if key not in _TABLES:
        entries = {}
        try:
            import triton

            data = json.loads(path.read_text())
            if data.get("triton") == triton.__version__:
                entries = data.get("entries", {})
        except (OSError, ValueError):
            pass
        _TABLES[key] = entries
    return _TABLES[key]


def _tile_from(d: dict) -> Tile:
    return Tile.of(int(d["num_warps"]), int(d["num_stages"]), **{k: int(v) for k, v in d["blocks"].items()})


def persisted(choice: Choice, device=None) -> Tile | None:
    """The stored autotuning winner of ``choice`` on ``device``, or None."""
    with _LOCK:
        hit = _table(table_path(device)).get(f"{choice.kernel}|{choice.key}")
    return _tile_from(hit) if hit else None


def _store(path: Path, key: str, tile: Tile, times: dict) -> None:
    import triton

    with _LOCK:
        table = _table(path)
        table[key] = {"blocks": tile.kwargs(), "num_warps": tile.num_warps, "num_stages": tile.num_stages,
                      "ms": times}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"triton": triton.__version__, "entries": table}, indent=1, sort_keys=True))
        os.replace(tmp, path)


def tuned(choice: Choice, run, device=None, bench=None) -> Tile:
    """The autotuned tile of ``choice``: the persisted winner, or time :func:`candidates` with ``run(tile)`` (one
    launch; ``bench(fn) -> ms``, default ``triton.testing.do_bench``) now and persist the fastest. Candidates that
    fail to compile or run are skipped."""
    hit = persisted(choice, device)
    if hit is not None:
        return hit
    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=5, rep=25)

    times = {}
    for tile in candidates(choice):
        try:
            times[str(tile)] = (tile, float(bench(lambda tile=tile: run(tile))))
        except Exception:  # noqa: BLE001 - a candidate the target rejects (shared memory, registers)
            continue
    if not times:
        return choice.default
    best = min(times.values(), key=lambda v: v[1])[0]
    _store(table_path(device), f"{choice.kernel}|{choice.key}", best, {k: v[1] for k, v in times.items()})
    return best
