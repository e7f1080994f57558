"""``lerpfast train``: command-line options generated from :class:`lerpfast.train.TrainConfig`'s fields.

Every field becomes ``--<field>`` with the field's help text (OpenLTH style); booleans that default to False are
flags, ``None`` defaults mean "the model's default setting". Extra options: ``--threads`` (torch intra-op
threads), ``--no-progress``, ``--print-run-dir`` (print the run directory a config maps to, without training).

Standalone use::

    python -m lerpfast.train.cli --model lenet_300_100 --dataset fashion-mnist --replicates 3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from lerpfast.train.config import TrainConfig

__all__ = ["add_parser", "add_config_arguments", "config_from_args", "run", "main"]


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation such as ``int | None``."""
    hints = annotation
    if isinstance(hints, str):
        # annotations are strings under `from __future__ import annotations`
        hints = eval(hints, {"typing": typing}, {})
    args = typing.get_args(hints)
    if isinstance(hints, types.UnionType) or typing.get_origin(hints) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], True
    return hints, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """Add one ``--<field>`` option per dataclass field, typed and documented from the field."""
    for f in dataclasses.fields(cls):
        typ, optional = _base_type(f.type)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        # --batch-size like the other lerpfast commands; --batch_size (the field's name) is accepted too
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        if typ is bool and not optional and f.default is False:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        elif typ is bool:
            parser.add_argument(*flags, dest=f.name, type=_bool, default=f.default, metavar="BOOL",
                                help=f"{help_text} (default: {f.default})")
        else:
            default_txt = "model's setting" if f.default is None else repr(f.default)
            parser.add_argument(*flags, dest=f.name, type=typ, default=f.default, metavar=typ.__name__.upper(),
                                help=f"{help_text} (default: {default_txt})")


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> TrainConfig:
    """Build the config from parsed arguments (fields only; other attributes are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-run-dir", action="store_true", help="print the run directory and exit")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command; its handler is ``args.func(args)`` (:func:`run`)."""
    p = subparsers.add_parser("train", help="train models with checkpoint schedules, replicates and resume",
                              description=__doc__.split("\n\n")[0])
    return _configure(p)


def run(args: argparse.Namespace) -> int:
    """Handler of ``lerpfast train``: train and print the run directory and each replicate's summary."""
    import json
    from pathlib import Path

    import torch

    from lerpfast.cli import CLIError, check_device, check_positive
    from lerpfast.train.trainer import train

    check_positive(args.threads, "--threads")
    check_device(args.device)
    from lerpfast.data import REGISTRY

    if args.dataset is not None and args.dataset not in REGISTRY:
        raise CLIError(f"--dataset {args.dataset!r}: unknown data set (known: {', '.join(REGISTRY)}; see "
                       f"`lerpfast data list`)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if args.print_run_dir:
        print(Path(config.resolved().out_dir) / config.run_name())
        return 0
    run_dir = train(config, progress=not args.no_progress)
    print(run_dir)
    for r in range(config.replicates):
        s = run_dir / f"replicate_{r}" / "summary.json"
        if s.exists():
            print(json.dumps(json.loads(s.read_text())))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lerpfast.train.cli``."""
    parser = _configure(argparse.ArgumentParser(prog="lerpfast train", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
