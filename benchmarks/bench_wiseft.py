"""WiSE-FT's 11 alphas, engine against the loop users write today (copy the weights, evaluate, repeat), in one
process (issue 20, parts 4 and 6), on the models the issue names:

* ``vit_b_32``: torchvision's ``vit_b_32`` (88 M parameters, 224 px) with a zero-shot head: L2-normalized features
  times fixed class embeddings (a buffer, the same at both ends) times a logit scale, as CLIP's zero-shot head;
* ``open_clip``: open_clip's ViT-B-32 image tower (``open_clip.create_model("ViT-B-32").visual``, its raw class /
  position embeddings and ``proj``) with the same head;
* ``gpt2``: transformers' ``GPT2LMHeadModel`` (124 M parameters), random token sequences through
  ``lerpfast.data.next_token_pairs`` (the loss is the mean next-token cross-entropy).

"Zero-shot" is a random initialization, "fine-tuned" the same weights moved by a small random step (the geometry of
a fine-tune: nearby weights, so the line is the WiSE-FT line). Random inputs (nothing is downloaded). The engine is
timed warm (its first call converts the model) and the loop after a warm-up, best of ``--repeats`` interleaved;
both must agree (fp32, 1e-4 relative on the loss). Needs torchvision, open_clip and transformers
(scripts/test_torch214.sh's environment):

    PYTHONPATH=. .venv-torch214/bin/python benchmarks/bench_wiseft.py [--models vit_b_32 open_clip gpt2] [--threads 1]

Writes benchmarks/results/wiseft_cpu.json (one row per model, after each model).
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


def open_clip_tower(classes: int) -> nn.Module:
    import open_clip

    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual  # its output: 512-d image embeddings
    return nn.Sequential(visual, ZeroShotHead(512, classes)).eval()


def gpt2() -> nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()


def _images(args):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(args.images, 3, 224, 224, generator=g),
            torch.randint(0, args.classes, (args.images,), generator=g))


def _tokens(args):
    g = torch.Generator().manual_seed(1)
    from lerpfast.data import next_token_pairs

    return next_token_pairs(torch.randint(0, 50257, (args.sequences, args.tokens + 1), generator=g))


MODELS = {  # name: (builder, data, settings for the record)
    "vit_b_32": (lambda a: tower(a.classes), _images, lambda a: {"images": a.images, "image_size": 224,
                                                                 "classes": a.classes}),
    "open_clip": (lambda a: open_clip_tower(a.classes), _images, lambda a: {"images": a.images, "image_size": 224,
                                                                            "classes": a.classes}),
    "gpt2": (lambda a: gpt2(), _tokens, lambda a: {"sequences": a.sequences, "tokens": a.tokens}),
}


def bench(name: str, args) -> dict:
    build, make_data, settings = MODELS[name]
    torch.manual_seed(0)
    zero_shot = build(args)
    fine_tuned = build(args)
    fine_tuned.load_state_dict(zero_shot.state_dict())
    with torch.no_grad():
        for p in fine_tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01 * p.std().clamp_min(1e-3))
    data = make_data(args)
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
    return {
        "model": name, **settings(args), "K": len(alphas), "batch_size": args.batch, "repeats": args.repeats,
        "engine_cold_s": round(cold, 2), "engine_warm_s": round(min(engine), 2), "loop_s": round(min(loop), 2),
        "ratio_warm": round(min(loop) / min(engine), 3),
        "not_native": sorted(m for m, p in res.meta["paths"].items() if p.startswith("fallback")),
        "max_loss_rel_diff": float(np.max(np.abs(res.loss - ref.loss) / np.abs(ref.loss))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wiseft_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip
    import torchvision
    import transformers

    rows = []
    meta = {"benchmark": "wiseft_11_alphas", "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "transformers": transformers.__version__,
            "lerpfast": lerpfast.__version__, "precision": "fp32", "date": time.strftime("%Y-%m-%d"), "rows": rows}
    for name in args.models:
        row = bench(name, args)
        rows.append(row)
        Path(args.out).write_text(json.dumps(meta, indent=1) + "\n")  # after every model: a killed run keeps them
        print(f"WiSE-FT {name}, K={row['K']}: engine {row['engine_warm_s']:.1f} s (cold {row['engine_cold_s']:.1f} s), "
              f"loop {row['loop_s']:.1f} s, loop/engine {row['ratio_warm']:.2f}; not native: "
              f"{row['not_native'] or 'none'}", flush=True)


if __name__ == "__main__":
    main()
