"""Instability analysis: fork a training run at iteration k, train the children, measure the barrier between them.

The experiment of Frankle, Dziugaite, Roy & Carbin ("Linear mode connectivity and the lottery ticket hypothesis",
ICML 2020). Training is stopped at iteration k and forked into children that start from the parent's exact state
at k but see different data orders (the only SGD noise they differ in); each child is trained to the parent's end,
and the children are compared along the straight line between them. The network is *stable* at k when that line
has no error barrier: instability is the largest test error along the line minus the mean of the endpoints' errors.
Plotted against k (their Fig. 3) it shows from which iteration on the outcome of training is settled up to
linearly connected minima.

How a fork is exact here
------------------------
A fork at k needs the parent's complete training state at k: weights, optimizer state (momentum, Adam moments),
the optimizer in use and its base rate after a switch, the RNG (dropout), the step counter (learning-rate schedule
and data position). A run keeps only the weights of its checkpoints, so the parent is *replayed* once from its
initialization with its own seeds up to the largest k (:func:`lerpfast.train.train_from` with ``save_states``),
keeping the exact state at every k, and each kept state is checked against the parent's checkpoint at k, bit for
bit: a run needs a checkpoint at every k (``--checkpoints`` when training, e.g. ``0,100,500,2000``), and a
replay that does not reproduce it (training that is not deterministic, e.g. some CUDA kernels) is an error instead
of a silently different fork. Child ``c`` then continues from the state at k with data seed
``child_seeds(parent data seed, children)[c]`` (:func:`lerpfast.train.train_from`).

Files, under the run directory (``instability/`` for replicate 0, ``instability_r<i>/`` for replicate i)::

    replay/                          the parent's replay; replay/states/step_<k>.pt: exact states at each k
    k_<k>/hparams.json               the parent's, plus {"fork": {k, parent, replicate, data seeds}}
    k_<k>/replicate_<c>/             child c (a replicate directory: checkpoints/, log.jsonl, resume.pt, summary)
    results.h5                       every child <-> child line: sweep "k=<k>:c<i>-c<j>" (":<align>" when aligned)
    instability.json                 the table: barriers per pair, mean and std per k, timings
    instability.png                  the figure

So ``lerpfast.train.load_model(run / "instability" / "k_100", replicate=1)`` is child 1 of the fork at 100. Every
stage resumes: finished children are skipped, interrupted ones continue from their ``resume.pt``, finished sweeps
are read back from the store and unfinished ones compute their missing points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "analyze_instability",
    "InstabilityResult",
    "fork_states",
    "child_seeds",
    "barrier_height",
    "read_instability",
    "plot_instability",
    "add_parser",
    "run_quick",
]

# Offset between data seeds of children: far from the ``data_seed + i`` of a run's replicates, so no child
# repeats a replicate's (or its parent's) data order.
_CHILD_SEED_STRIDE = 1_000_003
_METRICS = ("error", "loss")


def child_seeds(parent_data_seed: int, children: int) -> list[int]:
    """Data-order seeds of a fork's children: ``parent_data_seed + 1_000_003 * (c + 1)`` for child ``c``.

    Different from each other, from the parent's and from the seeds of the parent's replicates.
    """
    return [int(parent_data_seed) + _CHILD_SEED_STRIDE * (c + 1) for c in range(int(children))]


def barrier_height(alphas, values) -> float:
    """Frankle et al.'s (2020) barrier: ``max_{0 <= a <= 1} v(a) - (v(0) + v(1)) / 2``.

    The height of the curve above the mean of its endpoints (>= 0, since the endpoints are on the curve). For the
    test error between two children this is the instability at the iteration they were forked at.

    Parameters
    ----------
    alphas, values : array-like, shape (K,)
        The curve; ``alphas`` must contain 0 and 1 exactly.

    Returns
    -------
    float
    """
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.shape != v.shape:
        raise ValueError(f"alphas {a.shape} and values {v.shape} differ in length")
    if not (np.any(a == 0.0) and np.any(a == 1.0)):
        raise ValueError(f"the alphas must contain 0 and 1 (the two children), got {a.tolist()}")
    ends = 0.5 * (v[a == 0.0][0] + v[a == 1.0][0])
    inside = (a >= 0.0) & (a <= 1.0)
    return float(np.max(v[inside]) - ends)


# ----------------------------------------------------------------------------------------------------------------
# the parent, its forks and the children


def _base_dir(run_dir: Path, replicate: int) -> Path:
    return run_dir / ("instability" if replicate == 0 else f"instability_r{replicate}")


def _parent(run_dir: str | os.PathLike, replicate: int) -> tuple[Path, Any, dict, dict[int, Path]]:
    """The run directory, its config, its hparams.json and the replicate's checkpoints; clear errors otherwise."""
    from lerpfast.train import list_checkpoints, load_config

    run_dir = Path(run_dir)
    hp = run_dir / "hparams.json"
    if not hp.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no hparams.json): "
                                "give the directory `lerpfast train` printed")
    meta = json.loads(hp.read_text())
    ckpts = list_checkpoints(run_dir, replicate)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir} has no checkpoints for replicate {replicate} "
                                f"({run_dir / f'replicate_{replicate}' / 'checkpoints'})")
    return run_dir, load_config(run_dir), meta, ckpts


