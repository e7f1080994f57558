"""Training throughput of lerpfast's trainer (images/s), on random data of the real input shape.

The whole trainer loop is timed (optimizer step, per-step logging of loss / accuracy / distance from init),
checkpoints and evaluation off. Steps after ``--warmup`` are timed from the trainer's own step callback.
Writes ``benchmarks/results/train_<device>.json`` with device, versions and per-model images/s.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --device cpu --threads 1
    python benchmarks/bench_train.py --device cuda --models resnet20 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lerpfast.train import TensorLoader, TrainConfig, train

SHAPES = {"lenet_300_100": (1, 28, 28), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32), "resnet50": (3, 224, 224)}


def bench(model: str, device: str, batch_size: int, steps: int, warmup: int, optimizer: str, bf16: bool,
          channels_last: bool) -> dict:
    shape = SHAPES[model]
    g = torch.Generator().manual_seed(0)
    n = batch_size * (steps + warmup)
    x = torch.randn(n, *shape, generator=g).to(device)  # random, never zeros
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    stamps: dict[int, float] = {}

    def clock(ctx):
        if ctx.step in (warmup, warmup + steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps[ctx.step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=model, dataset="random", optimizer=optimizer, lr=0.01, batch_size=batch_size,
                          steps=f"{steps + warmup}it", checkpoints="none", evaluate="none", out_dir=tmp,
                          device=device, bf16=bf16, channels_last=channels_last, resume_every="1000000it")
        loader = TensorLoader(x, y, batch_size=batch_size, shuffle=True)
        train(cfg, data=(loader, None), progress=False, callbacks=[clock])
    seconds = stamps[warmup + steps] - stamps[warmup]
    return {"model": model, "batch_size": batch_size, "optimizer": optimizer, "steps_timed": steps,
            "bf16": bf16, "channels_last": channels_last, "seconds": round(seconds, 4),
            "images_per_s": round(steps * batch_size / seconds, 1), "ms_per_step": round(1000 * seconds / steps, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="lenet_300_100,resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--optimizer", default="sgdm")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [bench(m, a.device, a.batch_size, a.steps, a.warmup, a.optimizer, a.bf16, a.channels_last)
            for m in a.models.split(",")]
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    result = {"device": a.device, "device_name": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "python": platform.python_version(), "results": rows}
    kind = "gpu" if a.device.startswith("cuda") else "cpu"
    out = Path(a.out or Path(__file__).parent / "results" / f"train_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
