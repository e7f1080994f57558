"""`lerpfast sweep` under a real 2-process torchrun (gloo, CPU): the store it writes equals the single-process
one, and a rank that dies mid-sweep loses nothing already written: a re-run completes the file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lerpfast.store import ResultStore
from lerpfast.train import models

ALPHAS = "-0.25:1.25:9"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = d / f"seed{seed}.pt"
        torch.save(models.create("lenet_300_100", 10, (1, 8, 8)).state_dict(), p)
        paths.append(p)
    return paths


def _sweep_args(ckpts, store: Path) -> list[str]:
    return ["sweep", "line", *map(str, ckpts), "--model", "lenet_300_100", "--data", "digits", f"--alphas={ALPHAS}",
            "--store", str(store), "--name", "line", "--points-per-pass", "2", "--batch-size", "500",
            "--threads", "1"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(script_args: list[str], cwd: Path, nproc: int = 2, timeout: float = 240, restarts: int = 0,
              rdzv: str = "static") -> subprocess.CompletedProcess:
    port = _free_port()
    where = (["--master-addr", "127.0.0.1", "--master-port", str(port)] if rdzv == "static"  # one node
             else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"])  # as across nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--max-restarts", str(restarts), *where, *script_args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _single(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lerpfast.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=240)


def _read(store: Path):
    with ResultStore(store, mode="r") as s:
        return s.read("line")


def _assert_same(a, b) -> None:
    np.testing.assert_array_equal(a.coords, b.coords)
    assert sorted(a.metrics) == sorted(b.metrics)
    for k in a.metrics:  # same chunks of points on both sides: bit-identical
        np.testing.assert_array_equal(a.metrics[k], b.metrics[k], err_msg=k)
    assert a.meta["fingerprint"] == b.meta["fingerprint"]


@pytest.fixture(scope="module")
def single(ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    r = _single(_sweep_args(ckpts, d / "single.h5"), d)
    assert r.returncode == 0, r.stderr
    return _read(d / "single.h5")


def test_torchrun_two_ranks_writes_the_single_process_file(ckpts, single, tmp_path):
    r = _torchrun(["-m", "lerpfast.cli", *_sweep_args(ckpts, tmp_path / "dist.h5")], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks" in r.stdout  # rank 0 alone reports, and says how many ranks shared the points
    assert r.stdout.count("computed 9 points") == 1
    got = _read(tmp_path / "dist.h5")
    assert not np.isnan(got.metrics["loss"]).any()
    _assert_same(got, single)


# Rank 1 dies (os._exit, like a lost node) in its second chunk of points; torchrun then stops rank 0.
_DIE = textwrap.dedent("""
    import os, sys
    import lerpfast.evaluate as ev
    calls = [0]
    real = ev._EngineEvaluator.evaluate
    def evaluate(self, *a, **k):
        calls[0] += 1
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if os.environ.get("RANK") == "1" and calls[0] == 2 and first_attempt:
            os._exit(17)
        return real(self, *a, **k)
    ev._EngineEvaluator.evaluate = evaluate
    from lerpfast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_rank_dying_mid_sweep_keeps_what_was_written_and_rerun_completes(ckpts, single, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(_DIE)
    store = tmp_path / "dist.h5"
    r = _torchrun([str(script), *_sweep_args(ckpts, store)], tmp_path)
    assert r.returncode != 0, "the launch should fail when a rank dies"
    partial = _read(store)
    done = ~np.isnan(partial.metrics["loss"])
    # the first round (2 points per rank) was gathered and written by rank 0 before rank 1 died
    assert 4 <= done.sum() < 9, done
    np.testing.assert_array_equal(partial.metrics["loss"][done], single.metrics["loss"][done])
    r = _torchrun(["-m", "lerpfast.cli", *_sweep_args(ckpts, store)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"computed {9 - int(done.sum())} points" in r.stdout  # only the missing ones
    _assert_same(_read(store), single)


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_restart_resumes_the_sweep_by_itself(ckpts, single, tmp_path, rdzv):
    """With ``--max-restarts``, torchrun relaunches every rank after the failure; the relaunched sweep finds the
    store and computes only the missing points, so the launch as a whole succeeds. (Each attempt joins under its
    own store prefix, lerpfast.distributed: without it most relaunches here failed to connect or hung.)"""
    script = tmp_path / "die.py"
    script.write_text(_DIE)
    store = tmp_path / "dist.h5"
    r = _torchrun([str(script), *_sweep_args(ckpts, store)], tmp_path, restarts=1, rdzv=rdzv)
    assert r.returncode == 0, r.stdout + r.stderr
    computed = [int(line.split("computed ")[1].split()[0]) for line in r.stdout.splitlines() if "computed " in line]
    assert len(computed) == 1 and 0 < computed[0] <= 5, r.stdout  # the second attempt's share, not all 9
    _assert_same(_read(store), single)


# A small paper module: training happens once (rank 0, the others wait), the sweep's points are sharded, and only
# rank 0 writes the store, the figures and the summary.
_PAPER = textwrap.dedent("""
    import sys
    import lerpfast.reproduce as rp

    class Mini:
        TITLE = "mini"
        DEFAULTS = {"model": "lenet_300_100"}

        @staticmethod
        def run(ctx):
            from lerpfast.train import list_checkpoints, load_model
            run = ctx.train(model=ctx.s.model, dataset=ctx.s.dataset, steps="30it", limit=600, checkpoints="0,15")
            ck = list_checkpoints(run)
            res = ctx.sweep("init-final", load_model(run), (ck[0], ck[max(ck)]), "0:1:7", ctx.data(limit=300),
                            points_per_pass=2)
            ctx.claim("loss decreases", "-", f"{res.loss[-1]:.6f}", bool(res.loss[-1] < res.loss[0]),
                      start=res.loss[0], end=res.loss[-1])

    sys.modules["mini_paper"] = Mini
    rp.PAPERS["mini"] = "mini_paper"
    from lerpfast.cli import main
    sys.exit(main(["reproduce", "mini", "--quick", "--out", sys.argv[1], "--threads", "1", "--no-progress"]))
""")


def test_reproduce_under_torchrun_equals_single_process(tmp_path):
    import json

    script = tmp_path / "mini.py"
    script.write_text(_PAPER)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "single")], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _torchrun([str(script), str(tmp_path / "dist")], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("claims agree") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("single", "dist"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["claims"][0]["values"] == two["claims"][0]["values"]
    assert len(list((tmp_path / "dist" / "runs").glob("train_*/replicate_0/checkpoints/*.pt"))) == 3
