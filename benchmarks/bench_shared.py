"""Head-only fine-tunes at K = 11: the part of the network that is the same at every point runs once on the B rows
(issue 20, part 2; lerpfast/engine/shared.py), against the loop users write today and against the engine with the
shared part switched off (``LERPFAST_SHARED=0``: every layer on all K*B rows), all in one process.

Cases (random weights, random images: nothing is downloaded; "fine-tuned" = the same backbone, a new head):

* ``hf_vit_b32``: transformers' ``ViTForImageClassification`` at ViT-B/32's size (12 layers, 768 wide, 224 px,
  patch 32), a linear probe: only ``classifier`` differs. Not traceable by torch.fx: the backbone is one shared
  module (``vit``).
* ``resnet50``: the zoo's ResNet-50 (64 px), a new ``fc``: the stem, the four stages, the pooling and the flatten
  are one shared region of the traced graph.
* ``resnet50_last_stage``: the same with ``layer4`` fine-tuned too: the shared region ends before ``layer4``.

The engine is timed warm (its first call converts the model), best of ``--repeats`` interleaved with the others;
all three must agree (fp32, 1e-4 relative on the loss).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_shared.py [--images 16] [--threads 1]

Writes benchmarks/results/shared_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import lerpfast


def _hf_vit(classes):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=224, patch_size=32, num_labels=classes)
    return ViTForImageClassification(cfg).eval(), (3, 224, 224), ["classifier."]


def _resnet50(classes, tuned=("fc.",)):
    from lerpfast.train import models

    return models.create("resnet50", num_classes=classes, in_shape=(3, 64, 64)).eval(), (3, 64, 64), list(tuned)


CASES = {
    "hf_vit_b32": _hf_vit,
    "resnet50": _resnet50,
    "resnet50_last_stage": lambda c: _resnet50(c, ("fc.", "layer4.")),
}


def _fine_tune(model, prefixes):
    """The same weights with the tensors under ``prefixes`` moved (a new head / a fine-tuned last stage)."""
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith(tuple(prefixes)):
                p.add_(torch.randn_like(p) * 0.05 * p.std().clamp_min(1e-3))
    return tuned


def bench(name, classes, images, batch, repeats):
    torch.manual_seed(0)
    model, shape, prefixes = CASES[name](classes)
    tuned = _fine_tune(model, prefixes)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(images, *shape, generator=g), torch.randint(0, classes, (images,), generator=g))
    alphas = np.linspace(0, 1, 11).tolist()
    kw = dict(batch_size=batch, progress=False, reference=None)

    def run(shared=True, **extra):
        os.environ["LERPFAST_SHARED"] = "1" if shared else "0"
        try:
            t = time.perf_counter()
            res = lerpfast.sweep(model, (model, tuned), alphas, data, **kw, **extra)
            return time.perf_counter() - t, res
        finally:
            os.environ.pop("LERPFAST_SHARED", None)

    cold, res = run()
    run(shared=False)
    run(method="loop")
    times = {"engine": [], "engine_unshared": [], "loop": []}
    for _ in range(repeats):
        t, res = run()
        times["engine"].append(t)
        t, off = run(shared=False)
        times["engine_unshared"].append(t)
        t, ref = run(method="loop")
        times["loop"].append(t)
    for other in (off, ref):
        np.testing.assert_allclose(res.loss, other.loss, rtol=1e-4, atol=1e-6)
    best = {k: min(v) for k, v in times.items()}
    shared = res.meta["shared"]
    return {
        "case": name, "tuned": prefixes, "K": len(alphas), "images": images, "batch_size": batch,
        "input_shape": list(shape), "engine_cold_s": round(cold, 2),
        **{f"{k}_s": round(v, 3) for k, v in best.items()},
        "loop_over_engine": round(best["loop"] / best["engine"], 2),
        "unshared_over_shared": round(best["engine_unshared"] / best["engine"], 2),
        "shared_modules": len(shared["modules"]), "shared_region_nodes": len(shared["region"]),
        "shared_ends_before": shared["ends_before"], "shared_calls": shared["calls"],
        "not_native": sorted(m for m, p in res.meta["paths"].items() if p.startswith("fallback")),
        "max_loss_rel_diff": float(np.max(np.abs(res.loss - ref.loss) / np.abs(ref.loss))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shared_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    record = {
        "benchmark": "shared_prefix_head_only", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
        "lerpfast": lerpfast.__version__, "precision": "fp32", "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d"), "cases": [],
    }
    for name in args.cases.split(","):
        r = bench(name, args.classes, args.images, args.batch, args.repeats)
        record["cases"].append(r)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")  # finished cases survive a later failure
        print(f"{name}: engine {r['engine_s']:.2f} s, unshared {r['engine_unshared_s']:.2f} s, loop {r['loop_s']:.2f}"
              f" s: loop/engine {r['loop_over_engine']:.2f}, unshared/shared {r['unshared_over_shared']:.2f}; "
              f"shared ends before {r['shared_ends_before'] or r['shared_modules']}")


if __name__ == "__main__":
    main()
