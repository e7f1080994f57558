"""The kernels a sweep compiles, listed without a GPU and compiled ahead of time (``lerpfast warmup``).

:func:`plan` builds the engine for a model exactly as :func:`lerpfast.sweep` does (model rewriting, epilogue
fusion, the points of one pass with the reference point) on ``meta`` tensors, and runs one batched forward with
the dispatcher in planning mode (:func:`lerpfast.engine.dispatch.planning`): every op takes the path a CUDA
device takes in automatic mode, and each Triton launch is recorded (kernel, arguments as the JIT specializes
them, constexprs, launch config) instead of run (:func:`lerpfast.kernels.launch.recording`). Nothing is
allocated, so ResNet-50 at batch 128 plans in about a second on a CPU. The distinct variants among the
launches are what the first sweep on a GPU compiles (its dispatcher compiles each triton candidate once per
variant, in the background).

:func:`compile_plan` compiles those variants in parallel threads: on a GPU for the local device, into Triton's
on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), which a later sweep then loads in
milliseconds; on a machine without a GPU for sm_90 (:func:`lerpfast.kernels.launch.cross_compile`), as a check
and to measure the compile cost (``benchmarks/bench_compile.py``).

Command line::

    lerpfast warmup --model resnet20 --precision bf16 [--K 32] [--batch 1000] [--input-shape 3,32,32]
    python -m lerpfast.kernels.warmup --model resnet50 --precision fp32,tf32,bf16 --list
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Plan", "plan", "compile_plan", "add_parser", "main", "DEFAULT_BATCH"]

PRECISIONS = ("fp32", "tf32", "bf16")
#: the batch a plan assumes when none is given: lerpfast.sweep's default, 128 for ImageNet-size inputs
DEFAULT_BATCH = 1000


@dataclass
class Plan:
    """What one batched forward of a sweep launches on a GPU.

    ``launches``: every Triton launch, in order (:class:`lerpfast.kernels.launch.Launch`); ``variants``: the
    distinct compiled kernels among them (one compile each); ``ops``: dispatched ops that have no Triton
    candidate and run on torch.
    """

    model: str
    precision: str
    K: int
    batch: int
    input_shape: tuple
    launches: list = field(default_factory=list)
    torch_ops: int = 0
    seconds: float = 0.0

    @property
    def variants(self) -> list:
        from lerpfast.kernels.launch import unique

        return unique(self.launches)

    def to_json(self) -> dict:
        return {"model": self.model, "precision": self.precision, "K": self.K, "batch": self.batch,
                "input_shape": list(self.input_shape), "launches": len(self.launches), "torch_ops": self.torch_ops,
                "plan_seconds": round(self.seconds, 3),
                "variants": [v.describe() for v in self.variants]}


@contextlib.contextmanager
def _precision(precision: str):
    """The math flags a sweep sets for ``precision`` (tf32 on or off; bf16 autocast stands in the plan)."""
    mm, cd = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (mm.allow_tf32, cd.allow_tf32)
    mm.allow_tf32 = cd.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        mm.allow_tf32, cd.allow_tf32 = saved


def _model(model, input_shape, num_classes):
    """(name, meta-device model, input shape without batch) for a zoo name or a module."""
    if isinstance(model, str):
        from lerpfast.train import models

        shape = tuple(input_shape) if input_shape is not None else models.default_in_shape(model)
        with torch.device("meta"):
            net = models.create(model, num_classes=num_classes, in_shape=shape)
        return model, net, shape
    if input_shape is None:
        raise ValueError("plan(module, ...) needs input_shape (without the batch axis)")
    return type(model).__name__, model, tuple(input_shape)


def _slice(kind: str, state: dict, model: nn.Module, K: int):
    from lerpfast import geometry

    coords = [i / max(K - 1, 1) for i in range(K)]
    if kind == "line":
        spec = geometry.Line(state, state, coords)
        n = 2
    elif kind == "barycentric":
        side = max(2, round(K ** 0.5))
        spec = geometry.Barycentric(state, state, state, alphas=coords[:side], betas=coords[:side])
        n = 3
    elif kind == "bilinear":
        side = max(2, round(K ** 0.5))
        spec = geometry.Bilinear(state, state, state, state, alphas=coords[:side], betas=coords[:side])
        n = 4
    else:
        raise ValueError(f"slice={kind!r}: expected 'line', 'barycentric' or 'bilinear'")
    return spec.resolve([state] * n, model, torch.float32)


def plan(model: nn.Module | str, precision: str = "fp32", K: int = 32, *, batch: int | None = None,
         input_shape=None, num_classes: int | None = None, slice: str = "line",  # noqa: A002
         reference: bool = True, channels_last: bool = False, fuse: bool | str = "auto",
         bn: str = "interpolate") -> Plan:
    """The Triton launches of one batched forward of ``lerpfast.sweep(model, ...)`` on a GPU, without a GPU.

    Parameters
    ----------
    model : a zoo name (``lerpfast.train.models.available()``) or a module (then ``input_shape`` is required).
    precision : "fp32" | "tf32" | "bf16" (the sweep's ``precision``).
    K : points per pass (``points_per_pass``, or the sweep's K); ``reference`` adds the reference point.
    batch : images per batch (default :data:`DEFAULT_BATCH`, 128 for inputs larger than 64 px).
    input_shape : one input without the batch axis (default: the zoo model's, e.g. (3, 32, 32)).
    slice : "line" (two anchors, one direction), "barycentric" (three, two) or "bilinear" (four, three).
    channels_last, fuse, bn : the sweep's options of the same names.

    Returns
    -------
    :class:`Plan` (``plan.variants``: the distinct kernels the first sweep compiles).
    """
    from lerpfast.engine import dispatch
    from lerpfast.engine.functional import Points
    from lerpfast.engine.model import MultiPointModel
    from lerpfast.kernels import launch
    from lerpfast.metrics import PointMetrics

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    t0 = time.perf_counter()
    name, net, shape = _model(model, input_shape, num_classes)
    if batch is None:
        batch = 128 if max(shape[1:], default=0) > 64 else DEFAULT_BATCH
    state = {k: v.to("meta") for k, v in net.state_dict().items()}
    aff = _slice(slice, state, net, K)
    pts = aff.points()
    if reference:  # the sweep evaluates the reference point (anchor 0) in the same pass
        pts = Points(torch.cat([pts.anchor_idx, torch.zeros(1, dtype=torch.long)]),
                     torch.cat([pts.coefs, torch.zeros(1, aff.J, dtype=pts.coefs.dtype)]))
    policy = bn.partition(":")[0]
    if policy == "recompute":
        fuse = False  # as lerpfast.sweep: batch statistics are no per-point affine map
    elif isinstance(fuse, str) and fuse == "auto":
        fuse = True  # what "auto" means on a CUDA device (the slice is on meta here)
    mp = MultiPointModel(net, aff, fuse=fuse)
    mp.eval()
    x = torch.empty((batch, *shape), device="meta")
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    mp.set_points(pts.to("cpu").to("meta"))  # .to("cpu") first: the used anchors are worked out on the host
    autocast = torch.bfloat16 if precision == "bf16" else None
    used_before = dict(dispatch._USED)
    with torch.inference_mode(), _precision(precision), dispatch.planning(autocast), \
            launch.recording(dry=True) as rec:
        if policy == "recompute":
            mp.ctx.calibrate = True
            try:
                mp(x, batch)
            finally:
                mp.ctx.calibrate = False
        logits = mp(x, batch)  # (K [+ 1], batch, C)
        # the metrics of the batch, as the sweep takes them (one fused kernel on a GPU)
        target = torch.empty(batch, dtype=torch.long, device="meta")
        PointMetrics(K, reference=reference).update(logits[:K], target, logits[K] if reference else None)
    dispatch._USED.clear()
    dispatch._USED.update(used_before)
    return Plan(name, precision, K + int(reference), batch, shape, rec.launches, seconds=time.perf_counter() - t0)


def compile_plan(launches, *, device: torch.device | str | None = None, arch: int = 90, workers: int | None = None,
                 progress=None, quality: bool = False) -> dict:
    """Compile the distinct variants of ``launches`` in ``workers`` threads.

    On a GPU (``device`` "cuda", the default when one is present): for that device, into the JIT's and Triton's
    on-disk caches. Otherwise for ``sm_<arch>`` without a GPU (a check; the cubins land in the disk cache too).
    ``quality``: also read each variant's registers, spills, tensor-core use and H100 occupancy from its cubin and
    PTX (:func:`lerpfast.kernels.quality.analyze`), and the CTAs and waves on 132 SMs of each of its launches.

    Returns
    -------
    ``{"compiles", "seconds" (wall), "errors", "target", "workers", "variants": [{"kernel", "seconds", "error"}]}``;
    with ``quality`` each variant also has ``"quality"`` (None on a compile error) and ``"launches"``:
    ``[{"ctas", "waves"}]``, one per launch of that variant in plan order.
    """
    from lerpfast.kernels import launch

    launches = list(launches)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    variants = launch.unique(launches)
    workers = workers or min(16, os.cpu_count() or 1)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        target = f"sm_{major}{minor}"
        ctx = contextlib.nullcontext()
    else:
        target, ctx = f"sm_{arch} (cross-compiled, no GPU)", launch.cross_compile(arch)
    t0 = time.perf_counter()
    with ctx:
        results = launch.warm(variants, workers=workers, device=device if device.type == "cuda" else None,
                              on_done=progress)
    wall = time.perf_counter() - t0
    rows = [{"kernel": r["launch"].describe(), "seconds": round(r["seconds"], 3), "error": r["error"]}
            for r in results]
    if quality:
        from lerpfast.kernels import quality as kq

        for row, r in zip(rows, results):
            q = kq.analyze(r["compiled"]) if r["compiled"] is not None else None
            key = r["launch"].key()
            row["quality"] = q
            row["launches"] = [kq.waves(ln.grid, q["ctas_per_sm"] if q else 1) for ln in launches
                               if ln.key() == key]
    errors = [r for r in rows if r["error"]]
    return {"compiles": len(rows) - len(errors), "seconds": round(wall, 2), "errors": len(errors), "target": target,
            "workers": workers, "variants": rows}


# ---------------------------------------------------------------------------------------------- command line


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape: expected e.g. 3,32,32, got {text!r}") from None


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="zoo model (lerpfast train --help lists them), e.g. resnet20")
    p.add_argument("--precision", default="fp32,tf32,bf16",
                   help="fp32, tf32, bf16 or a comma list (default: all three)")
    p.add_argument("--K", "-K", type=int, default=32, dest="K", help="points per pass (default 32; +1 reference)")
    p.add_argument("--batch", type=int, default=None, help=f"images per batch (default {DEFAULT_BATCH}; 128 "
                                                            "for inputs larger than 64 px)")
    p.add_argument("--input-shape", type=_shape, default=None, help="one input without the batch, e.g. 3,32,32")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--slice", default="line", choices=("line", "barycentric", "bilinear"),
                   help="the slice's structure: anchors and directions (default line)")
    p.add_argument("--channels-last", action="store_true", help="the sweep's channels_last=True")
    p.add_argument("--no-reference", action="store_true", help="the sweep's reference=None")
    p.add_argument("--workers", type=int, default=None, help="compile threads (default: CPU count, at most 16)")
    p.add_argument("--arch", type=int, default=90, help="target without a GPU: sm_<arch> (default 90)")
    p.add_argument("--list", action="store_true", help="print the plan, compile nothing")
    p.add_argument("--json", default=None, help="write the plans and compile results to this file")
    p.set_defaults(func=run)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lerpfast warmup`` (wired in lerpfast/cli.py)."""
    p = subparsers.add_parser(
        "warmup", help="compile the Triton kernels a sweep of a model needs, before the sweep",
        description="Compile the Triton kernels the first sweep of a model launches (traced on meta tensors, no "
                    "data), in parallel, into Triton's on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache): "
                    "a later sweep loads them instead of compiling. Without a GPU: compiles for sm_90 as a check.",
        epilog="example: lerpfast warmup --model resnet20 --precision bf16 --K 32")
    return _configure(p)


def run(args: argparse.Namespace) -> int:
    """Handler of ``lerpfast warmup``; prints one line per precision, the last ``compiles=N seconds=S``."""
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"--precision {p!r}: expected fp32, tf32 or bf16")
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not args.list:
        raise ValueError("lerpfast warmup compiles kernels: unset TRITON_INTERPRET")
    out, launches = [], []
    for p in precisions:
        pl = plan(args.model, p, args.K, batch=args.batch, input_shape=args.input_shape,
                  num_classes=args.num_classes, slice=args.slice, reference=not args.no_reference,
                  channels_last=args.channels_last)
        launches += pl.launches
        rec = pl.to_json()
        print(f"{args.model} {p}: {len(pl.launches)} launches per batch, {len(pl.variants)} kernel variants "
              f"(planned in {pl.seconds:.1f} s)")
        if args.list:
            for v in rec["variants"]:
                print("  " + v)
        out.append(rec)
    result = None
    if not args.list:
        from lerpfast.kernels import launch

        n = len(launch.unique(launches))
        print(f"compiling {n} variants ({args.workers or min(16, os.cpu_count() or 1)} threads) ...", flush=True)
        result = compile_plan(launches, arch=args.arch, workers=args.workers)
        print(f"target {result['target']}, cache {_cache_dir()}")
        for r in result["variants"]:
            if r["error"]:
                print(f"  FAILED {r['kernel']}: {r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plans": out, "compile": result}, f, indent=1)
    if result is not None:
        print(f"compiles={result['compiles']} seconds={result['seconds']}")
        return 1 if result["errors"] else 0
    return 0


def _cache_dir() -> str:
    try:
        from triton import knobs

        return str(knobs.cache.dir)
    except Exception:  # noqa: BLE001 - older triton
        return os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))


def main(argv=None) -> int:
    p = _configure(argparse.ArgumentParser(prog="python -m lerpfast.kernels.warmup",
                                           description=__doc__.split("\n\n")[0]))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
