"""Slices of weight space: lines, planes, rays and random directions, all in one affine form.

Every slice resolves to an :class:`AffineSlice`: M anchor points, J <= 3 direction tensors per model
tensor, and for each of the K points an anchor index and J coefficients (DESIGN §2)::

    theta_k = anchors[anchor_idx[k]] + sum_j coefs[k, j] * dirs[j]

Anchors keep the defining points bit-exact. A line uses torch.lerp's two-sided formula
(``a + t*(b-a)`` for t < 0.5, ``b + (t-1)*(b-a)`` for t >= 0.5, coefficients computed in the combine
dtype as torch.lerp does), and every corner of a bilinear or barycentric plane is its own anchor.

>>> line = Line(theta_init, theta_final, alphas="-0.5:1.5:81")
>>> plane = Bilinear(t1, t2, t3, t4, alphas="0:1:21", betas="0:1:21")
>>> ray = Ray(theta1, theta0, lambdas="0:40:41")          # Im et al. eq. 1, absolute distance
>>> rnd = RandomDirections(theta_star, xs="-1:1:31", ys="-1:1:31", seed=0)   # Li et al., filter-normalized
>>> curve = Bezier(theta_a, theta_bend, theta_b, ts="0:1:41")   # Garipov et al.'s quadratic curve
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lerpfast.engine.functional import ParamSlice, Points, combine

__all__ = [
    "AffineSlice", "Slice", "Line", "Bilinear", "Barycentric", "Ray", "RandomDirections",
    "TaskVectors", "Soup", "Bezier", "PolyChain", "curve_coefficients", "parse_coords", "as_slice",
]


def parse_coords(values: Any, name: str = "alphas") -> np.ndarray:
    """Coordinates from a list, array, tensor, scalar, or a ``"start:stop:num"`` string (inclusive, like linspace).

    >>> parse_coords("0:1:5")
    array([0.  , 0.25, 0.5 , 0.75, 1.  ])
    """
    if isinstance(values, str):
        parts = values.split(":")
        if len(parts) != 3:
            raise ValueError(f"{name}={values!r}: expected 'start:stop:num', e.g. '0:1:101'")
        try:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError as e:
            raise ValueError(f"{name}={values!r}: expected 'start:stop:num' with numbers, e.g. '-0.5:1.5:81'") from e
        if num < 1:
            raise ValueError(f"{name}={values!r}: num must be >= 1")
        if not (np.isfinite(start) and np.isfinite(stop)):
            raise ValueError(f"{name}={values!r}: start and stop must be finite numbers, e.g. '-0.5:1.5:81'")
        return np.linspace(start, stop, num, dtype=np.float64)
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-d sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: coordinates must be finite, got {arr[~np.isfinite(arr)][:3].tolist()}")
    return arr


@dataclass
class AffineSlice:
    """A resolved slice: per model tensor a :class:`ParamSlice`, plus the K points.

    Attributes
    ----------
    params : dict name -> ParamSlice (floating tensors of the state dict; anchors (M, *S), dirs (J, *S)).
    carried : dict name -> Tensor (integer buffers such as ``num_batches_tracked``: taken from anchor 0).
    anchor_idx : (K,) int64.   coefs : (K, J) in the combine dtype.
    coords : (K, D) user coordinates.   coord_names : their names.   grid_shape : (n_0, n_1) for grids.
    """

    kind: str
    params: dict[str, ParamSlice]
    carried: dict[str, torch.Tensor]
    anchor_idx: torch.Tensor
    coefs: torch.Tensor
    coords: np.ndarray
    coord_names: tuple[str, ...]
    grid_shape: tuple[int, ...] | None = None
    info: dict = field(default_factory=dict)

    @property
    def K(self) -> int:  # noqa: N802
        return int(self.anchor_idx.shape[0])

    @property
    def J(self) -> int:  # noqa: N802
        return int(self.coefs.shape[1])

    def points(self, index: Sequence[int] | torch.Tensor | None = None) -> Points:
        """The :class:`Points` of the given point indices (all by default)."""
        if index is None:
            return Points(self.anchor_idx, self.coefs)
        index = torch.as_tensor(index, dtype=torch.long)
        return Points(self.anchor_idx[index], self.coefs[index])

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Point k as a full state dict (the oracle's path), built with the engine's own formula."""
        pts = self.points([k])
        out = {name: combine(p.anchors, p.dirs, pts.anchor_idx, pts.coefs)[0] for name, p in self.params.items()}
        out.update(self.carried)
        return out

    def nbytes(self) -> int:
        """Bytes held by the slice's tensors (independent of K)."""
        return sum(p.nbytes() for p in self.params.values())

    def to(self, device) -> AffineSlice:
        params = {k: p.to(device) for k, p in self.params.items()}
        return AffineSlice(self.kind, params, {k: v.to(device) for k, v in self.carried.items()},
                           self.anchor_idx, self.coefs, self.coords, self.coord_names, self.grid_shape, self.info)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def _float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def _build(kind: str, anchors: list[dict], dirs: list[dict], anchor_idx, coefs, coords, names, dtype,
           grid_shape=None, info=None) -> AffineSlice:
    keys = _float_keys(anchors[0])
    params = {}
    M = len(anchors)
    for key in keys:
        # anchors and directions back to back in one tensor: a shared-input layer multiplies the data with all of
        # them at once without copying them into a bank first (engine.functional._bank)
        ad = torch.stack([s[key].to(dtype) for s in anchors] + [s[key].to(dtype) for s in dirs])
        params[key] = ParamSlice(ad[:M], ad[M:] if dirs else None)
    carried = {k: v.clone() for k, v in anchors[0].items() if not v.is_floating_point()}  # never aliases a source
    return AffineSlice(kind, params, carried, torch.as_tensor(anchor_idx, dtype=torch.long),
                       torch.as_tensor(coefs).to(dtype).reshape(len(coords), -1), np.asarray(coords, np.float64),
                       tuple(names), grid_shape, dict(info or {}))


