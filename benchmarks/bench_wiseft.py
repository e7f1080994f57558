"""WiSE-FT's 11 alphas on a ViT-B/32-sized image tower with a zero-shot head: lerpfast.sweep against the loop users
write today (copy the weights, evaluate, repeat), in one process (issue 20, part 6).

The tower is torchvision's ``vit_b_32`` (88 M parameters, 224 px); its head is a zero-shot classifier: L2-normalized
features times fixed class embeddings (a buffer, the same at both ends) times a logit scale, as CLIP's zero-shot
head. "Zero-shot" is a random initialization, "fine-tuned" the same weights moved by a small random step (the
geometry of a fine-tune: nearby weights, so the line is the WiSE-FT line). Random images (nothing is downloaded).
The engine is timed warm (its first call converts the model) and the loop after a warm-up, best of ``--repeats``
interleaved; both must agree (fp32, 1e-4 relative on the loss). Needs torchvision (scripts/test_torch214.sh's
environment):

    PYTHONPATH=. .venv-torch214/bin/python benchmarks/bench_wiseft.py [--images 16] [--threads 1]

Writes benchmarks/results/wiseft_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lerpfast


class ZeroShotHead(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.register_buffer("class_embeddings", nn.functional.normalize(torch.randn(classes, dim), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(100.0))

    def forward(self, x):
        return self.logit_scale * nn.functional.normalize(x, dim=-1) @ self.class_embeddings.t()


def tower(classes: int) -> nn.Module:
    import torchvision

    m = torchvision.models.vit_b_32(num_classes=classes)
    m.heads = ZeroShotHead(768, classes)
    return m.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wiseft_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision

    torch.manual_seed(0)
    zero_shot = tower(args.classes)
    fine_tuned = tower(args.classes)
    fine_tuned.load_state_dict(zero_shot.state_dict())
    with torch.no_grad():
        for p in fine_tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01 * p.std().clamp_min(1e-3))
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(args.images, 3, 224, 224, generator=g), torch.randint(0, args.classes, (args.images,),
                                                                                generator=g))
    alphas = np.linspace(0, 1, 11).tolist()
    kw = dict(batch_size=args.batch, progress=False, reference=None)

    def run(**extra):
        t = time.perf_counter()
        res = lerpfast.sweep(zero_shot, (zero_shot, fine_tuned), alphas, data, **kw, **extra)
        return time.perf_counter() - t, res

    cold, res = run()
    run(method="loop")
    engine, loop = [], []
    for _ in range(args.repeats):
        t, res = run()
        engine.append(t)
        t, ref = run(method="loop")
        loop.append(t)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-4, atol=1e-6)
    record = {
        "benchmark": "wiseft_vit_b_32_zero_shot_head", "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "lerpfast": lerpfast.__version__, "precision": "fp32", "K": len(alphas), "images": args.images,
        "image_size": 224, "batch_size": args.batch, "classes": args.classes, "repeats": args.repeats,
        "engine_cold_s": round(cold, 2), "engine_warm_s": round(min(engine), 2), "loop_s": round(min(loop), 2),
        "ratio_warm": round(min(loop) / min(engine), 3), "date": time.strftime("%Y-%m-%d"),
        "not_native": sorted(m for m, p in res.meta["paths"].items() if p.startswith("fallback")),
        "max_loss_rel_diff": float(np.max(np.abs(res.loss - ref.loss) / np.abs(ref.loss))),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"WiSE-FT, vit_b_32 + zero-shot head, K={len(alphas)}, {args.images} images: engine {min(engine):.1f} s "
          f"(cold {cold:.1f} s), loop {min(loop):.1f} s, loop/engine {record['ratio_warm']:.2f}; not native: "
          f"{record['not_native'] or 'none'}")


if __name__ == "__main__":
    main()
