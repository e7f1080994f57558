"""The result of a sweep: coordinates, per-point metric arrays and the metadata that reproduces it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SweepResult"]


@dataclass
class SweepResult:
    """Per-point results of one sweep.

    Attributes
    ----------
    kind : "line", "bilinear", "barycentric", "ray", "random", "task_vectors", "soup", "bezier" or "polychain".
    coords : (K, D) user coordinates (alpha; alpha, beta; lambda; x, y; lambda_0..lambda_{J-1}; w_0..w_{N-1}).
    coord_names : names of the D coordinates.
    metrics : name -> (K,) float64 array (NaN where a point is not computed yet).
    meta : JSON-serializable description (slice, checkpoints, BN policy, precision, data, paths, timings).
    grid_shape : (n0, n1) when the points form a grid (C order: first coordinate slowest), else None.
    """

    kind: str
    coords: np.ndarray
    coord_names: tuple[str, ...]
    metrics: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    grid_shape: tuple[int, ...] | None = None

    @property
    def K(self) -> int:  # noqa: N802
        return int(self.coords.shape[0])

    @property
    def alphas(self) -> np.ndarray:
        """The first coordinate (alpha for lines, lambda for rays and shared-lambda task vectors, x for random
        directions)."""
        return self.coords[:, 0]

    @property
    def loss(self) -> np.ndarray:
        return self.metrics["loss"]

    @property
    def error(self) -> np.ndarray:
        return self.metrics["error"]

    def grid(self, metric: str) -> np.ndarray:
        """A metric reshaped to ``grid_shape`` (planes)."""
        if self.grid_shape is None:
            raise ValueError(f"a {self.kind} sweep is not a grid")
        return self.metrics[metric].reshape(self.grid_shape)

    def axes(self) -> tuple[np.ndarray, ...]:
        """The distinct values along each grid axis."""
        if self.grid_shape is None:
            return (self.coords[:, 0],)
        n0, n1 = self.grid_shape
        return self.coords[::n1, 0], self.coords[:n1, 1]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "coords": self.coords.tolist(), "coord_names": list(self.coord_names),
                "metrics": {k: v.tolist() for k, v in self.metrics.items()}, "meta": self.meta,
                "grid_shape": None if self.grid_shape is None else list(self.grid_shape)}

    def __repr__(self) -> str:
        best = ""
        if "loss" in self.metrics and np.isfinite(self.loss).any():
            i = int(np.nanargmin(self.loss))
            best = f", min loss {self.loss[i]:.4g} at {dict(zip(self.coord_names, self.coords[i].round(4)))}"
        return f"SweepResult({self.kind}, K={self.K}, metrics={sorted(self.metrics)}{best})"
