"""The resume guard: a few numbers of a sweep's first point on its first batch, stored when the sweep is created
and recomputed when it is resumed.

A stored sweep is identified by a fingerprint of its settings (slice, checkpoints' sha256, BN policy, precision,
data description, loss name). What that cannot see — the model's code (the same class built with another
activation), a data loader whose labels were permuted, two ``loss_fn`` lambdas of the same name — would let a resume
return the old numbers as the new sweep's, or mix two sweeps in one curve. The probe sees all three at the cost of
one forward pass of one point on one batch: the per-sample loss's mean, checksums of the logits (sum, absolute sum,
a fixed random projection) and of the labels. It is computed in float32 (float64 for ``precision="fp64"``) with
TF32 off, whatever the sweep's precision, by a plain per-point forward, so a resume on another device or with another
``method`` reproduces it to rounding.

It does not see changes that leave point 0's output on the first batch unchanged (a change in a later batch, or in
weights that only other points use).
"""

from __future__ import annotations

import copy
import math

import torch

__all__ = ["compute", "compare", "RTOL"]

#: relative tolerance of a resumed probe: fp32 rounding of one batch across devices, libraries and methods
RTOL = 1e-4


def compute(model, aff, batches, loss_fn, device: torch.device, dtype: torch.dtype, forward) -> dict | None:
    """The probe of point 0 of ``aff`` on the first batch of ``batches`` (None when there is no batch).

    ``forward(net, x)`` returns the logits of the network copy ``net`` (in ``dtype`` on ``device``) for the batch
    input ``x`` as the data gives it: the sweep's own input handling and logits rule.
    """
    it = iter(batches)
    try:
        x, y = next(it)
    except StopIteration:
        return None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    net = copy.deepcopy(model).to(device=device).eval()
    if dtype == torch.float64:
        net.to(torch.float64)
    net.load_state_dict(aff.state_dict(0))

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            z = forward(net, x)
            y = y.to(device)
            if loss_fn is not None:  # called as the sweep's metrics call it (lerpfast.metrics.call_loss_fn)
                from lerpfast.metrics import call_loss_fn

                loss = call_loss_fn(loss_fn, z.reshape(-1, z.shape[-1]).double(), y.reshape(-1))
            else:
                zz = z.reshape(-1, z.shape[-1])
                loss = torch.nn.functional.cross_entropy(zz.double(), y.reshape(-1), reduction="none")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    zd = z.detach().double().reshape(-1).cpu()
    w = torch.randn(zd.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    yd = y.detach().reshape(-1).double().cpu()
    return {"loss": float(loss.double().mean()), "logits_sum": float(zd.sum()), "logits_abs": float(zd.abs().sum()),
            "logits_proj": float(zd @ w), "labels_sum": float(yd.sum()),
            "labels_proj": float(yd @ torch.arange(1, yd.numel() + 1, dtype=torch.float64))}


def compare(stored: dict, now: dict) -> list[str]:
    """What differs between a stored probe and a recomputed one (empty when they agree to :data:`RTOL`)."""
    diffs = []
    scale = max(1.0, abs(stored.get("logits_abs", 0.0)))  # sums of signed logits: relative to their magnitude
    for key, a in stored.items():
        b = now.get(key)
        if b is None:
            continue
        if not (math.isfinite(a) and math.isfinite(b)):
            same = (math.isnan(a) and math.isnan(b)) or a == b
        elif key.startswith("labels"):
            same = a == b
        elif key in ("logits_sum", "logits_proj"):
            same = abs(a - b) <= RTOL * scale
        else:
            same = abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12)
        if not same:
            diffs.append(f"{key} {a:.6g} -> {b:.6g}")
    return diffs


def describe(diffs: list[str]) -> str:
    what = []
    keys = " ".join(diffs)
    if "labels" in keys:
        what.append("the data's labels or order")
    if "logits" in keys:
        what.append("the model's code or the data")
    elif "loss" in keys:
        what.append("the loss function")
    return " or ".join(what) or "the model, data or loss"


