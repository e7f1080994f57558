"""Model-merging workflows, one call each: WiSE-FT, greedy model soups, task arithmetic.

Each workflow evaluates all the candidates of a step in one batched pass (``lerpfast.sweep`` over a
:class:`~lerpfast.Line`, :class:`~lerpfast.Soup` or :class:`~lerpfast.TaskVectors` slice), chooses, and returns a
:class:`MergeResult`: the chosen state dict, every sweep it ran (also written to the HDF5 ``store`` when one is
given, one named sweep per step and data set, so a re-run resumes) and the record of its choices.

>>> r = lerpfast.merge.wiseft(model, zero_shot, fine_tuned, {"id": id_test, "shift": shift_test}, alphas="0:1:11")
>>> r = lerpfast.merge.greedy_soup(model, [sd_0, sd_1, sd_2, sd_3], held_out)
>>> r = lerpfast.merge.task_arithmetic(model, pretrained, [ft_a, ft_b, ft_c], validation, lambdas="0:1:11")
>>> model.load_state_dict(r.state_dict)

Several data sets (WiSE-FT's in-distribution and shifted test sets) are evaluated by one ``sweep(...,
data={name: data, ...})`` call: every set is read once for all K points, the sets one after another, each stored as
its own sweep.

Selection minimizes ``metric`` (``"error"``, i.e. maximizes accuracy, as the papers do; or ``"loss"``); ties go to
the earliest candidate in the order each workflow documents.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lerpfast.geometry import Line, Soup, TaskVectors, _checkpoint_list, _coef_matrix, parse_coords
from lerpfast.result import SweepResult

__all__ = ["MergeResult", "wiseft", "greedy_soup", "task_arithmetic", "plot_wiseft"]

METRICS = ("error", "loss")
# sweep() arguments a workflow sets itself
_OWN = ("ckpts", "alphas", "data", "store", "name", "labels")


@dataclass
class MergeResult:
    """What a merging workflow chose and how.

    Attributes
    ----------
    kind : ``"wiseft"``, ``"greedy_soup"`` or ``"task_arithmetic"``.
    state_dict : the chosen model's state dict (CPU tensors in the checkpoints' dtypes, ordered like the model's),
        computed in float64 from the checkpoints and rounded once; a choice that is one of the checkpoints (alpha 0
        or 1, a soup of one ingredient, all lambdas 0 or a single 1) is that checkpoint bit for bit.
    choice : the chosen coordinates: ``{"alpha": a}``; ``{"ingredients": [i, ...], "weights": [...]}``;
        ``{"lambdas": [l_0, ..., l_{J-1}]}`` (one value per task, also for a shared lambda), plus ``metric`` and
        its ``value`` on the selection data.
    results : sweep name -> :class:`~lerpfast.SweepResult`, in the order they ran (the names used in the store).
    steps : one dict per step of the search (greedy soups, per-task searches): what was tried, the metric of each
        candidate, what was kept.
    meta : the workflow's settings (recipe, search, metric, selection data).
    """

    kind: str
    state_dict: dict[str, torch.Tensor]
    choice: dict[str, Any]
    results: dict[str, SweepResult] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def curves(self, metric: str = "error") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Sweep name -> (first coordinate, ``metric``) of every sweep run (WiSE-FT: alpha -> error per data set)."""
        return {n: (r.alphas, r.metrics[metric]) for n, r in self.results.items() if metric in r.metrics}

    def __repr__(self) -> str:
        what = ", ".join(f"{k}={_short(v)}" for k, v in self.choice.items())
        return f"MergeResult({self.kind}, {what}, {len(self.results)} sweeps)"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_short(x) for x in v[:6]) + ", ...]"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS} (lower is better; 'error' = 1 - accuracy)")
    return metric


def _check_kwargs(sweep_kwargs: dict, workflow: str) -> dict:
    bad = [k for k in sweep_kwargs if k in _OWN]
    if bad:
        raise TypeError(f"{workflow}: {', '.join(bad)} cannot be passed through to sweep (the workflow sets "
                        f"{'it' if len(bad) == 1 else 'them'}: give the data, store and name as {workflow}'s own "
                        "arguments)")
    kw = dict(sweep_kwargs)
    kw.setdefault("reference", None)  # no extra reference point per pass unless asked for
    return kw


