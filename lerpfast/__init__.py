"""lerpfast: evaluate a network at K points of weight space in one forward pass.

>>> import lerpfast
>>> res = lerpfast.sweep(model, (theta_init, theta_final), "0:1:101", (X, y))
>>> res.alphas, res.loss, res.error
"""

from lerpfast._version import __version__
from lerpfast.checkpoints import CheckpointError
from lerpfast.evaluate import sweep
from lerpfast.geometry import Barycentric, Bilinear, Line, RandomDirections, Ray
from lerpfast.result import SweepResult

__all__ = [
    "__version__", "sweep", "SweepResult", "Line", "Bilinear", "Barycentric", "Ray", "RandomDirections",
    "CheckpointError",
]
