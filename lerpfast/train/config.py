"""Training hyper-parameters: one dataclass whose field help texts also generate the ``train`` CLI.

Fields left at ``None`` take the model's default setting (OpenLTH's defaults: LeNet-300-100 on MNIST: batch 128,
SGD lr 0.1, 40 epochs; CIFAR ResNets / VGGs / NIN: batch 128, SGD momentum 0.9, lr 0.1, x0.1 at epochs 80 and
120, weight decay 1e-4, 160 epochs; ResNet-50 on ImageNet: batch 1024, lr 0.4 with 5 warm-up epochs, x0.1 at
epochs 30, 60 and 80, 90 epochs), see :meth:`TrainConfig.resolved` and
:func:`lerpfast.train.models.train_defaults`.

The run directory is named by a hash of the *non-default* training hyper-parameters (after resolution), so
adding a field with a default later leaves existing run names unchanged, and a run asked for twice lands in the
same directory (and resumes there).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lerpfast.train import models

__all__ = ["TrainConfig", "parse_options"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# Fields that do not change the trained weights (or only say where / how to run): left out of the run hash.
_NOT_HASHED = frozenset({"out_dir", "device", "replicates", "data_root", "log_every", "evaluate", "resume_every",
                         "progress_every", "channels_last", "eval_batch_size"})


@dataclass
class TrainConfig:
    """Everything that defines a training run (see the module docstring for the defaults)."""

    # -- what -----------------------------------------------------------------------------------------------
    model: str = _f("lenet_300_100", "model name (lerpfast.train.models.available())")
    model_options: str = _f("", "model keyword options, e.g. 'width=2,bn=False' or "
                                "'widths=(500,300),activation=\"maxout\"'")
    dataset: str | None = _f(None, "data set name (lerpfast.data.available()); default: the model's setting")
    data_root: str | None = _f(None, "data root (default $LERPFAST_DATA, see docs/data.md)")
    limit: int | None = _f(None, "train on only the first N training samples (demos, tests)")
    loss: str = _f("cross_entropy", "loss: cross_entropy | mse (regression, e.g. deep linear nets)")
    # -- optimizer ------------------------------------------------------------------------------------------
    optimizer: str | None = _f(None, "sgd | sgdm | nesterov | rmsprop | adadelta | adam | "
                                     "rk_{sgd,adam}_{midpoint,heun,ralston}")
    lr: float | None = _f(None, "base learning rate")
    momentum: float = _f(0.9, "momentum of sgdm / nesterov")
    nesterov: bool = _f(False, "use Nesterov momentum with sgdm")
    weight_decay: float | None = _f(None, "L2 weight decay")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float | None = _f(None, "optimizer epsilon (default 1e-8; adadelta 1e-6)")
    alpha: float = _f(0.99, "RMSprop smoothing constant")
    rho: float = _f(0.9, "Adadelta smoothing constant")
    # -- schedule -------------------------------------------------------------------------------------------
    batch_size: int | None = _f(None, "minibatch size")
    drop_last: bool | None = _f(None, "drop the last incomplete batch of every epoch (default: only for imagenet)")
    steps: str | None = _f(None, "training length: '160ep', '500it', '2ep100it'")
    milestones: str | None = _f(None, "lr drops, comma-separated steps, e.g. '80ep,120ep'")
    gamma: float = _f(0.1, "lr multiplier at each milestone")
    warmup: str | None = _f(None, "linear lr warm-up length, e.g. '5ep'")
    # -- optimizer switch (Im et al. section 4.3) ----------------------------------------------------------------
    switch_optimizer: str | None = _f(None, "switch to this optimizer during training (fresh optimizer state)")
    switch_at: str | None = _f(None, "when to switch: a step ('30ep', '5000it') or a fraction of training ('50%')")
    switch_lr: float | None = _f(None, "base lr after the switch (default: lr); the milestone factors still apply")
    # -- checkpoints, replicates, seeds ----------------------------------------------------------------------------
    checkpoints: str = _f("frankle", "checkpoint steps: frankle | 'each epoch' | 'every N' | list '0,100,1ep' | none "
                                     "(the final step is always saved)")
    replicates: int = _f(1, "number of replicates (replicate i uses seeds offset by i, see seed_policy)")
    seed: int = _f(0, "initialization seed of replicate 0")
    data_seed: int | None = _f(None, "data-order / augmentation seed of replicate 0 (default: seed)")
    seed_policy: str = _f("both", "what varies across replicates: both | init | data (same init, new data order) | "
                                  "none")
    # -- where / how ---------------------------------------------------------------------------------------------
    out_dir: str = _f("runs", "parent directory of run directories")
    device: str = _f("auto", "cpu | cuda | cuda:N | auto")
    channels_last: bool = _f(False, "channels_last memory format (GPU convnets)")
    bf16: bool = _f(False, "bf16 autocast for forward and backward (GPU)")
    evaluate: str = _f("checkpoints", "test-set evaluation: checkpoints | epoch | end | none")
    eval_batch_size: int = _f(1000, "batch size of test-set evaluation")
    log_every: int = _f(1, "log train loss / accuracy / distance from init every N steps")
    resume_every: str = _f("1ep", "save exact-resume state this often (also at every checkpoint)")

    # -----------------------------------------------------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled from the model's setting and the generic defaults."""
        d = dataclasses.asdict(self)
        for k, v in models.train_defaults(self.model).items():
            if d.get(k) is None:
                d[k] = v
        generic = dict(dataset="mnist", optimizer="sgd", lr=0.1, weight_decay=0.0, batch_size=128, steps="40ep",
                       milestones="", warmup="", drop_last=False)
        for k, v in generic.items():
            if d.get(k) is None:
                d[k] = v
        if d["data_seed"] is None:
            d["data_seed"] = d["seed"]
        if d["switch_optimizer"] is not None and d["switch_at"] is None:
            raise ValueError("switch_optimizer needs switch_at")
        if d["seed_policy"] not in ("both", "init", "data", "none"):
            raise ValueError(f"seed_policy must be both | init | data | none, got {d['seed_policy']!r}")
        if d["loss"] not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be cross_entropy | mse, got {d['loss']!r}")
        return TrainConfig(**d)

    def model_kwargs(self) -> dict[str, Any]:
        """``model_options`` parsed into keyword arguments."""
        return parse_options(self.model_options)

    def seeds(self, replicate: int) -> tuple[int, int]:
        """``(init_seed, data_seed)`` of a replicate under ``seed_policy``."""
        c = self.resolved() if self.data_seed is None else self
        init_seed = c.seed + (replicate if c.seed_policy in ("both", "init") else 0)
        data_seed = c.data_seed + (replicate if c.seed_policy in ("both", "data") else 0)
        return init_seed, data_seed

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise, missing keys take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)

    def non_default(self) -> dict[str, Any]:
        """Resolved hyper-parameters that differ from the dataclass defaults and change training."""
        r = self.resolved()
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _NOT_HASHED:
                continue
            v = getattr(r, f.name)
            if v != f.default:
                out[f.name] = v
        return out

    def run_hash(self) -> str:
        """md5 of the non-default training hyper-parameters (the run directory is ``train_<hash>``)."""
        blob = json.dumps(self.non_default(), sort_keys=True)
        return hashlib.md5(blob.encode()).hexdigest()[:16]

    def run_name(self) -> str:
        """Name of the run directory."""
        return f"train_{self.run_hash()}"


def parse_options(s: str) -> dict[str, Any]:
    """Parse ``"width=2,bn=False,widths=(500,300),activation=maxout"`` into a dict.

    Values are Python literals when they parse as such, else strings; commas inside brackets are kept.
    """
    out: dict[str, Any] = {}
    if not s or not s.strip():
        return out
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in parts:
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"model option {part!r} is not key=value")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out
