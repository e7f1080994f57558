"""Pruned models (``torch.nn.utils.prune``): the weights move along the slice, the mask stays fixed.

A pruned module keeps ``weight_orig`` (a parameter), ``weight_mask`` (a buffer) and a forward pre-hook that sets
``weight = weight_orig * weight_mask`` before every call: the lottery-ticket setting of Frankle & Carbin's work,
where two sparse networks with the same mask are interpolated. A sweep treats such a model as the plain model it
computes:

* the mask is a buffer that is never interpolated: one mask per pruned tensor, the same at every point;
* every checkpoint's tensor is multiplied by that mask once, and so is every direction of the slice, so that
  point k's weight is ``mask * (anchor + sum_j c_j dir_j)``, exactly the pruned module's ``weight_orig * weight_mask``
  at the interpolated ``weight_orig`` (a 0/1 mask makes the two equal bit for bit), at no cost per point;
* the model is evaluated through a copy without the pruning hooks (the model itself is never modified; the copy
  shares its tensors), so every method (engine, loop, vmap) and every path (kernels, fallback) sees an ordinary
  model.

Checkpoints may be pruned (``weight_orig`` + ``weight_mask`` keys) or dense (``weight``), in any mix, and the model
may be pruned or not: a dense initialization and a trained sparse network give the line between the masked
initialization and the sparse network. The mask of a tensor comes from the checkpoints that carry one; when they
disagree the sweep stops with an error naming the tensor unless ``mask_from`` says whose mask to use; when none
carries one the model's own mask is used.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from lerpfast.checkpoints import CheckpointError, _align_prefixes, default_labels, load_state, match_to_model

__all__ = ["Pruning", "pruned_tensors", "unpruned", "load_pruned"]

_ORIG, _MASK = "_orig", "_mask"


def pruned_tensors(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{"features.0.weight": ("features.0", "weight"), ...}``: every tensor a pruning hook computes."""
    out = {}
    for mname, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                out[f"{mname}.{name}" if mname else name] = (mname, name)
    return out


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(model: nn.Module, found: dict) -> tuple:
    """What a cached unpruned copy depends on: the model's tensor objects and its pruning hooks."""
    tensors = tuple(id(t) for t in itertools.chain(model.parameters(), model.buffers()))
    hooks = tuple((k, id(h)) for k, (m, _) in sorted(found.items())
                  for h in model.get_submodule(m)._forward_pre_hooks.values())
    return tensors + hooks


def unpruned(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``model`` without its pruning hooks, and its masks by state-dict key.

    Returns ``(model, {})`` for a model without pruning. Otherwise a copy in which every pruned tensor is a plain
    parameter holding ``orig * mask`` (its value today) and no ``*_orig`` / ``*_mask`` entries or hooks remain; all
    other parameters and buffers are the model's own tensor objects (shared, not copied: nothing in a sweep writes
    to them). The copy is reused while the model's tensors and hooks are the same objects.
    """
    found = pruned_tensors(model)
    if not found:
        return model, {}
    ident = _identity(model, found)
    cached = _COPIES.get(model)
    if cached is None or cached[0] != ident:
        memo: dict = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        for mname, name in found.values():
            computed = model.get_submodule(mname).__dict__.get(name)
            if computed is not None:  # a non-leaf tensor: deepcopy refuses it; the copy drops it below
                memo[id(computed)] = None
        clone = copy.deepcopy(model, memo)
        for mname, name in found.values():
            module = clone.get_submodule(mname)
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
                    del module._forward_pre_hooks[key]
                    getattr(module, "_forward_pre_hooks_always_called", {}).pop(key, None)
            orig = module._parameters.pop(name + _ORIG)
            module._buffers.pop(name + _MASK)
            module.__dict__.pop(name, None)
            module.register_parameter(name, nn.Parameter(torch.empty_like(orig), requires_grad=orig.requires_grad))
        cached = (ident, clone)
        _COPIES[model] = cached
    clone = cached[1]
    masks = {}
    with torch.no_grad():
        for key, (mname, name) in found.items():
            module = model.get_submodule(mname)
            mask = getattr(module, name + _MASK)
            masks[key] = mask.detach()
            clone.get_submodule(mname)._parameters[name].copy_(getattr(module, name + _ORIG) * mask)
    return clone, masks


@dataclass
class Pruning:
    """The masks a sweep applies: ``masks`` by state-dict key (CPU), ``source`` says where each came from."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.masks)

    def describe(self) -> dict:
        """For ``meta["pruning"]``: per tensor the mask's source and the fraction of weights it removes."""
        return {k: {"mask_from": self.source[k], "sparsity": float(1.0 - m.float().mean())}
                for k, m in self.masks.items()}

    def apply(self, aff) -> None:
        """Multiply the slice's directions of every pruned tensor by its mask (anchors are masked already)."""
        for key, mask in self.masks.items():
            p = aff.params.get(key)
            if p is not None and p.dirs is not None:
                p.dirs.mul_(mask.to(device=p.dirs.device, dtype=p.dirs.dtype))


