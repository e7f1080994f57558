"""Per-point metrics over a whole data set, accumulated in float64 in the same pass as the forward.

For K points (and optionally a reference point) and batches of logits:

* ``loss``: mean of ``loss_fn(logits, target)`` (cross-entropy by default; any reduction='none' loss);
* ``error`` / ``top5_error``: top-1 / top-5 error (top-5 only with >= 5 classes);
* ``distance``: functional distance to the reference, Im et al. eq. 4.1 on softmax outputs,
  ``sqrt(mean_i ||softmax(f(x_i; theta_k)) - softmax(f(x_i; theta_ref))||^2)``;
* ``disagreement``: fraction of samples whose predicted label differs from the reference's.

Non-finite logits (the same rule on every path: this torch code, the fused Triton kernel
:mod:`lerpfast.kernels.point_metrics` and its reference): a sample whose logits contain a NaN or a +inf in any
class has no defined prediction, so it counts as wrong for top-1 and top-5, its loss and distance are NaN (so the
point's mean loss / distance are NaN), and it disagrees with the reference (as does every sample whose
reference logits contain a NaN or +inf). A -inf logit is a class of probability 0 and is scored normally (the
loss is +inf when the target's logit is -inf). Class labels must lie in ``[0, C)``: a label outside is a
``ValueError`` naming the label, its position in the batch and C (one min / max check per batch).

Sequence outputs ((K, N, T, C) logits, (N, T) targets) count every position as a sample: with next-token
targets (``labels[:, t]`` the token after position t) the loss is the mean token cross-entropy (``exp(loss)`` is
the perplexity) and the error the next-token error. A target of ``IGNORE_INDEX`` (-100, transformers' and
``F.cross_entropy``'s convention for padding and prompt positions) leaves its position out of every metric.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PointMetrics", "METRIC_NAMES", "IGNORE_INDEX", "default_loss", "call_loss_fn"]

METRIC_NAMES = ("loss", "error", "top5_error", "distance", "disagreement")
IGNORE_INDEX = -100  # a target left out of the metrics (padding, prompt tokens), as in F.cross_entropy
_CHUNK_ELEMENTS = 1 << 22  # logits per piece of the float64 path (32 MB in float64)


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _loss_fn_name(loss_fn: Callable) -> str:
    return getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def call_loss_fn(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss_fn(logits, target)`` under the contract of ``sweep(loss_fn=...)``, its result checked.

    Parameters
    ----------
    loss_fn : the user's loss.
    logits : (R, C) float64: R rows (the K points' samples stacked point by point, and for sequence outputs every
        position of a sample) of C logits each.
    target : (R,) the target of each row (class indices, or values for a regression).

    Returns
    -------
    The R per-row losses (a tensor of shape (R,), or (R, 1)).

    Raises
    ------
    ValueError
        ``loss_fn`` returned anything else (a scalar from a ``reduction='mean'`` loss, a (B, T) array of a sequence
        loss): the message names ``loss_fn``, the shape it returned and the shape it must return.
    """
    R = logits.shape[0]
    loss = loss_fn(logits, target)
    shape = tuple(loss.shape) if torch.is_tensor(loss) else None
    if shape not in ((R,), (R, 1)):
        got = f"shape {shape}" if shape is not None else f"a {type(loss).__name__}"
        raise ValueError(
            f"loss_fn {_loss_fn_name(loss_fn)} returned {got} for logits of shape {tuple(logits.shape)} and targets "
            f"of shape {tuple(target.shape)}: it must return one loss per row, a tensor of shape ({R},) "
            f"(e.g. F.cross_entropy(logits, target, reduction='none')); lerpfast averages them itself")
    return loss


def _fused(logits: torch.Tensor) -> bool:
    """Whether a batch's metrics go through the dispatched fused kernel: on CUDA (or with LERPFAST_BACKEND=triton),
    for fp32 / bf16 / fp16 logits (an fp64 sweep is the reference: it keeps the float64 torch path)."""
    if logits.dtype == torch.float64 or logits.dim() != 3:
        return False
    if logits.device.type == "cuda":
        return True
    from lerpfast.engine.dispatch import forced_backend, planned

    return forced_backend() == "triton" or planned(logits.device)


