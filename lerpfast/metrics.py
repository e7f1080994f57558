"""Per-point metrics over a whole data set, accumulated in float64 in the same pass as the forward.

For K points (and optionally a reference point) and batches of logits:

* ``loss``: mean of ``loss_fn(logits, target)`` (cross-entropy by default; any reduction='none' loss);
* ``error`` / ``top5_error``: top-1 / top-5 error (top-5 only with >= 5 classes);
* ``distance``: functional distance to the reference, Im et al. eq. 4.1 on softmax outputs,
  ``sqrt(mean_i ||softmax(f(x_i; theta_k)) - softmax(f(x_i; theta_ref))||^2)``;
* ``disagreement``: fraction of samples whose predicted label differs from the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PointMetrics", "METRIC_NAMES", "default_loss"]

METRIC_NAMES = ("loss", "error", "top5_error", "distance", "disagreement")


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


class PointMetrics:
    """Accumulates the metrics of K points batch by batch.

    Logits of shape (K, N, C) or (K, N, ..., C) with targets (N,) or (N, ...) (sequence outputs count
    every position as a sample).
    """

    def __init__(self, K: int, *, loss_fn: Callable | None = None, reference: bool = True):
        self.K, self.reference = K, reference
        self.loss_fn = loss_fn or default_loss
        self.sums: dict[str, torch.Tensor] | None = None
        self.count = 0
        self.num_classes: int | None = None

    def update(self, logits: torch.Tensor, target: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        K, C = logits.shape[0], logits.shape[-1]
        z = logits.reshape(K, -1, C).double()  # (K, N, C), reductions in float64
        t = target.reshape(-1).to(z.device)
        n = t.shape[0]
        if z.shape[1] != n:
            raise ValueError(f"logits have {z.shape[1]} samples per point but targets have {n}")
        if self.sums is None:
            self.num_classes = C
            self.sums = {k: torch.zeros(K, dtype=torch.float64, device=z.device) for k in METRIC_NAMES}
        s = self.sums
        loss = self.loss_fn(z.reshape(K * n, C), t.repeat(K))
        s["loss"] += loss.reshape(K, -1).double().sum(1)
        pred = z.argmax(-1)  # (K, N)
        s["error"] += (pred != t).sum(1).double()
        if C >= 5:
            top5 = z.topk(5, dim=-1).indices  # (K, N, 5)
            s["top5_error"] += (~(top5 == t[None, :, None]).any(-1)).sum(1).double()
        if ref_logits is not None:
            r = ref_logits.reshape(-1, C).double()
            diff = torch.softmax(z, -1) - torch.softmax(r, -1)[None]
            s["distance"] += diff.pow(2).sum(-1).sum(1)
            s["disagreement"] += (pred != r.argmax(-1)[None]).sum(1).double()
        self.count += n

    def compute(self) -> dict[str, np.ndarray]:
        if self.sums is None or self.count == 0:
            raise ValueError("no data was seen: the data iterable produced no batches")
        n = float(self.count)
        s = {k: v.cpu().numpy() for k, v in self.sums.items()}
        out = {"loss": s["loss"] / n, "error": s["error"] / n}
        if self.num_classes >= 5:
            out["top5_error"] = s["top5_error"] / n
        if self.reference:
            out["distance"] = np.sqrt(s["distance"] / n)
            out["disagreement"] = s["disagreement"] / n
        return out