def _cast(states: list[dict], dtype) -> list[dict]:
    return [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in s.items()} for s in states]


def _sub(a: dict, b: dict) -> dict:
    """a - b on floating entries (in the combine dtype)."""
    return {k: a[k] - b[k] for k in _float_keys(a)}


def _grid(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(xs)*len(ys), 2) with the first coordinate slowest (C order, like np.meshgrid(indexing='ij'))."""
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


class Slice:
    """Base class of slice specifications: checkpoint sources plus coordinates, resolved against a model."""

    kind = "slice"
    #: checkpoints (modules, state dicts or paths) in the order the slice names them
    sources: list

    def resolve(self, states: list[dict[str, torch.Tensor]], model: nn.Module, dtype: torch.dtype) -> AffineSlice:
        raise NotImplementedError

    def with_default_coords(self, alphas) -> Slice:
        """Fill in coordinates that were left out at construction from ``sweep``'s ``alphas``."""
        return self

    def describe(self) -> dict:
        return {"kind": self.kind}

    def labels(self) -> list[str] | None:
        """Names of the checkpoints for error messages (None: lerpfast.checkpoints' defaults)."""
        return None


class Line(Slice):
    """``theta(a) = (1-a)*theta_a + a*theta_b`` for each alpha (inside or outside [0, 1]); endpoints bit-exact.

    Covers init -> final, solution -> solution, random point -> solution and the zoomed sweeps of
    Goodfellow et al. (e.g. ``alphas="0.99:1:200"``).

    With ``align="weights"`` (or ``"activations"``) theta_b's hidden units are first permuted to match theta_a's
    (:func:`lerpfast.align`, at resolve time, against the sweep's model): the line runs from theta_a to the aligned
    theta_b, which computes theta_b's function. ``align_options`` go to :func:`lerpfast.align` (``seed``,
    ``max_iter``, ``data`` for ``"activations"``, ...). The alignment's summary is in the slice's
    ``info["align"]`` (a sweep's ``meta["slice_info"]``) and the method in ``describe()``; the
    :class:`lerpfast.Alignment` itself in ``self.alignment`` after the sweep.
    """

    kind = "line"

    def __init__(self, theta_a, theta_b, alphas=None, *, align: str | None = None,
                 align_options: dict | None = None):
        self.sources = [theta_a, theta_b]
        self.alphas = None if alphas is None else parse_coords(alphas)
        if align is not None:
            from lerpfast.align import METHODS

            if align not in METHODS:
                raise ValueError(f"Line: align={align!r}: expected None or one of {METHODS}")
            if align == "activations" and (align_options or {}).get("data") is None:
                raise ValueError("Line: align='activations' needs align_options={'data': batches} (e.g. the "
                                 "training set)")
        self.align, self.align_options = align, dict(align_options or {})
        self.alignment = None

    def with_default_coords(self, alphas) -> Line:
        if alphas is not None:
            self.alphas = parse_coords(alphas)
        if self.alphas is None:
            raise ValueError("Line: no alphas given (pass alphas=..., e.g. '0:1:101')")
        return self

    def describe(self) -> dict:
        out = {"kind": self.kind, "alphas": self.alphas.tolist()}
        if self.align is not None:  # (absent without alignment: stores written before it still resume)
            opts = {k: v for k, v in self.align_options.items() if isinstance(v, (int, float, str, bool, type(None)))}
            if "data" in self.align_options:
                from lerpfast.evaluate import _describe_data, as_batches

                opts["data"] = _describe_data(as_batches(self.align_options["data"], 256))
            out["align"] = {"method": self.align, **opts}
        return out

    def resolve(self, states, model, dtype) -> AffineSlice:
        info = None
        if self.align is not None:
            self.alignment = _cached_alignment(model, states, self.align, self.align_options,
                                               self.describe()["align"])
            # the aligned endpoint is theta_b from here on (the caller's list: bn="endpoint:1" reads it)
            states[1] = self.alignment.state_dict
            info = {"align": self.alignment.summary()}
        a, b = _cast(states, dtype)
        t = torch.as_tensor(self.alphas, dtype=torch.float64).to(dtype)  # rounded to the combine dtype first,
        upper = t >= 0.5                                                  # then 1-w in that dtype: torch.lerp's order
        coefs = torch.where(upper, t - 1, t)
        return _build(self.kind, [a, b], [_sub(b, a)], upper.long(), coefs[:, None], self.alphas[:, None],
                      ("alpha",), dtype, info=info)


