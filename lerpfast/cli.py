"""``lerpfast``: the command line.

Sub-commands: ``sweep`` (line, bilinear, barycentric, plane, random, ray), ``merge`` (wiseft, soup,
task-arithmetic), ``align``, ``curve`` (fit a curve between two solutions), ``show``, ``plot``, ``train``,
``reproduce``, ``instability``, ``warmup``, ``data``, ``bench``, ``demo``. Options of ``sweep`` are generated from
:class:`SweepOptions` (field help texts), those of ``train`` from :class:`lerpfast.train.TrainConfig`.

Exit codes: 0 success; 2 usage (bad option or value); 3 data or checkpoint problem; 4 result-store problem
(file in use, corrupt, a different sweep under the same name); 130 interrupted. Expected errors print one line,
``lerpfast: error: ...``; set ``LERPFAST_DEBUG=1`` for the traceback.

Everything heavy (torch, h5py, matplotlib, the trainers) is imported inside the command that needs it, so
``lerpfast --help`` stays fast, and a broken part breaks only its own command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "SweepOptions", "MergeOptions", "AlignOptions", "CLIError", "EXIT_OK", "EXIT_USAGE",
           "EXIT_DATA", "EXIT_STORE"]

EXIT_OK, EXIT_USAGE, EXIT_DATA, EXIT_STORE = 0, 2, 3, 4


class CLIError(Exception):
    """An expected error: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


SLICE_KINDS = {
    # kind: (number of checkpoints, what they are)
    "line": (2, "theta_a theta_b: the line (1-a)*theta_a + a*theta_b"),
    "bilinear": (4, "t1 t2 t3 t4: the bilinear surface through four points (Im et al. A.1)"),
    "barycentric": (3, "t0 t1 t2: the triangle through three points (Im et al. A.1)"),
    "plane": (1, "center: a random plane around one point, filter-normalized (Li et al.)"),
    "random": (1, "center: one random direction through one point, filter-normalized"),
    "ray": (2, "theta1 theta0: the ray from theta1 towards theta0 in absolute distance (Im et al. Fig. 6)"),
    "bezier": (3, "theta_a theta_bend theta_b: the quadratic Bezier curve (Garipov et al.; `lerpfast curve` fits "
                  "the bend)"),
    "polychain": (3, "theta_a theta_bend theta_b: the polygonal chain a -> bend (t = 0.5) -> b"),
}


# paths from theta_a (0) to theta_b (1) whose summaries are a line's (max increase, barrier): lines and curves
PATH_KINDS = ("line", "bezier", "polychain")


@dataclass
class ModelSourceOptions:
    """The model and checkpoint options that ``lerpfast sweep`` and ``lerpfast merge`` share."""

    # -- model and checkpoints ------------------------------------------------------------------------------
    run: str | None = _f(None, "a `lerpfast train` run directory: the model comes from its hparams.json, and "
                               "checkpoints may be given as steps (0, 1024), 'init' or 'final'")
    replicate: int = _f(0, "replicate of --run whose checkpoints are used")
    model: str | None = _f(None, "model name, e.g. lenet_300_100, resnet20, mlp (not needed with --run)")
    model_options: str = _f("", "model keyword options, e.g. 'widths=(100,)' or 'width=2,bn=False'")


@dataclass
class SweepOptions(ModelSourceOptions):
    """Options of ``lerpfast sweep`` (each field becomes ``--<field-with-dashes>``)."""

    mask_from: str | None = _f(None, "pruned checkpoints (weight_orig + weight_mask) whose masks differ: the "
                                     "index of the checkpoint whose masks to use, or 'model'")
    # -- data --------------------------------------------------------------------------------------------------
    data: str | None = _f(None, "data set name (see `lerpfast data list`); default: the run's data set")
    split: str = _f("test", "split evaluated: test or train")
    data_root: str | None = _f(None, "data root (default $LERPFAST_DATA)")
    limit: int | None = _f(None, "evaluate on only the first N samples of the split")
    batch_size: int = _f(1000, "evaluation batch size")
    # -- coordinates -------------------------------------------------------------------------------------------
    alphas: str | None = _f(None, "line / bilinear / barycentric coordinate 'start:stop:num' (the t of bezier / "
                                  "polychain) (default 0:1:101 for a line, 0:1:21 for surfaces, 0:1:41 for "
                                  "curves); outside [0,1] extrapolates")
    betas: str | None = _f(None, "second coordinate of bilinear / barycentric (default: alphas)")
    lambdas: str | None = _f(None, "ray distances 'start:stop:num' in weight-space units "
                                   "(default: -0.5d:1.5d:81 with d = ||theta0 - theta1||)")
    xs: str | None = _f(None, "random plane / direction coordinate (default -1:1:41)")
    ys: str | None = _f(None, "random plane second coordinate (default -1:1:41)")
    seed: int = _f(0, "seed of random directions")
    filter_normalize: bool = _f(True, "scale random directions filter by filter to the weights' norms")
    # -- evaluation --------------------------------------------------------------------------------------------
    align: str | None = _f(None, "line only: permute theta_b's hidden units to match theta_a first (Git Re-Basin): "
                                 "weights | activations (matched on the evaluated data)")
    bn: str = _f("interpolate", "batch-norm statistics: interpolate | endpoint | endpoint:I | recompute")
    precision: str = _f("fp32", "fp32 | tf32 | bf16 | fp64")
    device: str = _f("auto", "cpu | cuda | cuda:N | auto")
    points_per_pass: int | None = _f(None, "points evaluated per forward pass (default: all)")
    method: str = _f("engine", "engine (batched) | loop (one point at a time, the oracle) | vmap")
    reference: str = _f("first", "point for functional distance and disagreement: first | none | an index")
    fuse: str = _f("auto", "fuse conv/linear -> BN -> add -> ReLU chains into one op: auto | true | false")
    compile: str = _f("false", "engine forward: false | cudagraphs (CUDA) | true (torch.compile) | a backend name")
    threads: int | None = _f(None, "torch intra-op threads (default: torch's choice)")
    output: str | None = _f(None, "where the logits are in the model's output: a key / attribute name, or an index "
                                  "of a returned tuple (default: the tensor, .logits, ['logits'], else item 0)")
    # -- output ------------------------------------------------------------------------------------------------
    store: str = _f("results.h5", "HDF5 result file (created if absent; many sweeps per file)")
    name: str | None = _f(None, "sweep name in the file (default: kind and checkpoint names); re-running the "
                                "same sweep under the same name computes only the missing points")
    plot: str | None = _f(None, "also write this sweep's figures into this folder")
    progress: bool = _f(True, "progress bar")


