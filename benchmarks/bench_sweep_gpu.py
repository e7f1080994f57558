"""End-to-end sweep throughput on one GPU: lerpfast vs the baselines, measured in the same run, within a budget.

Claim to check (issues 6 and 9, DESIGN section 6): on one H100 / H200, through ``lerpfast.sweep`` on GPU-resident
data, the batched engine reaches the targets below in image-point evaluations per second (at the K best for each
precision), is at least 3x the bf16 per-point loop at K = 32 on every model, its fp32 mode is within 1e-5
relative of float64, and its memory for weights is flat in K.

    target (tf32 / bf16): LeNet-300-100 500 M / 1 G, ResNet-20 1.5 M / 3 M, VGG-16 400 k / 800 k,
                          ResNet-50 (224 px) 20 k / 40 k image-points/s

Usage::

    python benchmarks/bench_sweep_gpu.py --budget-s 300 --jsonl out/sweep_gpu.jsonl --md out/sweep_gpu.md
    python benchmarks/bench_sweep_gpu.py --dry --budget-s 60 --jsonl /tmp/r.jsonl   # CPU, tiny sizes: plumbing
    python benchmarks/bench_sweep_gpu.py --summarize out/sweep_gpu.jsonl
        # -> benchmarks/results/sweep_gpu_<device>.json and .md (the README quotes the .md table)

How it runs:

* Every record (a header with device, versions, commit and settings; one record per model x method x precision
  x K measurement; skipped / timed-out / failed items; an end record) is appended to the JSON-lines file and
  flushed the moment it exists, so a run killed at any point keeps everything it finished.
* A plan orders the items by importance: per model the bf16 loop baseline, lerpfast bf16 / tf32 at K = 32; then
  the K sweep (for the best K); then the error of every precision against a float64 sweep; then peak memory
  against K (16 images, so weights dominate); then the other baselines (fp32 loop, torch.func vmap, lerpfast
  fp32, bf16 without fusion, bf16 with CUDA graphs); then the remaining K. Each tier runs over all models
  before the next tier starts.
* ``--budget-s`` bounds the whole run: before each item its cost is estimated from what was measured so far
  (rates of the same model and method, scaled by K and images; the compile overhead seen on first calls) and an
  item that would not fit is recorded as ``skipped`` (reason ``budget``) instead of run.
* The measurements run in a worker process; an item that exceeds ``--item-timeout-s`` (a hung compile, say) is
  killed with the worker, recorded as ``timeout`` (with the first-call time if that finished), the rest of its
  model x method group is skipped, and a fresh worker continues with the next item.
* Each throughput record has ``first_call_s`` (the first sweep of that configuration in the process: Triton
  compilation, dispatch measurement, cuDNN autotuning, CUDA-graph capture) apart from the steady state
  (``steady_s`` = best of the timed repeats after it, ``steady_all_s`` = all of them).
* ``--dry`` (or ``DRY=1``) runs the whole plan on the CPU at tiny sizes and checks the JSONL it wrote: the
  numbers mean nothing, the plumbing is tested (tests/test_bench_gpu.py).

Without CUDA and without ``--dry`` the script refuses (exit code 2). ``--dry-run-cpu`` is the old name of
``--dry``. The session script benchmarks/gpu_session.sh runs this after building and testing on a fresh GPU
machine; docs/gpu_session.md has the device call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SCHEMA = 2


@dataclass(frozen=True)
class ModelSpec:
    images: int  # full-size number of images (GPU-resident, synthetic)
    in_shape: tuple
    classes: int
    batch: int
    k_max: int  # largest K measured (activations of K x batch images must fit)
    acc_images: int  # images of the float64 accuracy check
    prior_rate: float  # conservative loop rate (image-points/s) before anything is measured on a GPU


MODELS = {
    "lenet_300_100": ModelSpec(10_000, (1, 28, 28), 10, 10_000, 256, 2000, 2e5),
    "resnet20": ModelSpec(10_000, (3, 32, 32), 10, 1000, 128, 1000, 1e5),
    "vgg16": ModelSpec(10_000, (3, 32, 32), 10, 1000, 128, 500, 5e4),
    "resnet50": ModelSpec(1024, (3, 224, 224), 1000, 128, 64, 128, 3e3),
}
# image-points/s targets (issue 9): tf32, bf16
TARGETS = {"lenet_300_100": (500e6, 1e9), "resnet20": (1.5e6, 3e6), "vgg16": (400e3, 800e3),
           "resnet50": (20e3, 40e3)}
METHODS = {
    "loop_fp32": dict(method="loop", precision="fp32", channels_last=False),
    "loop_bf16_cl": dict(method="loop", precision="bf16", channels_last=True),
    "vmap_fp32": dict(method="vmap", precision="fp32", channels_last=False),
    "lerpfast_fp32": dict(method="engine", precision="fp32", channels_last=False),
    "lerpfast_tf32": dict(method="engine", precision="tf32", channels_last=True),
    "lerpfast_bf16": dict(method="engine", precision="bf16", channels_last=True),
    # what epilogue fusion and CUDA graphs each add (the rows above use the defaults: fused, no graphs)
    "lerpfast_bf16_unfused": dict(method="engine", precision="bf16", channels_last=True, fuse=False),
    "lerpfast_bf16_graphs": dict(method="engine", precision="bf16", channels_last=True, compile="cudagraphs"),
}
ACC_METHODS = ("lerpfast_fp32", "lerpfast_tf32", "lerpfast_bf16", "loop_fp32")
MEM_KS = (1, 8, 32, 128)
DEFAULT_KS = (1, 4, 8, 16, 32, 64, 128)


@dataclass
class Settings:
    models: list = field(default_factory=lambda: list(MODELS))
    ks: list = field(default_factory=lambda: list(DEFAULT_KS))
    core_k: int = 32
    methods: list = field(default_factory=lambda: list(METHODS))
    budget_s: float = 420.0
    item_timeout_s: float = 150.0
    acc_points: int = 16
    mem_images: int = 16
    repeats: int = 5  # at most this many timed sweeps after the first call ...
    min_time_s: float = 1.0  # ... and at least one; fewer than `repeats` once this much was timed
    images_scale: float = 1.0
    dry: bool = False
    threads: int | None = None
    jsonl: str | None = None
    append: bool = False
    out: str | None = None
    md: str | None = None
    tiers: list = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])


def _ints(s):
    return [int(t) for t in str(s).split(",") if t.strip()]


def _parse(argv=None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="numbers of points K for lerpfast")
    p.add_argument("--core-k", type=int, default=32, help="K of the headline comparison (loop baselines run here)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--budget-s", type=float, default=None, help="whole run, seconds (default 420; dry 120)")
    p.add_argument("--item-timeout-s", type=float, default=None,
                   help="one item, seconds (default 150; dry 60); also at most max(40 %% of the time left, 30 s, "
                        "3x its estimate)")
    p.add_argument("--acc-points", type=int, default=16, help="points compared with the float64 reference")
    p.add_argument("--repeats", type=int, default=5, help="most timed sweeps after the first call")
    p.add_argument("--min-time-s", type=float, default=1.0, help="stop repeating once this much was timed")
    p.add_argument("--images-scale", type=float, default=1.0, help="scale the number of images per model")
    p.add_argument("--tiers", default="1,2,3,4,5,6", help="plan tiers to run (1 headline ... 6 extra K)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the worker (dry default 1)")
    p.add_argument("--dry", "--dry-run-cpu", dest="dry", action="store_true",
                   help="tiny sizes on the CPU: checks the script only (also DRY=1)")
    p.add_argument("--jsonl", default=None, help="records, one JSON a line (default: next to --out, or "
                                                 "benchmarks/results/sweep_gpu_<device>.jsonl)")
    p.add_argument("--append", action="store_true", help="append to --jsonl instead of starting it afresh")
    p.add_argument("--out", default=None, help="summary JSON written at the end (default: none)")
    p.add_argument("--md", default=None, help="summary markdown table written at the end (default: none)")
    p.add_argument("--summarize", metavar="JSONL", default=None,
                   help="only summarize a records file: --out / --md default to "
                        "benchmarks/results/sweep_gpu_<device>.json / .md")
    p.add_argument("--check", metavar="JSONL", default=None,
                   help="only check a records file (its last run): exit 1 if records are missing or malformed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dry = a.dry or os.environ.get("DRY", "0") == "1"
    s = Settings(models=[m for m in a.models.split(",") if m], ks=_ints(a.ks), core_k=a.core_k,
                 methods=[m for m in a.methods.split(",") if m],
                 budget_s=a.budget_s if a.budget_s is not None else (120.0 if dry else 420.0),
                 item_timeout_s=a.item_timeout_s if a.item_timeout_s is not None else (60.0 if dry else 150.0),
                 acc_points=a.acc_points, repeats=a.repeats, min_time_s=a.min_time_s, images_scale=a.images_scale,
                 dry=dry, threads=a.threads, jsonl=a.jsonl, append=a.append, out=a.out, md=a.md,
                 tiers=_ints(a.tiers))
    for m in s.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for m in s.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if s.dry:
        s.ks = [k for k in s.ks if k <= 4] or [1, 2]
        s.acc_points, s.mem_images = 3, 4
        s.repeats, s.min_time_s = min(s.repeats, 2), 0.0
        s.threads = s.threads or 1
    if s.core_k not in s.ks:
        s.core_k = max([k for k in s.ks if k <= s.core_k] or s.ks[:1])
    return s, a


# ================================================================================================ plan


@dataclass
class Item:
    id: str
    kind: str  # env | throughput | accuracy | memory
    tier: int
    model: str | None = None
    method: str | None = None  # METHODS key; "fp64_ref" for the accuracy reference
    K: int | None = None

    @property
    def group(self) -> str:
        return f"{self.model}/{self.method}"


def model_size(name: str, s: Settings) -> tuple[int, tuple, int, int]:
    """(images, input shape, batch size, K cap) of a model under the settings."""
    spec = MODELS[name]
    if s.dry:  # tiny: ResNet-50 on 32 px (it has no fixed input size); VGG needs 32 px for its 5 poolings
        shape = (3, 32, 32) if name == "resnet50" else spec.in_shape
        return 8, shape, 8, 1 << 30
    n = max(16, int(spec.images * s.images_scale))
    return n, spec.in_shape, min(spec.batch, n), spec.k_max


def build_plan(s: Settings) -> list[Item]:
    plan = [Item("env", "env", 0)]
    ms = s.methods
    core = s.core_k

    def tp(tier, m, method, K):
        if method in ms and K <= model_size(m, s)[3]:
            plan.append(Item(f"{m}/{method}/K{K}", "throughput", tier, m, method, K))

    def tier(n):
        return n in s.tiers

    larger = sorted([k for k in s.ks if k > core], reverse=True)
    smaller = sorted([k for k in s.ks if k < core], reverse=True)
    sweep2 = larger + smaller[:1]  # 128, 64, then 8: where the best K is likely to be
    rest = smaller[1:]
    if tier(1):
        for m in s.models:
            for method in ("loop_bf16_cl", "lerpfast_bf16", "lerpfast_tf32"):
                tp(1, m, method, core)
    if tier(2):
        for m in s.models:
            for K in sweep2:
                for method in ("lerpfast_bf16", "lerpfast_tf32"):
                    tp(2, m, method, K)
    if tier(3):
        for m in s.models:
            plan.append(Item(f"{m}/accuracy/fp64_ref", "accuracy", 3, m, "fp64_ref", s.acc_points))
            for method in ACC_METHODS:
                if method in ms:
                    plan.append(Item(f"{m}/accuracy/{method}", "accuracy", 3, m, method, s.acc_points))
    if tier(4):
        mem_ks = sorted({k for k in MEM_KS if k <= max(s.ks)} | {1, max(s.ks)})
        for m in s.models:
            for K in mem_ks:
                if K <= model_size(m, s)[3] and "lerpfast_bf16" in ms:
                    plan.append(Item(f"{m}/memory/lerpfast_bf16/K{K}", "memory", 4, m, "lerpfast_bf16", K))
    if tier(5):
        for m in s.models:
            for method in ("loop_fp32", "vmap_fp32", "lerpfast_fp32", "lerpfast_bf16_unfused",
                           "lerpfast_bf16_graphs"):
                tp(5, m, method, core)
    if tier(6):
        for m in s.models:
            for K in rest:
                for method in ("lerpfast_bf16", "lerpfast_tf32"):
                    tp(6, m, method, K)
            for method in ("loop_bf16_cl", "vmap_fp32"):
                tp(6, m, method, min(s.ks))
    seen, out = set(), []
    for it in plan:  # an item listed twice (e.g. core K also in the sweep list) runs once
        if it.id not in seen:
            seen.add(it.id)
            out.append(it)
    return out


# ================================================================================================ estimates


class Estimator:
    """Cost of an item from the records so far (conservative: linear in K and images, compile overhead seen)."""

    def __init__(self, s: Settings):
        self.s = s
        self.tp: list[dict] = []  # ok throughput records
        self.extra: dict[str, float] = {}  # method -> largest first-call overhead seen (any model)
        self.extra_model: dict[tuple, float] = {}  # (model, method) -> latest overhead
        self.extra_kind: dict[tuple, float] = {}  # (model, engine | loop | vmap) -> largest overhead
        self.model_load: dict[str, float] = {}
        self.worker_start = 2.0 if s.dry else 10.0

    def add(self, rec: dict) -> None:
        if rec.get("type") == "model" and "load_s" in rec:
            self.model_load[rec["model"]] = rec["load_s"]
        if rec.get("type") == "worker_ready":
            self.worker_start = rec.get("start_s", self.worker_start)
        if rec.get("status") != "ok" or rec.get("type") not in ("throughput", "accuracy", "memory"):
            return
        if rec["type"] == "throughput":
            self.tp.append(rec)
        first, steady = rec.get("time_to_steady_s", rec.get("first_call_s")), rec.get("steady_s")
        if first is not None and steady is not None:
            over = max(0.0, first - steady)
            key = rec["method"]
            self.extra[key] = max(self.extra.get(key, 0.0), over)
            self.extra_model[(rec["model"], key)] = over  # the latest: later K compile fewer new variants
            kind = (rec["model"], METHODS[key]["method"])
            self.extra_kind[kind] = max(self.extra_kind.get(kind, 0.0), over)

    def _sweep_s(self, model: str, method: str, K: int, images: int) -> float:
        """Seconds of one steady sweep."""
        if method == "fp64_ref":
            return 20.0 * self._sweep_s(model, "lerpfast_fp32", K, images)
        kind = METHODS[method]["method"]
        pools = [[r for r in self.tp if r["model"] == model and r["method"] == method],
                 [r for r in self.tp if r["model"] == model and METHODS[r["method"]]["method"] == kind],
                 [r for r in self.tp if r["model"] == model]]  # engine unknown: as slow as a known baseline
        for pool in pools:
            if pool:
                r = min(pool, key=lambda r: abs(math.log(r["K"] / K)))
                per_img = r["steady_s"] / r["images"]
                return per_img * images * max(1.0, K / r["K"])  # fewer points are not slower
        if self.s.dry:
            return 0.02 * K * images / 8
        return K * images / MODELS[model].prior_rate

    def _extra_s(self, model: str, method: str) -> float:
        key = "lerpfast_fp32" if method == "fp64_ref" else method
        if (model, key) in self.extra_model:
            return self.extra_model[(model, key)]
        if (model, METHODS[key]["method"]) in self.extra_kind:  # e.g. tf32 after bf16: as many kernels
            return self.extra_kind[(model, METHODS[key]["method"])]
        if key in self.extra:
            return self.extra[key]
        if self.s.dry:
            return 1.0
        return 30.0 if METHODS[key]["method"] == "engine" else 3.0

    def estimate(self, it: Item, images: int, loaded: bool) -> float:
        if it.kind == "env":
            return 3.0 if self.s.dry else 15.0
        one = self._sweep_s(it.model, it.method, it.K, images)
        n_rep = 1 if it.kind in ("accuracy", "memory") else max(1, min(self.s.repeats, math.ceil(
            self.s.min_time_s / max(one, 1e-9))))
        load = 0.0 if loaded else self.model_load.get(it.model, 1.0 if self.s.dry else 8.0)
        return load + self._extra_s(it.model, it.method) + one * (1 + n_rep)


# ================================================================================================ worker


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, n: int) -> dict[str, float]:
    """Measured dense matmul peak in TFLOP/s for fp32 (no tf32), tf32 and bf16 (best of 5, random data)."""
    import torch

    out = {}
    old = torch.get_float32_matmul_precision()
    try:
        for name, dtype, prec in [("fp32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
                                  ("bf16", torch.bfloat16, "highest")]:
            torch.set_float32_matmul_precision(prec)
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            a @ b
            _sync(device)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                a @ b
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * n**3 / best / 1e12
            del a, b
    finally:
        torch.set_float32_matmul_precision(old)
    return out


class Worker:
    """Runs items sent by the parent; one JSON message a line on the protocol pipe."""

    def __init__(self, s: Settings, proto):
        import torch

        self.s, self.proto, self.torch = s, proto, torch
        self.device = torch.device("cpu" if s.dry else "cuda")
        self.models: dict[str, dict] = {}
        self.ran: set[str] = set()  # method groups run in this process (first_call_in_process)

    def send(self, msg: dict) -> None:
        self.proto.write(json.dumps(msg, default=str) + "\n")
        self.proto.flush()

    # ---------------------------------------------------------------------------------------- model and data
    def model(self, name: str) -> dict:
        if name in self.models:
            return self.models[name]
        torch = self.torch
        from lerpfast.train import models

        t0 = time.perf_counter()
        spec = MODELS[name]
        n, shape, batch, _ = model_size(name, self.s)
        torch.manual_seed(0)
        model_a = models.create(name, num_classes=spec.classes, in_shape=shape).to(self.device)
        torch.manual_seed(1)
        model_b = models.create(name, num_classes=spec.classes, in_shape=shape).to(self.device)
        g = torch.Generator(device="cpu").manual_seed(2)
        X = torch.randn((n, *shape), generator=g).to(self.device)
        y = torch.randint(0, spec.classes, (n,), generator=g).to(self.device)
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model_a.eval()(X[:2])
        flops = fc.get_total_flops() / 2  # per image, 2 per multiply-add
        params = sum(p.numel() for p in model_a.parameters())
        _sync(self.device)
        m = dict(a=model_a, ends=(model_a.state_dict(), model_b.state_dict()), X=X, y=y, n=n, batch=batch,
                 shape=shape, flops=flops, param_bytes=4 * params, ref=None)
        self.models[name] = m
        self.send({"type": "model", "model": name, "images": n, "in_shape": list(shape), "batch_size": batch,
                   "classes": spec.classes, "flops_per_image": flops, "params": params, "param_bytes": 4 * params,
                   "load_s": time.perf_counter() - t0})
        return m

    # ---------------------------------------------------------------------------------------- one sweep
    def sweep(self, m, method, alphas, n_img, batch, points_per_pass=None):
        import lerpfast

        cfg = METHODS[method] if method != "fp64_ref" else dict(method="engine", precision="fp64",
                                                                channels_last=False)
        kw = dict(batch_size=batch, device=self.device, progress=False, method=cfg["method"],
                  precision=cfg["precision"], channels_last=cfg["channels_last"],
                  **{k: cfg[k] for k in ("fuse", "compile") if k in cfg})
        if points_per_pass is not None:
            kw["points_per_pass"] = points_per_pass
        data = (m["X"][:n_img], m["y"][:n_img]) if n_img < m["n"] else (m["X"], m["y"])
        _sync(self.device)
        t0 = time.perf_counter()
        res = lerpfast.sweep(m["a"], m["ends"], alphas, data, **kw)
        _sync(self.device)
        return time.perf_counter() - t0, res

    @staticmethod
    def alphas(K):
        return [(-0.5 + 2.0 * i / (K - 1)) for i in range(K)] if K > 1 else [0.5]

    def _report(self):
        try:
            from lerpfast.engine import dispatch

            return dispatch.report()
        except Exception:  # noqa: BLE001 - informational only
            return None

    @staticmethod
    def _diff(after, before):
        if after is None or before is None:
            return after
        out = {}
        for op, counts in after.items():
            d = {b: n - before.get(op, {}).get(b, 0) for b, n in counts.items()}
            d = {b: n for b, n in d.items() if n}
            if d:
                out[op] = d
        return out

    def _meta(self, res) -> dict:
        meta = getattr(res, "meta", {}) or {}
        keep = {k: meta[k] for k in ("seconds", "setup_seconds", "points_per_pass", "cudagraphs") if k in meta}
        fus = meta.get("fusion")
        if isinstance(fus, dict):
            keep["fusion"] = {k: fus[k] for k in ("mode", "calls") if k in fus} or None
            if "chains" in fus:
                keep["fusion_chains"] = len(fus["chains"]) if hasattr(fus["chains"], "__len__") else fus["chains"]
        return keep

    # ---------------------------------------------------------------------------------------- items
    def run_item(self, it: dict) -> dict:
        hang = os.environ.get("LERPFAST_BENCH_HANG")  # tests: make one item hang to exercise the timeout
        kind = it["kind"]
        if kind == "env":
            return self.env()
        m = self.model(it["model"])
        if hang and hang in it["id"]:
            self.send({"type": "progress", "id": it["id"], "phase": "hanging (LERPFAST_BENCH_HANG)"})
            time.sleep(1e6)
        return {"throughput": self.throughput, "accuracy": self.accuracy, "memory": self.memory}[kind](it, m)

    def env(self) -> dict:
        torch = self.torch
        dev = self.device
        rec = {"type": "env", "device": str(dev), "cudnn": torch.backends.cudnn.version()
               if torch.backends.cudnn.is_available() else None}
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            rec.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                       memory_total_bytes=p.total_memory)
        else:
            rec.update(device_name="cpu (dry run)", cpu=platform.processor() or platform.machine(),
                       threads=torch.get_num_threads())
        from lerpfast.kernels import ext

        rec["lerpfast_C"] = ext.available()
        rec["lerpfast_C_cuda"] = ext.has_cuda_kernels()
        try:
            from lerpfast.kernels import triton_available

            rec["triton_available"] = bool(triton_available())
        except Exception as exc:  # noqa: BLE001
            rec["triton_available"] = repr(exc)
        t0 = time.perf_counter()
        rec["matmul_peak_tflops"] = matmul_peak(dev, 256 if self.s.dry else 8192)
        rec["matmul_peak_s"] = time.perf_counter() - t0
        return rec

    def settle(self, it, call) -> dict:
        """After a first call: wait for the dispatcher's background compiles, if it has them, then one more call
        (where the compiled candidates are measured and the choice settles), so the timed repeats see the steady
        state. Optional API (``dispatch.wait`` / ``dispatch.pending``): without it, nothing happens here."""
        try:
            from lerpfast.engine import dispatch
        except Exception:  # noqa: BLE001
            return {}
        wait, pending = getattr(dispatch, "wait", None), getattr(dispatch, "pending", None)
        if wait is None or self.device.type != "cuda":
            return {}
        n = pending() if pending else None
        if not n:
            return {"compile_pending": n}
        t0 = time.perf_counter()
        budget = max(1.0, 0.5 * it.get("limit_s", 60.0) - (time.perf_counter() - it["_t0"]))
        done = wait(timeout=budget)
        out = {"compile_pending": n, "compile_wait_s": time.perf_counter() - t0, "compile_wait_done": bool(done)}
        self.send({"type": "progress", "id": it["id"], "phase": "compile_wait", **out})
        out["settle_s"] = call()
        return out

    def throughput(self, it, m) -> dict:
        torch = self.torch
        method, K = it["method"], it["K"]
        cfg = METHODS[method]
        rec = {"type": "throughput", "model": it["model"], "method": method, "sweep_method": cfg["method"],
               "precision": cfg["precision"], "channels_last": cfg["channels_last"], "fuse": cfg.get("fuse", "auto"),
               "compile": cfg.get("compile", False), "K": K, "images": m["n"], "batch_size": m["batch"],
               "first_call_in_process": it["group"] not in self.ran}
        self.ran.add(it["group"])
        alphas = self.alphas(K)
        t_first, res = self.sweep(m, method, alphas, m["n"], m["batch"])
        rec["first_call_s"] = t_first
        self.send({"type": "progress", "id": it["id"], "phase": "first_call", "first_call_s": t_first})
        rec.update(self.settle(it, lambda: self.sweep(m, method, alphas, m["n"], m["batch"])[0]))
        rec["time_to_steady_s"] = t_first + rec.get("compile_wait_s", 0.0) + rec.get("settle_s", 0.0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times, before = [], None
        while len(times) < self.s.repeats and (len(times) < 1 or sum(times) < self.s.min_time_s):
            before = self._report()
            t, res = self.sweep(m, method, alphas, m["n"], m["batch"])
            times.append(t)
        best = min(times)
        rate = K * m["n"] / best
        rec.update(steady_s=best, steady_median_s=sorted(times)[len(times) // 2], steady_all_s=times,
                   img_points_per_s=rate, first_call_img_points_per_s=K * m["n"] / t_first,
                   peak_mem_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                   else None, backends=self._diff(self._report(), before), **self._meta(res))
        return rec

    def accuracy(self, it, m) -> dict:
        torch = self.torch
        n = min(m["n"], MODELS[it["model"]].acc_images if not self.s.dry else m["n"])
        batch = min(m["batch"], n)
        alphas = self.alphas(it["K"])
        rec = {"type": "accuracy", "model": it["model"], "method": it["method"], "K": it["K"], "images": n}
        ref_t = None
        if m["ref"] is None:  # also after a worker restart: the reference is recomputed
            ref_t, res = self.sweep(m, "fp64_ref", alphas, n, batch)
            m["ref"] = torch.as_tensor(res.loss, dtype=torch.float64)
        if it["method"] == "fp64_ref":
            rec.update(seconds=ref_t, loss_min=m["ref"].min().item(), loss_max=m["ref"].max().item())
            return rec
        t, res = self.sweep(m, it["method"], alphas, n, batch)
        loss = torch.as_tensor(res.loss, dtype=torch.float64)
        dev = (loss - m["ref"]).abs()
        rec.update(seconds=t, first_call_s=t, max_abs=dev.max().item(),
                   max_rel=(dev / m["ref"].abs().clamp_min(1e-12)).max().item(),
                   nan=bool(torch.isnan(loss).any().item()), precision=METHODS[it["method"]]["precision"])
        return rec

    def memory(self, it, m) -> dict:
        """Peak memory above the resident model and data of a sweep on a few images: weights dominate there."""
        torch = self.torch
        n = min(self.s.mem_images, m["n"])
        K = it["K"]
        alphas = self.alphas(K)
        t_first, _ = self.sweep(m, it["method"], alphas, n, n, points_per_pass=K)
        rec = {"type": "memory", "model": it["model"], "method": it["method"], "K": K, "images": n,
               "first_call_s": t_first, "param_bytes": m["param_bytes"], "materialized_bytes": K * m["param_bytes"]}
        rec.update(self.settle(it, lambda: self.sweep(m, it["method"], alphas, n, n, points_per_pass=K)[0]))
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            t, _ = self.sweep(m, it["method"], alphas, n, n, points_per_pass=K)
            extra = torch.cuda.max_memory_allocated(self.device) - base
            rec.update(seconds=t, peak_extra_bytes=extra, extra_over_materialized=extra / (K * m["param_bytes"]))
        else:
            rec.update(seconds=None, peak_extra_bytes=None, extra_over_materialized=None)
        return rec


def worker_main(s: Settings) -> int:
    t0 = time.perf_counter()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (ours, lerpfast's, C libraries') go to stderr, not the protocol pipe
    try:  # die with the parent (Linux)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except Exception:  # noqa: BLE001
        pass
    sys.path.insert(0, ROOT)
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)
    w = Worker(s, proto)
    import lerpfast  # noqa: F401 - import time counts as start

    w.send({"type": "worker_ready", "pid": os.getpid(), "start_s": time.perf_counter() - t0})
    for line in sys.stdin:
        if not line.strip():
            continue
        it = json.loads(line)
        t1 = it["_t0"] = time.perf_counter()
        try:
            rec = w.run_item(it)
            rec["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded; the plan goes on
            oom = "out of memory" in str(exc).lower()
            rec = {"type": it["kind"], "model": it.get("model"), "method": it.get("method"), "K": it.get("K"),
                   "status": "error", "error": "out of memory" if oom else repr(exc)[:2000],
                   "traceback": traceback.format_exc(limit=6)[-4000:]}
        rec["id"] = it["id"]
        rec["tier"] = it["tier"]
        rec["elapsed_s"] = time.perf_counter() - t1
        w.send(rec)
        w.send({"type": "done", "id": it["id"]})
        gc.collect()
        if w.device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


# ================================================================================================ parent


class WorkerHandle:
    def __init__(self, s: Settings, argv_settings: dict):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     process_group=0)  # own group: killed alone on a timeout
        self.proc.stdin.write((json.dumps(argv_settings) + "\n").encode())
        self.proc.stdin.flush()
        self.buf = b""
        os.set_blocking(self.proc.stdout.fileno(), False)

    def send(self, item: Item, limit_s: float) -> None:
        msg = {**asdict(item), "group": item.group, "limit_s": limit_s}
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, deadline: float) -> dict | None | str:
        """Next message; None when the deadline passed; "eof" when the worker died."""
        import select

        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return "eof"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"type": "noise", "line": line[:500].decode(errors="replace")}

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001
            pass
        self.kill()


class Recorder:
    """Appends one JSON a line, flushed and synced at once."""

    def __init__(self, path: str, append: bool, run: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self.path, self.run = path, run
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self.fd = os.open(path, flags, 0o644)
        self.counts: dict[str, int] = {}

    def write(self, rec: dict) -> dict:
        rec = {"run": self.run, "t": round(time.time(), 3), **rec}
        os.write(self.fd, (json.dumps(rec, default=str) + "\n").encode())  # one call: a signal cannot split it
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        st = rec.get("status")
        if st:
            self.counts[st] = self.counts.get(st, 0) + 1
        return rec

    def close(self):
        os.close(self.fd)


def _source_sha256() -> str:
    h = hashlib.sha256()
    paths = []
    for sub in ("lerpfast", "csrc"):
        for dp, dns, fns in os.walk(os.path.join(ROOT, sub)):
            dns[:] = sorted(d for d in dns if d != "__pycache__")
            paths += [os.path.join(dp, f) for f in fns if f.endswith((".py", ".cpp", ".cu", ".h"))]
    paths += [os.path.join(ROOT, p) for p in ("setup.py", "benchmarks/bench_sweep_gpu.py")]
    for p in sorted(paths):
        if os.path.exists(p):
            h.update(os.path.relpath(p, ROOT).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def header(s: Settings, argv, run: str) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    try:
        from lerpfast._version import __version__ as lf_version
    except Exception:  # noqa: BLE001
        lf_version = None
    commit = os.environ.get("LERPFAST_COMMIT") or _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"type": "header", "schema": SCHEMA, "started": _dt.datetime.now(_dt.UTC).isoformat(),
            "argv": list(argv) if argv is not None else sys.argv[1:], "settings": asdict(s), "dry": s.dry,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "numpy": _version("numpy"), "lerpfast": lf_version,
            "platform": platform.platform(), "hostname": platform.node(), "commit": commit,
            "dirty": None if dirty is None else bool(dirty), "source_sha256": _source_sha256(),
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("LERPFAST_", "TRITON_", "CUDA_VISIBLE", "TORCH_CUDA_ARCH"))}}


def _device_tag(name: str | None, dry: bool) -> str:
    if dry:
        return "cpu_dry_run"
    tag = "".join(c if c.isalnum() else "_" for c in (name or "gpu").lower()).strip("_")
    while "__" in tag:
        tag = tag.replace("__", "_")
    return tag or "gpu"


def run_plan(s: Settings, argv) -> int:
    run = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    jsonl = s.jsonl
    if jsonl is None:
        if s.out:
            jsonl = os.path.splitext(s.out)[0] + ".jsonl"
        else:
            tag = "cpu_dry_run" if s.dry else _device_tag(_cuda_name(), False)
            jsonl = os.path.join(RESULTS, f"sweep_gpu_{tag}.jsonl")
    t_start = time.monotonic()
    deadline = t_start + s.budget_s
    reserve = 1.0 if s.dry else 3.0  # for the end record and the summary
    rec = Recorder(jsonl, s.append, run)
    rec.write(header(s, argv, run))
    est = Estimator(s)
    plan = build_plan(s)
    rec.write({"type": "plan", "items": [it.id for it in plan], "budget_s": s.budget_s,
               "item_timeout_s": s.item_timeout_s})
    print(f"bench_sweep_gpu: {len(plan)} items, budget {s.budget_s:.0f} s, records -> {jsonl}", flush=True)
    worker: WorkerHandle | None = None
    loaded: set[str] = set()  # models the current worker holds
    ref_done: set[str] = set()  # models whose float64 reference the current worker holds
    start_failures = 0
    dead: dict[str, str] = {}  # group -> id of the item that timed out / crashed the worker
    wsettings = asdict(s)
    interrupted = None

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)

    def log(r):
        brief = {k: r.get(k) for k in ("id", "status", "img_points_per_s", "first_call_s", "steady_s", "max_rel",
                                       "peak_extra_bytes", "reason", "error", "estimate_s") if r.get(k) is not None}
        print(json.dumps(brief, default=str), flush=True)

    try:
        for it in plan:
            now = time.monotonic()
            remaining = deadline - now - reserve
            base = {"type": it.kind, "id": it.id, "tier": it.tier, "model": it.model, "method": it.method,
                    "K": it.K}
            if it.group in dead and it.kind != "env":
                log(rec.write({**base, "status": "skipped", "reason": f"after {dead[it.group]} failed"}))
                continue
            if s.dry and it.method and METHODS.get(it.method, {}).get("compile") == "cudagraphs":
                log(rec.write({**base, "status": "skipped", "reason": "CUDA graphs need a GPU (dry run)"}))
                continue
            images = model_size(it.model, s)[0] if it.model else 0
            if it.kind == "memory":
                images = min(s.mem_images, images)
            elif it.kind == "accuracy" and not s.dry:
                images = min(images, MODELS[it.model].acc_images)
            e = est.estimate(it, images, it.model in loaded) + (0.0 if worker else est.worker_start)
            if it.kind == "accuracy" and it.method != "fp64_ref" and it.model not in ref_done:
                e += est.estimate(Item("ref", "accuracy", 3, it.model, "fp64_ref", it.K), images, True)
            if e > remaining:
                log(rec.write({**base, "status": "skipped", "reason": "budget", "estimate_s": round(e, 2),
                               "remaining_s": round(remaining, 2)}))
                continue
            if worker is None:
                if start_failures >= 2:
                    log(rec.write({**base, "status": "skipped", "reason": "the worker process does not start"}))
                    continue
                worker = WorkerHandle(s, wsettings)
                loaded.clear()
                ref_done.clear()
                msg = worker.read(min(time.monotonic() + (60 if s.dry else 120), deadline - reserve))
                if not isinstance(msg, dict) or msg.get("type") != "worker_ready":
                    rc = worker.proc.poll()
                    worker.kill()
                    worker = None
                    start_failures += 1
                    log(rec.write({**base, "status": "error", "error": f"worker did not start ({msg!r}, "
                                                                        f"returncode {rc}); see its stderr"}))
                    continue
                est.add(msg)
                rec.write(msg)
            # one item never takes more than --item-timeout-s, nor (hung compiles) much of what is left
            left = deadline - time.monotonic() - reserve
            limit = max(1.0, min(s.item_timeout_s, left, max(0.4 * left, 30.0, 3 * e)))
            worker.send(it, limit)
            item_deadline = time.monotonic() + limit
            progress = {}
            result = None
            while True:
                msg = worker.read(item_deadline)
                if msg is None or msg == "eof":
                    break
                t = msg.get("type")
                if t == "worker_ready":
                    est.add(msg)
                    rec.write(msg)
                elif t == "model":
                    loaded.add(msg["model"])
                    est.add(msg)
                    rec.write(msg)
                elif t == "progress":
                    progress.update({k: v for k, v in msg.items() if k not in ("type", "id")})
                elif t == "done":
                    break
                elif t == "noise":
                    print("worker:", msg["line"], file=sys.stderr)
                else:
                    result = msg
            if result is not None:
                result["estimate_s"] = round(e, 2)
                est.add(result)
                log(rec.write(result))
                if result.get("type") == "accuracy" and result.get("status") == "ok":
                    ref_done.add(it.model)
                if msg != "eof":
                    continue
                worker.kill()  # died after its answer: the next item starts a fresh worker
                worker = None
                continue
            # timed out or died: kill the worker, keep what it said, go on with a fresh one
            rc = worker.proc.poll()
            worker.kill()
            worker = None
            what = "timeout" if msg is None else "error"
            r = {**base, "status": what, "limit_s": round(limit, 2), "estimate_s": round(e, 2), **progress}
            if what == "error":
                r["error"] = f"worker exited (returncode {rc})"
            r["reason"] = "item time limit" if limit < left - 1e-6 else "budget"
            log(rec.write(r))
            dead[it.group] = it.id
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "interrupt"
        print(f"bench_sweep_gpu: interrupted ({interrupted}); the records so far are kept", flush=True)
    finally:
        if worker is not None:
            worker.kill() if interrupted else worker.close()
        signal.signal(signal.SIGTERM, old_term)
        rec.write({"type": "end", "finished": _dt.datetime.now(_dt.UTC).isoformat(),
                   "elapsed_s": round(time.monotonic() - t_start, 2), "counts": rec.counts,
                   "interrupted": interrupted})
        rec.close()
    records = read_jsonl(jsonl)
    problems = check_records(records, run)
    if problems:
        print("bench_sweep_gpu: JSONL check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    summary = summarize(records, run=run)
    if s.out:
        write_json(summary, s.out)
    md = markdown(summary)
    if s.md:
        with open(s.md, "w") as f:
            f.write(md)
    print(md, flush=True)
    print(f"records: {jsonl}" + (f"; summary: {s.out}" if s.out else "") + (f"; table: {s.md}" if s.md else ""))
    if interrupted:
        return 130
    return 1 if problems else 0


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# ================================================================================================ records


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: skip it
                    continue
    return out


def _last_run(records: list[dict]) -> str | None:
    runs = [r["run"] for r in records if r.get("type") == "header" and "run" in r]
    return runs[-1] if runs else None


def check_records(records: list[dict], run: str | None = None) -> list[str]:
    """Problems with the records of one run (empty when they are complete and consistent)."""
    run = run or _last_run(records)
    recs = [r for r in records if r.get("run") == run]
    probs = []
    types = [r.get("type") for r in recs]
    if not recs or types[0] != "header":
        probs.append("the first record of the run is not a header")
    if "end" not in types:
        probs.append("no end record")
    plan = next((r for r in recs if r.get("type") == "plan"), None)
    if plan is None:
        return probs + ["no plan record"]
    by_id = {}
    for r in recs:
        if "id" in r and "status" in r:
            by_id.setdefault(r["id"], []).append(r)
    ended = "end" in types and not next(r for r in recs if r.get("type") == "end").get("interrupted")
    for i in plan["items"]:
        got = by_id.get(i, [])
        if len(got) > 1:
            probs.append(f"{i}: {len(got)} records")
        if not got and ended:
            probs.append(f"{i}: no record")
        for r in got:
            if r["status"] not in ("ok", "skipped", "timeout", "error"):
                probs.append(f"{i}: status {r['status']!r}")
            if r["status"] == "ok" and r.get("type") == "throughput":
                for k in ("first_call_s", "steady_s", "img_points_per_s"):
                    if not isinstance(r.get(k), (int, float)) or not r[k] > 0:
                        probs.append(f"{i}: {k} = {r.get(k)!r}")
            if r["status"] == "skipped" and not r.get("reason"):
                probs.append(f"{i}: skipped without a reason")
    return probs


def _fmt_rate(x) -> str:
    if x is None:
        return "—"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.3g}"


def _fmt_bytes(x) -> str:
    if x is None:
        return "—"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.0f} B"


def summarize(records: list[dict], run: str | None = None) -> dict:
    """One run's records -> per-model headline numbers, ratios, accuracy, memory, first calls, session steps."""
    run = run or _last_run(records)
    recs = [r for r in records if r.get("run") == run]
    head = next((r for r in recs if r.get("type") == "header"), {})
    env = next((r for r in recs if r.get("type") == "env" and r.get("status") == "ok"), {})
    end = next((r for r in recs if r.get("type") == "end"), {})
    session = [r for r in records if r.get("type") == "session_step"]
    peaks = env.get("matmul_peak_tflops") or {}
    environment = {k: head.get(k) for k in ("python", "torch", "cuda", "triton", "numpy", "lerpfast", "platform",
                                            "commit", "dirty", "source_sha256")}
    environment.update({k: env.get(k) for k in ("device_name", "capability", "sm_count", "memory_total_bytes",
                                                "cudnn", "lerpfast_C", "lerpfast_C_cuda", "triton_available")})
    settings = head.get("settings", {})
    core = settings.get("core_k", 32)
    out = {"schema": SCHEMA, "run": run, "dry": head.get("dry"), "started": head.get("started"),
           "finished": end.get("finished"), "elapsed_s": end.get("elapsed_s"), "interrupted": end.get("interrupted"),
           "counts": end.get("counts"), "environment": environment, "matmul_peak_tflops": peaks,
           "settings": settings, "session": session, "targets": {m: {"tf32": t[0], "bf16": t[1]}
                                                                for m, t in TARGETS.items()},
           "device_tag": _device_tag(env.get("device_name"), bool(head.get("dry"))), "models": []}
    names = settings.get("models") or list(MODELS)
    for name in names:
        info = next((r for r in recs if r.get("type") == "model" and r.get("model") == name), {})
        runs = [r for r in recs if r.get("type") == "throughput" and r.get("model") == name]
        ok = [r for r in runs if r.get("status") == "ok"]
        for r in ok:
            fl = info.get("flops_per_image")
            prec = "bf16" if r["precision"] == "bf16" else ("tf32" if r["precision"] == "tf32" else "fp32")
            if fl and peaks.get(prec):
                r["frac_flop_floor"] = r["img_points_per_s"] * fl / (peaks[prec] * 1e12)

        def rate(method, K=None, _ok=ok):
            rs = [r for r in _ok if r["method"] == method and (K is None or r["K"] == K)]
            return max(rs, key=lambda r: r["img_points_per_s"]) if rs else None

        loop_b, loop_f, vmap = rate("loop_bf16_cl", core) or rate("loop_bf16_cl"), \
            rate("loop_fp32", core) or rate("loop_fp32"), rate("vmap_fp32", core) or rate("vmap_fp32")
        for r in ok:
            for key, base in (("ratio_to_loop_bf16", loop_b), ("ratio_to_loop_fp32", loop_f),
                              ("ratio_to_vmap", vmap)):
                if base:
                    r[key] = r["img_points_per_s"] / base["img_points_per_s"]
        best = {p: rate(f"lerpfast_{p}") for p in ("fp32", "tf32", "bf16")}
        at_core = {p: rate(f"lerpfast_{p}", core) for p in ("fp32", "tf32", "bf16")}
        acc = {r["method"]: {k: r.get(k) for k in ("max_rel", "max_abs", "nan", "seconds", "images", "K", "status",
                                                      "error", "reason")}
               for r in recs if r.get("type") == "accuracy" and r.get("model") == name}
        mem = sorted([{k: r.get(k) for k in ("K", "images", "peak_extra_bytes", "materialized_bytes",
                                             "extra_over_materialized", "status", "reason", "error")}
                      for r in recs if r.get("type") == "memory" and r.get("model") == name],
                     key=lambda r: r["K"] or 0)
        mem_ok = [r for r in mem if r.get("peak_extra_bytes") is not None]
        tgt = TARGETS.get(name, (None, None))
        g = lambda r: r["img_points_per_s"] if r else None  # noqa: E731
        ratio = lambda a, b: a["img_points_per_s"] / b["img_points_per_s"] if a and b else None  # noqa: E731
        fp32_rel = (acc.get("lerpfast_fp32") or {}).get("max_rel")
        headline = {
            "loop_fp32": g(loop_f), "loop_bf16_cl": g(loop_b), "vmap_fp32": g(vmap),
            **{f"lerpfast_{p}_best": g(best[p]) for p in best},
            **{f"lerpfast_{p}_best_K": best[p]["K"] if best[p] else None for p in best},
            **{f"lerpfast_{p}_K{core}": g(at_core[p]) for p in at_core},
            f"bf16_K{core}_over_loop_bf16": ratio(at_core["bf16"], loop_b),
            "bf16_best_over_loop_bf16": ratio(best["bf16"], loop_b),
            "tf32_best_over_loop_fp32": ratio(best["tf32"], loop_f),
            "bf16_best_over_vmap": ratio(best["bf16"], vmap),
            "target_tf32": tgt[0], "target_bf16": tgt[1],
            "meets_target_tf32": (g(best["tf32"]) >= tgt[0]) if best["tf32"] and tgt[0] else None,
            "meets_target_bf16": (g(best["bf16"]) >= tgt[1]) if best["bf16"] and tgt[1] else None,
            "meets_3x_loop_bf16": (ratio(at_core["bf16"], loop_b) >= 3.0) if at_core["bf16"] and loop_b else None,
            "fp32_max_rel_vs_fp64": fp32_rel,
            "fp32_within_1e-5": (fp32_rel <= 1e-5) if fp32_rel is not None else None,
            "frac_flop_floor_bf16": best["bf16"].get("frac_flop_floor") if best["bf16"] else None,
            "first_call_s": {m: r["first_call_s"] for m in METHODS if (r := rate(m, core))},
            "time_to_steady_s": {m: r.get("time_to_steady_s", r["first_call_s"]) for m in METHODS
                                 if (r := rate(m, core))},
            "memory_extra_kmax_over_k1": (mem_ok[-1]["peak_extra_bytes"] / max(mem_ok[0]["peak_extra_bytes"], 1))
            if len(mem_ok) >= 2 else None,
            "memory_extra_over_materialized_kmax": mem_ok[-1]["extra_over_materialized"] if mem_ok else None,
        }
        out["models"].append({"model": name, **{k: info.get(k) for k in ("images", "in_shape", "batch_size",
                                                                          "flops_per_image", "params")},
                              "flop_floor_img_points_per_s": {p: peaks[p] * 1e12 / info["flops_per_image"]
                                                              for p in peaks} if info.get("flops_per_image")
                              else None,
                              "headline": headline, "runs": runs, "accuracy": acc, "memory": mem})
    out["not_measured"] = [{k: r.get(k) for k in ("id", "status", "reason", "estimate_s", "limit_s", "error",
                                                  "first_call_s")}
                           for r in recs if r.get("status") in ("skipped", "timeout", "error")]
    return out