# Alignments already computed, by (model structure, the two endpoints' sha256, method and options): a re-run of a sweep
# (resume, another data set, another alpha grid) does not align again (ResNet-50: a minute). Digests are cached
# per tensor (lerpfast.checkpoints), so a hit costs no hashing either. lerpfast.clear_caches() empties it.
_ALIGNMENTS: OrderedDict = OrderedDict()
_ALIGNMENTS_SIZE = 4


def _cached_alignment(model: nn.Module, states: list[dict], method: str, options: dict, described: dict):
    import json

    from lerpfast.align import align
    from lerpfast.checkpoints import describe
    from lerpfast.engine.model import structure_key

    key = (structure_key(model), describe(states[0])["sha256"], describe(states[1])["sha256"],
           json.dumps(described, sort_keys=True, default=str))
    hit = _ALIGNMENTS.get(key)
    if hit is None:
        hit = align(model, states[0], states[1], method, **options)
        _ALIGNMENTS[key] = hit
        while len(_ALIGNMENTS) > _ALIGNMENTS_SIZE:
            _ALIGNMENTS.popitem(last=False)
    _ALIGNMENTS.move_to_end(key)
    return hit


def clear_alignment_cache() -> None:
    """Forget the alignments :class:`Line` computed (``align=``)."""
    _ALIGNMENTS.clear()


class Bilinear(Slice):
    """Bilinear surface over four points (Im et al. appendix A.1) on the grid alphas x betas.

    ``theta(a, b) = (1-b)*((1-a)*t1 + a*t2) + b*((1-a)*t3 + a*t4)
                  = t1 + a*(t2-t1) + b*(t3-t1) + a*b*(t1-t2-t3+t4)``; each corner is exact.
    """

    kind = "bilinear"

    def __init__(self, t1, t2, t3, t4, alphas=None, betas=None):
        self.sources = [t1, t2, t3, t4]
        self.alphas = None if alphas is None else parse_coords(alphas)
        self.betas = None if betas is None else parse_coords(betas, "betas")

    def with_default_coords(self, alphas) -> Slice:
        if self.alphas is None:
            if alphas is None:
                raise ValueError(f"{type(self).__name__}: no alphas given")
            self.alphas = parse_coords(alphas)
        if self.betas is None:
            self.betas = self.alphas
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, "alphas": self.alphas.tolist(), "betas": self.betas.tolist()}

    def _corners(self) -> dict[tuple[float, float], int]:
        return {(0.0, 0.0): 0, (1.0, 0.0): 1, (0.0, 1.0): 2, (1.0, 1.0): 3}

    def _coefs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([a, b, a * b], axis=1)

    def _dirs(self, t: list[dict]) -> list[dict]:
        t1, t2, t3, t4 = t
        cross = {k: (t1[k] - t2[k]) - t3[k] + t4[k] for k in _float_keys(t1)}
        return [_sub(t2, t1), _sub(t3, t1), cross]

    def resolve(self, states, model, dtype) -> AffineSlice:
        t = _cast(states, dtype)
        coords = _grid(self.alphas, self.betas)
        coefs = self._coefs(coords[:, 0], coords[:, 1])
        idx = np.zeros(len(coords), dtype=np.int64)
        for (ca, cb), m in self._corners().items():
            hit = (coords[:, 0] == ca) & (coords[:, 1] == cb)
            idx[hit] = m
            coefs[hit] = 0.0
        return _build(self.kind, t, self._dirs(t), idx, torch.from_numpy(coefs), coords, ("alpha", "beta"),
                      dtype, grid_shape=(len(self.alphas), len(self.betas)))


