"""Instability analysis: exact forks (train_from), children, the store of child <-> child lines, resume, errors."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import lerpfast
from lerpfast import cli
from lerpfast.instability import (
    analyze_instability,
    barrier_height,
    child_seeds,
    fork_states,
    plot_instability,
    read_instability,
)
from lerpfast.store import ResultStore
from lerpfast.train import TrainConfig, evaluate, list_checkpoints, load_config, load_model, train, train_from

# momentum (optimizer state), dropout (RNG), an lr drop at 40 (schedule position); 23 batches per epoch, so the
# fork at 17 is inside the first epoch and 30 inside the second
PARENT = dict(model="mlp", model_options="widths=(32,),dropout=0.2", dataset="digits", optimizer="sgdm", lr=0.05,
              milestones="40it", batch_size=64, steps="60it", checkpoints="0,17,30", evaluate="none", device="cpu")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return train(TrainConfig(out_dir=str(tmp_path_factory.mktemp("runs")), **PARENT), progress=False)


def _final(run_dir, replicate=0):
    ck = list_checkpoints(run_dir, replicate)
    return torch.load(ck[max(ck)], weights_only=True)


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fork_with_the_parents_seed_reproduces_the_parent_bit_for_bit(parent, tmp_path):
    cfg = load_config(parent)
    _, seed = cfg.seeds(0)
    states = fork_states(parent, [0, 17, 30])
    for k in (0, 17, 30):
        out = train_from(cfg, tmp_path / f"k{k}", state=states[k], data_seed=seed, progress=False,
                         theta0=list_checkpoints(parent)[0])
        _assert_equal(torch.load(out / "checkpoints" / "step_60.pt", weights_only=True), _final(parent))
        assert json.loads((out / "summary.json").read_text()).get("start_step", 0) == k


def test_fork_state_is_checked_against_the_parents_checkpoint(parent):
    states = fork_states(parent, "17")
    state = torch.load(states[17], weights_only=True)
    _assert_equal(state["model"], torch.load(list_checkpoints(parent)[17], weights_only=True))
    assert state["step"] == 17 and state["optimizer"]["state"]  # momentum buffers are part of the fork


def test_replay_that_differs_from_the_checkpoint_is_an_error(tmp_path):
    run = train(TrainConfig(out_dir=str(tmp_path), **PARENT), progress=False)
    path = list_checkpoints(run)[17]
    sd = torch.load(path, weights_only=True)
    sd["out.bias"] = sd["out.bias"] + 1e-6  # what a non-deterministic device would give
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"k=17 does not reproduce its checkpoint .*out\.bias"):
        fork_states(run, [17])


def test_interrupted_fork_resumes_exactly(parent, tmp_path):
    cfg = load_config(parent)
    state = fork_states(parent, [17])[17]
    ref = train_from(cfg, tmp_path / "ref", state=state, data_seed=5, progress=False)

    def stop(ctx):
        if ctx.step == 41:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_from(cfg, tmp_path / "cut", state=state, data_seed=5, progress=False, callbacks=[stop])
    assert not (tmp_path / "cut" / "summary.json").exists()
    cut = train_from(cfg, tmp_path / "cut", state=state, data_seed=5, progress=False)
    _assert_equal(torch.load(cut / "checkpoints" / "step_60.pt", weights_only=True),
                  torch.load(ref / "checkpoints" / "step_60.pt", weights_only=True))


def test_children_with_other_seeds_than_before_are_an_error(parent, tmp_path):
    analyze_instability(parent, [30], 2, alphas="0:1:3", store=tmp_path / "a.h5")
    with pytest.raises(RuntimeError, match=r"k_30/replicate_0 holds a child with data seed 1000003"):
        analyze_instability(parent, [30], 2, seeds=[7, 8], alphas="0:1:3", store=tmp_path / "b.h5")


def test_children_differ_and_every_pair_is_stored(parent, tmp_path):
    store = tmp_path / "inst.h5"
    res = analyze_instability(parent, [0, 30], 3, alphas="0:1:6", store=store)
    seeds = child_seeds(load_config(parent).seeds(0)[1], 3)
    assert res.seeds == seeds and len(set(seeds)) == 3
    assert res.pairs == [(0, 1), (0, 2), (1, 2)] and res.ks == [0, 30]
    base = parent / "instability"
    finals = {(k, c): torch.load(list_checkpoints(base / f"k_{k}", c)[60], weights_only=True)
              for k in (0, 30) for c in range(3)}
    theirs = _final(parent)
    for k in (0, 30):
        for c in range(3):
            assert not torch.equal(finals[(k, c)]["out.weight"], theirs["out.weight"])
            for d in range(c):
                assert not torch.equal(finals[(k, c)]["out.weight"], finals[(k, d)]["out.weight"])
    names = set(ResultStore(store, "r").names())
    assert names == {f"k={k}:c{i}-c{j}" for k in (0, 30) for i, j in res.pairs}
    for m in ("error", "loss"):
        assert res.barriers[m].shape == (3, 2) and np.all(np.isfinite(res.barriers[m]))
        assert np.all(res.barriers[m] >= 0)
    back = read_instability(store)
    np.testing.assert_array_equal(back.barriers["error"], res.barriers["error"])
    # the lines' endpoints are the children: their test error is what the trainer's evaluation gives
    test = __import__("lerpfast.data", fromlist=["load"]).load("digits", "test")
    model = load_model(base / "k_30", replicate=2)
    assert res.endpoints["error"][2, 1] == pytest.approx(1 - evaluate(model, test)["test_acc"], abs=1e-12)
    # the same barrier from the stored curve, by hand
    r = ResultStore(store, "r").read("k=30:c0-c2")
    e = np.asarray(r.metrics["error"])
    assert res.barriers["error"][1, 1] == pytest.approx(e.max() - (e[0] + e[-1]) / 2, abs=1e-15)
    js = json.loads((tmp_path / "instability.json").read_text())
    assert [row["k"] for row in js["rows"]] == [0, 30]


def test_rerun_resumes_without_retraining_and_keeps_records(parent, tmp_path):
    store = tmp_path / "inst.h5"
    first = analyze_instability(parent, [0, 30], 2, alphas="0:1:5", store=store)
    base = parent / "instability"
    stamps = {p: p.stat().st_mtime_ns for p in base.rglob("*.pt")}
    again = analyze_instability(parent, [0, 30], 2, alphas="0:1:5", store=store)
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*.pt")} == stamps  # nothing trained or replayed
    assert again.seconds["train"] < 5 and again.seconds["replay"] < 5
    np.testing.assert_array_equal(again.barriers["error"], first.barriers["error"])
    # a new fork point before the replay's end: replayed again, the finished children and records are kept
    more = analyze_instability(parent, [0, 17, 30], 2, alphas="0:1:5", store=store)
    assert more.ks == [0, 17, 30]
    for p in base.glob("k_*/replicate_*/checkpoints/*.pt"):
        if p in stamps:
            assert p.stat().st_mtime_ns == stamps[p], p
    np.testing.assert_array_equal(more.barriers["error"][:, [0, 2]], first.barriers["error"])
    assert set(ResultStore(store, "r").names()) == {"k=0:c0-c1", "k=17:c0-c1", "k=30:c0-c1"}


def test_childrens_data_seed_equal_to_parents_gives_no_barrier(parent, tmp_path):
    parent = shutil.copytree(parent, tmp_path / "run", ignore=shutil.ignore_patterns("instability"))
    seed = load_config(parent).seeds(0)[1]
    res = analyze_instability(parent, [17], 2, seeds=[seed, seed], alphas="0:1:3", store=tmp_path / "s.h5")
    assert res.barriers["error"][0, 0] == 0.0 and res.barriers["loss"][0, 0] == 0.0
    _assert_equal(torch.load(list_checkpoints(parent / "instability" / "k_17", 1)[60], weights_only=True),
                  _final(parent))


@pytest.mark.parametrize("kw, err, match", [
    (dict(at=[999]), ValueError, r"k=999 is beyond the run's length.*60 iterations"),
    (dict(at=[5]), FileNotFoundError, r"no checkpoint at k=5"),
    (dict(at=[-1]), ValueError, r"k=-1"),
    (dict(at="1x"), ValueError, r"'1x'"),
    (dict(at=[0], children=1), ValueError, r"children must be an integer >= 2.*1"),
    (dict(at=[0], children=2, seeds=[1]), ValueError, r"1 seeds given for children=2"),
    (dict(at=[0], align="bogus"), ValueError, r"'bogus'"),
])
def test_bad_input_names_the_value(parent, tmp_path, kw, err, match):
    kw = {"children": 2, **kw}
    with pytest.raises(err, match=match):
        analyze_instability(parent, kw.pop("at"), kw.pop("children"), store=tmp_path / "x.h5", **kw)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        analyze_instability(tmp_path, [0], 2)


def test_train_from_rejects_a_state_that_is_not_one(parent, tmp_path):
    cfg = load_config(parent)
    with pytest.raises(ValueError, match="missing .*optimizer"):
        train_from(cfg, tmp_path / "x", state={"step": 0, "model": {}}, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train_from(cfg, tmp_path / "y", state=tmp_path / "nope.pt", progress=False)
    with pytest.raises(ValueError, match="stop=61"):
        train_from(cfg, tmp_path / "z", stop=61, progress=False)


def test_barrier_height():
    a = np.linspace(0, 1, 5)
    assert barrier_height(a, [0.1, 0.3, 0.5, 0.2, 0.3]) == pytest.approx(0.5 - 0.2)
    assert barrier_height(a, [0.4, 0.3, 0.2, 0.1, 0.0]) == pytest.approx(0.4 - 0.2)  # an endpoint is the max
    with pytest.raises(ValueError, match="must contain 0 and 1"):
        barrier_height([0.0, 0.5], [1.0, 2.0])


def test_align_hook(parent, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lerpfast.align", None)  # the module missing, whether or not it exists
    with pytest.raises(ImportError, match="alignment needs lerpfast.align"):
        analyze_instability(parent, [30], 2, align="weights", alphas="0:1:3", store=tmp_path / "a.h5")
    calls = []

    def align(model, a, b, method, data=None):  # a stand-in: "aligns" b onto a by returning a itself
        calls.append(method)
        return types.SimpleNamespace(state_dict=a)

    monkeypatch.setitem(sys.modules, "lerpfast.align", types.SimpleNamespace(align=align))
    res = analyze_instability(parent, [30], 2, align="activations", alphas="0:1:3", store=tmp_path / "a.h5")
    assert calls == ["activations"] and res.names[(30, (0, 1))] == "k=30:c0-c1:activations"
    assert res.barriers["error"][0, 0] == 0.0  # child 0 against itself


def test_with_real_alignment(parent, tmp_path):
    """lerpfast.align for real: the aligned child computes the same function, so the line's endpoints match the raw
    line's, and the raw and aligned sweeps sit side by side in one file."""
    raw = analyze_instability(parent, [0, 30], 2, alphas="0:1:5", store=tmp_path / "r.h5")
    for method in ("weights", "activations"):
        al = analyze_instability(parent, [0, 30], 2, alphas="0:1:5", store=tmp_path / "r.h5", align=method)
        assert al.names[(30, (0, 1))] == f"k=30:c0-c1:{method}"
        for m in ("error", "loss"):
            np.testing.assert_allclose(al.endpoints[m], raw.endpoints[m], rtol=1e-5, atol=1e-7)
        assert np.all(np.isfinite(al.barriers["error"]))
    assert read_instability(tmp_path / "r.h5").names == raw.names  # the raw sweeps, unchanged


