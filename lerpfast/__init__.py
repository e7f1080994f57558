"""lerpfast: evaluate a network at K points of weight space in one forward pass."""

from lerpfast._version import __version__

__all__ = ["__version__"]
