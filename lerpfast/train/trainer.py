"""The training loop: replicates, checkpoint schedule, optimizer switch, logging and exact resume.

Layout of a run directory (``<out_dir>/train_<hash of the non-default hyper-parameters>``)::

    hparams.json                      resolved TrainConfig, the non-default subset, data shape, versions
    replicate_<i>/checkpoints/step_<step>.pt   model state_dict (CPU tensors; torch.load(weights_only=True))
    replicate_<i>/log.jsonl           one JSON object per line: training records and evaluation records
    replicate_<i>/resume.pt           exact-resume state (model, optimizer, RNG, step, log offset)
    replicate_<i>/summary.json        written when the replicate finishes: final test metrics, wall time

Every optimizer is driven the same way: ``optimizer.step(closure)`` where the closure recomputes the loss on
the current minibatch (the RK2 optimizers call it twice). The data position is a pure function of the step:
step ``s`` uses batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, and each epoch's order comes
from ``(data_seed, epoch)`` only (``lerpfast.data.DeviceLoader.iter_from``), so resuming is exact.

:func:`train_from` runs the same loop from a saved exact state (a ``resume.pt``, or a state kept with
``save_states``) with a data seed of its own: a fork of a run at step k (``lerpfast.instability``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lerpfast.train import models
from lerpfast.train import optim as optim_lib
from lerpfast.train.config import TrainConfig
from lerpfast.train.schedule import lr_factor, parse_checkpoints, parse_steps

__all__ = [
    "train",
    "train_from",
    "StepContext",
    "TensorLoader",
    "list_checkpoints",
    "load_config",
    "load_model",
    "evaluate",
    "read_log",
]

_LOG_FLUSH = 200  # buffered training records per device->host copy (one sync per 200 steps on the GPU)


@dataclass
class StepContext:
    """What a callback sees after every optimizer step.

    Attributes
    ----------
    run_dir, replicate_dir : Path
        The run and this replicate's directory.
    replicate : int
        Replicate index.
    step : int
        Iterations completed.
    total_steps, steps_per_epoch : int
        Length of training and of an epoch.
    model : nn.Module
        The model (in training mode).
    optimizer : torch.optim.Optimizer
        The current optimizer (after a switch, the new one).
    optimizer_name : str
        Its name.
    config : TrainConfig
        Resolved configuration.
    events : list of str
        Things that happened at this step: ``"checkpoint"``, ``"resume_point"``, ``"switch"``, ``"eval"``.
    metrics : dict
        Latest test metrics when ``"eval"`` is in ``events``.
    """

    run_dir: Path
    replicate_dir: Path
    replicate: int
    step: int
    total_steps: int
    steps_per_epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    config: TrainConfig
    events: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


Callback = Callable[[StepContext], None]


class TensorLoader:
    """Batches of in-memory tensors with the resume interface of ``lerpfast.data.DeviceLoader``.

    For data that is not a registered data set (regression targets for deep linear nets, synthetic problems).
    Epoch ``e``'s order comes from ``lerpfast.data.epoch_generator(seed, e)``.

    Parameters
    ----------
    x, y : torch.Tensor
        Inputs ``(N, ...)`` and targets ``(N, ...)``.
    batch_size : int
        Samples per batch.
    shuffle : bool
        New random order every epoch.
    seed : int
        Seed of the orders.
    drop_last : bool
        Drop the last incomplete batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if x.shape[0] != y.shape[0]:
            raise ValueError("x and y need the same number of samples")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, int(seed), drop_last
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.y.dtype in (torch.int64, torch.int32):
            return int(self.y.max().item()) + 1
        return int(math.prod(self.y.shape[1:])) if self.y.dim() > 1 else 1

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield epoch ``epoch`` from batch index ``batch`` on."""
        from lerpfast.data import epoch_generator

        self.epoch = epoch + 1
        n, b = self.num_samples, self.batch_size
        order = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)

        def gen():
            for i in range(batch, len(self)):
                idx = order[i * b:min((i + 1) * b, n)]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)
        return gen()


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lerpfast_version() -> str:
    from lerpfast._version import __version__

    return __version__


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "cross_entropy":
        return F.cross_entropy
    return lambda out, y: F.mse_loss(out, y.to(out.dtype).view_as(out))


def _correct(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss != "cross_entropy":
        return torch.full((), float("nan"), device=out.device)
    return (out.argmax(dim=1) == y).sum().to(torch.float32)


def _make_optimizer(name: str, params: Sequence[torch.nn.Parameter], lr: float, c: TrainConfig):
    return optim_lib.create(name, params, lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
                            betas=(c.beta1, c.beta2), eps=c.eps, alpha=c.alpha, rho=c.rho)


@torch.no_grad()
def evaluate(model: nn.Module, data, loss: str = "cross_entropy", *, bf16: bool = False) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` (put in eval mode, then restored) over an iterable of ``(x, y)``.

    The global RNG state is left untouched, so evaluating never changes a training run.
    """
    was_training = model.training
    model.eval()
    loss_fn = _loss_fn(loss)
    total_loss = torch.zeros((), dtype=torch.float64)
    correct, n = torch.zeros((), dtype=torch.float64), 0
    with torch.random.fork_rng(devices=[]):
        for x, y in data:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            out = out.float()
            total_loss += (loss_fn(out, y).double() * y.shape[0]).cpu()
            correct += _correct(out, y, loss).double().cpu()
            n += y.shape[0]
    model.train(was_training)
    return {"test_loss": float(total_loss / max(n, 1)), "test_acc": float(correct / max(n, 1))}


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``log.jsonl`` as a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def list_checkpoints(run_dir: str | os.PathLike, replicate: int = 0) -> dict[int, Path]:
    """Checkpoints of a replicate, ``{step: path}`` sorted by step."""
    d = Path(run_dir) / f"replicate_{replicate}" / "checkpoints"
    if not d.is_dir():
        return {}
    found = {}
    for p in d.glob("step_*.pt"):
        try:
            found[int(p.stem.split("_", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The resolved :class:`TrainConfig` saved in ``hparams.json``."""
    with open(Path(run_dir) / "hparams.json") as f:
        return TrainConfig.from_dict(json.load(f)["config"])


def load_model(run_dir: str | os.PathLike, step: int | None = None, replicate: int = 0) -> nn.Module:
    """Rebuild a run's model and load a checkpoint (the last one when ``step`` is None)."""
    run_dir = Path(run_dir)
    with open(run_dir / "hparams.json") as f:
        meta = json.load(f)
    c = TrainConfig.from_dict(meta["config"])
    model = models.create(c.model, meta["data"]["num_classes"], meta["data"]["input_shape"], **c.model_kwargs())
    ckpts = list_checkpoints(run_dir, replicate)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints in {run_dir}/replicate_{replicate}")
    path = ckpts[max(ckpts)] if step is None else ckpts[step]
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------


def _epoch_batches(loader, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start, start+1, ...`` of ``epoch``.

    Uses ``loader.iter_from`` when the loader has it (exact and cheap); otherwise ``set_epoch`` (when present) and
    skipping ``start`` batches, which is exact whenever the loader's order depends only on (seed, epoch).
    """
    if hasattr(loader, "iter_from"):
        return loader.iter_from(epoch, start)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return itertools.islice(iter(loader), start, None)


def _load_data(c: TrainConfig, device: torch.device, data):
    if data is not None:
        train_data, test_data = data
        if isinstance(train_data, tuple):
            train_data = TensorLoader(*(t.to(device) for t in train_data), batch_size=c.batch_size, shuffle=True,
                                      seed=c.data_seed, drop_last=bool(c.drop_last))
        if isinstance(test_data, tuple):
            test_data = TensorLoader(*(t.to(device) for t in test_data), batch_size=c.eval_batch_size, shuffle=False)
        return train_data, test_data
    import lerpfast.data as ld

    train_data = ld.load(c.dataset, "train", root=c.data_root, device=device, batch_size=c.batch_size, train=True,
                         seed=c.data_seed, limit=c.limit, drop_last=bool(c.drop_last), channels_last=c.channels_last)
    test_data = None
    if c.evaluate != "none":
        test_data = ld.load(c.dataset, "test", root=c.data_root, device=device, batch_size=c.eval_batch_size,
                            train=False, channels_last=c.channels_last)
    return train_data, test_data


def train(config: TrainConfig, *, progress: bool = True, callbacks: Sequence[Callback] = (), data=None) -> Path:
    """Train ``config.replicates`` replicates and return the run directory.

    Parameters
    ----------
    config : TrainConfig
        Hyper-parameters; ``None`` fields take the model's default setting.
    progress : bool
        Show a progress bar with the running loss and accuracy.
    callbacks : sequence of callable
        Called as ``cb(ctx: StepContext)`` after every optimizer step (after logging, checkpointing and saving
        resume state for that step). An exception raised by a callback stops training; calling ``train`` again
        resumes from the last resume point.
    data : tuple, optional
        ``(train, test)`` to use instead of ``lerpfast.data.load(config.dataset)``: each a loader with
        ``iter_from(epoch, batch)`` (else ``set_epoch``), ``__len__``, a writable ``seed`` (set to each replicate's
        data seed), ``input_shape`` and ``num_classes``
        (``lerpfast.data.DeviceLoader``, :class:`TensorLoader`), or an ``(x, y)`` tuple of tensors;
        ``test`` may be None.

    Returns
    -------
    Path
        ``<out_dir>/train_<hash>``. Finished replicates are skipped when called again; unfinished ones resume.
    """
    c = config.resolved()
    run_dir = Path(c.out_dir) / c.run_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    device, train_data, test_data, steps_per_epoch, total, in_shape, num_classes = _setup(c, data)
    meta = {
        "config": c.to_dict(),
        "non_default": c.non_default(),
        "run_hash": c.run_hash(),
        "data": {"input_shape": list(in_shape), "num_classes": num_classes, "steps_per_epoch": steps_per_epoch,
                 "num_samples": int(getattr(train_data, "num_samples", 0) or 0)},
        "total_steps": total,
        "versions": {"torch": torch.__version__, "lerpfast": _lerpfast_version()},
    }
    hp = run_dir / "hparams.json"
    if hp.exists():
        old = json.loads(hp.read_text())
        if old.get("non_default") != meta["non_default"]:
            raise RuntimeError(f"{run_dir} holds a run with other hyper-parameters: {old.get('non_default')}")
    tmp = hp.with_name("hparams.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, hp)
    for r in range(c.replicates):
        init_seed, data_seed = c.seeds(r)
        _train_replicate(c, r, run_dir, run_dir / f"replicate_{r}", train_data, test_data, device, in_shape,
                         num_classes, steps_per_epoch, total, progress, callbacks, init_seed=init_seed,
                         data_seed=data_seed)
    return run_dir


def _setup(c: TrainConfig, data):
    """Device, loaders and lengths of a resolved config: what :func:`train` and :func:`train_from` share."""
    device = _device(c.device)
    train_data, test_data = _load_data(c, device, data)
    steps_per_epoch = len(train_data)
    total = parse_steps(c.steps, steps_per_epoch)
    in_shape = tuple(int(s) for s in train_data.input_shape)
    num_classes = int(train_data.num_classes)  # for regression (TensorLoader, float targets): the output size
    return device, train_data, test_data, steps_per_epoch, total, in_shape, num_classes


_STATE_KEYS = ("step", "model", "optimizer", "optimizer_name", "base_lr", "rng_cpu")


def _load_state(state, total: int) -> dict[str, Any]:
    """An exact training state (the ``resume.pt`` format) from a dict or a file, checked."""
    where = "state"
    if not isinstance(state, dict):
        where = str(state)
        if not Path(state).is_file():
            raise FileNotFoundError(f"training state {where} does not exist")
        state = torch.load(state, map_location="cpu", weights_only=True)
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{where} is not an exact training state (resume.pt format): missing {', '.join(missing)}")
    if not 0 <= int(state["step"]) <= total:
        raise ValueError(f"{where} is at step {state['step']}, outside the run's 0..{total} steps")
    return state


def train_from(config: TrainConfig, out_dir: str | os.PathLike, *, state=None, data_seed: int | None = None,
               replicate: int = 0, stop: int | None = None, save_states: Sequence[int] = (),
               theta0: str | os.PathLike | None = None, progress: bool = True, callbacks: Sequence[Callback] = (),
               data=None) -> Path:
    """Train one replicate of ``config`` into ``out_dir``, from a saved exact state and with a data seed of its own.

    The loop is :func:`train`'s: the same learning-rate schedule, checkpoint schedule, optimizer switch, logging and
    exact resume. Starting from the state of a run at step k (weights, optimizer state, optimizer name and base rate
    after a switch, RNG, step counter) with the run's own data seed continues that run bit for bit; with another
    seed it is a fork of the run at k whose data order from step k on is that seed's (step ``s`` takes batch
    ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` in the order of ``(data_seed, epoch)``, so a fork
    inside an epoch finishes that epoch in its own order).

    Parameters
    ----------
    config : TrainConfig
        The run's hyper-parameters (training length, schedule, optimizer, checkpoints).
    out_dir : str or PathLike
        A replicate directory: ``checkpoints/step_<s>.pt`` (the start step, the schedule's steps after it and the
        final step), ``log.jsonl``, ``resume.pt``, ``summary.json`` and, with ``save_states``, ``states/``. When it
        holds a ``resume.pt`` training resumes from there (``state`` is then not read), and a finished one returns
        at once.
    state : dict, str or PathLike, optional
        An exact training state in the ``resume.pt`` format (a run's ``resume.pt``, or ``states/step_<k>.pt`` kept
        with ``save_states``). Default: the initialization of ``replicate`` (``torch.manual_seed(init seed)``).
    data_seed : int, optional
        Data-order seed from the start on; default: the replicate's (``config.seeds(replicate)``).
    replicate : int
        Replicate whose seeds are the defaults.
    stop : int, optional
        Stop after this many steps (a resume point is written there; ``summary.json`` only at the end of training).
        Calling again with a later ``stop`` (or None) continues.
    save_states : sequence of int
        Steps at which to keep the exact state as ``states/step_<s>.pt`` (the ``state`` of a later fork).
    theta0 : str or PathLike, optional
        Checkpoint the logged ``dist_init`` is measured from (default: the first one, ``checkpoints/step_0.pt``,
        or the start state's ``step_<k>.pt``; a fork passes its parent's ``step_0.pt`` to log the parent's).
    progress, callbacks, data
        As for :func:`train`.

    Returns
    -------
    Path
        ``out_dir``.
    """
    c = config.resolved()
    out_dir = Path(out_dir)
    device, train_data, test_data, steps_per_epoch, total, in_shape, num_classes = _setup(c, data)
    init_seed, default_data_seed = c.seeds(replicate)
    if stop is not None and not 0 <= int(stop) <= total:
        raise ValueError(f"stop={stop} is outside the run's 0..{total} steps")
    bad = [s for s in save_states if not 0 <= int(s) <= total]
    if bad:
        raise ValueError(f"save_states {bad} are outside the run's 0..{total} steps")
    start = None
    if state is not None and not (out_dir / "resume.pt").exists():
        start = _load_state(state, total)
    out_dir.mkdir(parents=True, exist_ok=True)
    _train_replicate(c, replicate, out_dir.parent, out_dir, train_data, test_data, device, in_shape, num_classes,
                     steps_per_epoch, total, progress, callbacks, init_seed=init_seed,
                     data_seed=default_data_seed if data_seed is None else int(data_seed), start=start,
                     theta0_path=None if theta0 is None else Path(theta0), stop=stop,
                     save_states=frozenset(int(s) for s in save_states))
    return out_dir


def _train_replicate(c: TrainConfig, replicate: int, run_dir: Path, rdir: Path, train_data, test_data,
                     device: torch.device, in_shape: tuple[int, ...], num_classes: int, steps_per_epoch: int,
                     total: int, progress: bool, callbacks: Sequence[Callback], *, init_seed: int, data_seed: int,
                     start: dict[str, Any] | None = None, theta0_path: Path | None = None, stop: int | None = None,
                     save_states: frozenset[int] = frozenset()) -> None:
    ckdir = rdir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    resume_path, log_path, summary_path = rdir / "resume.pt", rdir / "log.jsonl", rdir / "summary.json"
    if hasattr(train_data, "seed"):
        train_data.seed = data_seed
    end = total if stop is None else min(int(stop), total)

    ckpt_steps = parse_checkpoints(c.checkpoints, total, steps_per_epoch) | {0, total}
    resume_every = max(1, parse_steps(c.resume_every, steps_per_epoch, total))
    milestones = [parse_steps(m, steps_per_epoch, total) for m in c.milestones.split(",") if m.strip()]
    warmup_steps = parse_steps(c.warmup, steps_per_epoch, total) if c.warmup else 0
    switch_step = parse_steps(c.switch_at, steps_per_epoch, total) if c.switch_optimizer else None
    eval_steps: set[int] = {
        "checkpoints": ckpt_steps, "epoch": set(range(0, total + 1, steps_per_epoch)) | {total},
        "end": {total}, "none": set(),
    }[c.evaluate]
    if test_data is None:
        eval_steps = set()

    torch.manual_seed(init_seed)
    model = models.create(c.model, num_classes, in_shape, **c.model_kwargs()).to(device)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt_name, base_lr = c.optimizer, c.lr
    step, elapsed = 0, 0.0
    resume = torch.load(resume_path, map_location="cpu", weights_only=True) if resume_path.exists() else None
    if resume is not None and (resume.get("done") or resume["step"] >= end):
        return
    state = resume if resume is not None else start  # start: a fork's exact state at its first step
    if state is not None:
        model.load_state_dict(state["model"])
        step, elapsed = int(state["step"]), (resume["elapsed"] if resume is not None else 0.0)
        opt_name, base_lr = state["optimizer_name"], state["base_lr"]
    optimizer = _make_optimizer(opt_name, list(model.parameters()), base_lr, c)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    if resume is not None:
        with open(log_path, "r+b") as f:  # drop records written after the resume point
            f.truncate(resume["log_offset"])
    else:
        log_path.write_text("")
        _atomic_save(_cpu_state_dict(model), ckdir / f"step_{step}.pt")  # step 0, or a fork's first step
    first_step = int(resume.get("start_step", 0)) if resume is not None else step  # > 0 for a fork
    theta0_path = theta0_path or ckdir / f"step_{first_step}.pt"
    theta0 = [t.to(device) for t in torch.load(theta0_path, map_location="cpu", weights_only=True).values()]
    names = list(model.state_dict().keys())
    param_ids = {id(p) for p in model.parameters()}
    sd = model.state_dict(keep_vars=True)
    theta0 = [t for k, t in zip(names, theta0) if id(sd[k]) in param_ids]  # parameters only, in state-dict order
    params = [sd[k] for k in names if id(sd[k]) in param_ids]

    loss_fn = _loss_fn(c.loss)
    log_f = open(log_path, "a")
    buffer: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, tensor(loss, acc, dist)) awaiting a host copy

    def flush() -> None:
        if not buffer:
            return
        vals = torch.stack([b[2] for b in buffer]).cpu().tolist()
        for (s, lr, _), (loss_v, acc_v, dist_v) in zip(buffer, vals):
            rec = {"step": s, "epoch": round(s / steps_per_epoch, 4), "lr": lr, "train_loss": loss_v,
                   "train_acc": acc_v, "dist_init": dist_v}
            log_f.write(json.dumps(rec) + "\n")
        buffer.clear()
        log_f.flush()

    def write_record(rec: dict[str, Any]) -> None:
        flush()
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    def save_resume(done: bool = False, path: Path = resume_path) -> None:
        flush()
        state = {
            "step": step, "model": _cpu_state_dict(model), "optimizer": optimizer.state_dict(),
            "optimizer_name": opt_name, "base_lr": base_lr, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "log_offset": log_f.tell(), "elapsed": elapsed + (time.perf_counter() - t_start), "done": done,
            "start_step": first_step,
        }
        _atomic_save(state, path)

    def keep_state() -> None:  # an exact state to fork from later (train_from(state=...))
        (rdir / "states").mkdir(exist_ok=True)
        save_resume(path=rdir / "states" / f"step_{step}.pt")

    def run_eval(events: list[str]) -> dict[str, float]:
        m = evaluate(model, test_data, c.loss, bf16=c.bf16)
        write_record({"step": step, "epoch": round(step / steps_per_epoch, 4), **m})
        events.append("eval")
        return m

    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"replicate {replicate}", dynamic_ncols=True, mininterval=1.0)
    if resume is None:  # step 0, or a fork's first step
        if step in eval_steps:
            run_eval([])
        if step in save_states:
            keep_state()
        save_resume()

    last_metrics: dict[str, float] = {}
    try:
        while step < end:
            epoch, start_batch = divmod(step, steps_per_epoch)
            for x, y in _epoch_batches(train_data, epoch, start_batch):
                if step >= end:
                    break
                events: list[str] = []
                if switch_step is not None and step == switch_step and opt_name != c.switch_optimizer:
                    opt_name = c.switch_optimizer
                    base_lr = c.switch_lr if c.switch_lr is not None else c.lr
                    optimizer = _make_optimizer(opt_name, params, base_lr, c)
                    write_record({"step": step, "event": "switch", "optimizer": opt_name, "base_lr": base_lr})
                    events.append("switch")
                lr = base_lr * lr_factor(step, milestones, c.gamma, warmup_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                first: list[torch.Tensor] = []

                def closure(x=x, y=y, first=first, opt=optimizer) -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.bf16):
                        out = model(x)
                    out = out.float()
                    loss = loss_fn(out, y)
                    loss.backward()
                    if not first:
                        first.extend([loss.detach(), _correct(out.detach(), y, c.loss) / y.shape[0]])
                    return loss

                optimizer.step(closure)
                step += 1
                if step % c.log_every == 0 or step == total:
                    with torch.no_grad():
                        diffs = torch._foreach_sub([p.detach() for p in params], theta0)
                        dist = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)))
                    buffer.append((step, lr, torch.stack([first[0].float(), first[1].float(), dist.float()])))
                    if len(buffer) >= _LOG_FLUSH:
                        flush()
                if step in ckpt_steps:
                    _atomic_save(_cpu_state_dict(model), ckdir / f"step_{step}.pt")
                    events.append("checkpoint")
                if step in eval_steps:
                    last_metrics = run_eval(events)
                if step in save_states:
                    keep_state()
                if step in ckpt_steps or step % resume_every == 0 or step == end:
                    if step < total:
                        save_resume()
                        events.append("resume_point")
                if bar is not None:
                    bar.update(1)
                    if step % 50 == 0 or step == total:
                        bar.set_postfix(loss=f"{first[0].item():.4f}", acc=f"{first[1].item():.3f}",
                                        refresh=False)
                if callbacks:
                    ctx = StepContext(run_dir, rdir, replicate, step, total, steps_per_epoch, model, optimizer,
                                      opt_name, c, events, dict(last_metrics) if "eval" in events else {})
                    for cb in callbacks:
                        cb(ctx)
        if step < total:  # stopped early (train_from's stop): resume.pt holds the state, no summary yet
            return
        wall = elapsed + (time.perf_counter() - t_start)
        if total not in eval_steps and test_data is not None:
            last_metrics = run_eval([])
        summary = {"replicate": replicate, "init_seed": init_seed, "data_seed": data_seed, "final_step": total,
                   "wall_time_s": round(wall, 3), **last_metrics}
        if first_step:
            summary["start_step"] = first_step
        summary_path.write_text(json.dumps(summary, indent=2))
        save_resume(done=True)
    finally:
        with contextlib.suppress(Exception):
            flush()
        log_f.close()
        if bar is not None:
            bar.close()