class Barycentric(Bilinear):
    """Plane through three points (Im et al. appendix A.1) on the grid alphas x betas in [0, 1]^2.

    ``theta(a, b) = t0 + a*(b*(t1-t0) + (1-b)*(t2-t0))``: a runs from t0 (a=0) to the edge t2..t1 (a=1),
    b along that edge (b=0: t2, b=1: t1). The three points are exact.
    """

    kind = "barycentric"

    def __init__(self, t0, t1, t2, alphas=None, betas=None):
        self.sources = [t0, t1, t2]
        self.alphas = None if alphas is None else parse_coords(alphas)
        self.betas = None if betas is None else parse_coords(betas, "betas")

    def _corners(self) -> dict[tuple[float, float], int]:
        return {(1.0, 1.0): 1, (1.0, 0.0): 2}

    def _coefs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([b * a, (1 - b) * a], axis=1)

    def _dirs(self, t: list[dict]) -> list[dict]:
        return [_sub(t[1], t[0]), _sub(t[2], t[0])]

    def resolve(self, states, model, dtype) -> AffineSlice:
        out = super().resolve(states, model, dtype)
        zero = np.all(out.coords[:, :1] == 0.0, axis=1)  # a = 0 is t0 whatever b is
        out.coefs[torch.from_numpy(zero)] = 0.0
        return out


def _parameter_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}


class Ray(Slice):
    """Ray of absolute length from theta1 towards theta0 (Im et al. eq. 1):
    ``theta(l) = theta1 + l * (theta0 - theta1) / ||theta0 - theta1||``.

    The norm runs over the model's parameters (buffers excluded); running statistics follow the same
    direction so that ``l = ||theta0 - theta1||`` reaches theta0 in every tensor. ``info['distance']`` holds it.
    """

    kind = "ray"

    def __init__(self, theta1, theta0, lambdas=None):
        self.sources = [theta1, theta0]
        self.lambdas = None if lambdas is None else parse_coords(lambdas, "lambdas")

    def with_default_coords(self, alphas) -> Ray:
        if self.lambdas is None:
            if alphas is None:
                raise ValueError("Ray: no lambdas given")
            self.lambdas = parse_coords(alphas, "lambdas")
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, "lambdas": self.lambdas.tolist()}

    def resolve(self, states, model, dtype) -> AffineSlice:
        t1, t0 = _cast(states, dtype)
        diff = _sub(t0, t1)
        pnames = _parameter_names(model)
        sq = sum(float(diff[k].double().pow(2).sum()) for k in diff if k in pnames)
        dist = float(np.sqrt(sq))
        if dist == 0.0:
            raise ValueError("Ray: theta0 and theta1 are identical, the direction is undefined")
        unit = {k: v / dist for k, v in diff.items()}
        lam = self.lambdas
        return _build(self.kind, [t1], [unit], np.zeros(len(lam), np.int64), torch.from_numpy(lam[:, None].copy()),
                      lam[:, None], ("lambda",), dtype, info={"distance": dist})


class RandomDirections(Slice):
    """Random directions around theta* (Li et al. 2018): one (``ys=None``) or two filter-normalized directions.

    Each direction is Gaussian; with ``filter_normalize`` every filter (slice along dim 0 of a weight with
    >= 2 dims) is rescaled to the norm of the same filter of theta*. Tensors with <= 1 dim (biases, BN
    weights) get a zero direction when ``ignore_bias_bn`` (Li et al.'s default), else are rescaled to
    theta*'s norm. Buffers (running statistics) always get a zero direction. Reproducible from ``seed``.
    """

    kind = "random"

    def __init__(self, center, xs=None, ys=None, *, seed: int = 0, filter_normalize: bool = True,
                 ignore_bias_bn: bool = True):
        self.sources = [center]
        self.xs = None if xs is None else parse_coords(xs, "xs")
        self.ys = None if ys is None else parse_coords(ys, "ys")
        self.seed, self.filter_normalize, self.ignore_bias_bn = seed, filter_normalize, ignore_bias_bn

    def with_default_coords(self, alphas) -> RandomDirections:
        if self.xs is None:
            if alphas is None:
                raise ValueError("RandomDirections: no xs given")
            self.xs = parse_coords(alphas, "xs")
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, "xs": self.xs.tolist(), "ys": None if self.ys is None else self.ys.tolist(),
                "seed": self.seed, "filter_normalize": self.filter_normalize, "ignore_bias_bn": self.ignore_bias_bn}

    def directions(self, center: dict[str, torch.Tensor], model: nn.Module, n: int) -> list[dict]:
        """The n random directions (float32 draws from a seeded CPU generator, in state-dict order)."""
        gen = torch.Generator().manual_seed(self.seed)
        pnames = _parameter_names(model)
        dirs: list[dict] = [{} for _ in range(n)]
        for key in _float_keys(center):
            theta = center[key]
            for j in range(n):
                d = torch.randn(theta.shape, generator=gen, dtype=torch.float32).to(theta.dtype)
                if key not in pnames or (theta.dim() <= 1 and self.ignore_bias_bn):
                    d = torch.zeros_like(theta)
                elif self.filter_normalize and theta.dim() >= 2:
                    dn = d.flatten(1).norm(dim=1)
                    tn = theta.flatten(1).norm(dim=1)
                    d = d * (tn / (dn + 1e-10)).reshape((-1,) + (1,) * (theta.dim() - 1))
                elif self.filter_normalize:
                    d = d * (theta.norm() / (d.norm() + 1e-10))
                dirs[j][key] = d
        return dirs

    def resolve(self, states, model, dtype) -> AffineSlice:
        (c,) = _cast(states, dtype)
        if self.ys is None:
            coords = self.xs[:, None]
            names, grid = ("x",), None
        else:
            coords = _grid(self.xs, self.ys)
            names, grid = ("x", "y"), (len(self.xs), len(self.ys))
        dirs = self.directions(c, model, coords.shape[1])
        return _build(self.kind, [c], dirs, np.zeros(len(coords), np.int64), torch.from_numpy(coords.copy()),
                      coords, names, dtype, grid_shape=grid)


