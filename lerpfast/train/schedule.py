"""Training steps, learning-rate schedules and checkpoint schedules.

A :class:`Step` is an iteration count that knows the epoch length, parsed from OpenLTH-style strings
(``"160ep"``, ``"500it"``, ``"2ep100it"``). :func:`frankle_schedule` is the checkpoint set of Frankle (2020):
``{0} U {2^k : k <= 10} U {1000 k : k > 1}``. :func:`parse_checkpoints` turns the trainer's ``checkpoints`` option
into a set of steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Step", "frankle_schedule", "parse_checkpoints", "parse_steps", "lr_factor"]

_STEP_RE = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


@dataclass(frozen=True, order=True)
class Step:
    """A training step (number of optimizer iterations done) with the epoch length it refers to.

    Attributes
    ----------
    it : int
        Iterations since the start of training.
    steps_per_epoch : int
        Iterations per epoch (batches per epoch).
    """

    it: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.it < 0:
            raise ValueError(f"a step cannot be negative (got {self.it})")
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 (got {self.steps_per_epoch})")

    @classmethod
    def from_str(cls, s: str | int, steps_per_epoch: int) -> Step:
        """Parse ``"160ep"``, ``"500it"``, ``"2ep100it"`` or a bare integer (iterations).

        Examples
        --------
        >>> Step.from_str("160ep", 391).it
        62560
        >>> Step.from_str("2ep5it", 100).it
        205
        """
        if isinstance(s, int) or (isinstance(s, str) and s.strip().isdigit()):
            return cls(int(s), steps_per_epoch)
        m = _STEP_RE.match(s)
        if m is None or (m.group(1) is None and m.group(2) is None):
            raise ValueError(f"cannot parse step {s!r}; use e.g. '160ep', '500it' or '2ep100it'")
        ep, it = int(m.group(1) or 0), int(m.group(2) or 0)
        return cls(ep * steps_per_epoch + it, steps_per_epoch)

    @classmethod
    def from_epoch(cls, epoch: int, it: int, steps_per_epoch: int) -> Step:
        """The step ``it`` iterations into epoch ``epoch``."""
        return cls(epoch * steps_per_epoch + it, steps_per_epoch)

    @property
    def ep(self) -> int:
        """Completed epochs."""
        return self.it // self.steps_per_epoch

    @property
    def it_in_epoch(self) -> int:
        """Iterations into the current epoch."""
        return self.it % self.steps_per_epoch

    def __str__(self) -> str:
        return f"{self.ep}ep{self.it_in_epoch}it"


def parse_steps(s: str | int, steps_per_epoch: int, total: int | None = None) -> int:
    """Iteration count of ``s``: a :class:`Step` string, or a percentage of ``total`` (``"50%"``)."""
    if isinstance(s, str) and s.strip().endswith("%"):
        if total is None:
            raise ValueError(f"{s!r}: a percentage needs the total number of steps")
        return int(round(float(s.strip()[:-1]) / 100.0 * total))
    return Step.from_str(s, steps_per_epoch).it


def frankle_schedule(total_steps: int, steps_per_epoch: int | None = None) -> set[int]:
    """Frankle (2020, §2)'s checkpoint iterations: ``{0} U {2^k : 0 <= k <= 10} U {1000 k : k > 1}``, up to
    ``total_steps`` inclusive (1000 itself is not in the paper's set; 1024 is).

    Parameters
    ----------
    total_steps : int
        Length of training in iterations.
    steps_per_epoch : int, optional
        Unused (the schedule is in iterations); accepted for a uniform signature.

    Returns
    -------
    set of int
        For a 62,560-iteration run: 0, 1, 2, 4, ..., 1024, 2000, 3000, ..., 62000 (73 steps).
        The trainer additionally saves the final step (the endpoint of every interpolation).
    """
    steps = {0} | {2**k for k in range(11)} | set(range(2000, total_steps + 1, 1000))
    return {s for s in steps if s <= total_steps}


def parse_checkpoints(spec: str | Iterable[int], total_steps: int, steps_per_epoch: int) -> set[int]:
    """Checkpoint steps from the trainer's ``checkpoints`` option.

    Parameters
    ----------
    spec : str or iterable of int
        ``"frankle"`` (default), ``"each epoch"`` (0 and every epoch boundary), ``"every N"`` (0, N, 2N, ...;
        ``N`` may be a step string such as ``"every 2ep"``), ``"none"``, or a comma-separated list of steps
        (``"0,100,1ep,2ep50it"``), or an iterable of ints.
    total_steps : int
        Length of training; steps beyond it are dropped.
    steps_per_epoch : int
        Iterations per epoch, for ``ep`` strings.

    Returns
    -------
    set of int
        Steps in ``[0, total_steps]``. The trainer always adds ``total_steps`` itself.
    """
    if not isinstance(spec, str):
        steps = {int(s) for s in spec}
    else:
        s = spec.strip().lower()
        if s in ("frankle", "default", ""):
            steps = frankle_schedule(total_steps, steps_per_epoch)
        elif s in ("each epoch", "each_epoch", "epoch", "epochs"):
            steps = set(range(0, total_steps + 1, steps_per_epoch))
        elif s.startswith("every"):
            n = Step.from_str(s[len("every"):].strip().lstrip("_"), steps_per_epoch).it
            if n < 1:
                raise ValueError(f"{spec!r}: the interval must be >= 1 iteration")
            steps = set(range(0, total_steps + 1, n))
        elif s == "none":
            steps = set()
        else:
            steps = {Step.from_str(part, steps_per_epoch).it for part in s.split(",") if part.strip()}
    return {t for t in steps if 0 <= t <= total_steps}


def lr_factor(step: int, milestones: Iterable[int], gamma: float, warmup_steps: int) -> float:
    """Multiplier of the base learning rate for the update made at iteration ``step`` (0-based).

    ``gamma ** (number of milestones <= step)``, times a linear warm-up ``(step + 1) / warmup_steps`` during the
    first ``warmup_steps`` iterations (so the first update is already non-zero, and the full rate is reached at
    the last warm-up step).
    """
    f = gamma ** sum(1 for m in milestones if step >= m)
    if warmup_steps > 0 and step < warmup_steps:
        f *= (step + 1) / warmup_steps
    return f
