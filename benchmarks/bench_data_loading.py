"""CPU decode throughput: lerpfast's FFCV loader vs a torchvision-style ImageFolder + torch DataLoader.

Both pipelines turn the same generated JPEG set (ImageNet-like sizes, random smooth content plus noise, never
zeros) into normalized float32 (B, 3, 224, 224) batches with ImageNet's eval transform:

* baseline: PIL decode -> Resize(256, bilinear) -> CenterCrop(224) -> ToTensor (float / 255) -> Normalize, in
  torch DataLoader worker processes (what torchvision.datasets.ImageFolder + transforms do; torchvision is not
  a dependency, so the transforms are written with PIL + numpy in lerpfast.data.folder);
* FFCV: the set written once to a .beton (re-encoded as JPEG quality 90, FFCV's ImageNet recipe), decoded by
  FFCV's JIT threads with CenterCropRGBImageDecoder(224, ratio 224/256), normalized by lerpfast (torch):
  lerpfast.data.ffcv.make_loader.

Each loader is warmed up with one epoch (FFCV JIT compile, worker start); then ``--epochs`` rounds in which the
arms alternate (the machine may be shared), median per arm and median of the per-round ratios. Writes
benchmarks/results/data_loading_cpu.json and prints the ratio FFCV / baseline.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_loading.py --num-images 400 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lerpfast.data.folder import ImageFolder, center_crop, resize_shorter

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def generate_jpegs(root: Path, n: int, quality: int, seed: int = 0, num_classes: int = 10) -> dict:
    """Write ``n`` random JPEGs of ImageNet-like size (mean about 400x350) into ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    nbytes, sizes = 0, []
    for i in range(n):
        c = root / f"n{i % num_classes:08d}"
        c.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(300, 501)), int(rng.integers(250, 451))
        # Random structure (a 48x64 random grid upsampled) plus luminance noise: at quality 95 the files average
        # about 108 kB, like ILSVRC-2012's (about 110 kB at a mean of roughly 400x350), instead of the 3-4x larger
        # files of white noise or the tiny ones of flat images.
        small = Image.fromarray(rng.integers(20, 236, (48, 64, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(small, dtype=np.int16) + rng.normal(0, 16, (h, w, 1)).astype(np.int16)
        img = np.clip(noisy, 1, 255).astype(np.uint8)
        p = c / f"img_{i:05d}.JPEG"
        Image.fromarray(img).save(p, quality=quality)
        nbytes += p.stat().st_size
        sizes.append((w, h))
    ws, hs = zip(*sizes)
    return {"num_images": n, "mean_width": float(np.mean(ws)), "mean_height": float(np.mean(hs)),
            "mean_file_kb": nbytes / n / 1024, "jpeg_quality": quality, "num_classes": num_classes}


class TorchvisionStyleEval:
    """Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize, as torchvision's eval transform."""

    def __call__(self, image: Image.Image, index: int = 0) -> torch.Tensor:
        image = center_crop(resize_shorter(image, 256), 224)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # ToTensor: (3, 224, 224) in [0, 1]
        return torch.from_numpy((x - MEAN) / STD)


class _Folder(torch.utils.data.Dataset):
    def __init__(self, root: Path) -> None:
        self.folder = ImageFolder(root, TorchvisionStyleEval())

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        return self.folder[i]


def run_epoch(loader) -> tuple[float, int]:
    """Seconds and images for one full pass over ``loader`` (every batch checked for shape and dtype)."""
    t0 = time.perf_counter()
    count = 0
    for x, y in loader:
        count += len(y)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 224, 224)
    return time.perf_counter() - t0, count


def make_baseline(root: Path, workers: int, batch_size: int):
    return torch.utils.data.DataLoader(_Folder(root), batch_size=batch_size, shuffle=False, num_workers=workers,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def make_ffcv(beton: Path, workers: int, batch_size: int):
    from lerpfast.data.ffcv import make_loader

    return make_loader(beton, batch_size=batch_size, num_workers=workers, resolution=224, decoder="center_crop",
                       channels_last=False)


def bench_interleaved(arms: dict, epochs: int) -> dict:
    """Warm each loader up with one epoch, then time ``epochs`` rounds in which every arm runs one epoch.

    The machine is shared (load average 2-4 on 2 cores while this was written): interleaving the arms round by
    round exposes them to the same background load, and the per-round ratio is reported next to the medians.
    """
    out = {name: {"epoch_seconds": []} for name in arms}
    for name, loader in arms.items():
        t0 = time.perf_counter()
        _, n = run_epoch(loader)
        out[name]["warmup_epoch_s"] = time.perf_counter() - t0
        out[name]["images_per_epoch"] = n
    names = list(arms)
    for r in range(epochs):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            dt, n = run_epoch(arms[name])
            assert n == out[name]["images_per_epoch"]
            out[name]["epoch_seconds"].append(dt)
    for name in names:
        o = out[name]
        o["images_per_s"] = o["images_per_epoch"] / statistics.median(o["epoch_seconds"])
        o["images_per_s_best"] = o["images_per_epoch"] / min(o["epoch_seconds"])
    base = out["baseline"]["epoch_seconds"]
    for name in names[1:]:
        ratios = [b / f for b, f in zip(base, out[name]["epoch_seconds"])]
        out[name]["ratio_over_baseline_median_of_rounds"] = statistics.median(ratios)
        out[name]["ratio_over_baseline"] = out[name]["images_per_s"] / out["baseline"]["images_per_s"]
    return out


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    import PIL

    out["pillow"] = PIL.__version__
    try:
        import lerpfast

        out["lerpfast"] = lerpfast.__version__
    except Exception:  # noqa: BLE001 - a version string is best effort
        pass
    for mod in ("ffcv", "numba", "cv2"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    try:
        from importlib.metadata import version

        out["ffcv_dist"] = version("ffcv")  # the package reports 0.0.3rc1 in ffcv.__version__ for 1.0.2
    except Exception:  # noqa: BLE001
        pass
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "loadavg_1m_at_start": os.getloadavg()[0],
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes / FFCV threads")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch (median)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the generated files")
    ap.add_argument("--beton-quality", type=int, default=90, help="JPEG quality inside the .beton (FFCV's ImageNet "
                    "recipe uses 90)")
    ap.add_argument("--workdir", default=None, help="where to put the images and .beton (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_loading_cpu.json"))
    args = ap.parse_args(argv)

    from lerpfast.data.ffcv import write_beton

    torch.set_num_threads(1)
    mach = machine()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "images"
        t0 = time.perf_counter()
        dataset = generate_jpegs(root, args.num_images, args.quality)
        gen_s = time.perf_counter() - t0
        beton = Path(tmp) / "images.beton"
        t0 = time.perf_counter()
        write_beton(root, beton, write_mode="jpg", jpeg_quality=args.beton_quality, max_resolution=512,
                    num_workers=max(args.workers))
        write_s = time.perf_counter() - t0
        dataset.update(generate_s=gen_s, beton_write_s=write_s, beton_mib=beton.stat().st_size / 2**20)
        betons = {"ffcv": beton}
        if args.beton_quality != args.quality:  # also the same JPEG quality as the source files
            same = Path(tmp) / "images_same_quality.beton"
            write_beton(root, same, write_mode="jpg", jpeg_quality=args.quality, max_resolution=512,
                        num_workers=max(args.workers))
            betons[f"ffcv_q{args.quality}"] = same
        results = []
        for w in args.workers:
            arms = {"baseline": make_baseline(root, w, args.batch_size)}
            arms.update({k: make_ffcv(b, w, args.batch_size) for k, b in betons.items()})
            res = bench_interleaved(arms, args.epochs)
            results.append({"workers": w, **res})
            line = f"workers={w}: baseline (PIL + DataLoader) {res['baseline']['images_per_s']:7.1f} img/s"
            for k in betons:
                line += (f" | {k} {res[k]['images_per_s']:7.1f} img/s, "
                         f"ratio {res[k]['ratio_over_baseline_median_of_rounds']:.2f}x")
            print(line, flush=True)
    mach["loadavg_1m_at_end"] = os.getloadavg()[0]
    record = {
        "benchmark": "data_loading_cpu",
        "claim": "decode + resize/crop + normalize to float32 (B, 3, 224, 224), images/s, median of timed epochs",
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_data_loading.py " + " ".join(sys.argv[1:] if argv is None
                                                                                           else argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "machine": mach,
        "settings": {"batch_size": args.batch_size, "epochs": args.epochs, "eval_transform": "resize 256, crop 224",
                     "baseline": "PIL decode + Resize(256, bilinear) + CenterCrop(224) + ToTensor + Normalize "
                                 "in torch DataLoader workers",
                     "ffcv": "CenterCropRGBImageDecoder((224, 224), ratio=224/256) + ToTensor + ToTorchImage, "
                             "normalized by torch in the main thread",
                     "beton": f"write_mode=jpg, jpeg_quality={args.beton_quality}, max_resolution=512 "
                              "(re-encoded from the generated files)"},
        "dataset": dataset,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
