"""What every paper's reproduction shares: settings, the run context, claims and the summary.

A paper module (``goodfellow``, ``frankle``, ``im``) has a ``TITLE``, a ``DEFAULTS`` dict (``model``; optionally
``dataset``, the full run's data set when installed) and a function
``run(ctx: Context) -> None`` that trains what it needs with :meth:`Context.train`, sweeps with
:meth:`Context.sweep`, draws with :meth:`Context.figure`, records each checked statement of the paper with
:meth:`Context.claim` and each finding of its own that the paper does not state with :meth:`Context.observe`.
:func:`lerpfast.reproduce.reproduce` then writes ``summary.md`` (the claims table, then the observations, which
are not counted as agreement) and ``summary.json`` next to ``results.h5`` and ``figs/``.

A paper module also has ``REFERENCES``, the identifiers of its paper's real sections, figures and tables (taken
from the texts in ``../shared/papers``); every claim's ``source`` cites some of them and nothing else
(:func:`references` reads them out of a source string, :func:`check_sources` checks a table).

Everything is resumable for free: training runs live in ``<out>/runs`` under the hash of their
hyper-parameters (a finished run is skipped, an interrupted one resumes) and every sweep is a named entry of
``<out>/results.h5`` (a complete sweep is read back, an interrupted one computes only its missing points), so
re-running a reproduction redoes only the analysis and the figures.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Claim", "Settings", "Context", "fmt", "fmt_pm", "threads", "default_threads", "references",
           "check_sources"]


@dataclass
class Claim:
    """One statement of a paper, checked on our data.

    Attributes
    ----------
    claim : the paper's statement, quoted or in a few words ("the init -> final line decreases monotonically").
    source : where the paper makes it, with the paper's own identifiers ("§4, Fig. 3", "App. B", "Table 1").
        For an observation (:meth:`Context.observe`): what it relates to, or "ours".
    ours : our number(s), formatted, with what they are ("max increase 0.000 +- 0.000 (3 replicates)").
    agrees : True / False; None when the claim cannot be checked in our setting (the note says why). For an
        observation: whether it holds.
    note : where our setting differs (data, model size, training length), and how the paper's words became the
        criterion (which threshold stands for "sharp", "slight", "flat").
    values : the raw numbers behind ``ours`` (for tests and for summary.json).
    """

    claim: str
    source: str
    ours: str
    agrees: bool | None
    note: str = ""
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class Settings:
    """What a reproduction runs on; ``dataset`` and ``model`` are resolved (never ``None``) by then."""

    paper: str
    out: Path
    dataset: str
    model: str
    quick: bool = False
    device: str = "cpu"
    threads: int = 1
    progress: bool = False
    command: str = ""


# A paper's own identifiers inside a source string: "§4.1", "Fig. 5", "Figs. 2-3", "Fig. 4c/4d", "Table 1",
# "App. B", "App. A.5", "eq. 1", "abstract".
_REF = re.compile(r"§\s?(\d+(?:\.\d+)*)|\bFigs?\.\s?(\d+)[a-d]?(?:\s?(?:-|–|/|,|and)\s?(\d+)[a-d]?)*"
                  r"|\bTables?\s(\d+)(?:\s?(?:-|–|,|and)\s?(\d+))*|\bApp\.\s?([A-Z](?:\.\d+)*)|\beq\.\s?(\d+(?:\.\d+)?)"
                  r"|\b(abstract)\b")


def references(source: str) -> list[str]:
    """The paper identifiers a claim's ``source`` cites, normalized: ``"§4.1"``, ``"Fig. 5"``, ``"Table 1"``,
    ``"App. B"``, ``"eq. 1"``, ``"abstract"``. Ranges and lists ("Figs. 2-3", "Figs. 9, 10", "Fig. 4c/4d") give
    every figure they name."""
    out: list[str] = []
    for m in _REF.finditer(source):
        sec, fig, _, tab, _, app, eq, abstract = m.groups()
        if sec:
            out.append(f"§{sec}")
        elif fig or tab:
            kind, nums = ("Fig.", fig) if fig else ("Table", tab)
            found = [int(n) for n in re.findall(r"(\d+)", m.group(0))]
            if re.search(r"\d[a-d]?\s?(?:-|–)\s?\d", m.group(0)) and len(found) == 2:
                found = list(range(found[0], found[1] + 1))
            out += [f"{kind} {n}" for n in found]
        elif app:
            out.append(f"App. {app}")
        elif eq:
            out.append(f"eq. {eq}")
        elif abstract:
            out.append("abstract")
    return out


def check_sources(claims, known) -> list[str]:
    """Problems with a claims table's sources: a row that cites none of ``known`` (a paper module's
    ``REFERENCES``), or cites an identifier the paper does not have. Empty when every row is right."""
    known = set(known)
    problems = []
    for c in claims:
        source = c["source"] if isinstance(c, dict) else c.source
        refs = references(source)
        if not refs:
            problems.append(f"{source!r} cites no section, figure or table of the paper")
        problems += [f"{source!r} cites {r!r}, which the paper does not have" for r in refs if r not in known]
    return problems


def fmt(x: float, digits: int = 4) -> str:
    """A number for the claims table: fixed point for ordinary sizes, scientific for tiny or huge ones."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    ax = abs(x)
    if ax != 0 and (ax < 10 ** -(digits - 1) or ax >= 1e5):
        return f"{x:.{max(1, digits - 2)}e}"
    return f"{x:.{digits}f}"