def _datasets(datasets, arg: str) -> dict[str, Any]:
    """``datasets`` as an ordered name -> data mapping (a single data set is named ``"data"``)."""
    if isinstance(datasets, Mapping):
        if not datasets:
            raise ValueError(f"{arg}: expected at least one data set, got an empty mapping")
        for k in datasets:
            if not isinstance(k, str) or not k or "/" in k:
                raise ValueError(f"{arg}: data set names must be non-empty strings without '/', got {k!r}")
        return dict(datasets)
    if datasets is None:
        raise ValueError(f"{arg} is required: a data set ((X, y), a Dataset or a loader) or a dict name -> data set")
    return {"data": datasets}


def _sweep_name(name: str, part: str | None) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name={name!r}: expected a non-empty string without '/' (the sweeps' names in the store "
                         "start with it)")
    return name if part is None else f"{name}.{part}"


def _load(model: nn.Module, sources: list, labels: list[str]) -> list[dict[str, torch.Tensor]]:
    from lerpfast.checkpoints import load_checkpoints

    return load_checkpoints(sources, model, labels)


def _combine(states: list[dict[str, torch.Tensor]], coefs: Sequence[float], base: int | None) -> dict:
    """``states[base] + sum_i coefs[i] * (states[i] - states[base])`` (``base`` given) or ``sum_i coefs[i] *
    states[i]`` (``base`` None), in float64, rounded once to each tensor's dtype. Non-floating entries come from
    states[0]. A combination that is one of the states (a single coefficient 1, the rest 0; or all 0 with a base)
    returns that state's tensors, copied."""
    coefs = [float(c) for c in coefs]
    nz = [i for i, c in enumerate(coefs) if c != 0.0]
    exact = None
    if base is not None and not nz:
        exact = base
    elif len(nz) == 1 and coefs[nz[0]] == 1.0:
        exact = nz[0]
    out = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif exact is not None:
            out[k] = states[exact][k].clone()
        elif base is not None:
            b = states[base][k].double()
            acc = b.clone()
            for i in nz:
                acc += coefs[i] * (states[i][k].double() - b)
            out[k] = acc.to(v.dtype)
        else:
            acc = torch.zeros_like(v, dtype=torch.float64)
            for i in nz:
                acc += coefs[i] * states[i][k].double()
            out[k] = acc.to(v.dtype)
    return out