def _fork_steps(at, meta: dict, ckpts: dict[int, Path], run_dir: Path) -> list[int]:
    """``at`` (ints or step strings, a comma-separated string) as sorted distinct iterations, validated."""
    from lerpfast.train import parse_steps

    items = [a.strip() for a in at.split(",") if a.strip()] if isinstance(at, str) else list(at)
    if not items:
        raise ValueError("at: give at least one fork iteration k")
    total, spe = int(meta["total_steps"]), int(meta["data"]["steps_per_epoch"])
    ks = []
    for a in items:
        try:
            k = parse_steps(a, spe, total) if isinstance(a, str) else int(a)
        except (ValueError, TypeError) as e:
            raise ValueError(f"at: {a!r} is not an iteration ({e})") from None
        if not 0 <= k <= total:
            raise ValueError(f"at: k={k} is beyond the run's length: {run_dir} trains for {total} iterations")
        if k not in ckpts:
            near = sorted(ckpts, key=lambda s: abs(s - k))[:6]
            raise FileNotFoundError(
                f"at: {run_dir} has no checkpoint at k={k}, so its state there cannot be checked (checkpoints near "
                f"it: {sorted(near)}); train the parent with a checkpoint at every fork iteration, e.g. "
                f"--checkpoints {','.join(str(a) for a in items)}")
        ks.append(k)
    return sorted(set(ks))


def fork_states(run_dir: str | os.PathLike, at, *, replicate: int = 0, data=None,
                progress: bool = False) -> dict[int, Path]:
    """The parent's exact training state at every fork iteration k, replayed and checked.

    Replays the parent from its initialization with its own seeds (once, up to the largest k not yet kept; a kept
    state is reused) and checks that the replayed weights at k equal the parent's checkpoint at k bit for bit.

    Parameters
    ----------
    run_dir : str or PathLike
        A run directory of :func:`lerpfast.train.train`.
    at : sequence of int or str, or a comma-separated str
        Fork iterations (``"0,100,1ep"``); each needs a checkpoint of the parent.
    replicate : int
        The parent replicate.
    data : tuple, optional
        The ``data`` the parent was trained with, when it was not a registered data set (see ``train``).
    progress : bool
        Progress bar of the replay.

    Returns
    -------
    dict of int to Path
        ``{k: <run>/instability/replay/states/step_<k>.pt}`` (``torch.load`` gives the ``resume.pt`` format).
    """
    import torch

    from lerpfast.train import train_from

    run_dir, config, meta, ckpts = _parent(run_dir, replicate)
    ks = _fork_steps(at, meta, ckpts, run_dir)
    replay = _base_dir(run_dir, replicate) / "replay"
    states = {k: replay / "states" / f"step_{k}.pt" for k in ks}
    missing = [k for k in ks if not states[k].is_file()]
    if missing:
        resume = replay / "resume.pt"
        if resume.is_file() and torch.load(resume, map_location="cpu", weights_only=True)["step"] >= min(missing):
            resume.unlink()  # the replay went past a newly asked k: replay again from the start, keep what is kept
        cfg = dataclasses.replace(config, evaluate="none", checkpoints="none")
        train_from(cfg, replay, replicate=replicate, stop=max(missing), save_states=missing, progress=progress,
                   data=data)
    for k in ks:
        state = torch.load(states[k], map_location="cpu", weights_only=True)
        parent = torch.load(ckpts[k], map_location="cpu", weights_only=True)
        if int(state["step"]) != k:
            raise RuntimeError(f"{states[k]} holds step {state['step']}, not {k}: delete {replay} and run again")
        if state["model"].keys() != parent.keys():
            raise RuntimeError(f"replay of {run_dir} at k={k}: state-dict keys differ from {ckpts[k]}")
        for key, t in parent.items():
            if not torch.equal(state["model"][key], t):
                diff = (state["model"][key].double() - t.double()).abs().max().item()
                raise RuntimeError(
                    f"replaying {run_dir} (replicate {replicate}) to k={k} does not reproduce its checkpoint "
                    f"{ckpts[k]}: {key!r} differs by up to {diff:.3g}. Training is not deterministic here "
                    f"(device {config.device!r}), so an exact fork is impossible; delete {replay} and replay on "
                    "the device the parent was trained on")
    return states