# ----------------------------------------------------------------------------------------------------------------
# Merging: any number of endpoints


def _checkpoint_list(values, name: str) -> list:
    """``values`` as a non-empty list of checkpoints (a single checkpoint is a list of one)."""
    out = list(values) if isinstance(values, (list, tuple)) else [values]
    if not out:
        raise ValueError(f"{name}: expected at least one checkpoint (a module, a state dict or a path), got none")
    return out


def _coef_matrix(values: Any, width: int, name: str, symbol: str, what: str) -> np.ndarray:
    """``values`` as a finite (K, width) float64 array; errors name the argument, the width wanted and the one given."""
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a (K, {symbol}) array of numbers, got {type(values).__name__}") from e
    if arr.ndim != 2:
        one = " (one point is a list of one row: [[...]])" if arr.ndim == 1 else ""
        raise ValueError(f"{name}: expected a (K, {symbol}) = (K, {width}) array, one column per {what} "
                         f"({symbol} = {width}), got a {arr.ndim}-d array of shape {arr.shape}{one}")
    if arr.shape[1] != width or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a (K, {symbol}) array with one column per {what} ({symbol} = {width}) "
                         f"and at least one row, got shape {arr.shape} (width {arr.shape[1]}): give one "
                         f"{name[:-1]} per {what} in each row")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: coordinates must be finite, got {arr[~np.isfinite(arr)][:3].tolist()}")
    return arr


def _one_hot_rows(rows: np.ndarray) -> np.ndarray:
    """(K,) index of the single 1 of each row that is exactly one 1 and zeros elsewhere, else -1."""
    ones, zeros = rows == 1.0, rows == 0.0
    hit = (ones.sum(1) == 1) & ((ones | zeros).all(1))
    return np.where(hit, ones.argmax(1), -1)


def _with_exact_anchors(base: dict, extra: list[dict], hit: np.ndarray, coefs: np.ndarray):
    """Anchors ``[base] + [extra[i] for every i some point hits]`` and each point's anchor index; points that hit a
    checkpoint (``hit[k] = i >= 0``) sit on it with zero coefficients, so they are that checkpoint bit for bit.
    Points with ``hit[k] = -1`` use the base. Only checkpoints that are hit are held as anchors."""
    used = sorted({int(i) for i in hit if i >= 0})
    idx = np.zeros(len(hit), dtype=np.int64)
    coefs = coefs.copy()
    for pos, i in enumerate(used):
        idx[hit == i] = pos + 1
    coefs[hit >= 0] = 0.0
    return [base] + [extra[i] for i in used], idx, coefs


def _source_labels(sources: list, names: list[str]) -> list[str]:
    """Labels for error messages: a path names itself, anything else the argument it was passed in."""
    from lerpfast.checkpoints import _is_path

    return [os.fspath(s) if _is_path(s) else n for s, n in zip(sources, names)]