def _argmin(values: np.ndarray, what: str) -> int:
    """Index of the smallest value (the first of ties); NaN values never win."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).any():
        raise RuntimeError(f"{what}: every candidate's metric is NaN or infinite; nothing to choose")
    return int(np.nanargmin(np.where(np.isfinite(v), v, np.nan)))


# ----------------------------------------------------------------------------------------------------------------
# WiSE-FT


def wiseft(model: nn.Module, zero_shot, fine_tuned, datasets, alphas="0:1:11", *, select: str | float | None = None,
           metric: str = "error", store=None, name: str = "wiseft", **sweep_kwargs) -> MergeResult:
    """WiSE-FT (Wortsman et al., CVPR 2022): the weight-space ensemble ``(1 - alpha) * zero_shot + alpha *
    fine_tuned`` at every alpha, on every data set, one pass per data set for all alphas.

    Parameters
    ----------
    model : the network (never modified).
    zero_shot, fine_tuned : checkpoints (modules, state dicts or paths) of ``model``.
    datasets : a dict name -> data (each an (X, y) pair, a Dataset or a re-iterable of batches), e.g. the
        in-distribution test set and shifted test sets; or a single data set (named ``"data"``).
    alphas : the mixing coefficients (list, array or ``"start:stop:num"``); the paper's grid is ``"0:1:11"``.
    select : how alpha is chosen: the name of the data set whose ``metric`` is minimized (default: the first of
        ``datasets``; ties go to the smallest alpha), or a number: that fixed alpha (the paper's alpha = 0.5 when
        no held-out data is used for the choice).
    metric : ``"error"`` (default) or ``"loss"``.
    store, name : an HDF5 result file (path or ``ResultStore``) and the prefix of the sweeps' names: data set
        ``d`` is stored as ``"{name}.{d}"``. Re-running resumes.
    **sweep_kwargs : passed to :func:`lerpfast.sweep` (``precision``, ``batch_size``, ``device``, ``bn``,
        ``loss_fn``, ``output``, ``method``, ``points_per_pass``, ``reference`` (default None here), ...).

    Returns
    -------
    MergeResult with ``choice = {"alpha", "metric", "value"}`` and one sweep per data set in ``results`` (its
    curve against alpha; :func:`plot_wiseft` draws the curves and WiSE-FT's Fig. 1, ID against shift).
    """
    from lerpfast.evaluate import sweep

    metric = _check_metric(metric)
    sets = _datasets(datasets, "datasets")
    kw = _check_kwargs(sweep_kwargs, "wiseft")
    grid = parse_coords(alphas, "alphas")
    fixed = None
    if select is None:
        select = next(iter(sets))
    if isinstance(select, (int, float, np.floating)) and not isinstance(select, bool):
        fixed = float(select)
        if not math.isfinite(fixed):
            raise ValueError(f"select={select!r}: a fixed alpha must be a finite number")
    elif select not in sets:
        raise ValueError(f"select={select!r}: not one of the data sets ({', '.join(map(repr, sets))}); give the name "
                         "of the data set alpha is chosen on, or a number (a fixed alpha)")
    per_set = sweep(model, Line(zero_shot, fine_tuned, grid), data=sets, store=store, name=_sweep_name(name, None),
                    labels=["zero_shot", "fine_tuned"], **kw)
    results = {_sweep_name(name, d): r for d, r in per_set.items()}
    if fixed is None:
        sel = results[_sweep_name(name, select)]
        i = _argmin(sel.metrics[metric], f"wiseft: data set {select!r}")
        alpha, value = float(grid[i]), float(sel.metrics[metric][i])
    else:
        alpha, value = fixed, None  # the value on the first data set where the fixed alpha is on the grid
        hit = np.flatnonzero(grid == fixed)
        if len(hit):
            value = float(results[_sweep_name(name, next(iter(sets)))].metrics[metric][hit[0]])
    za, ft = _load(model, [zero_shot, fine_tuned], ["zero_shot", "fine_tuned"])
    state = _combine([za, ft], [0.0, alpha], base=0)
    choice = {"alpha": alpha, "metric": metric, "value": value}
    meta = {"alphas": grid.tolist(), "select": select, "datasets": list(sets), "metric": metric,
            "sweeps": {d: _sweep_name(name, d) for d in sets}}
    return MergeResult("wiseft", state, choice, results, [], meta)


def plot_wiseft(result: MergeResult, metric: str = "error", *, id: str | None = None,  # noqa: A002
                shift: Sequence[str] | None = None, title: str | None = None):
    """Figures of a :func:`wiseft` result: (1) accuracy (or loss) of every data set against alpha; (2) WiSE-FT's
    Fig. 1: in-distribution accuracy (x) against the mean accuracy of the shifted sets (y), one marker per alpha,
    the endpoints labelled. ``id`` names the in-distribution set (default: the first), ``shift`` the others (default:
    all the rest). With ``metric="error"`` accuracy (1 - error) is drawn. Returns the matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    if result.kind != "wiseft":
        raise ValueError(f"plot_wiseft: expected the result of lerpfast.merge.wiseft, got a {result.kind} result")
    names = list(result.meta["datasets"])
    curves = {d: result.results[result.meta["sweeps"][d]] for d in names}
    id = id or names[0]
    shift = list(shift) if shift is not None else [d for d in names if d != id]
    for d in [id, *shift]:
        if d not in curves:
            raise ValueError(f"plot_wiseft: no data set {d!r} in the result (data sets: {', '.join(names)})")
    acc = metric == "error"

    def val(r):
        v = np.asarray(r.metrics[metric], dtype=np.float64)
        return 1.0 - v if acc else v

    ylabel = "accuracy" if acc else metric
    fig = Figure(figsize=(10, 4) if shift else (5, 4))
    ax = fig.add_subplot(1, 2 if shift else 1, 1)
    for d, r in curves.items():
        ax.plot(r.alphas, val(r), marker="o", ms=3, label=d)
    ax.axvline(result.choice["alpha"], color="0.6", ls=":", lw=1)
    ax.set_xlabel("alpha (0: zero-shot / pre-trained, 1: fine-tuned)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title("per data set")
    if shift:
        ax2 = fig.add_subplot(1, 2, 2)
        x = val(curves[id])
        y = np.mean([val(curves[d]) for d in shift], axis=0)
        alphas = curves[id].alphas
        sc = ax2.scatter(x, y, c=alphas, cmap="viridis", s=18, zorder=3)
        ax2.plot(x, y, color="0.7", lw=1, zorder=2)
        for i, dx, ha in ((0, 6, "left"), (len(alphas) - 1, -6, "right")):  # inside the axes at either end
            ax2.annotate(f"alpha={alphas[i]:g}", (x[i], y[i]), fontsize=8, xytext=(dx, 6), textcoords="offset points",
                         ha=ha)
        fig.colorbar(sc, ax=ax2, label="alpha")
        ax2.set_xlabel(f"{id} {ylabel}")
        ax2.set_ylabel(f"mean {ylabel} of {', '.join(shift)}")
        ax2.set_title("in-distribution against shift (WiSE-FT Fig. 1)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Greedy soup


RECIPES = ("greedy", "forward")


def greedy_soup(model: nn.Module, ingredients, held_out, *, recipe: str = "greedy", metric: str = "error",
                store=None, name: str = "soup", **sweep_kwargs) -> MergeResult:
    """Greedy model soup (Wortsman et al., ICML 2022, Algorithm 1), or forward selection over the ingredients.

    The recipe implemented (``recipe="greedy"``, the paper's):

    1. evaluate every ingredient on ``held_out`` (one pass, N points) and sort them by held-out accuracy, best first
       (lower ``metric``; ties keep the order given);
    2. the soup starts as the best ingredient; for each next ingredient in that order, evaluate the uniform average
       of the soup's ingredients plus this one, and add it to the soup if the held-out accuracy does not drop
       (``metric`` of the new average <= the soup's), else leave it out;
    3. the result is the uniform average of the soup's ingredients.

    Each step of the recipe depends on the previous one, so it evaluates one candidate per pass (N - 1 passes of
    one point after the first pass of N). ``recipe="forward"`` (forward selection) instead tries every remaining
    ingredient at each step, all in one pass: the candidate averages soup + {i} for every i not yet in the soup
    (K = the number remaining), adds the best one (ties: the better-ranked ingredient) if it does not drop the
    held-out accuracy, and stops when the best one would, or when every ingredient is in.

    Parameters
    ----------
    model : the network (never modified).
    ingredients : a list of N checkpoints of ``model`` (modules, state dicts or paths), e.g. fine-tunes with
        different hyper-parameters from one pre-trained model.
    held_out : the held-out data (an (X, y) pair, a Dataset or a loader): not the test set.
    recipe : ``"greedy"`` (the paper's) or ``"forward"``.
    metric : ``"error"`` (default: accuracy, as in the paper) or ``"loss"``.
    store, name : HDF5 result file and prefix of the sweeps' names: ``"{name}.ingredients"``, then
        ``"{name}.step1"``, ``"{name}.step2"``, ... (one per pass). Re-running with the same data resumes.
    **sweep_kwargs : passed to :func:`lerpfast.sweep` (``precision``, ``batch_size``, ``device``, ``bn``, ...).

    Returns
    -------
    MergeResult with ``choice = {"ingredients": [indices into ingredients, in the order added], "weights": (N,)
    uniform weights over them, "metric", "value"}``, ``steps`` (per pass: the candidates tried, their metric,
    the one kept or none) and ``meta["ranking"]`` (ingredients, best first) and ``meta["individual"]``.
    """
    from lerpfast.evaluate import sweep

    metric = _check_metric(metric)
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {RECIPES} ('greedy': the paper's recipe, one "
                         "candidate per step; 'forward': every remaining ingredient tried in one pass per step)")
    kw = _check_kwargs(sweep_kwargs, "greedy_soup")
    ings = _checkpoint_list(ingredients, "ingredients")
    N = len(ings)
    labels = Soup(ings).labels()
    results: dict[str, SweepResult] = {}
    steps: list[dict] = []

    def evaluate(rows: list[list[int]], part: str) -> np.ndarray:
        w = np.zeros((len(rows), N))
        for r, members in enumerate(rows):
            w[r, members] = 1.0 / len(members)
        sname = _sweep_name(name, part)
        res = sweep(model, Soup(ings, w), data=held_out, store=store, name=sname, labels=labels, **kw)
        results[sname] = res
        return np.asarray(res.metrics[metric], dtype=np.float64)

    individual = evaluate([[n] for n in range(N)], "ingredients")
    if not np.isfinite(individual).any():
        raise RuntimeError(f"greedy_soup: every ingredient's held-out {metric} is NaN or infinite")
    key = np.where(np.isfinite(individual), individual, np.inf)
    ranking = [int(i) for i in np.argsort(key, kind="stable")]
    soup, current = [ranking[0]], float(individual[ranking[0]])
    steps.append({"step": 0, "tried": [[i] for i in ranking], "values": [float(individual[i]) for i in ranking],
                  "added": ranking[0], "soup": list(soup), "value": current})
    if recipe == "greedy":
        for s, i in enumerate(ranking[1:], start=1):
            tried = [soup + [i]]
            (v,) = evaluate(tried, f"step{s}")
            added = bool(v <= current)  # held-out accuracy did not drop (NaN never adds)
            if added:
                soup, current = soup + [i], float(v)
            steps.append({"step": s, "tried": tried, "values": [float(v)],
                          "added": i if added else None, "soup": list(soup), "value": current})
    else:
        remaining = ranking[1:]
        s = 0
        while remaining:
            s += 1
            vals = evaluate([soup + [i] for i in remaining], f"step{s}")
            b = int(np.argmin(np.where(np.isfinite(vals), vals, np.inf)))
            added = bool(vals[b] <= current)
            tried = [soup + [i] for i in remaining]
            if added:
                soup, current = soup + [remaining[b]], float(vals[b])
            steps.append({"step": s, "tried": tried, "values": vals.tolist(),
                          "added": remaining[b] if added else None, "soup": list(soup), "value": current})
            if not added:
                break
            remaining = remaining[:b] + remaining[b + 1:]
    states = _load(model, ings, labels)
    weights = np.zeros(N)
    weights[soup] = 1.0 / len(soup)
    state = _combine(states, weights.tolist(), base=None)  # a soup of one: that ingredient, bit for bit
    choice = {"ingredients": list(soup), "weights": weights.tolist(), "metric": metric, "value": current}
    meta = {"recipe": recipe, "metric": metric, "ranking": ranking, "individual": individual.tolist(), "N": N}
    return MergeResult("greedy_soup", state, choice, results, steps, meta)


# ----------------------------------------------------------------------------------------------------------------
# Task arithmetic


SEARCHES = ("shared", "grid", "coordinate")


def task_arithmetic(model: nn.Module, pretrained, finetuned, validation, lambdas="0:1:11", *,
                    search: str | None = None, metric: str = "error", max_points: int = 4096,
                    max_rounds: int = 20, store=None, name: str = "task_arithmetic", **sweep_kwargs) -> MergeResult:
    """Task arithmetic (Ilharco et al., ICLR 2023): ``theta = pretrained + sum_j lambda_j tau_j`` with task vectors
    ``tau_j = finetuned[j] - pretrained``, the lambdas chosen on validation data.

    Searches (every step's candidates in one pass):

    * ``"shared"`` (default for a 1-d ``lambdas``; the paper's): one lambda for every task, each value of
      ``lambdas`` tried (the paper's grid is 0, 0.05, ..., 1: ``"0:1:21"``); one pass.
    * ``"grid"``: one lambda per task, every combination of the values of ``lambdas`` (``len(lambdas) ** J``
      points, at most ``max_points``); one sweep.
    * ``"coordinate"``: one lambda per task by coordinate search: start at the best shared lambda (one pass), then
      each round evaluates, in one pass, every point that changes one task's lambda to another value of
      ``lambdas`` (J x (len(lambdas) - 1) candidates) and moves to the best if it strictly improves ``metric``;
      stops when none does, or after ``max_rounds`` rounds.
    * a (K, J) ``lambdas`` array (read from a file, say): exactly those K points, one pass.

    Parameters
    ----------
    model : the network (never modified).
    pretrained : checkpoint of the pre-trained model; finetuned : a list of J checkpoints fine-tuned from it (a
        TIES- or DARE-processed task vector goes in as the checkpoint ``pretrained + tau``).
    validation : the data lambda is chosen on (an (X, y) pair, a Dataset or a loader).
    lambdas : the values tried: a 1-d array or ``"start:stop:num"``, or a (K, J) array of points.
    search : ``"shared"``, ``"grid"`` or ``"coordinate"`` (default: ``"shared"``; with a (K, J) ``lambdas``
        nothing else is allowed).
    metric : ``"error"`` (default) or ``"loss"``; ties go to the earliest point (smallest shared lambda; grid in
        C order; the first task's change first).
    max_points, max_rounds : bounds of the grid and of the coordinate search.
    store, name : HDF5 result file and the sweeps' names: ``name`` (shared, grid or given points), then
        ``"{name}.round1"``, ... for the coordinate search. Re-running resumes.
    **sweep_kwargs : passed to :func:`lerpfast.sweep`.

    Returns
    -------
    MergeResult with ``choice = {"lambdas": [one per task], "metric", "value"}``; ``steps`` records every pass.
    """
    from lerpfast.evaluate import sweep

    metric = _check_metric(metric)
    kw = _check_kwargs(sweep_kwargs, "task_arithmetic")
    fts = _checkpoint_list(finetuned, "finetuned")
    J = len(fts)
    matrix = not isinstance(lambdas, str) and np.ndim(lambdas) == 2
    if matrix:
        if search not in (None, "matrix"):
            raise ValueError(f"search={search!r} with a (K, J) lambdas array: the array lists the points to try; "
                             "give a 1-d lambdas (values) for a search")
        pts = _coef_matrix(lambdas, J, "lambdas", "J", "fine-tuned checkpoint")
        search = "matrix"
    else:
        search = search or "shared"
        if search not in SEARCHES:
            raise ValueError(f"search={search!r}: expected one of {SEARCHES}")
        values = parse_coords(lambdas, "lambdas")
    labels = TaskVectors(pretrained, fts).labels()
    results: dict[str, SweepResult] = {}
    steps: list[dict] = []

    def evaluate(spec: TaskVectors, part: str | None) -> np.ndarray:
        sname = _sweep_name(name, part)
        res = sweep(model, spec, data=validation, store=store, name=sname, labels=labels, **kw)
        results[sname] = res
        return np.asarray(res.metrics[metric], dtype=np.float64)

    if search == "shared":
        vals = evaluate(TaskVectors(pretrained, fts, values), None)
        i = _argmin(vals, "task_arithmetic")
        best, current = np.full(J, values[i]), float(vals[i])
        steps.append({"step": 0, "tried": values.tolist(), "values": vals.tolist(), "chosen": best.tolist()})
    elif search in ("grid", "matrix"):
        if search == "grid":
            n = len(values) ** J
            if n > max_points:
                raise ValueError(f"lambdas: a grid of {len(values)} values over J = {J} tasks is {n} points, more than "
                                 f"max_points={max_points}; use search='coordinate', fewer values, or raise "
                                 "max_points")
            pts = np.array(list(itertools.product(values, repeat=J)), dtype=np.float64).reshape(-1, J)
        vals = evaluate(TaskVectors(pretrained, fts, pts), None)
        i = _argmin(vals, "task_arithmetic")
        best, current = pts[i].copy(), float(vals[i])
        steps.append({"step": 0, "tried": pts.tolist(), "values": vals.tolist(), "chosen": best.tolist()})
    else:  # coordinate
        vals = evaluate(TaskVectors(pretrained, fts, values), "shared")
        i = _argmin(vals, "task_arithmetic")
        best, current = np.full(J, values[i]), float(vals[i])
        steps.append({"step": 0, "tried": values.tolist(), "values": vals.tolist(), "chosen": best.tolist()})
        for r in range(1, max_rounds + 1):
            cands = []
            for j in range(J):
                for v in values:
                    if v != best[j]:
                        c = best.copy()
                        c[j] = v
                        cands.append(c)
            if not cands:
                break
            cands = np.stack(cands)
            vals = evaluate(TaskVectors(pretrained, fts, cands), f"round{r}")
            b = int(np.argmin(np.where(np.isfinite(vals), vals, np.inf)))
            moved = bool(vals[b] < current)
            if moved:
                best, current = cands[b].copy(), float(vals[b])
            steps.append({"step": r, "tried": cands.tolist(), "values": vals.tolist(), "chosen": best.tolist(),
                          "moved": moved})
            if not moved:
                break
    pre, *ft_states = _load(model, [pretrained, *fts], labels)
    state = _combine([pre, *ft_states], [0.0, *best.tolist()], base=0)
    choice = {"lambdas": best.tolist(), "metric": metric, "value": current}
    meta = {"search": search, "metric": metric, "J": J,
            "lambdas": pts.tolist() if search == "matrix" else values.tolist()}
    return MergeResult("task_arithmetic", state, choice, results, steps, meta)