def _base_type(annotation: Any) -> tuple[type, bool]:
    hints = eval(annotation, {"typing": typing}, {}) if isinstance(annotation, str) else annotation
    if isinstance(hints, types.UnionType) or typing.get_origin(hints) is typing.Union:
        return next(a for a in typing.get_args(hints) if a is not type(None)), True
    return hints, False


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """One ``--<field>`` option per dataclass field, typed and documented from the field's metadata."""
    group = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        typ, _ = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "").replace("%", "%%")
        if typ is bool:
            group.add_argument(flag, dest=f.name, type=_bool, default=f.default, metavar="BOOL",
                               help=f"{text} (default: {str(f.default).lower()})")
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag, dest=f.name, type=typ, default=f.default, metavar=typ.__name__.upper(),
                               help=text + shown)


def options_from_args(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------------------------------------
# sweep

SWEEP_EPILOG = """\
examples:
  # init -> final of a training run, 101 points, Fashion-MNIST test set
  lerpfast sweep line --run runs/train_1a2b3c init final --store results.h5 --name init-final

  # Frankle's t -> final for t = 1024, extrapolated, with figures
  lerpfast sweep line --run runs/train_1a2b3c 1024 final --alphas=-0.5:1.5:201 --plot figs/

  # two checkpoint files, any registered model and data set
  lerpfast sweep line a.pt b.pt --model lenet_300_100 --data fashion-mnist --name a-b

  # a random plane around a solution; a bilinear surface between four solutions
  lerpfast sweep plane final.pt --model resnet20 --data cifar10 --xs=-1:1:51 --ys=-1:1:51
  lerpfast sweep bilinear sgd.pt adam.pt rmsprop.pt rk2.pt --model mlp --data digits

  # basin width: the ray from a solution towards the init, in absolute distance
  lerpfast sweep ray final.pt init.pt --model mlp --data digits --lambdas 0:40:81

Interrupt a sweep at any time: running the same command again computes only the missing points.
Checkpoints are PyTorch state dicts (.pt/.pth, loaded with weights_only=True) or .safetensors files.
"""


def _add_sweep(sub) -> None:
    kinds = "\n".join(f"  {k:<12} {n} checkpoint{'s' if n > 1 else ''}: {what}" for k, (n, what) in SLICE_KINDS.items())
    p = sub.add_parser("sweep", help="evaluate a model along a line, plane or ray of weight space",
                       description="Evaluate a model at K points of a slice of weight space, K points per forward "
                                   "pass, and write per-point loss, error, top-5 error, functional distance and "
                                   "disagreement to an HDF5 store.\n\nslices:\n" + kinds,
                       epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=list(SLICE_KINDS), help="slice kind")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint files, or with --run: steps (0, 1024), init, final")
    add_dataclass_options(p, SweepOptions, "sweep options")
    p.set_defaults(func=cmd_sweep)


def _device(name: str) -> str:
    from lerpfast.distributed import local_device

    check_device(name)
    return local_device(name)


def check_device(name: str, flag: str = "--device") -> None:
    """A usage error (exit 2) for a device torch cannot parse, or CUDA asked for where there is none."""
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"{flag} {name!r}: not a device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{flag} {name!r}: no CUDA GPU is available on this machine (use --device cpu or "
                           f"auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"{flag} {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def check_positive(value: int | None, flag: str) -> None:
    """A usage error (exit 2) for an integer option that must be >= 1 when given."""
    if value is not None and value < 1:
        raise CLIError(f"{flag} {value}: must be a positive integer (leave it out for the default)")


def _resolve_checkpoints(tokens: Sequence[str], opts: SweepOptions) -> tuple[list, list[str]]:
    """Checkpoint paths (and labels) from the command line: files, or steps of ``--run``."""
    if opts.run is None:
        paths = []
        for t in tokens:
            p = Path(t)
            if not p.is_file():
                by_step = t.isdigit() or t in ("init", "final")
                hint = " (use --run RUN_DIR to name checkpoints by step)" if by_step else ""
                raise CLIError(f"checkpoint {t!r}: no such file{hint}", EXIT_DATA)
            paths.append(p)
        return paths, [p.stem for p in paths]
    from lerpfast.train import list_checkpoints

    ckpts = list_checkpoints(opts.run, opts.replicate)
    if not ckpts:
        raise CLIError(f"{opts.run}: no checkpoints of replicate {opts.replicate} (is it a `lerpfast train` run "
                       f"directory?)", EXIT_DATA)
    out, labels = [], []
    for t in tokens:
        if t == "init":
            step = min(ckpts)
        elif t == "final":
            step = max(ckpts)
        elif t.isdigit():
            step = int(t)
        else:
            if not Path(t).is_file():
                raise CLIError(f"checkpoint {t!r}: not a step of {opts.run} and no such file", EXIT_DATA)
            out.append(Path(t))
            labels.append(Path(t).stem)
            continue
        if step not in ckpts:
            have = ", ".join(map(str, list(ckpts)[:12])) + (" ..." if len(ckpts) > 12 else "")
            raise CLIError(f"{opts.run}: no checkpoint at step {step} (saved steps: {have})", EXIT_DATA)
        out.append(ckpts[step])
        labels.append("final" if step == max(ckpts) and t == "final" else f"t={step}")
    return out, labels


def _build_model_and_data(opts: SweepOptions):
    import lerpfast.data as ld
    from lerpfast.train import models
    from lerpfast.train.config import parse_options

    dataset, model_name, model_opts = opts.data, opts.model, opts.model_options
    if opts.run is not None:
        from lerpfast.train import load_config

        try:
            cfg = load_config(opts.run)
        except FileNotFoundError:
            raise CLIError(f"{opts.run}: no hparams.json (not a `lerpfast train` run directory)", EXIT_DATA) from None
        dataset = dataset or cfg.dataset
        model_name = model_name or cfg.model
        model_opts = model_opts or cfg.model_options
    if model_name is None:
        raise CLIError("which model? give --model NAME (e.g. lenet_300_100) or --run RUN_DIR")
    if dataset is None:
        raise CLIError("which data? give --data NAME (see `lerpfast data list`)")
    device = _device(opts.device)
    if dataset not in ld.REGISTRY:
        raise CLIError(f"--data {dataset!r}: unknown data set (known: {', '.join(ld.REGISTRY)}; see "
                       f"`lerpfast data list`)")
    data = ld.load(dataset, opts.split, root=opts.data_root, device=device, batch_size=opts.batch_size,
                   limit=opts.limit)
    try:
        model = models.create(model_name, int(data.num_classes), tuple(int(s) for s in data.input_shape),
                              **parse_options(model_opts))
    except TypeError as e:
        raise CLIError(f"model {model_name!r}: bad --model-options ({e})") from None
    return model.to(device).eval(), data, dataset, device


def _slice(kind: str, ckpts: list, opts: SweepOptions, data=None):
    import lerpfast

    if opts.align is not None and kind != "line":
        raise CLIError(f"--align {opts.align}: applies to sweep line only, not {kind}")
    if kind == "line":
        if opts.align is not None and opts.align not in ("weights", "activations"):
            raise CLIError(f"--align {opts.align!r}: expected weights or activations")
        align_options = {"data": data} if opts.align == "activations" else None
        return lerpfast.Line(*ckpts, alphas=opts.alphas or "0:1:101", align=opts.align, align_options=align_options)
    if kind == "bilinear":
        return lerpfast.Bilinear(*ckpts, alphas=opts.alphas or "0:1:21", betas=opts.betas)
    if kind == "barycentric":
        return lerpfast.Barycentric(*ckpts, alphas=opts.alphas or "0:1:21", betas=opts.betas)
    if kind in ("plane", "random"):
        ys = (opts.ys or "-1:1:41") if kind == "plane" else opts.ys
        return lerpfast.RandomDirections(ckpts[0], xs=opts.xs or "-1:1:41", ys=ys, seed=opts.seed,
                                         filter_normalize=opts.filter_normalize)
    if kind == "ray":
        lambdas = opts.lambdas
        if lambdas is None:
            d = _distance(*ckpts)
            lambdas = f"{-0.5 * d}:{1.5 * d}:81"
        return lerpfast.Ray(*ckpts, lambdas=lambdas)
    if kind in ("bezier", "polychain"):
        return (lerpfast.Bezier if kind == "bezier" else lerpfast.PolyChain)(*ckpts, ts=opts.alphas or "0:1:41")
    raise CLIError(f"unknown slice kind {kind!r}")


def _distance(a, b) -> float:
    from lerpfast.checkpoints import load_state

    sa, sb = load_state(a), load_state(b)
    sq = sum(float((sa[k].double() - sb[k].double()).pow(2).sum()) for k in sa
             if k in sb and sa[k].is_floating_point() and "running_" not in k)
    return sq**0.5


def _mask_from(value: str | None) -> int | str | None:
    if value is None or value == "model":
        return value
    if not value.lstrip("-").isdigit():
        raise CLIError(f"--mask-from {value!r}: expected a checkpoint index (0, 1, ...) or 'model'")
    return int(value)


def cmd_sweep(args: argparse.Namespace) -> int:
    opts: SweepOptions = options_from_args(args, SweepOptions)
    need, _ = SLICE_KINDS[args.kind]
    if len(args.checkpoints) != need:
        raise CLIError(f"sweep {args.kind} takes {need} checkpoint{'s' if need > 1 else ''}, "
                       f"got {len(args.checkpoints)}: {SLICE_KINDS[args.kind][1]}")
    import numpy as np
    import torch

    import lerpfast
    from lerpfast.analysis import barrier, max_increase
    from lerpfast.distributed import init_from_env

    check_positive(opts.threads, "--threads")
    check_positive(opts.points_per_pass, "--points-per-pass")
    check_device(opts.device)
    mask_from = _mask_from(opts.mask_from)
    rank, world = init_from_env()  # under torchrun: points sharded over the ranks, rank 0 writes the store
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ckpts, labels = _resolve_checkpoints(args.checkpoints, opts)
    model, data, dataset, device = _build_model_and_data(opts)
    spec = _slice(args.kind, ckpts, opts, data)
    name = opts.name or "_".join([args.kind, *labels]).replace("/", "_")
    reference: Any = opts.reference
    if reference == "none":
        reference = None
    elif reference.lstrip("-").isdigit():
        reference = int(reference)
    flags = {"true": True, "false": False}
    fuse = flags.get(opts.fuse.lower(), opts.fuse)
    compile_ = flags.get(opts.compile.lower(), opts.compile)
    t0 = time.perf_counter()
    res = lerpfast.sweep(model, spec, None, data, bn=opts.bn, precision=opts.precision, fuse=fuse, compile=compile_,
                         batch_size=opts.batch_size, points_per_pass=opts.points_per_pass, device=device,
                         progress=opts.progress and sys.stderr.isatty(), reference=reference, method=opts.method,
                         store=opts.store, name=name, labels=labels, mask_from=mask_from,
                         output=int(opts.output) if opts.output and opts.output.lstrip("-").isdigit() else opts.output)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return EXIT_OK
    computed = res.meta.get("points_computed", res.K)
    ranks = f", {world} ranks" if world > 1 else ""
    line = (f"{opts.store}:{name}  {res.kind}  K={res.K}  computed {computed} points in {seconds:.1f}s  "
            f"({dataset}/{opts.split}, {res.meta.get('num_samples', '?')} samples, {device}{ranks})")
    print(line)
    loss = np.asarray(res.metrics["loss"])
    if np.isfinite(loss).any():
        i = int(np.nanargmin(loss))
        where = ", ".join(f"{n}={c:.4g}" for n, c in zip(res.coord_names, res.coords[i]))
        summary = f"  min loss {loss[i]:.4g} at {where}"
        if res.grid_shape is None and res.kind in PATH_KINDS:
            summary += (f"; max increase: loss {max_increase(res.alphas, loss):.4g}, "
                        f"error {max_increase(res.alphas, res.metrics['error']):.4g}; "
                        f"barrier: loss {barrier(res.alphas, loss):.4g}")
        print(summary)
    if opts.plot:
        from lerpfast.plot import plot_store

        for f in plot_store(opts.store, opts.plot, names=[name]):
            print(f"  wrote {f}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# merge

MERGE_KINDS = {
    # kind: (fewest checkpoints, most (None: any), what they are)
    "wiseft": (2, 2, "ZERO_SHOT FINE_TUNED: (1-alpha)*zero_shot + alpha*fine_tuned at every alpha, on every "
                     "--data set (WiSE-FT)"),
    "soup": (1, None, "INGREDIENT ...: the greedy soup of N ingredients (Wortsman et al. 2022), or --recipe "
                      "forward"),
    "task-arithmetic": (2, None, "PRETRAINED FINETUNED ...: pretrained + sum_j lambda_j (finetuned_j - pretrained) "
                                 "(Ilharco et al. 2023)"),
}


@dataclass
class MergeOptions(ModelSourceOptions):
    """Options of ``lerpfast merge`` (each field becomes ``--<field-with-dashes>``)."""

    # -- data --------------------------------------------------------------------------------------------------
    data: str | None = _f(None, "data sets NAME[:SPLIT], comma-separated, e.g. digits:test,digits:train. wiseft: "
                                "every set is evaluated, alpha is chosen on the first (or --select); soup and "
                                "task-arithmetic: one held-out / validation set. Default: the run's data set")
    split: str = _f("test", "split of a --data entry without :SPLIT")
    data_root: str | None = _f(None, "data root (default $LERPFAST_DATA)")
    limit: int | None = _f(None, "evaluate on only the first N samples of each set")
    batch_size: int = _f(1000, "evaluation batch size")
    # -- the workflow ------------------------------------------------------------------------------------------
    alphas: str = _f("0:1:11", "wiseft: mixing coefficients 'start:stop:num'")
    select: str | None = _f(None, "wiseft: the --data entry alpha is chosen on (default: the first), or a number: "
                                  "that fixed alpha")
    recipe: str = _f("greedy", "soup: greedy (the paper's: ingredients by held-out accuracy, each added if the "
                               "average does not drop) | forward (every remaining ingredient tried in one pass "
                               "per step)")
    lambdas: str = _f("0:1:11", "task-arithmetic: the values tried, 'start:stop:num', or a .npy / .csv file "
                                "holding a (K, J) matrix: K points, one column per fine-tuned checkpoint")
    search: str = _f("shared", "task-arithmetic with values: shared (one lambda for every task) | grid (every "
                               "combination) | coordinate (one task's lambda at a time)")
    metric: str = _f("error", "what the choice minimizes: error | loss")
    # -- evaluation --------------------------------------------------------------------------------------------
    bn: str = _f("interpolate", "batch-norm statistics: interpolate | endpoint | endpoint:I | recompute")
    precision: str = _f("fp32", "fp32 | tf32 | bf16 | fp64")
    device: str = _f("auto", "cpu | cuda | cuda:N | auto")
    points_per_pass: int | None = _f(None, "points evaluated per forward pass (default: all)")
    method: str = _f("engine", "engine (batched) | loop (one point at a time, the oracle) | vmap")
    threads: int | None = _f(None, "torch intra-op threads (default: torch's choice)")
    # -- output ------------------------------------------------------------------------------------------------
    store: str = _f("results.h5", "HDF5 result file: one sweep per step and data set, named NAME.<part>")
    name: str | None = _f(None, "prefix of the sweeps' names (default: wiseft, soup or task_arithmetic); re-running "
                                "the same command resumes")
    out: str | None = _f(None, "write the chosen state dict to this file (.pt, or .safetensors)")
    plot: str | None = _f(None, "wiseft: write the curves and the in-distribution-vs-shift figure into this folder")
    progress: bool = _f(True, "progress bar")


MERGE_EPILOG = """\
examples:
  # WiSE-FT: 11 alphas between a pre-trained and a fine-tuned checkpoint, on two test sets, the chosen model saved
  lerpfast merge wiseft zero_shot.pt fine_tuned.pt --model mlp --data digits:test,digits:train --out wiseft.pt

  # the greedy soup of five fine-tunes on held-out data; forward selection instead
  lerpfast merge soup ft0.pt ft1.pt ft2.pt ft3.pt ft4.pt --model mlp --data digits:train --out soup.pt
  lerpfast merge soup ft*.pt --model mlp --data digits:train --recipe forward

  # task arithmetic: one shared lambda; one lambda per task (coordinate search); given points from a file
  lerpfast merge task-arithmetic pre.pt a.pt b.pt c.pt --model mlp --data digits:train --lambdas 0:1:21
  lerpfast merge task-arithmetic pre.pt a.pt b.pt c.pt --model mlp --data digits:train --search coordinate
  lerpfast merge task-arithmetic pre.pt a.pt b.pt --model mlp --data digits:train --lambdas points.csv

Every step evaluates all its candidates in one batched pass; each is stored as a sweep (`lerpfast show`).
"""


def _add_merge(sub) -> None:
    kinds = "\n".join(f"  {k:<16} {what}" for k, (_, _, what) in MERGE_KINDS.items())
    p = sub.add_parser("merge", help="model merging: WiSE-FT, greedy soups, task arithmetic",
                       description="Choose merge coefficients with every candidate of a step evaluated in one "
                                   "batched pass; write the sweeps to an HDF5 store and the chosen state dict to "
                                   "--out.\n\nworkflows:\n" + kinds,
                       epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", choices=list(MERGE_KINDS), help="merging workflow")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint files, or with --run: steps (0, 1024), init, final")
    add_dataclass_options(p, MergeOptions, "merge options")
    p.set_defaults(func=cmd_merge)


def _data_entries(opts: MergeOptions, default: str | None) -> list[tuple[str, str]]:
    """(data set, split) of each --data entry."""
    text = opts.data or default
    if text is None:
        raise CLIError("which data? give --data NAME[:SPLIT] (see `lerpfast data list`)")
    out = []
    for entry in text.split(","):
        name, _, split = entry.strip().partition(":")
        if not name:
            raise CLIError(f"--data {text!r}: empty entry (expected NAME[:SPLIT], comma-separated)")
        out.append((name, split or opts.split))
    return out


def _merge_model_and_data(opts: MergeOptions, workflow: str):
    import lerpfast.data as ld
    from lerpfast.train import models
    from lerpfast.train.config import parse_options

    model_name, model_opts, default_data = opts.model, opts.model_options, None
    if opts.run is not None:
        from lerpfast.train import load_config

        try:
            cfg = load_config(opts.run)
        except FileNotFoundError:
            raise CLIError(f"{opts.run}: no hparams.json (not a `lerpfast train` run directory)", EXIT_DATA) from None
        default_data = cfg.dataset
        model_name = model_name or cfg.model
        model_opts = model_opts or cfg.model_options
    if model_name is None:
        raise CLIError("which model? give --model NAME (e.g. lenet_300_100) or --run RUN_DIR")
    entries = _data_entries(opts, default_data)
    if workflow != "wiseft" and len(entries) > 1:
        raise CLIError(f"--data {opts.data!r}: merge {workflow} takes one held-out / validation set, got "
                       f"{len(entries)}")
    device = _device(opts.device)
    sets, shape = {}, None
    for name, split in entries:
        if name not in ld.REGISTRY:
            raise CLIError(f"--data {name!r}: unknown data set (known: {', '.join(ld.REGISTRY)}; see "
                           f"`lerpfast data list`)")
        key = f"{name}:{split}"
        if key in sets:
            raise CLIError(f"--data: {name}:{split} is given twice")
        data = ld.load(name, split, root=opts.data_root, device=device, batch_size=opts.batch_size, limit=opts.limit)
        this = (int(data.num_classes), tuple(int(s) for s in data.input_shape))
        if shape is None:
            shape = this
        elif this != shape:
            raise CLIError(f"--data: {name}:{split} has {this[0]} classes of shape {this[1]}, but {entries[0][0]} "
                           f"has {shape[0]} of shape {shape[1]}: every set must fit the one model")
        sets[key] = data
    try:
        model = models.create(model_name, shape[0], shape[1], **parse_options(model_opts))
    except TypeError as e:
        raise CLIError(f"model {model_name!r}: bad --model-options ({e})") from None
    return model.to(device).eval(), sets, device


def _matrix_or_text(value: str, flag: str):
    """A (K, J) matrix from a .npy / .csv / .txt file, or the text itself ('start:stop:num')."""
    import numpy as np

    if not value.lower().endswith((".npy", ".csv", ".txt")):
        return value
    path = Path(value)
    if not path.is_file():
        raise CLIError(f"{flag} {value!r}: no such file (a .npy or .csv file of a (K, J) matrix, or "
                       f"'start:stop:num')", EXIT_DATA)
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else np.loadtxt(
            path, delimiter="," if path.suffix.lower() == ".csv" else None, ndmin=2)
    except (ValueError, OSError) as e:
        raise CLIError(f"{flag} {value!r}: cannot read a matrix of numbers ({e})", EXIT_DATA) from None
    return np.asarray(arr, dtype=float)


def cmd_merge(args: argparse.Namespace) -> int:
    opts: MergeOptions = options_from_args(args, MergeOptions)
    low, high, what = MERGE_KINDS[args.workflow]
    n = len(args.checkpoints)
    if n < low or (high is not None and n > high):
        want = f"{low}" if low == high else f"at least {low}"
        raise CLIError(f"merge {args.workflow} takes {want} checkpoint{'s' if low > 1 else ''}, got {n}: {what}")
    import numpy as np
    import torch

    import lerpfast.merge as lm

    check_positive(opts.threads, "--threads")
    check_positive(opts.points_per_pass, "--points-per-pass")
    check_device(opts.device)
    if opts.metric not in lm.METRICS:
        raise CLIError(f"--metric {opts.metric!r}: expected one of {', '.join(lm.METRICS)}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.out is not None and not Path(opts.out).parent.exists():
        raise CLIError(f"--out {opts.out!r}: the folder {str(Path(opts.out).parent)!r} does not exist", EXIT_DATA)
    ckpts, labels = _resolve_checkpoints(args.checkpoints, opts)
    model, sets, device = _merge_model_and_data(opts, args.workflow)
    kw = dict(precision=opts.precision, bn=opts.bn, batch_size=opts.batch_size, points_per_pass=opts.points_per_pass,
              device=device, method=opts.method, progress=opts.progress and sys.stderr.isatty(), metric=opts.metric,
              store=opts.store)
    t0 = time.perf_counter()
    if args.workflow == "wiseft":
        name = opts.name or "wiseft"
        select: Any = None
        if opts.select is not None:
            try:
                select = float(opts.select)
            except ValueError:
                s_name, _, s_split = opts.select.partition(":")
                select = f"{s_name}:{s_split or opts.split}"
                if select not in sets:
                    raise CLIError(f"--select {opts.select!r}: not one of the --data sets ({', '.join(sets)}), nor a "
                                   "number (a fixed alpha)") from None
        res = lm.wiseft(model, ckpts[0], ckpts[1], sets, opts.alphas, select=select, name=name, **kw)
    elif args.workflow == "soup":
        name = opts.name or "soup"
        if opts.recipe not in lm.RECIPES:
            raise CLIError(f"--recipe {opts.recipe!r}: expected one of {', '.join(lm.RECIPES)}")
        res = lm.greedy_soup(model, ckpts, next(iter(sets.values())), recipe=opts.recipe, name=name, **kw)
    else:
        name = opts.name or "task_arithmetic"
        lambdas = _matrix_or_text(opts.lambdas, "--lambdas")
        search = None if isinstance(lambdas, np.ndarray) and lambdas.ndim == 2 else opts.search
        if search is not None and search not in lm.SEARCHES:
            raise CLIError(f"--search {opts.search!r}: expected one of {', '.join(lm.SEARCHES)}")
        res = lm.task_arithmetic(model, ckpts[0], ckpts[1:], next(iter(sets.values())), lambdas, search=search,
                                 name=name, **kw)
    seconds = time.perf_counter() - t0
    for sname, r in res.results.items():
        print(f"{opts.store}:{sname}  {r.kind}  K={r.K}  computed {r.meta.get('points_computed', r.K)} points  "
              f"({r.meta.get('num_samples', '?')} samples)")
    if args.workflow == "wiseft":
        sets_order = list(res.meta["datasets"])
        print("  alpha  " + "  ".join(f"{d:>14}" for d in sets_order) + f"   ({opts.metric})")
        for i, a in enumerate(res.meta["alphas"]):
            vals = [res.results[res.meta["sweeps"][d]].metrics[opts.metric][i] for d in sets_order]
            print(f"  {a:5.3g}  " + "  ".join(f"{v:>14.4g}" for v in vals))
    elif args.workflow == "soup":
        for st in res.steps[1:]:
            print(f"  step {st['step']}: tried {len(st['tried'])} soup(s), best {opts.metric} "
                  f"{min(st['values']):.4g}; " + (f"added ingredient {st['added']} ({labels[st['added']]})"
                                                 if st["added"] is not None else "nothing added"))
    chosen = ", ".join(f"{k}={lm._short(v)}" for k, v in res.choice.items() if k not in ("metric", "value", "weights"))
    if args.workflow == "soup":
        chosen = "ingredients " + ", ".join(labels[i] for i in res.choice["ingredients"])
    value = res.choice["value"]
    print(f"chosen: {chosen}" + ("" if value is None else f"  ({opts.metric} {value:.4g})") + f"  in {seconds:.1f}s")
    if opts.out is not None:
        if opts.out.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in res.state_dict.items()}, opts.out)
        else:
            torch.save(res.state_dict, opts.out)
        print(f"  wrote {opts.out}")
    if opts.plot:
        if args.workflow != "wiseft":
            print(f"  --plot: no figure for merge {args.workflow} (the sweeps are in {opts.store}: lerpfast plot)",
                  file=sys.stderr)
        else:
            from lerpfast.plot import save

            for f in save(lm.plot_wiseft(res, opts.metric), Path(opts.plot) / f"{name}.png"):
                print(f"  wrote {f}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# align


@dataclass
class AlignOptions(ModelSourceOptions):
    """Options of ``lerpfast align`` (each field becomes ``--<field-with-dashes>``)."""

    out: str | None = _f(None, "where to write the aligned theta_b (.pt, or .safetensors); required")
    method: str = _f("weights", "weights (Git Re-Basin weight matching) | activations (correlation of the two "
                                "networks' activations over --data)")
    data: str | None = _f(None, "data set: its input shape and classes build the model, and with --method "
                                "activations its batches are matched on (default: the run's data set, else the "
                                "model's standard input)")
    split: str = _f("train", "split of --data")
    data_root: str | None = _f(None, "data root (default $LERPFAST_DATA)")
    limit: int | None = _f(None, "use only the first N samples of the split")
    batch_size: int = _f(500, "batch size of --method activations")
    seed: int = _f(0, "order of the permutation groups in weight matching")
    max_iter: int = _f(100, "most passes over the groups in weight matching")
    threads: int | None = _f(None, "torch intra-op threads (default: torch's choice)")


ALIGN_EPILOG = """\
examples:
  # permute b's hidden units to match a's (same function), then sweep the aligned line
  lerpfast align a.pt b.pt --model resnet20 --out b_aligned.pt
  lerpfast sweep line a.pt b_aligned.pt --model resnet20 --data cifar10 --bn recompute

  # activation matching on 2,000 training images; a model from a training run
  lerpfast align a.pt b.pt --model mlp --data digits --method activations --limit 2000 --out b_aligned.pt
  lerpfast align --run runs/train_1a2b3c final other_seed.pt --out b_aligned.pt

  # or in one step: lerpfast sweep line a.pt b.pt --model resnet20 --data cifar10 --align weights
"""


def _add_align(sub) -> None:
    p = sub.add_parser("align", help="permute a checkpoint's hidden units to match another's (Git Re-Basin)",
                       description="Permute theta_b's hidden units to match theta_a's (weight matching or activation "
                                   "matching); the result computes exactly theta_b's function and is written to "
                                   "--out. The permutation structure is derived from the model with torch.fx.",
                       epilog=ALIGN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs=2, metavar="CHECKPOINT",
                   help="theta_a (the reference) and theta_b (permuted): files, or with --run steps, init, final")
    add_dataclass_options(p, AlignOptions, "align options")
    p.set_defaults(func=cmd_align)


def cmd_align(args: argparse.Namespace) -> int:
    opts: AlignOptions = options_from_args(args, AlignOptions)
    if opts.out is None:
        raise CLIError("where to? give --out FILE (.pt or .safetensors) for the aligned theta_b")
    if not Path(opts.out).parent.exists():
        raise CLIError(f"--out {opts.out!r}: the folder {str(Path(opts.out).parent)!r} does not exist", EXIT_DATA)
    if opts.method not in ("weights", "activations"):
        raise CLIError(f"--method {opts.method!r}: expected weights or activations")
    check_positive(opts.threads, "--threads")
    check_positive(opts.max_iter, "--max-iter")
    check_positive(opts.limit, "--limit")
    check_positive(opts.batch_size, "--batch-size")
    import torch

    import lerpfast
    import lerpfast.data as ld
    from lerpfast.train import models
    from lerpfast.train.config import parse_options

    if opts.threads:
        torch.set_num_threads(opts.threads)
    ckpts, labels = _resolve_checkpoints(args.checkpoints, opts)
    model_name, model_opts, dataset = opts.model, opts.model_options, opts.data
    if opts.run is not None:
        from lerpfast.train import load_config

        try:
            cfg = load_config(opts.run)
        except FileNotFoundError:
            raise CLIError(f"{opts.run}: no hparams.json (not a `lerpfast train` run directory)", EXIT_DATA) from None
        model_name, model_opts = model_name or cfg.model, model_opts or cfg.model_options
        dataset = dataset or cfg.dataset
    if model_name is None:
        raise CLIError("which model? give --model NAME (e.g. lenet_300_100) or --run RUN_DIR")
    if opts.method == "activations" and dataset is None:
        raise CLIError("--method activations: which data? give --data NAME (see `lerpfast data list`)")
    data, shape = None, {}
    if dataset is not None:
        if dataset not in ld.REGISTRY:
            raise CLIError(f"--data {dataset!r}: unknown data set (known: {', '.join(ld.REGISTRY)}; see "
                           f"`lerpfast data list`)")
        data = ld.load(dataset, opts.split, root=opts.data_root, batch_size=opts.batch_size, limit=opts.limit)
        shape = {"num_classes": int(data.num_classes), "in_shape": tuple(int(s) for s in data.input_shape)}
    try:
        model = models.create(model_name, **shape, **parse_options(model_opts)).eval()
    except TypeError as e:
        raise CLIError(f"model {model_name!r}: bad --model-options ({e})") from None
    res = lerpfast.align(model, ckpts[0], ckpts[1], opts.method, data, seed=opts.seed, max_iter=opts.max_iter)
    s = res.summary()
    print(f"aligned {labels[1]} to {labels[0]} ({opts.method}): {s['groups']} groups, {s['units']} units, "
          f"{s['moved']} moved; {res.iterations} iteration{'s' if res.iterations != 1 else ''}, objective "
          f"{res.objective_start:.6g} -> {res.objective:.6g}; {res.seconds:.2f}s; same outputs to "
          f"{res.max_deviation:.1e}")
    if res.frozen:
        print("  held at the identity: " + "; ".join(f"{k} ({v})" for k, v in res.frozen.items()))
    if opts.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in res.state_dict.items()}, opts.out)
    else:
        torch.save(res.state_dict, opts.out)
    print(f"  wrote {opts.out}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# show / plot


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="list the sweeps in a result file and how complete they are",
                       description="List the sweeps in an HDF5 result file: kind, points done / total, metrics, "
                                   "and for complete lines the maximum increase and barrier of the loss. Safe to run "
                                   "while a sweep is writing the file.",
                       epilog="examples:\n  lerpfast show results.h5\n  lerpfast show results.h5 --json | jq .\n"
                              "  lerpfast show results.h5 --attrs init-final   # everything that reproduces it",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="HDF5 result file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--attrs", metavar="NAME", default=None, help="print one sweep's stored attributes as JSON")
    p.set_defaults(func=cmd_show)


def _add_repair(sub) -> None:
    p = sub.add_parser("repair", help="mark a result file's damaged points for recomputation",
                       description="Check every stored value of an HDF5 result file against its checksum and mark "
                                   "the points of damaged chunks as not computed (their values are dropped); the next "
                                   "run of the same sweep recomputes exactly those. Prints what it marked.",
                       epilog="example:\n  lerpfast repair results.h5 && lerpfast sweep ... --store results.h5",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="HDF5 result file")
    p.set_defaults(func=cmd_repair)


def cmd_repair(args: argparse.Namespace) -> int:
    from lerpfast.store import ResultStore, _ranges_text

    if not Path(args.store).exists():
        raise CLIError(f"{args.store}: no such result file", EXIT_STORE)
    fixed = ResultStore.repair(args.store)
    if not fixed:
        print(f"{args.store}: every stored value passes its checksum; nothing to repair")
    for name, points in fixed.items():
        print(f"{args.store}: sweep {name!r}: {len(points)} points marked for recomputation ({_ranges_text(points)})")
    return EXIT_OK


def _open_reader(path: str):
    from lerpfast.store import ResultStore

    if not Path(path).exists():
        raise CLIError(f"{path}: no such result file", EXIT_STORE)
    return ResultStore(path, "r")


def _natural(name: str) -> list:
    import re

    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


def cmd_show(args: argparse.Namespace) -> int:
    import numpy as np

    from lerpfast.analysis import barrier, max_increase

    store = _open_reader(args.store)
    if args.attrs:
        try:
            print(json.dumps(store.attrs(args.attrs), indent=2, sort_keys=True, default=str))
        except KeyError as e:
            raise CLIError(e.args[0], EXIT_STORE) from None
        return EXIT_OK
    rows = sorted(store.summary(), key=lambda r: _natural(r["name"]))  # t=16 before t=1024
    for row in rows:
        row["max_increase_loss"] = row["barrier_loss"] = None
        if row["kind"] in PATH_KINDS and row["done"] == row["total"]:
            res = store.read(row["name"])
            if res.grid_shape is None and "loss" in res.metrics:
                row["max_increase_loss"] = max_increase(res.alphas, res.metrics["loss"])
                row["barrier_loss"] = barrier(res.alphas, res.metrics["loss"])
                row["min_loss"] = float(np.nanmin(res.metrics["loss"]))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    if not rows:
        print(f"{args.store}: no sweeps")
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    kw = max([11] + [len(str(r["kind"])) for r in rows])  # task_vectors: 12
    print(f"{'sweep':<{width}}  {'kind':<{kw}} {'points':>13}  {'done':>6}  {'max incr.':>9}  {'barrier':>9}  created")
    for r in rows:
        pct = 100.0 * r["done"] / max(r["total"], 1)
        mi = "" if r["max_increase_loss"] is None else f"{r['max_increase_loss']:.4g}"
        ba = "" if r["barrier_loss"] is None else f"{r['barrier_loss']:.4g}"
        print(f"{r['name']:<{width}}  {r['kind']:<{kw}} {r['done']:>6}/{r['total']:<6}  {pct:5.1f}%  {mi:>9}  {ba:>9}  "
              f"{r['created']}")
    return EXIT_OK


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="figures of the sweeps in a result file (PNG, PDF, SVG)",
                       description="Write the default figures of the sweeps in a result file: loss and error "
                                   "against alpha for all lines (replicates named NAME@rep<i> become mean +- std "
                                   "bands; names with t=<step> also give the max increase against t), functional "
                                   "distance and disagreement, contours and surfaces of planes, rays with the "
                                   "basin width.",
                       epilog="examples:\n  lerpfast plot results.h5 --out figs\n"
                              "  lerpfast plot results.h5 --out figs --format png,pdf --logy\n"
                              "  lerpfast plot results.h5 --out figs --names init-final t=1024\n"
                              "  lerpfast plot results.h5 --out figs --run runs/train_<hash>   # + trajectory.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="HDF5 result file")
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--format", default="png", help="comma-separated: png, pdf, svg (default: png)")
    p.add_argument("--names", nargs="+", default=None, help="only these sweeps (default: all)")
    p.add_argument("--logy", action="store_true", help="log-scaled loss axes (Goodfellow et al. Fig. 3)")
    p.add_argument("--run", default=None, help="a `lerpfast train` run directory: also draw its training trajectory "
                                               "projected on init -> final against a random walk (trajectory.png)")
    p.add_argument("--replicate", type=int, default=0, help="replicate of --run for the trajectory (default: 0)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from lerpfast.plot import FORMATS, plot_store

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CLIError(f"--format {args.format!r}: choose from {', '.join(FORMATS)}")
    store = _open_reader(args.store)
    if args.names:
        have = store.names()
        missing = [n for n in args.names if n not in have]
        if missing:
            raise CLIError(f"{args.store}: no sweep named {', '.join(missing)} (sweeps: {', '.join(have)})",
                           EXIT_STORE)
    files = plot_store(args.store, args.out, names=args.names, formats=formats, logy=args.logy)
    if args.run is not None:
        from lerpfast.plot import plot_checkpoint_trajectory, save
        from lerpfast.train import list_checkpoints

        ckpts = list_checkpoints(args.run, args.replicate)
        if len(ckpts) < 3:
            raise CLIError(f"--run {args.run}: replicate {args.replicate} has {len(ckpts)} checkpoints "
                           "(a trajectory needs at least 3)")
        fig = plot_checkpoint_trajectory(ckpts, title=f"{Path(args.run).name}, replicate {args.replicate}")
        files += save(fig, Path(args.out) / "trajectory", formats)
    for f in files:
        print(f)
    if not files:
        print(f"{args.store}: nothing to plot", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# bench / demo


def _benchmarks_dir() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        d = base / "benchmarks"
        if d.is_dir() and any(d.glob("bench_*.py")):
            return d
    return None


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark scripts in benchmarks/",
                       description="Run benchmarks/bench_<name>.py (they ship with the source tree). Arguments "
                                   "after -- go to the script. Each writes JSON under benchmarks/results/.",
                       epilog="examples:\n  lerpfast bench --list\n  lerpfast bench sweep_cpu\n"
                              "  lerpfast bench sweep_gpu -- --models resnet20 --methods loop_bf16_cl,lerpfast_bf16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="benchmark names (bench_<name>.py); default: all")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    d = _benchmarks_dir()
    if d is None:
        raise CLIError("no benchmarks/ folder here or next to the lerpfast package (they ship with the source "
                       "tree: run from a clone)")
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(d.glob("bench_*.py"))}
    if args.list:
        for n, p in scripts.items():
            doc = ""
            for line in p.read_text().splitlines():
                if line.strip().strip('"').strip():
                    doc = line.strip().strip('"')
                    break
            print(f"{n:<18} {doc}")
        return EXIT_OK
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise CLIError(f"unknown benchmark {', '.join(unknown)} (have: {', '.join(scripts)})")
    extra = getattr(args, "extra", [])
    status = EXIT_OK
    for n in args.names or list(scripts):
        print(f"== {n}: {scripts[n]}", flush=True)
        rc = subprocess.call([sys.executable, str(scripts[n]), *extra])
        status = status or rc
    return status


def _add_demo(sub) -> None:
    from lerpfast import demo as _demo_doc  # light: demo imports its heavy parts inside run()

    p = sub.add_parser("demo", help="train a small network on real data, sweep it, write results and figures",
                       description=" ".join(_demo_doc.__doc__.split("\n\n")[1].split()).replace("``", ""),
                       epilog="examples:\n  lerpfast demo                   # a few minutes on a laptop CPU\n"
                              "  lerpfast demo --quick           # under a minute, scikit-learn digits\n"
                              "  lerpfast demo --out /tmp/demo --data digits",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _demo_doc.add_arguments(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from lerpfast import demo

    return demo.run(args)


# ----------------------------------------------------------------------------------------------------------------
# train / data: parsers owned by their packages, imported only when used


def _add_external(sub, command: str, module: str, help_text: str, wanted: bool) -> None:
    """Wire ``module.add_parser`` for ``command``; only import it when that command runs."""
    if wanted:
        try:
            import importlib

            importlib.import_module(module).add_parser(sub)
            return
        except Exception as e:  # a broken part breaks only its own command
            err = f"`lerpfast {command}` is unavailable: {type(e).__name__}: {e}"
            p = sub.add_parser(command, help=help_text, add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=lambda a, err=err: _fail(err))
            return
    p = sub.add_parser(command, help=help_text, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _fail(message: str) -> int:
    raise CLIError(message, 1)


MAIN_EPILOG = """\
start here:
  lerpfast demo                         train, sweep and plot on real data (a few minutes, CPU)

typical session:
  lerpfast data list                    data sets and where lerpfast looks for them
  lerpfast train --model lenet_300_100 --dataset fashion-mnist --replicates 3
  lerpfast sweep line --run runs/train_<hash> init final --name init-final
  lerpfast merge soup ft*.pt --model mlp --data digits:train   greedy soup (also: wiseft, task-arithmetic)
  lerpfast align a.pt b.pt --model resnet20 --out b_aligned.pt   permute b's units to match a's
  lerpfast show results.h5              sweeps in the file and their completion
  lerpfast plot results.h5 --out figs   the papers' figures

`lerpfast <command> --help` explains each command with examples.
exit codes: 0 ok, 2 usage, 3 data or checkpoint error, 4 result-store error.
"""


def _command_of(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
        if a in ("-h", "--help", "--version"):
            return None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``lerpfast`` parser. ``argv`` decides which external parsers (train, data) are imported."""
    from lerpfast._version import __version__

    parser = argparse.ArgumentParser(
        prog="lerpfast",
        description="Loss-landscape sweeps: evaluate a network at K points of weight space (lines, planes, rays) "
                    "in one batched forward pass; store, analyse and plot the results.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lerpfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = _command_of(argv)
    _add_sweep(sub)
    _add_merge(sub)
    _add_align(sub)
    _add_show(sub)
    _add_repair(sub)
    _add_plot(sub)
    _add_external(sub, "train", "lerpfast.train.cli", "train models with checkpoint schedules and replicates",
                  command == "train")
    _add_external(sub, "data", "lerpfast.data.cli", "data sets: list, info, write-ffcv", command == "data")
    _add_external(sub, "warmup", "lerpfast.kernels.warmup", "compile a model's Triton kernels", command == "warmup")
    _add_external(sub, "reproduce", "lerpfast.reproduce", "reproduce a paper's experiments and check its claims",
                  command == "reproduce")
    _add_external(sub, "instability", "lerpfast.instability",
                  "fork a training run at iterations k, train children, error barrier between them vs k",
                  command == "instability")
    _add_external(sub, "curve", "lerpfast.curves", "fit a curve between two solutions (Bezier, polygonal chain)",
                  command == "curve")
    _add_bench(sub)
    _add_demo(sub)
    return parser


def _classify(e: BaseException) -> tuple[int, str] | None:
    """Exit code and message of an expected error, or None for a bug (traceback)."""
    if isinstance(e, CLIError):
        return e.code, str(e)
    mod = sys.modules.get("lerpfast.store")
    if mod is not None and isinstance(e, mod.StoreError):
        return EXIT_STORE, str(e)
    ck = sys.modules.get("lerpfast.checkpoints")
    if ck is not None and isinstance(e, ck.CheckpointError):
        return EXIT_DATA, str(e)
    reg = sys.modules.get("lerpfast.data.registry")
    if reg is not None and isinstance(e, reg.DataNotFoundError):
        return EXIT_DATA, str(e).strip().replace("\n", " ")
    if isinstance(e, FileNotFoundError):
        return EXIT_DATA, str(e)
    if isinstance(e, ValueError) and not isinstance(e, UnicodeError):
        return EXIT_USAGE, str(e)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lerpfast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv and _command_of(argv) == "bench":
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.extra = extra
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:  # a sub-command without its own handler (e.g. `lerpfast data` alone)
        parser.parse_args([args.command, "--help"])
        return EXIT_USAGE
    try:
        rc = func(args)
        return int(rc or 0)
    except BrokenPipeError:  # `lerpfast show results.h5 | head`: the reader left, nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("lerpfast: interrupted (a sweep resumes where it stopped when run again)", file=sys.stderr)
        return 130
    except Exception as e:
        known = _classify(e)
        if known is None or os.environ.get("LERPFAST_DEBUG"):
            raise
        code, message = known
        one_line = " ".join(part.strip() for part in message.splitlines() if part.strip()) or type(e).__name__
        print(f"lerpfast: error: {one_line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