# ----------------------------------------------------------------------------------------------------------------
# results


@dataclass
class InstabilityResult:
    """Barriers between the children of each fork.

    Attributes
    ----------
    ks : list of int
        Fork iterations, sorted.
    pairs : list of (int, int)
        Child pairs ``(i, j)``, ``i < j``; the same for every k.
    barriers : dict of str to ndarray, shape (P, T)
        ``"error"`` and ``"loss"``: :func:`barrier_height` of test error / loss along child i <-> child j, pair p,
        fork ``ks[t]``. The error barrier is the instability.
    endpoints : dict of str to ndarray, shape (C, T)
        Each child's final test error and loss (the lines' endpoints).
    names : dict of (int, (int, int)) to str
        Sweep name of each (k, pair) in ``store``.
    store : Path
        The HDF5 result file.
    align : str or None
        Alignment applied to the second child of each pair before the sweep (None: the raw line).
    seeds : list of int
        Children's data seeds.
    seconds : dict of str to float
        This call's ``replay``, ``train`` (children trained now), ``sweep`` and ``total``; and, whenever it ran,
        ``replay_total`` (the replay's training time) and ``train_total`` (all children's, from their summaries).
    """

    ks: list[int]
    pairs: list[tuple[int, int]]
    barriers: dict[str, np.ndarray]
    endpoints: dict[str, np.ndarray]
    names: dict[tuple[int, tuple[int, int]], str]
    store: Path
    align: str | None = None
    seeds: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    alphas: np.ndarray | None = None

    def mean(self, metric: str = "error") -> np.ndarray:
        """Mean barrier over pairs, per k, shape (T,)."""
        return self.barriers[metric].mean(axis=0)

    def std(self, metric: str = "error") -> np.ndarray:
        """Sample std of the barrier over pairs, per k (0 with a single pair), shape (T,)."""
        b = self.barriers[metric]
        return b.std(axis=0, ddof=1) if b.shape[0] > 1 else np.zeros(b.shape[1])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per k: k, mean / std of both barriers, mean final test error of the children."""
        out = []
        for t, k in enumerate(self.ks):
            out.append({"k": k, "error_barrier": float(self.mean("error")[t]),
                        "error_barrier_std": float(self.std("error")[t]),
                        "loss_barrier": float(self.mean("loss")[t]), "loss_barrier_std": float(self.std("loss")[t]),
                        "child_error": float(self.endpoints["error"][:, t].mean()),
                        "pairs": len(self.pairs)})
        return out

    def table(self) -> str:
        """The rows as an aligned text table."""
        head = (f"instability ({len(self.seeds) or '?'} children, {len(self.pairs)} pairs per k; "
                f"{'aligned: ' + self.align if self.align else 'raw line'}; mean +- std over pairs)")
        lines = [head, f"{'k':>7}  {'error barrier':>17}  {'loss barrier':>17}  {'children test error':>19}"]
        for r in self.rows():
            lines.append(f"{r['k']:>7}  {r['error_barrier']:>8.4f} +- {r['error_barrier_std']:<6.4f}  "
                         f"{r['loss_barrier']:>8.4f} +- {r['loss_barrier_std']:<6.4f}  {r['child_error']:>19.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``instability.json`` holds)."""
        return {
            "ks": self.ks, "pairs": [list(p) for p in self.pairs], "align": self.align, "seeds": self.seeds,
            "store": str(self.store), "rows": self.rows(),
            "barriers": {m: v.tolist() for m, v in self.barriers.items()},
            "endpoints": {m: v.tolist() for m, v in self.endpoints.items()},
            "names": {f"{k}:{i}-{j}": n for (k, (i, j)), n in self.names.items()},
            "alphas": None if self.alphas is None else np.asarray(self.alphas).tolist(),
            "seconds": self.seconds,
        }