def _split(state: dict[str, torch.Tensor], bases: set[str]) -> tuple[dict, dict]:
    """A pruned checkpoint's ``X_orig`` / ``X_mask`` pairs as ``X`` (the unmasked tensor) plus ``{X: mask}``."""
    expected = bases | {b + s for b in bases for s in (_ORIG, _MASK)}
    state = _align_prefixes(state, expected)
    masks = {}
    for b in bases:
        if b + _ORIG in state and b + _MASK in state and b not in state:
            state[b] = state.pop(b + _ORIG)
            masks[b] = state.pop(b + _MASK)
    return state, masks


def _check_mask(mask: torch.Tensor, key: str, label: str, shape: torch.Size) -> torch.Tensor:
    where = f"{key}_mask of {label}"
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CheckpointError(f"pruning mask {where}: expected shape {tuple(shape)} (the weight's), got {found}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise CheckpointError(f"pruning mask {where}: a mask holds only 0 and 1, found {bad}")
    return mask


def _choose(key: str, found: list[tuple[int, torch.Tensor]], own: torch.Tensor | None, labels: Sequence[str],
            mask_from) -> tuple[torch.Tensor, str]:
    if mask_from == "model":
        if own is None:
            raise CheckpointError(f"mask_from='model': the model does not prune {key!r}; its mask can only come "
                                  f"from the checkpoints ({', '.join(repr(labels[i]) for i, _ in found)})")
        return own, "model"
    if mask_from is not None:
        for i, m in found:
            if i == mask_from:
                return m, labels[i]
        carriers = ", ".join(f"{i} ({labels[i]!r})" for i, _ in found) or "none"
        raise CheckpointError(f"mask_from={mask_from}: checkpoint {labels[mask_from]!r} carries no pruning mask for "
                              f"{key!r} (checkpoints that do: {carriers}{'; or model' if own is not None else ''})")
    if not found:
        return own, "model"
    i0, m0 = found[0]
    for i, m in found[1:]:
        if not torch.equal(m, m0):
            n = int((m != m0).sum())
            module = key.rsplit(".", 1)[0] if "." in key else "(the model)"
            or_model = ", or mask_from='model'" if own is not None else ""
            raise CheckpointError(
                f"module {module!r}: the pruning masks of {key!r} differ between checkpoints {labels[i0]!r} and "
                f"{labels[i]!r} ({n} of {m.numel()} entries); a mask is not interpolated: pass mask_from=<index of "
                f"the checkpoint whose masks to use> (e.g. mask_from={i0}){or_model} (CLI: --mask-from)")
    return m0, labels[i0] if len(found) == 1 else "all checkpoints"


def load_pruned(sources: Sequence, model: nn.Module, labels: Sequence[str] | None = None, *, copy: bool = True,
                mask_from: int | str | None = None) -> tuple[nn.Module, list[dict[str, torch.Tensor]], Pruning]:
    """:func:`lerpfast.checkpoints.load_checkpoints` for models and checkpoints that may be pruned.

    Returns ``(model, states, pruning)``: the model to evaluate (``model`` itself, or its unpruned copy, see
    :func:`unpruned`), the checkpoints as state dicts of that model with every pruned tensor already multiplied by
    its mask, and the masks (empty when nothing is pruned). ``mask_from`` picks the masks where the checkpoints'
    differ: a checkpoint's index, or ``"model"`` for the model's own.

    Raises
    ------
    CheckpointError
        As ``load_checkpoints``; and masks that differ between checkpoints (naming the module and tensor) without
        ``mask_from``, a ``mask_from`` checkpoint without a mask, a mask that is not 0/1 or has the wrong shape.
    """
    labels = default_labels(sources, labels)
    if mask_from is not None and mask_from != "model":
        n = len(sources)
        if isinstance(mask_from, bool) or not isinstance(mask_from, int) or not -n <= mask_from < n:
            raise ValueError(f"mask_from={mask_from!r}: expected the index of a checkpoint (0..{len(sources) - 1}) "
                             f"or 'model'")
        mask_from %= len(sources)
    net, own = unpruned(model)
    reference = net.state_dict()
    bases = {k for k, v in reference.items() if v.is_floating_point()}
    raw = [_split(load_state(s, label=lab, copy=copy), bases) for s, lab in zip(sources, labels)]
    states = [match_to_model(state, net, label=lab) for (state, _), lab in zip(raw, labels)]
    pruning = Pruning()
    order = {k: i for i, k in enumerate(reference)}
    for key in sorted(set(own).union(*(m for _, m in raw)), key=order.__getitem__):
        found = [(i, _check_mask(m[key], key, labels[i], reference[key].shape))
                 for i, (_, m) in enumerate(raw) if key in m]
        mask, source = _choose(key, found, own.get(key), labels, mask_from)
        pruning.masks[key], pruning.source[key] = mask, source
        for state in states:
            state[key] = state[key] * mask.to(state[key].dtype)  # what the pruning hook computes
    if mask_from is not None and not pruning:
        raise ValueError(f"mask_from={mask_from!r}: neither the model nor the checkpoints are pruned "
                         "(no '*_orig' / '*_mask' tensors, no torch.nn.utils.prune hooks)")
    return net, states, pruning