def markdown(summary: dict) -> str:
    env = summary["environment"]
    core = summary["settings"].get("core_k", 32)
    lines = [f"Device: {env.get('device_name')} (capability {env.get('capability')}); torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, triton {env.get('triton')}, Python {env.get('python')}; lerpfast "
             f"{env.get('lerpfast')} commit {str(env.get('commit'))[:12]}; lerpfast._C CUDA "
             f"{env.get('lerpfast_C_cuda')}. Matmul peak (TFLOP/s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in (summary.get("matmul_peak_tflops") or {}).items())
             + (" **DRY RUN (CPU, tiny sizes): numbers mean nothing**" if summary.get("dry") else ""), "",
             f"| model | loop fp32 | loop bf16+CL | vmap fp32 | lerpfast fp32 (K={core}) | lerpfast tf32, best K | "
             f"lerpfast bf16, best K | bf16 K={core} / loop bf16 | target tf32 / bf16 | fp32 rel. err vs fp64 | "
             f"first call bf16 K={core} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in summary["models"]:
        h = m["headline"]
        r = _fmt_rate

        def bk(p, h=h):
            best = h[f"lerpfast_{p}_best"]
            return f"{_fmt_rate(best)} (K={h[f'lerpfast_{p}_best_K']})" if best else "—"

        ratio = h.get(f"bf16_K{core}_over_loop_bf16")
        rel = h.get("fp32_max_rel_vs_fp64")
        fc = (h.get("first_call_s") or {}).get("lerpfast_bf16")
        ts = (h.get("time_to_steady_s") or {}).get("lerpfast_bf16")
        fc_txt = "—" if fc is None else f"{fc:.1f} s" + (f" ({ts:.1f} s)" if ts is not None and ts > fc + 0.05 else "")
        lines.append(f"| {m['model']} | {r(h['loop_fp32'])} | {r(h['loop_bf16_cl'])} | {r(h['vmap_fp32'])} | "
                     f"{r(h.get(f'lerpfast_fp32_K{core}'))} | {bk('tf32')} | {bk('bf16')} | "
                     f"{f'{ratio:.2f}x' if ratio else '—'} | {r(h['target_tf32'])} / {r(h['target_bf16'])} | "
                     f"{f'{rel:.1e}' if rel is not None else '—'} | {fc_txt} |")
    lines += ["", "Image-point evaluations per second (K points x images / steady-state seconds of one "
              "`lerpfast.sweep` call, GPU-resident data); first call = compile + warm-up of that configuration "
              "(in brackets: until the steady state, when kernels compiled in the background after it).",
              "", "| model | peak memory above model + data, 16 images, bf16: K -> extra (x of K materialized "
              "weight copies) |", "|---|---|"]
    for m in summary["models"]:
        cells = [f"K={x['K']}: {_fmt_bytes(x['peak_extra_bytes'])}"
                 + (f" ({x['extra_over_materialized']:.2f}x)" if x.get("extra_over_materialized") is not None
                    else "") for x in m["memory"] if x.get("status") == "ok"]
        lines.append(f"| {m['model']} | {'; '.join(cells) or '—'} |")
    nm = summary.get("not_measured") or []
    lines += ["", f"Records: {summary.get('counts')}; elapsed {summary.get('elapsed_s')} s"
              + (f"; interrupted: {summary['interrupted']}" if summary.get("interrupted") else "")]
    if nm:
        why = lambda x: f": {x.get('reason') or x.get('error')}" if x.get("reason") or x.get("error") else ""  # noqa
        lines.append("Not measured: " + "; ".join(f"{x['id']} ({x['status']}{why(x)})" for x in nm[:40])
                     + (f"; ... {len(nm) - 40} more" if len(nm) > 40 else ""))
    if summary.get("session"):
        lines.append("Session steps: " + "; ".join(
            f"{x.get('step')} rc={x.get('rc')} {x.get('seconds')} s" for x in summary["session"]))
    return "\n".join(lines) + "\n"


def write_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def summarize_main(path: str, out: str | None, md: str | None) -> int:
    records = read_jsonl(path)
    problems = check_records(records)
    summary = summarize(records)
    base = os.path.join(RESULTS, f"sweep_gpu_{summary['device_tag']}")
    out = out or base + ".json"
    md = md or os.path.splitext(out)[0] + ".md"
    summary["records_file"] = os.path.basename(path)
    summary["record_problems"] = problems
    write_json(summary, out)
    text = markdown(summary)
    with open(md, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out} and {md}" + (f"; {len(problems)} record problems: {problems[:5]}" if problems else ""))
    return 0


def main(argv=None) -> int:
    s, a = _parse(argv)
    if a.worker:
        first = sys.stdin.readline()
        return worker_main(Settings(**json.loads(first)))
    if a.summarize:
        return summarize_main(a.summarize, a.out, a.md)
    if a.check:
        records = read_jsonl(a.check)
        problems = check_records(records)
        run = _last_run(records)
        n = sum(1 for r in records if r.get("run") == run)
        print(f"{a.check}: run {run}, {n} records, " + ("OK" if not problems else f"{len(problems)} problems:"))
        for pr in problems:
            print("  " + pr)
        return 1 if problems else 0
    import torch

    if not torch.cuda.is_available() and not s.dry:
        print("bench_sweep_gpu.py needs a CUDA GPU (use --dry to check the script on the CPU)", file=sys.stderr)
        return 2
    return run_plan(s, argv)


if __name__ == "__main__":
    sys.exit(main())