def _nonfinite_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows (last dimension) holding a NaN or a +inf: their softmax and argmax are undefined."""
    return (torch.isnan(z) | torch.isposinf(z)).any(-1)


def _check_labels(t: torch.Tensor, C: int) -> bool:
    """Labels in ``[0, C)`` or ``IGNORE_INDEX``, one device-side min / max and one host sync per batch; the error
    names the first offending label, its position in the batch and C. Returns whether any label is ignored."""
    if t.is_meta:  # a plan (lerpfast.kernels.warmup.plan) traces on meta tensors: no values to check
        return False
    lo, hi = torch.aminmax(t)
    if bool((lo < 0) | (hi >= C)):
        bad = ((t < 0) & (t != IGNORE_INDEX)) | (t >= C)
        if not bool(bad.any()):
            return True
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(t[pos])} at position {pos} of the batch is outside [0, {C}) for {C} classes "
                         f"(the model's output has {C} logits per sample; {IGNORE_INDEX} marks a position to "
                         f"leave out): check the data's labels or the model's output size")


class PointMetrics:
    """Accumulates the metrics of K points batch by batch.

    Logits of shape (K, N, C) or (K, N, ..., C) with targets (N,) or (N, ...) (sequence outputs count
    every position as a sample).
    """

    def __init__(self, K: int, *, loss_fn: Callable | None = None, reference: bool = True):
        self.K, self.reference = K, reference
        self.custom_loss = loss_fn is not None
        self.loss_fn = loss_fn or default_loss
        self.sums: dict[str, torch.Tensor] | None = None
        self.count = 0
        self.num_classes: int | None = None

    def update(self, logits: torch.Tensor, target: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        """Add one batch. Everything stays on the logits' device (no host synchronization).

        Written out rather than with ``F.cross_entropy`` / ``softmax`` / ``topk``: on a CPU those take ~1 ms each
        for (8, 1000, 10) float64 logits (rows of 10 do not vectorize), the five metrics together 4.5 ms per batch,
        against 1 ms here; the values are the same to float64 rounding.
        """
        K, C = logits.shape[0], logits.shape[-1]
        t = target.reshape(-1).to(logits.device)
        n = t.shape[0]
        if logits.numel() != K * n * C:
            raise ValueError(f"logits have {logits.numel() // max(1, K * C)} samples per point but targets have {n}")
        if self.sums is None:
            self.num_classes = C
            self.sums = {k: torch.zeros(K, dtype=torch.float64, device=logits.device) for k in METRIC_NAMES}
        s = self.sums
        by_class = not (t.is_floating_point() or t.is_complex())  # class indices (a custom loss may regress)
        if by_class and n and _check_labels(t, C):  # positions labelled IGNORE_INDEX leave every metric
            keep = t != IGNORE_INDEX
            logits = logits.reshape(K, n, C)[:, keep]
            if ref_logits is not None:
                ref_logits = ref_logits.reshape(n, C)[keep]
            t = t[keep]
            n = t.shape[0]
            if n == 0:
                return
        if by_class and not self.custom_loss and _fused(logits):
            # one Triton pass over the (K, N, C) logits instead of ~10 float64 torch kernels (lerpfast.kernels.
            # point_metrics), chosen by measurement against the torch path like every dispatched op
            from lerpfast.engine import dispatch

            sums = dispatch.point_metrics(logits.reshape(K, n, C), t, None if ref_logits is None
                                          else ref_logits.reshape(n, C))
            for k in METRIC_NAMES:
                s[k] += sums[k]
            self.count += n
            return
        ref = None
        if ref_logits is not None:  # the reference's softmax, prediction and undefined rows, once per batch
            r = ref_logits.reshape(-1, C).double()
            er = torch.exp(r - r.amax(-1, keepdim=True))
            ref = (er / er.sum(-1, keepdim=True), r.argmax(-1), _nonfinite_rows(r))
        # the float64 path a few points at a time: its temporaries (about ten times the logits, in float64) stay in
        # pieces of ~32 MB for large vocabularies (GPT-2: 11 x 256 x 50257 logits) instead of gigabytes
        lg = logits.reshape(K, n, C)
        step = max(1, _CHUNK_ELEMENTS // max(1, n * C))
        for k0 in range(0, K, step):
            self._update_points(lg[k0:k0 + step], t, by_class, ref, slice(k0, min(K, k0 + step)))
        self.count += n

    def _update_points(self, logits, t, by_class: bool, ref, points: slice) -> None:
        """The torch float64 metrics of the points ``points`` ((P, N, C) logits) added to their sums."""
        s = {k: v[points] for k, v in self.sums.items()}  # views: += writes through
        K, n, C = logits.shape
        z = logits.double()  # (K, N, C), reductions in float64
        if by_class:
            tk = t.reshape(1, n, 1).expand(K, n, 1)
            zt = z.gather(-1, tk)  # (K, N, 1): the target's logit
        if self.custom_loss:
            loss = call_loss_fn(self.loss_fn, z.reshape(K * n, C), t.repeat(K))
            s["loss"] += loss.reshape(K, n).double().sum(1)
        if not self.custom_loss or ref is not None:
            zmax = z.amax(-1, keepdim=True)
            e = torch.exp(z - zmax)
            se = e.sum(-1, keepdim=True)
            if not self.custom_loss:  # cross-entropy: logsumexp - z_target
                if not by_class:
                    raise ValueError(f"the default loss (cross-entropy) needs class indices as targets, got "
                                     f"{t.dtype}; pass loss_fn= for other targets")
                s["loss"] += (zmax + torch.log(se) - zt).sum((1, 2))
        bad = _nonfinite_rows(z)  # (K, N): NaN or +inf logits: no defined prediction (module docstring)
        if not self.custom_loss:
            s["loss"] += torch.where(bad, float("nan"), 0.0).sum(1)  # cross-entropy of a +inf row is not inf
        pred = z.argmax(-1)  # (K, N): the first maximum, NaN counting as the largest
        s["error"] += ((pred != t) | bad).sum(1).double()
        if C >= 5 and not by_class:
            s["top5_error"] += ((~(z.topk(5, dim=-1).indices == t[None, :, None]).any(-1)) | bad).sum(1).double()
        elif C >= 5:
            # rank of the target among the classes, ordered as argmax orders them (NaN largest, ties by index):
            # top-5 error = rank >= 5 (rank >= 1 is exactly pred != t)
            cols = torch.arange(C, device=z.device).reshape(1, 1, C)
            z_nan, t_nan = torch.isnan(z), torch.isnan(zt)
            above = (z > zt) | (z_nan & ~t_nan)
            tie = ((z == zt) | (z_nan & t_nan)) & (cols < tk)
            s["top5_error"] += (((above.sum(-1) + tie.sum(-1)) >= 5) | bad).sum(1).double()
        if ref is not None:
            ref_soft, ref_pred, ref_bad = ref
            diff = e / se - ref_soft[None]  # softmax(z) - softmax(r)
            bad_either = bad | ref_bad[None]
            s["distance"] += torch.where(bad_either, float("nan"), diff.pow(2).sum(-1)).sum(1)
            s["disagreement"] += ((pred != ref_pred[None]) | bad_either).sum(1).double()

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
