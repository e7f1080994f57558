"""Trainers for loss-landscape experiments: model zoo, optimizers (incl. Runge-Kutta), checkpoint schedules.

Quick start::

    from lerpfast.train import TrainConfig, train, list_checkpoints
    run_dir = train(TrainConfig(model="lenet_300_100", dataset="fashion-mnist", replicates=3))
    ckpts = list_checkpoints(run_dir, replicate=0)      # {0: Path(...step_0.pt), 1: ..., 18760: ...}

See docs/train.md.
"""

from lerpfast.train import models, optim
from lerpfast.train.config import TrainConfig, parse_options
from lerpfast.train.schedule import Step, frankle_schedule, lr_factor, parse_checkpoints, parse_steps
from lerpfast.train.trainer import (
    StepContext,
    TensorLoader,
    evaluate,
    list_checkpoints,
    load_config,
    load_model,
    read_log,
    train,
    train_from,
)

__all__ = [
    "TrainConfig",
    "train",
    "train_from",
    "list_checkpoints",
    "load_config",
    "load_model",
    "read_log",
    "evaluate",
    "StepContext",
    "TensorLoader",
    "Step",
    "frankle_schedule",
    "parse_checkpoints",
    "parse_steps",
    "lr_factor",
    "parse_options",
    "models",
    "optim",
]
