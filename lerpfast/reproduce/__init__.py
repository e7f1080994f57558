"""``lerpfast reproduce``: each paper's experiments in one command, claim by claim.

    lerpfast reproduce goodfellow [--quick] [--dataset D] [--model M] [--out DIR]
    lerpfast reproduce frankle ...
    lerpfast reproduce im ...
    lerpfast reproduce all ...

Each trains what the paper needs (resuming what exists), runs its sweeps into one HDF5 file, draws the paper's
figures and writes ``summary.md``: a table of the paper's claims, where the paper makes each, our number, and
whether it agrees, then the observations we add beyond the paper (not counted). ``--quick`` runs on
scikit-learn's digits in about a minute on 2 CPU cores; the full run uses the paper's default data set (Goodfellow:
mnist5k, 5,000 real MNIST digits, for the MNIST network of Goodfellow and Frankle; Im: Fashion-MNIST, offline) and
takes up to half an hour on 2 cores.
Re-running finishes from what is stored. REPRODUCTIONS.md has the full runs' tables.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

from lerpfast.reproduce._common import Claim, Context, Settings, default_threads

__all__ = ["PAPERS", "reproduce", "add_parser", "Claim", "Context", "Settings"]

PAPERS = {
    "goodfellow": "lerpfast.reproduce.goodfellow",
    "frankle": "lerpfast.reproduce.frankle",
    "im": "lerpfast.reproduce.im",
}


def _module(paper: str):
    try:
        return importlib.import_module(PAPERS[paper])
    except KeyError:
        raise ValueError(f"unknown paper {paper!r}; expected one of {', '.join(PAPERS)} or 'all'") from None


def _resolve_dataset(name: str | None, quick: bool, preferred: str | None = None) -> str:
    """The data set of a run: ``name`` if given; digits with ``quick``; else the paper's own default
    (``DEFAULTS["dataset"]`` of its module, e.g. Goodfellow's and Frankle's ``mnist5k``) when installed, else
    Fashion-MNIST, else digits."""
    if name is not None:
        return name
    if quick:
        return "digits"
    import lerpfast.data as ld

    if preferred is not None and preferred != "fashion-mnist":
        try:
            ld.load(preferred, "test", limit=16)
            return preferred
        except FileNotFoundError as e:
            print(f"lerpfast reproduce: {preferred} not found ({str(e).splitlines()[0]}): trying Fashion-MNIST",
                  file=sys.stderr)
    try:
        ld.load("fashion-mnist", "test", limit=16)
        return "fashion-mnist"
    except FileNotFoundError:
        print("lerpfast reproduce: Fashion-MNIST not found (apt-get install dataset-fashion-mnist): using "
              "scikit-learn's digits", file=sys.stderr)
        return "digits"


def reproduce(paper: str, *, out: str | os.PathLike | None = None, dataset: str | None = None,
              model: str | None = None, quick: bool = False, device: str = "auto", threads: int | None = None,
              progress: bool | None = None, command: str = "", log=print) -> dict:
    """Run one paper's reproduction and write its summary.

    Parameters
    ----------
    paper : ``"goodfellow"``, ``"frankle"`` or ``"im"``.
    out : output folder (default ``reproduce-<paper>``): ``results.h5``, ``runs/``, ``figs/``, ``summary.md``,
        ``summary.json``.
    dataset : data set name (default: digits with ``quick``, else the paper's own default when installed (Goodfellow,
        Frankle: ``mnist5k``, the 5,000 real MNIST digits), else Fashion-MNIST when installed, else digits).
    model : the paper's main model (default: the paper module's, LeNet-300-100 for the MNIST setting).
    quick : the small setting (about a minute on 2 CPU cores).
    device : ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    threads : torch threads (default: min(2, cores)).
    progress : progress bars (default: when stderr is a terminal).
    command : the command line, recorded in the summary.

    Returns
    -------
    dict with ``summary`` (path of summary.md), ``claims`` (list of :class:`Claim`: the paper's statements),
    ``observations`` (list of :class:`Claim`: our own findings beyond the paper, not counted), ``seconds``, ``out``.
    """
    import torch

    mod = _module(paper)
    t0 = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    settings = Settings(
        paper=paper, out=Path(out or f"reproduce-{paper}"),
        dataset=_resolve_dataset(dataset, quick, mod.DEFAULTS.get("dataset")),
        model=model or mod.DEFAULTS["model"], quick=quick, device=device, threads=threads,
        progress=sys.stderr.isatty() if progress is None else progress,
        command=command or f"lerpfast reproduce {paper}" + (" --quick" if quick else ""))
    settings.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(settings, log=log if _rank0() else (lambda *a, **k: None))
    ctx.log(f"{mod.TITLE}\n  data {settings.dataset}, model {settings.model}, {'quick' if quick else 'full'} run, "
            f"{device}, {threads} thread(s) -> {settings.out}")
    try:
        mod.run(ctx)
    finally:
        ctx.close()
    seconds = time.perf_counter() - t0
    summary = ctx.write_summary(mod.TITLE, seconds) if ctx.is_writer else None
    return {"summary": summary, "claims": ctx.claims, "observations": ctx.observations, "seconds": seconds,
            "out": settings.out}


def _rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------------------------------- CLI


def add_parser(sub) -> argparse.ArgumentParser:
    """``lerpfast reproduce`` (wired by :mod:`lerpfast.cli`)."""
    p = sub.add_parser(
        "reproduce", help="reproduce a paper's experiments and check its claims (goodfellow, frankle, im)",
        description=" ".join(__doc__.split("\n\n")[2].split()),
        epilog="examples:\n"
               "  lerpfast reproduce frankle --quick          # about a minute, scikit-learn digits\n"
               "  lerpfast reproduce goodfellow               # 5,000 real MNIST digits, a few minutes on 2 cores\n"
               "  lerpfast reproduce all --out repro          # the three papers into repro/<paper>\n"
               "  torchrun --nproc-per-node 4 -m lerpfast.cli reproduce im   # points sharded over 4 GPUs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paper", choices=[*PAPERS, "all"], help="which paper")
    p.add_argument("--quick", action="store_true", help="small setting on digits: about a minute on 2 CPU cores")
    p.add_argument("--dataset", default=None,
                   help="data set (default: digits with --quick, else the paper's: mnist5k for goodfellow and "
                        "frankle, fashion-mnist for im; cifar10 where installed)")
    p.add_argument("--model", default=None,
                   help="the main model (default: lenet_300_100); im also runs nin (at width 0.25 and 30 epochs on "
                        "digits: `lerpfast reproduce im --model nin --dataset digits`, about 8.5 min on 1 thread)")
    p.add_argument("--out", default=None, help="output folder (default: ./reproduce-<paper>)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: min(2, cores); MLP training uses 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``lerpfast reproduce``."""
    import lerpfast.data as ld
    from lerpfast.cli import CLIError, check_device, check_positive
    from lerpfast.distributed import init_from_env
    from lerpfast.train import models

    check_device(args.device)
    check_positive(args.threads, "--threads")
    if args.dataset is not None and args.dataset not in ld.REGISTRY:
        raise CLIError(f"--dataset {args.dataset!r}: unknown data set (known: {', '.join(ld.REGISTRY)}; see "
                       f"`lerpfast data list`)")
    if args.model is not None and args.model not in models.available():
        raise CLIError(f"--model {args.model!r}: unknown model (known: {', '.join(models.available())})")
    init_from_env()
    papers = list(PAPERS) if args.paper == "all" else [args.paper]
    command = "lerpfast " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    for paper in papers:
        out = args.out if len(papers) == 1 else (Path(args.out) / paper if args.out else None)  # reproduce-<paper>
        res = reproduce(paper, out=out, dataset=args.dataset, model=args.model, quick=args.quick,
                        device=args.device, threads=args.threads, progress=False if args.no_progress else None,
                        command=command)
        if res["summary"] is not None:
            agree = sum(c.agrees is True for c in res["claims"])
            print(f"{paper}: {agree}/{len(res['claims'])} claims agree, {res['seconds']:.0f}s -> {res['summary']}")
    return 0