def _sweep_name(k: int, pair: tuple[int, int], align: str | None) -> str:
    return f"k={k}:c{pair[0]}-c{pair[1]}" + (f":{align}" if align else "")


def _collect(results: dict[tuple[int, tuple[int, int]], Any], ks: list[int], pairs: list[tuple[int, int]],
             children: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    barriers = {m: np.full((len(pairs), len(ks)), np.nan) for m in _METRICS}
    endpoints = {m: np.full((children, len(ks)), np.nan) for m in _METRICS}
    alphas = None
    for t, k in enumerate(ks):
        for p, (i, j) in enumerate(pairs):
            res = results[(k, (i, j))]
            alphas = np.asarray(res.alphas, dtype=np.float64)
            for m in _METRICS:
                v = np.asarray(res.metrics[m], dtype=np.float64)
                barriers[m][p, t] = barrier_height(alphas, v)
                endpoints[m][i, t] = v[alphas == 0.0][0]
                endpoints[m][j, t] = v[alphas == 1.0][0]
    return barriers, endpoints, alphas


def read_instability(store: str | os.PathLike, align: str | None = None) -> InstabilityResult:
    """An :class:`InstabilityResult` from the sweeps of a result file (names ``k=<k>:c<i>-c<j>[:<align>]``).

    Only (k, pair) records present for every k count; a k missing some pair is an error naming it.
    """
    import re

    from lerpfast.store import ResultStore

    pattern = re.compile(r"^k=(\d+):c(\d+)-c(\d+)" + (f":{re.escape(align)}$" if align else "$"))
    st = ResultStore(store, "r")
    found: dict[tuple[int, tuple[int, int]], str] = {}
    for n in st.names():
        m = pattern.match(n)
        if m:
            found[(int(m.group(1)), (int(m.group(2)), int(m.group(3))))] = n
    if not found:
        raise ValueError(f"{store} holds no instability sweeps (k=<k>:c<i>-c<j>{':' + align if align else ''})")
    ks = sorted({k for k, _ in found})
    pairs = sorted({p for _, p in found})
    absent = [f"k={k} pair {p}" for k in ks for p in pairs if (k, p) not in found]
    if absent:
        raise ValueError(f"{store}: incomplete instability records, missing {', '.join(absent)}")
    results = {key: st.read(n) for key, n in found.items()}
    children = max(j for _, j in pairs) + 1
    barriers, endpoints, alphas = _collect(results, ks, pairs, children)
    return InstabilityResult(ks, pairs, barriers, endpoints, found, Path(store), align, alphas=alphas)


# ----------------------------------------------------------------------------------------------------------------
# the analysis


def _aligned(model, theta_a, theta_b, method: str, data=None):
    """``theta_b`` permuted to match ``theta_a`` by ``lerpfast.align.align`` (activation matching on ``data``, the
    run's training set)."""
    import importlib

    try:
        align_mod = importlib.import_module("lerpfast.align")
    except ImportError as e:
        raise ImportError(f"align={method!r}: alignment needs lerpfast.align, which this lerpfast does not have "
                          "(run without align for the raw line)") from e
    res = (align_mod.align(model, theta_a, theta_b, method=method) if data is None
           else align_mod.align(model, theta_a, theta_b, method=method, data=data))
    sd = res.state_dict
    return sd() if callable(sd) else sd


def analyze_instability(run_dir: str | os.PathLike, at, children: int = 2, *, replicate: int = 0,
                        alphas="0:1:21", seeds: Sequence[int] | None = None, align: str | None = None,
                        store: str | os.PathLike | None = None, data=None, eval_limit: int | None = None,
                        batch_size: int = 1000, device: str | None = None, progress: bool = False,
                        log: Callable[..., None] | None = None) -> InstabilityResult:
    """Instability analysis of a training run (Frankle et al. 2020): fork at each k, train children, sweep pairs.

    Parameters
    ----------
    run_dir : str or PathLike
        A run directory of :func:`lerpfast.train.train` with a checkpoint at every k.
    at : sequence of int or str, or a comma-separated str
        Fork iterations k (``"0,100,500,2000"``; step strings such as ``"1ep"`` work), 0 <= k <= the run's length.
    children : int
        Children per fork (>= 2); every pair of them is compared.
    replicate : int
        The parent replicate.
    alphas : str or array-like
        Coordinates of each child <-> child line (must contain 0 and 1; default 21 points from 0 to 1).
    seeds : sequence of int, optional
        The children's data seeds (``children`` of them); default :func:`child_seeds`. The parent's own seed
        reproduces the parent.
    align : str, optional
        ``"weights"`` or ``"activations"``: permute the second child of each pair onto the first with
        ``lerpfast.align.align`` before the sweep (an ``ImportError`` when lerpfast.align is missing).
    store : str or PathLike, optional
        The HDF5 result file (default ``<run>/instability/results.h5``). Sweep ``"k=<k>:c<i>-c<j>"`` per (k, pair).
    data : tuple, optional
        ``(train, test)`` as for :func:`lerpfast.train.train`, when the parent was not trained on a registered data
        set; the sweeps use ``test``.
    eval_limit : int, optional
        Sweep on the first N test samples only.
    batch_size : int
        Test batch size of the sweeps.
    device : str, optional
        Device of the sweeps (default: the parent's config; training follows the parent's config).
    progress : bool
        Progress bars.
    log : callable, optional
        Where progress lines go (default: nowhere).

    Returns
    -------
    InstabilityResult
        Also written to ``instability.json`` next to the store (``instability_<align>.json`` when aligned).
    """
    import torch

    import lerpfast
    from lerpfast.train import list_checkpoints, load_model, train_from

    log = log or (lambda *a, **k: None)
    t_start = time.perf_counter()
    if isinstance(children, bool) or not isinstance(children, (int, np.integer)) or children < 2:
        raise ValueError(f"children must be an integer >= 2 (a barrier needs a pair), got {children!r}")
    run_dir, config, meta, ckpts = _parent(run_dir, replicate)
    ks = _fork_steps(at, meta, ckpts, run_dir)
    _, parent_seed = config.seeds(replicate)
    seeds = child_seeds(parent_seed, children) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != children:
        raise ValueError(f"seeds: {len(seeds)} seeds given for children={children}")
    if align is not None and align not in ("weights", "activations"):
        raise ValueError(f"align must be 'weights' or 'activations', got {align!r}")
    base = _base_dir(run_dir, replicate)
    store = Path(store) if store is not None else base / "results.h5"

    # -- fork states and children ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    states = fork_states(run_dir, ks, replicate=replicate, data=data, progress=progress)
    t_replay = time.perf_counter() - t0
    replay_resume = base / "replay" / "resume.pt"
    replay_total = float(torch.load(replay_resume, map_location="cpu", weights_only=True)["elapsed"]) \
        if replay_resume.is_file() else t_replay
    child_cfg = dataclasses.replace(config, evaluate="none", checkpoints="none")
    theta0 = ckpts[0] if 0 in ckpts else None
    finals: dict[tuple[int, int], Path] = {}
    t0 = time.perf_counter()
    train_total = 0.0
    for k in ks:
        kdir = base / f"k_{k}"
        kdir.mkdir(parents=True, exist_ok=True)
        if not (kdir / "hparams.json").is_file():  # the parent's, so load_model / list_checkpoints work on kdir
            hp = {**meta, "fork": {"k": k, "parent": str(run_dir), "replicate": replicate, "data_seeds": seeds,
                                   "state": str(states[k])}}
            (kdir / "hparams.json").write_text(json.dumps(hp, indent=2, sort_keys=True))
        for c, seed in enumerate(seeds):
            cdir = kdir / f"replicate_{c}"
            if not (cdir / "summary.json").is_file():  # finished children are skipped without loading data
                log(f"  k={k}: training child {c} (data seed {seed}) from iteration {k} to {meta['total_steps']}")
                train_from(child_cfg, cdir, state=states[k], data_seed=seed, replicate=replicate, theta0=theta0,
                           progress=progress, data=data)
            summary = json.loads((cdir / "summary.json").read_text())
            if summary.get("data_seed") != seed or summary.get("start_step", 0) != k:
                raise RuntimeError(f"{cdir} holds a child with data seed {summary.get('data_seed')} from step "
                                   f"{summary.get('start_step', 0)}, not seed {seed} from {k}: delete it and run "
                                   "again")
            train_total += float(summary.get("wall_time_s", 0.0))
            cks = list_checkpoints(kdir, c)
            finals[(k, c)] = cks[max(cks)]
    t_train = time.perf_counter() - t0

    # -- sweeps -------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model = load_model(run_dir, step=0 if 0 in ckpts else None, replicate=replicate)  # the architecture
    if data is not None:
        test = data[1]
        if isinstance(test, tuple):
            test = tuple(t[:eval_limit] for t in test) if eval_limit else test
    else:
        import lerpfast.data as ld

        test = ld.load(config.dataset, "test", root=config.data_root, batch_size=batch_size, limit=eval_limit)
    if device is None:
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = list(combinations(range(children), 2))
    names: dict[tuple[int, tuple[int, int]], str] = {}
    results = {}
    from lerpfast.store import ResultStore

    store.parent.mkdir(parents=True, exist_ok=True)
    align_data = None
    if align == "activations":  # correlations over the training set, as the training run read it
        align_data = ld.load(config.dataset, "train", root=config.data_root, batch_size=batch_size, limit=config.limit)
    with ResultStore(store) as st:
        for k in ks:
            for i, j in pairs:
                name = _sweep_name(k, (i, j), align)
                theta_a, theta_b = finals[(k, i)], finals[(k, j)]
                if align is not None:
                    theta_b = _aligned(model, torch.load(theta_a, weights_only=True),
                                       torch.load(theta_b, weights_only=True), align, align_data)
                results[(k, (i, j))] = lerpfast.sweep(model, (theta_a, theta_b), alphas, test, store=st, name=name,
                                                      device=device, progress=progress, batch_size=batch_size)
                names[(k, (i, j))] = name
    t_sweep = time.perf_counter() - t0
    barriers, endpoints, alpha_arr = _collect(results, ks, pairs, children)
    out = InstabilityResult(ks, pairs, barriers, endpoints, names, store, align, seeds,
                            {"replay": t_replay, "replay_total": replay_total, "train": t_train,
                             "train_total": train_total, "sweep": t_sweep, "total": time.perf_counter() - t_start},
                            alpha_arr)
    suffix = f"_{align}" if align else ""
    (store.parent / f"instability{suffix}.json").write_text(json.dumps(out.to_dict(), indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------------------
# figure


def plot_instability(result, metrics: Sequence[str] = ("error", "loss"), *, title: str | None = None,
                     figsize: tuple[float, float] | None = None):
    """Barrier between children against the fork iteration k, mean +- std over pairs (Frankle et al., Fig. 3).

    The x axis is symmetric-log, linear below the smallest k > 0, so k = 0 is shown.

    Parameters
    ----------
    result : InstabilityResult, or a mapping of label to InstabilityResult
        One curve (with its band) per result.
    metrics : sequence of {"error", "loss"}
        One panel each; the error barrier is the instability.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    curves = dict(result) if isinstance(result, dict) else {None: result}
    positive = [k for r in curves.values() for k in r.ks if k > 0]
    linthresh = float(min(positive)) if positive else 1.0
    fig = Figure(figsize=figsize or (4.2 * len(metrics), 3.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        lows = [0.0]
        for n, (label, r) in enumerate(curves.items()):
            ks = np.asarray(r.ks, dtype=np.float64)
            mean, std = r.mean(metric), r.std(metric)
            what = f"{'aligned' if r.align else 'raw'} line, {len(r.pairs)} pair(s)"
            ax.plot(ks, mean, marker="o", ms=4, lw=1.4, color=f"C{n}",
                    label=f"{label}: {what}" if label is not None else what)
            ax.fill_between(ks, mean - std, mean + std, color=f"C{n}", alpha=0.25, lw=0)
            lows.append(float(np.nanmin(mean - std)))
        ax.set_xscale("symlog", linthresh=linthresh)
        ticks = sorted({k for r in curves.values() for k in r.ks})
        ax.set_xticks(ticks, [str(k) for k in ticks], fontsize="small")  # the forks themselves, k = 0 included
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("fork iteration k")
        ax.set_ylabel("instability (test error barrier)" if metric == "error" else f"test {metric} barrier")
        ax.set_ylim(bottom=min(lows))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# command line


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``lerpfast instability`` on a sub-parser collection."""
    p = sub.add_parser(
        "instability", help="fork a training run at iterations k, train children, barrier between them vs k",
        description="Instability analysis (Frankle, Dziugaite, Roy & Carbin 2020): fork the run at each iteration\n"
                    "k into children with new data orders (the parent's exact state at k, replayed and checked\n"
                    "against its checkpoint), train each to the end, sweep every child <-> child line and report\n"
                    "the test-error barrier against k. Everything resumes when run again.",
        epilog="examples:\n"
               "  lerpfast train --model lenet_300_100 --dataset fashion-mnist --steps 5ep "
               "--checkpoints 0,100,500,2000\n"
               "  lerpfast instability --run runs/train_<hash> --at 0,100,500,2000 --children 3\n"
               "  lerpfast instability --quick      # tiny MLP on scikit-learn digits, well under a minute",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="training run directory (printed by `lerpfast train`)")
    p.add_argument("--at", default=None, help="fork iterations k, comma-separated (steps or '1ep'); each needs a "
                                              "checkpoint of the run")
    p.add_argument("--children", type=int, default=2, help="children per fork (>= 2; default 2)")
    p.add_argument("--replicate", type=int, default=0, help="parent replicate (default 0)")
    p.add_argument("--alphas", default="0:1:21", help="points of each line, 'start:stop:num' (default 0:1:21)")
    p.add_argument("--seeds", default=None, help="children's data seeds, comma-separated (default: derived from "
                                                 "the parent's)")
    p.add_argument("--align", default=None, choices=["weights", "activations"],
                   help="permute the second child onto the first before the sweep (needs lerpfast.align)")
    p.add_argument("--store", default=None, help="HDF5 result file (default <run>/instability/results.h5)")
    p.add_argument("--plot", default=None, help="figure file (default instability.png next to the store)")
    p.add_argument("--eval-limit", type=int, default=None, help="sweep on the first N test samples only")
    p.add_argument("--batch-size", type=int, default=1000, help="test batch size of the sweeps (default 1000)")
    p.add_argument("--device", default=None, help="device of the sweeps (default: the run's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--quick", action="store_true",
                   help="train a tiny MLP on scikit-learn digits into --out and analyse it (CI smoke run)")
    p.add_argument("--out", default="lerpfast-instability-quick", help="folder of the --quick run")
    p.set_defaults(func=_cmd)
    return p


def run_quick(out: str | os.PathLike, *, log: Callable[..., None] | None = None, **kw) -> InstabilityResult:
    """The ``--quick`` run: a 64-unit MLP on scikit-learn's digits (230 iterations), forks at 0 and 46, 2 children.

    Keyword arguments go to :func:`analyze_instability` (``alphas``, ``align``, ``store``...).
    """
    from lerpfast.train import TrainConfig, train

    cfg = TrainConfig(model="mlp", model_options="widths=(64,)", dataset="digits", batch_size=64, steps="10ep",
                      checkpoints="0,2ep", evaluate="end", out_dir=str(Path(out) / "runs"), device="cpu")
    run_dir = train(cfg, progress=False)
    kw.setdefault("alphas", "0:1:11")
    return analyze_instability(run_dir, "0,2ep", 2, log=log, **kw)


def _cmd(args: argparse.Namespace) -> int:
    import torch

    from lerpfast.plot import save

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = None if not args.seeds else [int(s) for s in args.seeds.split(",") if s.strip()]
    kw = dict(alphas=args.alphas, seeds=seeds, align=args.align, store=args.store, eval_limit=args.eval_limit,
              batch_size=args.batch_size, device=args.device, progress=args.progress, log=print)
    try:
        if args.quick:
            res = run_quick(args.out, **kw)
        else:
            if not args.run or not args.at:
                raise ValueError("--run and --at are required (or --quick)")
            res = analyze_instability(args.run, args.at, args.children, replicate=args.replicate, **kw)
    except ImportError as e:
        if "lerpfast.align" not in str(e):
            raise
        from lerpfast.cli import CLIError

        raise CLIError(str(e), 1) from None
    print(res.table())
    fig = plot_instability(res, title="instability: test error barrier between children forked at k")
    suffix = f"_{res.align}" if res.align else ""
    target = Path(args.plot) if args.plot else res.store.parent / f"instability{suffix}.png"
    written = save(fig, target, dpi=110)
    s = res.seconds
    print(f"done in {s['total']:.1f}s (replay {s['replay']:.1f}s, training {s['train']:.1f}s, sweeps "
          f"{s['sweep']:.1f}s). Wrote {res.store} and {written[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lerpfast.instability``."""
    p = argparse.ArgumentParser(prog="lerpfast")
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["instability", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