class TaskVectors(Slice):
    """Task arithmetic (Ilharco et al., ICLR 2023): ``theta_k = pretrained + sum_j lambdas[k, j] * tau_j`` with the
    task vectors ``tau_j = finetuned[j] - pretrained``.

    Parameters
    ----------
    pretrained : a checkpoint (module, state dict or path).
    finetuned : a list of J checkpoints of the same model (J is not capped). A task vector reshaped first (TIES,
        DARE) goes in as the checkpoint ``pretrained + tau``.
    lambdas : a (K, J) array, one row of J scales per point (coordinates ``lambda_0 .. lambda_{J-1}``); or a 1-d
        array or ``"start:stop:num"`` string: one lambda shared by every task (``theta = pretrained +
        lambda * sum_j tau_j``, a single coordinate ``lambda``: it stores and plots like a line). Default:
        ``sweep``'s ``alphas``, as a shared lambda.

    Points whose lambdas are all 0 are ``pretrained``, and points with a single 1 (the rest 0) are that fine-tuned
    checkpoint, bit for bit (with one task, lambda = 1 of a shared lambda too). Values must be finite.

    >>> tv = TaskVectors(theta0, [theta_a, theta_b, theta_c], lambdas="0:1:11")        # one lambda for all tasks
    >>> tv = TaskVectors(theta0, [theta_a, theta_b], lambdas=[[0.3, 0.5], [0.5, 0.5]])   # one lambda per task
    """

    kind = "task_vectors"

    def __init__(self, pretrained, finetuned, lambdas=None):
        finetuned = _checkpoint_list(finetuned, "finetuned")
        self.sources = [pretrained, *finetuned]
        self.J = len(finetuned)
        self.shared = True
        self.lambdas: np.ndarray | None = None
        if lambdas is not None:
            self._set_lambdas(lambdas)

    def _set_lambdas(self, lambdas) -> None:
        shared = isinstance(lambdas, str) or np.ndim(lambdas) <= 1
        if shared:
            self.lambdas = parse_coords(lambdas, "lambdas")
        else:
            self.lambdas = _coef_matrix(lambdas, self.J, "lambdas", "J", "fine-tuned checkpoint")
        self.shared = shared

    def with_default_coords(self, alphas) -> TaskVectors:
        if self.lambdas is None:
            if alphas is None:
                raise ValueError("TaskVectors: no lambdas given (pass lambdas=..., e.g. '0:1:11' for one lambda "
                                 "shared by every task, or a (K, J) array with one lambda per task)")
            self._set_lambdas(alphas)
        return self

    def labels(self) -> list[str]:
        return _source_labels(self.sources, ["pretrained"] + [f"finetuned[{j}]" for j in range(self.J)])

    def describe(self) -> dict:
        return {"kind": self.kind, "J": self.J, "shared_lambda": self.shared, "lambdas": self.lambdas.tolist()}

    def resolve(self, states, model, dtype) -> AffineSlice:
        pre, *fts = _cast(states, dtype)
        if self.shared:
            lam = self.lambdas
            # sum_j tau_j accumulated in float64 and rounded once (with one task: exactly finetuned - pretrained)
            tau = {k: sum(s[k].double() for s in states[1:]).sub_(states[0][k].double() * self.J).to(dtype)
                   for k in _float_keys(pre)}
            hit = np.where(lam == 1.0, 0, -1) if self.J == 1 else np.full(len(lam), -1)
            anchors, idx, coefs = _with_exact_anchors(pre, fts, hit, lam[:, None])
            return _build(self.kind, anchors, [tau], idx, torch.from_numpy(coefs), lam[:, None], ("lambda",), dtype,
                          info={"J": self.J})
        lam = self.lambdas
        anchors, idx, coefs = _with_exact_anchors(pre, fts, _one_hot_rows(lam), lam)
        return _build(self.kind, anchors, [_sub(f, pre) for f in fts], idx, torch.from_numpy(coefs), lam,
                      tuple(f"lambda_{j}" for j in range(self.J)), dtype, info={"J": self.J})