def fmt_pm(mean: float, std: float, digits: int = 4) -> str:
    """``mean +- std``."""
    return f"{fmt(mean, digits)} +- {fmt(std, digits)}"


class Context:
    """The state of one reproduction run: settings, the store, stage timings, figures and claims."""

    def __init__(self, settings: Settings, log=print):
        self.s = settings
        self.log = log
        self.out = Path(settings.out)
        self.runs_dir = self.out / "runs"
        self.figs_dir = self.out / "figs"
        self.store_path = self.out / "results.h5"
        self.claims: list[Claim] = []
        self.observations: list[Claim] = []  # our own findings beyond the paper: reported, never counted
        self.figures: list[tuple[str, Path]] = []  # (caption, path)
        self.notes: list[str] = []
        self.stages: list[tuple[str, float]] = []  # (name, seconds)
        self.facts: dict[str, Any] = {}  # extra key figures for summary.json (final test error, ...)
        self._store = None
        self._data: dict[tuple, Any] = {}
        self.rank, self.world = _rank_world()
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the context was made (the run's start), for progress lines."""
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def is_writer(self) -> bool:
        """Rank 0 (or the only process): writes the store, the figures and the summary."""
        return self.rank == 0

    @property
    def store(self):
        """The reproduction's :class:`~lerpfast.store.ResultStore` (opened on rank 0 at first use; None elsewhere)."""
        if self._store is None and self.is_writer:
            from lerpfast.store import ResultStore

            self._store = ResultStore(self.store_path)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Any]:
        """Time a stage and show a progress bar over its ``total`` steps (``bar.update()`` per step)."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=f"{self.s.paper}: {name}", unit="step", leave=False, file=sys.stderr,
                   disable=not (self.s.progress and self.is_writer))
        try:
            yield bar
        finally:
            bar.close()
            dt = time.perf_counter() - t0
            self.stages.append((name, dt))
            self.log(f"  {name}: {dt:.1f}s")

    # ------------------------------------------------------------------------------------------ work

    def train(self, data=None, **config) -> Path:
        """Train (or resume, or skip when finished) a run; returns its directory.

        ``config`` are :class:`lerpfast.train.TrainConfig` fields; ``out_dir`` and ``device`` are the
        reproduction's. ``data`` is passed to :func:`lerpfast.train.train` (e.g. ``((x, y), (x_test, y_test))``
        tensors with regression targets for a deep linear net); the run's hash does not see it, so give such a
        run a config of its own. Under torchrun, rank 0 trains and the other ranks wait for it.
        """
        from lerpfast.train import TrainConfig, train

        cfg = TrainConfig(**{"out_dir": str(self.runs_dir), "device": self.s.device, "evaluate": "end", **config})
        run_dir = self.runs_dir / cfg.run_name()
        # A finished run is skipped without loading its data (0.2-0.4 s each: a re-run of Im et al.'s 30 runs).
        # Every rank sees the same files, so under torchrun all ranks skip together and no barrier is left unpaired.
        if all((run_dir / f"replicate_{r}" / "summary.json").exists() for r in range(cfg.replicates)):
            return run_dir
        if self.world > 1:
            import torch.distributed as dist

            if self.is_writer:
                train(cfg, progress=False, data=data)
            dist.barrier()
            return run_dir
        return train(cfg, progress=False, data=data)

    def data(self, split: str = "test", *, limit: int | None = None, batch_size: int = 1000,
             dataset: str | None = None):
        """A (cached) evaluation loader of the reproduction's data set, on its device."""
        import lerpfast.data as ld

        key = (dataset or self.s.dataset, split, limit, batch_size)
        if key not in self._data:
            self._data[key] = ld.load(key[0], split, device=self.s.device, batch_size=batch_size, limit=limit)
        return self._data[key]

    def sweep(self, name: str, model, ckpts, alphas=None, data=None, **kw):
        """:func:`lerpfast.sweep` into the reproduction's store under ``name`` (resumes; instant when complete)."""
        import lerpfast

        kw.setdefault("progress", False)
        # every rank passes a store (sweep opens it on rank 0 only and broadcasts what was stored to the others)
        store = self.store if self.is_writer else self.store_path
        return lerpfast.sweep(model, ckpts, alphas, data if data is not None else self.data(), store=store,
                              name=name, **kw)

    def figure(self, fig, name: str, caption: str) -> Path | None:
        """Save a matplotlib figure as ``figs/<name>.png`` and list it in the summary."""
        if not self.is_writer:
            return None
        from lerpfast.plot import save

        path = save(fig, self.figs_dir / name, ("png",), dpi=110)[0]
        self.figures.append((caption, path))
        return path

    def claim(self, claim: str, source: str, ours: str, agrees: bool | None, note: str = "",
              **values: float) -> Claim:
        """Record one checked statement of the paper (see :class:`Claim`)."""
        c = Claim(claim, source, ours, None if agrees is None else bool(agrees), note,
                  {k: float(v) for k, v in values.items()})
        self.claims.append(c)
        return c

    def observe(self, text: str, relates: str, ours: str, holds: bool | None, note: str = "",
                **values: float) -> Claim:
        """Record a finding of ours that the paper does not state (e.g. the polynomial degree of the deep linear
        line): it goes to the summary's "Observations" list and never into the claims' tally.

        ``relates`` says what in the paper (or "ours") it relates to; ``holds`` whether our numbers show it."""
        c = Claim(text, relates, ours, None if holds is None else bool(holds), note,
                  {k: float(v) for k, v in values.items()})
        self.observations.append(c)
        return c

    def note(self, text: str) -> None:
        """A remark for the summary's notes section (e.g. where the setting differs from the paper's)."""
        self.notes.append(text)

    # ------------------------------------------------------------------------------------------ summary

    def write_summary(self, title: str, seconds: float) -> Path:
        """Write ``summary.md`` and ``summary.json``; returns the markdown path."""
        import torch

        from lerpfast._version import __version__

        s = self.s
        yes = sum(c.agrees is True for c in self.claims)
        no = sum(c.agrees is False for c in self.claims)
        na = sum(c.agrees is None for c in self.claims)
        lines = [
            f"# Reproduction: {title}", "",
            f"`{s.command}`" if s.command else "", "",
            f"* data: **{s.dataset}**; model: **{s.model}**; {'quick' if s.quick else 'full'} run",
            f"* ran in {seconds:.0f} s on {s.device} with {s.threads} thread(s), {self.world} process(es); "
            f"lerpfast {__version__}, torch {torch.__version__}",
            "* stages: " + ", ".join(f"{n} {t:.0f} s" for n, t in self.stages),
            f"* claims: {yes} agree, {no} disagree, {na} not checkable in this setting"
            + (f"; {len(self.observations)} observations of ours (not counted)" if self.observations else ""), "",
            "| # | claim | paper | ours | agrees |", "|---|---|---|---|---|",
        ]
        for i, c in enumerate(self.claims, 1):
            mark = {True: "yes", False: "**no**", None: "n/a (setting)"}[c.agrees]
            text = c.claim + (f" *({c.note})*" if c.note else "")
            lines.append(f"| {i} | {_cell(text)} | {_cell(c.source)} | {_cell(c.ours)} | {mark} |")
        if self.observations:
            lines += ["", "## Observations", "",
                      "Our own findings beyond the paper's statements: reported, not counted as agreement.", "",
                      "| # | observation | relates to | ours | holds |", "|---|---|---|---|---|"]
            for i, c in enumerate(self.observations, 1):
                mark = {True: "yes", False: "no", None: "n/a"}[c.agrees]
                text = c.claim + (f" *({c.note})*" if c.note else "")
                lines.append(f"| O{i} | {_cell(text)} | {_cell(c.source)} | {_cell(c.ours)} | {mark} |")
        if self.figures:
            lines += ["", "## Figures", ""]
            for caption, path in self.figures:
                lines += [f"**{caption}**", "", f"![{caption}]({path.relative_to(self.out).as_posix()})", ""]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"* {n}" for n in self.notes]
        md = self.out / "summary.md"
        md.write_text("\n".join(lines).replace("\n\n\n", "\n\n") + "\n")
        record = {
            "paper": s.paper, "title": title, "command": s.command, "dataset": s.dataset, "model": s.model,
            "quick": s.quick, "device": s.device, "threads": s.threads, "world_size": self.world,
            "seconds": seconds, "stages": dict(self.stages), "lerpfast_version": __version__,
            "torch_version": torch.__version__, "claims": [asdict(c) for c in self.claims],
            "observations": [asdict(c) for c in self.observations],
            "figures": [{"caption": c, "path": str(p.relative_to(self.out))} for c, p in self.figures],
            "notes": self.notes, "facts": self.facts,
        }
        (self.out / "summary.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        return md


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_threads() -> int:
    """Torch threads for a reproduction: min(2, cores). ResNet-20's training and sweeps gain from the second core
    (Frankle's full run: 8 min 53 s with 2 threads, 15 min 32 s with 1); LeNet's training runs in
    :func:`threads` (1)."""
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block with at most ``n`` torch threads. Training steps of the MLPs (a batch of 128 through LeNet-300-100:
    ~0.2 GFLOP) gain nothing from a second thread, and on a 2-core machine shared with other jobs they lose a lot:
    one Fashion-MNIST epoch took 9.5 s with one thread and 46.5 s with two at load average 6."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)
