"""Many directions on the torch path (issue 20 part 1): the cost per direction count J of building a layer's K
weight settings, and of the layer itself, on the CPU.

Task vectors over J tasks and soups over N ingredients are slices with J (N - 1) directions. The fused Triton
kernels combine at most 3 directions in registers; beyond that every backend runs the torch path, which builds
the layer's K weights ``W_k = anchors[idx_k] + sum_j coefs[k, j] * dirs[j]`` (one layer at a time) and then runs
the layer's GEMM / convolution. This script measures, for K = 11 and J = 1, 2, 3, 4, 8, 16:

* ``combine``: :func:`lerpfast.engine.functional.combine` as the engine runs it (``engine``), and the two forms it
  can take:
  ``loop`` (1 + 2J passes over (K, numel): a multiply and an add per direction, one rounding per term) and
  ``addmm`` (the gathered anchors plus one (K x J) @ (J x numel) product);
* ``layer``: the whole multi-point layer (:func:`lerpfast.engine.functional.lerp_linear` / ``conv_per_point``) on a
  batch, so that the combine's share of the layer shows;
* ``shared``: a layer whose input is the same for every point (a model's first layer): the basis form (the input
  multiplied by every used anchor and every direction, then mixed per point: |anchors| + J products) against
  building the K weights (K products, ``materialized``): past J ~ K the basis form does more work than the points
  themselves; ``shared_engine`` is what the engine does (it picks the basis form while T <= K).

Two tensors: a Linear 1024 x 1024 and a 3x3 conv 256 -> 256. One intra-op thread (the CI machine's setting; the
JSON records it), median of ``--repeats`` timed calls after a warm-up. The GPU crossover between the fused kernels
(J <= 3) and the torch path cannot be measured here: it is for the GPU session.

    python benchmarks/bench_many_dirs.py                 # -> benchmarks/results/many_dirs_cpu.json
    python benchmarks/bench_many_dirs.py --quick         # smaller shapes, 3 repeats (smoke)
    python benchmarks/bench_many_dirs.py --table benchmarks/results/many_dirs_cpu.json   # docs/kernels.md's table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lerpfast  # noqa: E402
from lerpfast.engine import functional as F  # noqa: E402
from lerpfast.engine.functional import ParamSlice, Points  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
JS = (1, 2, 3, 4, 8, 16)


def _git() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lerpfast"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def table(path: str) -> str:
    """The markdown table of docs/kernels.md from a results JSON (milliseconds)."""
    d = json.load(open(path))
    out = ["| tensor | J | combine, engine | combine, loop | layer (engine) | combine share | shared input: basis "
           "| shared: K weights | shared: engine |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        ms = lambda k, r=r: f"{r[k] * 1e3:.1f}" if k in r else "—"  # noqa: E731
        form = f" ({r['shared_engine_form']})" if "shared_engine_form" in r else ""
        out.append(f"| {r['tensor']} {'x'.join(map(str, r['shape']))} | {r['J']} | {ms('combine_engine_s')} | "
                   f"{ms('combine_loop_s')} | {ms('layer_s')} | {r['combine_share_of_layer']:.2f} | "
                   f"{ms('shared_basis_s')} | {ms('shared_materialized_s')} | {ms('shared_engine_s')}{form} |")
    return "\n".join(out)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-touch)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def combine_loop(anchors, dirs, idx, coefs):
    out = anchors.index_select(0, idx)
    view = (coefs.shape[0],) + (1,) * (anchors.dim() - 1)
    for j in range(coefs.shape[1]):
        out = out + coefs[:, j].reshape(view) * dirs[j]
    return out


def combine_addmm(anchors, dirs, idx, coefs):
    a = anchors.reshape(anchors.shape[0], -1).index_select(0, idx)
    return torch.addmm(a, coefs, dirs.reshape(dirs.shape[0], -1)).reshape(idx.shape[0], *anchors.shape[1:])


def shared_basis(x, w, pts):
    """The basis form of a shared-input Linear: x times every used anchor and direction, then mixed per point."""
    bank, mix = F._bank(w, pts)
    return F._mix(mix, torch.matmul(x, bank.transpose(-1, -2)))


def _slice(M: int, J: int, shape, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ad = torch.randn((M + J, *shape), generator=g)  # anchors and directions back to back, as geometry builds them
    w = ParamSlice(ad[:M], ad[M:])
    idx = torch.arange(K) % M
    coefs = torch.rand((K, J), generator=g) * 2 - 0.5
    return w, Points(idx, coefs)


def run(quick: bool, repeats: int, K: int) -> dict:
    torch.manual_seed(0)
    lin = (256, 256) if quick else (1024, 1024)
    conv = (64, 64, 3, 3) if quick else (256, 256, 3, 3)
    rows = []
    with torch.inference_mode():
        for J in JS:
            for name, shape in (("linear", lin), ("conv3x3", conv)):
                w, pts = _slice(1, J, shape, K, seed=J)
                a, d, idx, c = w.anchors, w.dirs, pts.anchor_idx, pts.coefs
                row = {"tensor": name, "shape": list(shape), "numel": int(a[0].numel()), "J": J, "K": K}
                row["combine_engine_s"] = _time(lambda: F.combine(a, d, idx, c), repeats)  # noqa: B023
                row["combine_loop_s"] = _time(lambda: combine_loop(a, d, idx, c), repeats)  # noqa: B023
                row["combine_addmm_s"] = _time(lambda: combine_addmm(a, d, idx, c), repeats)  # noqa: B023
                ref = combine_loop(a.double(), d.double(), idx, c.double())
                row["addmm_max_abs_err_vs_fp64"] = float((combine_addmm(a, d, idx, c).double() - ref).abs().max())
                row["loop_max_abs_err_vs_fp64"] = float((combine_loop(a, d, idx, c).double() - ref).abs().max())
                if name == "linear":
                    B = 32 if quick else 128
                    x = torch.randn(K, B, shape[1])
                    row["layer_batch"] = B
                    row["layer_s"] = _time(lambda: F.lerp_linear(x, w, None, pts), repeats)  # noqa: B023
                    xs = torch.randn(4 * B, shape[1])
                    row["shared_batch"] = 4 * B
                    row["shared_basis_s"] = _time(lambda: shared_basis(xs, w, pts), repeats)  # noqa: B023
                    row["shared_materialized_s"] = _time(
                        lambda: torch.matmul(xs, F.combine(a, d, idx, c).transpose(1, 2)), repeats)  # noqa: B023
                    row["shared_engine_s"] = _time(
                        lambda: F.lerp_linear(xs, w, None, pts, shared_input=True), repeats)  # noqa: B023
                    row["shared_engine_form"] = "basis" if F._basis_pays(w, pts) else "materialized"
                else:
                    B, S = (2, 8) if quick else (2, 8)
                    x = torch.randn(K, B, shape[1], S, S)
                    row["layer_batch"] = [B, shape[1], S, S]
                    row["layer_s"] = _time(
                        lambda: F.conv_per_point(x, w, None, pts, 1, 1, 1, 1), repeats)  # noqa: B023
                row["combine_share_of_layer"] = row["combine_engine_s"] / row["layer_s"]
                rows.append(row)
                print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--K", type=int, default=11)
    p.add_argument("--out", default=None)
    p.add_argument("--table", metavar="JSON", default=None, help="print the markdown table of a results JSON")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    load0 = os.getloadavg()
    t0 = time.time()
    res = run(args.quick, repeats, args.K)
    record = {
        "benchmark": "many_dirs_cpu", "device": platform.machine(), "cpu": platform.processor() or None,
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "lerpfast": lerpfast.__version__, "python": platform.python_version(), "git_commit": _git(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "seconds": time.time() - t0,
        "settings": {"K": args.K, "J": list(JS), "repeats": repeats, "quick": args.quick, "dtype": "float32",
                     "statistic": "median seconds per call after one warm-up call", "inference_mode": True},
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "command": "python benchmarks/bench_many_dirs.py" + (" --quick" if args.quick else ""),
        **res,
    }
    out = args.out or os.path.join(RESULTS, "many_dirs_cpu" + ("_quick" if args.quick else "") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