class Soup(Slice):
    """Model soups (Wortsman et al., ICML 2022): ``theta_k = sum_n weights[k, n] * ingredients[n]``.

    Parameters
    ----------
    ingredients : a list of N checkpoints of the same model (modules, state dicts or paths; N is not capped).
    weights : a (K, N) array, one row of N weights per point (coordinates ``w_0 .. w_{N-1}``): ``[1/N] * N`` is
        the uniform soup, a row with a single 1 (the rest 0) is that ingredient, bit for bit. Values must be
        finite. A row that does not sum to 1 is evaluated as the weighted sum it asks for, with one warning (it is
        not a soup, an average of the ingredients).

    Computed as ``ingredients[0] + sum_{n>=1} weights[k, n] * (ingredients[n] - ingredients[0])`` (plus
    ``(sum_n weights[k, n] - 1) * ingredients[0]`` for rows that do not sum to 1): ingredients fine-tuned from one
    model differ little, so the differences keep the rounding small.

    >>> soup = Soup([theta_a, theta_b, theta_c], weights=[[1/3, 1/3, 1/3], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    """

    kind = "soup"

    def __init__(self, ingredients, weights=None):
        ingredients = _checkpoint_list(ingredients, "ingredients")
        self.sources = list(ingredients)
        self.N = len(ingredients)
        self.weights: np.ndarray | None = None
        if weights is not None:
            self.weights = _coef_matrix(weights, self.N, "weights", "N", "ingredient")
            self._warn_sums()

    def _warn_sums(self) -> None:
        sums = self.weights.sum(1)
        off = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
        if len(off):
            i = int(off[0])
            warnings.warn(f"Soup: {len(off)} of {len(sums)} weight rows do not sum to 1 (row {i}: sum {sums[i]:.6g}): "
                          "those points are the weighted sums of the ingredients as given, a linear combination "
                          "that is not a soup (an average, weights summing to 1); divide each row by its sum for "
                          "a soup", UserWarning, stacklevel=3)

    def with_default_coords(self, alphas) -> Soup:
        if self.weights is None:
            raise ValueError(f"Soup: no weights given (pass weights=..., a (K, N) array with one row of N = "
                             f"{self.N} ingredient weights per point, e.g. [[{', '.join(['1/N'] * min(self.N, 3))}"
                             f"{', ...' if self.N > 3 else ''}]] for the uniform soup)")
        return self

    def labels(self) -> list[str]:
        return _source_labels(self.sources, [f"ingredients[{n}]" for n in range(self.N)])

    def describe(self) -> dict:
        return {"kind": self.kind, "N": self.N, "weights": self.weights.tolist()}

    def resolve(self, states, model, dtype) -> AffineSlice:
        ings = _cast(states, dtype)
        w = self.weights
        excess = w.sum(1) - 1.0
        excess[np.abs(excess) <= 1e-12] = 0.0  # summing to 1 up to the rounding of the sum itself
        dirs = [_sub(s, ings[0]) for s in ings[1:]]
        coefs = w[:, 1:]
        if np.any(excess != 0.0) or not dirs:  # ingredient 0 itself as a direction: rows summing to s != 1
            dirs.append({k: ings[0][k] for k in _float_keys(ings[0])})
            coefs = np.concatenate([coefs, excess[:, None]], axis=1)
        hit = _one_hot_rows(w)
        anchors, idx, coefs = _with_exact_anchors(ings[0], ings[1:], np.where(hit >= 1, hit - 1, -1), coefs)
        coefs[hit == 0] = 0.0  # ingredient 0 is the base anchor
        return _build(self.kind, anchors, dirs, idx, torch.from_numpy(coefs), w,
                      tuple(f"w_{n}" for n in range(self.N)), dtype, info={"N": self.N})


# ----------------------------------------------------------------------------------------------------------------
# Curves between solutions (Garipov et al. 2018): a bend point between two endpoints

CURVE_KINDS = ("bezier", "polychain")


def curve_coefficients(kind: str, ts) -> np.ndarray:
    """(T, 3) float64 weights ``(c_a, c_bend, c_b)`` of the curve's point ``c_a*a + c_bend*bend + c_b*b`` at each t.

    ``"bezier"``: ``((1-t)^2, 2t(1-t), t^2)``; ``"polychain"``: ``(1-2t, 2t, 0)`` for t <= 0.5, ``(0, 2-2t, 2t-1)``
    after. Used by :func:`lerpfast.curves.fit_curve` (training) and by the float64 references of the tests; the
    slices :class:`Bezier` and :class:`PolyChain` evaluate the same curves in their anchored form.
    """
    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    if kind == "bezier":
        return np.stack([(1 - t) ** 2, 2 * t * (1 - t), t * t], axis=1)
    if kind == "polychain":
        low = t <= 0.5
        return np.stack([np.where(low, 1 - 2 * t, 0.0), np.where(low, 2 * t, 2 - 2 * t),
                         np.where(low, 0.0, 2 * t - 1)], axis=1)
    raise ValueError(f"kind={kind!r}: expected one of {CURVE_KINDS}")


class _Curve(Slice):
    """A curve through ``theta_a`` (t = 0) and ``theta_b`` (t = 1) shaped by a bend point; coordinate ``t``."""

    def __init__(self, theta_a, theta_bend, theta_b, ts=None):
        self.sources = [theta_a, theta_bend, theta_b]
        self.ts = None if ts is None else parse_coords(ts, "ts")

    def with_default_coords(self, alphas) -> Slice:
        if alphas is not None and self.ts is None:
            self.ts = parse_coords(alphas, "ts")
        if self.ts is None:
            raise ValueError(f"{type(self).__name__}: no ts given (pass ts=..., e.g. '0:1:41')")
        return self

    def labels(self) -> list[str]:
        return _source_labels(self.sources, ["theta_a", "theta_bend", "theta_b"])

    def describe(self) -> dict:
        return {"kind": self.kind, "ts": self.ts.tolist()}


