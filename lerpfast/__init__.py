"""lerpfast: evaluate a network at K points of weight space in one forward pass.

>>> import lerpfast
>>> res = lerpfast.sweep(model, (theta_init, theta_final), "0:1:101", (X, y))
>>> res.alphas, res.loss, res.error

Names are imported on first use, so ``import lerpfast`` (and the ``lerpfast`` CLI's ``--help``) stays fast.
"""

from importlib import import_module

from lerpfast._version import __version__

__all__ = [
    "__version__", "sweep", "SweepResult", "Line", "Bilinear", "Barycentric", "Ray", "RandomDirections",
    "TaskVectors", "Soup", "Bezier", "PolyChain", "fit_curve", "CheckpointError", "ResultStore", "clear_caches",
    "merge", "analyze_instability", "InstabilityResult", "align", "Alignment", "AlignError",
]

_LAZY = {
    "sweep": "lerpfast.evaluate", "SweepResult": "lerpfast.result", "Line": "lerpfast.geometry",
    "Bilinear": "lerpfast.geometry", "Barycentric": "lerpfast.geometry", "Ray": "lerpfast.geometry",
    "RandomDirections": "lerpfast.geometry", "TaskVectors": "lerpfast.geometry", "Soup": "lerpfast.geometry",
    "Bezier": "lerpfast.geometry", "PolyChain": "lerpfast.geometry", "fit_curve": "lerpfast.curves",
    "CheckpointError": "lerpfast.checkpoints", "ResultStore": "lerpfast.store",
    "clear_caches": "lerpfast.evaluate", "analyze_instability": "lerpfast.instability",
    "InstabilityResult": "lerpfast.instability", "align": "lerpfast.align", "Alignment": "lerpfast.align",
    "AlignError": "lerpfast.align",
}


def __getattr__(name: str):
    if name == "merge":  # the merging workflows (lerpfast.merge.wiseft, greedy_soup, task_arithmetic)
        return import_module("lerpfast.merge")
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lerpfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