def test_plot(parent, tmp_path):
    res = analyze_instability(parent, [0, 17, 30], 2, alphas="0:1:3", store=tmp_path / "p.h5")
    fig = plot_instability(res, title="t")
    axes = fig.get_axes()
    assert len(axes) == 2 and axes[0].get_xscale() == "symlog"
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), res.mean("error"))
    two = plot_instability({"a": res, "b": res}, metrics=("error",)).get_axes()
    assert len(two) == 1 and len(two[0].lines) == 2
    assert lerpfast.analyze_instability is analyze_instability  # the lazy top-level export


def test_cli_quick_and_errors(tmp_path, capsys):
    assert cli.main(["instability", "--quick", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "error barrier" in out and "instability.png" in out
    run = next((tmp_path / "q" / "runs").glob("train_*"))
    assert (run / "instability" / "instability.png").stat().st_size > 1000
    assert set(ResultStore(run / "instability" / "results.h5", "r").names()) == {"k=0:c0-c1", "k=46:c0-c1"}
    assert cli.main(["instability", "--run", str(run), "--at", "0,5000"]) == cli.EXIT_USAGE
    assert "k=5000 is beyond the run's length" in capsys.readouterr().err
    assert cli.main(["instability", "--run", str(run), "--at", "10"]) == cli.EXIT_DATA
    assert "no checkpoint at k=10" in capsys.readouterr().err
    assert cli.main(["instability", "--run", str(run), "--at", "0", "--children", "1"]) == cli.EXIT_USAGE


def test_an_interrupted_child_is_resumed_by_the_analysis(parent, tmp_path):
    parent = shutil.copytree(parent, tmp_path / "run", ignore=shutil.ignore_patterns("instability"))
    cfg = load_config(parent)
    seed = child_seeds(cfg.seeds(0)[1], 2)[0]
    state = fork_states(parent, [30])[30]
    ref = train_from(cfg, tmp_path / "ref", state=state, data_seed=seed, progress=False)
    cut = parent / "instability" / "k_30" / "replicate_0"
    train_from(cfg, cut, state=state, data_seed=seed, stop=45, progress=False)  # as if killed at step 45
    assert json.loads((cut / "log.jsonl").read_text().splitlines()[-1])["step"] == 45
    assert not (cut / "summary.json").exists()
    analyze_instability(parent, [30], 2, alphas="0:1:3", store=tmp_path / "r.h5")
    assert json.loads((cut / "log.jsonl").read_text().splitlines()[0])["step"] == 31  # one log, continued
    _assert_equal(torch.load(cut / "checkpoints" / "step_60.pt", weights_only=True),
                  torch.load(ref / "checkpoints" / "step_60.pt", weights_only=True))