class Bezier(_Curve):
    """Quadratic Bezier curve between two solutions (Garipov et al., NeurIPS 2018, eq. 3):
    ``phi(t) = (1-t)^2 theta_a + 2t(1-t) theta_bend + t^2 theta_b``.

    Parameters
    ----------
    theta_a, theta_bend, theta_b : checkpoints (modules, state dicts or paths); ``theta_bend`` is the control point,
        e.g. trained by :func:`lerpfast.fit_curve`. The curve passes near it, not through it (at t = 0.5 it is
        ``(theta_a + 2 theta_bend + theta_b) / 4``); with the bend at the midpoint the curve is the straight line.
    ts : coordinates ``t`` (list, array, tensor or ``"start:stop:num"``); values outside [0, 1] follow the
        polynomial. Default: ``sweep``'s ``alphas``.

    Resolved as two anchors and two directions ``bend - a`` and ``bend - b``: ``phi(t) = a + (2t - t^2)(bend - a) -
    t^2 (bend - b)`` for t < 0.5 and ``b + (1 - t^2)(bend - b) - (1-t)^2 (bend - a)`` from 0.5 on (coefficients in
    float64, rounded once to the combine dtype), so t = 0 and t = 1 are the endpoints bit for bit and each half is
    computed from its nearer endpoint. Stored and plotted like a line (coordinate ``t``).

    >>> curve = Bezier(theta_a, fit.bend, theta_b, ts="0:1:41")
    >>> res = lerpfast.sweep(model, curve, data=test, bn="recompute", bn_data=train)
    """

    kind = "bezier"

    def resolve(self, states, model, dtype) -> AffineSlice:
        a, bend, b = _cast(states, dtype)
        t = self.ts
        upper = t >= 0.5
        s = 1 - t
        coefs = np.where(upper[:, None], np.stack([-(s * s), 1 - t * t], 1), np.stack([2 * t - t * t, -(t * t)], 1))
        return _build(self.kind, [a, b], [_sub(bend, a), _sub(bend, b)], upper.astype(np.int64),
                      torch.from_numpy(coefs), t[:, None], ("t",), dtype)


class PolyChain(_Curve):
    """Polygonal chain between two solutions through a bend point (Garipov et al., NeurIPS 2018, eq. 2):
    ``theta_a -> theta_bend`` for t in [0, 0.5], ``theta_bend -> theta_b`` for t in [0.5, 1].

    Parameters
    ----------
    theta_a, theta_bend, theta_b : checkpoints (modules, state dicts or paths).
    ts : coordinates ``t``; values outside [0, 1] extend the first or the last segment. Default: ``sweep``'s
        ``alphas``.

    Each segment is a line with torch.lerp's two-sided formula (its nearer end plus a multiple of the segment):
    three anchors, two directions ``bend - a`` and ``b - bend``; t = 0, 0.5 and 1 are ``theta_a``, ``theta_bend``
    and ``theta_b`` bit for bit. Stored and plotted like a line (coordinate ``t``).
    """

    kind = "polychain"

    def resolve(self, states, model, dtype) -> AffineSlice:
        a, bend, b = _cast(states, dtype)
        t = self.ts
        u = np.where(t <= 0.5, 2 * t, 2 * t - 1)  # position along the segment, 0..1
        second = t > 0.5
        near_end = u >= 0.5
        idx = np.where(second, np.where(near_end, 2, 1), np.where(near_end, 1, 0)).astype(np.int64)
        c = np.where(near_end, u - 1, u)
        coefs = np.zeros((len(t), 2))
        coefs[~second, 0] = c[~second]
        coefs[second, 1] = c[second]
        return _build(self.kind, [a, bend, b], [_sub(bend, a), _sub(b, bend)], idx, torch.from_numpy(coefs),
                      t[:, None], ("t",), dtype)


def as_slice(ckpts, alphas) -> Slice:
    """``sweep``'s ``ckpts`` argument as a :class:`Slice`: a Slice as is, or a pair of checkpoints (a line)."""
    if isinstance(ckpts, Slice):
        return ckpts.with_default_coords(alphas)
    if isinstance(ckpts, (list, tuple)) and len(ckpts) == 2:
        return Line(ckpts[0], ckpts[1]).with_default_coords(alphas)
    raise TypeError(
        "ckpts must be a pair (theta_a, theta_b) for a line, or a slice object "
        "(lerpfast.Line, Bilinear, Barycentric, Ray, RandomDirections, TaskVectors, Soup, Bezier, PolyChain); "
        f"got {type(ckpts).__name__}" + (f" of length {len(ckpts)}" if isinstance(ckpts, (list, tuple)) else ""))
