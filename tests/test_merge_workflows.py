"""The merging workflows, one call each (issue 20 part 3): ``lerpfast.merge.wiseft``, ``greedy_soup`` (the paper's
recipe and forward selection) and ``task_arithmetic`` (shared lambda, grid, coordinate search, given points), and
``lerpfast merge`` end to end.

Real tiny data (scikit-learn's digits) and real training: a small MLP "pre-trained" on some digits and fine-tuned on
others. Every workflow is checked against a float64 oracle written here that does the work by hand, the way users
do it today: build each candidate's state dict in float64, load it into a float64 copy of the model, evaluate,
choose. The workflows run with ``precision="fp64"`` where a choice is compared (so that accuracy ties, which the
recipe's "does not drop" rule makes common, are decided on the same numbers), and in fp32 where metrics are
compared to 1e-5.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lerpfast
import lerpfast.data as ld
from lerpfast.checkpoints import CheckpointError
from lerpfast.cli import EXIT_DATA, EXIT_USAGE, main
from lerpfast.store import ResultStore
from lerpfast.train import models

MODEL_OPTIONS = "widths=(32,)"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return models.create("mlp", 10, (1, 8, 8), widths=(32,)).eval()


def _train(model, state, x, y, rows, *, steps, lr=0.1, seed=0, labels=None) -> dict[str, torch.Tensor]:
    """Minibatch SGD on the rows selected by the boolean mask ``rows``."""
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    net.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    target = y if labels is None else labels
    idx = torch.nonzero(rows).squeeze(1)
    for _ in range(steps):
        b = idx[torch.randint(len(idx), (128,), generator=g)]
        opt.zero_grad()
        F.cross_entropy(net(x[b]), target[b]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def setup():
    """Digits train / test; a model pre-trained on digits 0-4 and fine-tuned on 5-9 (WiSE-FT's stand-in); five soup
    ingredients fine-tuned on all digits (one on shuffled labels); a base trained on 0-3 and three fine-tunes adding
    4-5, 6-7, 8-9 (task arithmetic)."""
    torch.set_num_threads(1)
    x, y = next(iter(ld.load("digits", "train", batch_size=10_000)))
    xt, yt = next(iter(ld.load("digits", "test", batch_size=10_000)))
    model = _model()
    init = model.state_dict()
    pre = _train(model, init, x, y, y < 5, steps=300)
    ft = _train(model, pre, x, y, y >= 5, steps=150)
    ings = [_train(model, pre, x, y, y >= 0, steps=s, lr=lr, seed=sd)
            for s, lr, sd in [(100, 0.05, 1), (200, 0.1, 2), (100, 0.2, 3), (300, 0.05, 4)]]
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    ings.append(_train(model, pre, x, y, y >= 0, steps=200, lr=0.2, seed=6, labels=shuffled))
    base = _train(model, init, x, y, y < 4, steps=300)
    tasks = [_train(model, base, x, y, (y < 4) | (y // 2 == t), steps=150, seed=t) for t in (2, 3, 4)]
    return {
        "model": model, "pre": pre, "ft": ft, "ings": ings, "base": base, "tasks": tasks,
        "low": (xt[yt < 5], yt[yt < 5]), "high": (xt[yt >= 5], yt[yt >= 5]),
        "val": (xt[:180], yt[:180]),
    }


# ---------------------------------------------------------------------------------------------------------------
# The float64 oracle: each candidate by hand


def _f64(sd):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def _evaluate(model, state, data) -> tuple[float, float]:
    """(loss, error) of one state dict: float64 copy of the model, float64 data."""
    net = copy.deepcopy(model).double().eval()
    net.load_state_dict(_f64(state))
    x, yy = data
    with torch.no_grad():
        z = net(x.double())
    return float(F.cross_entropy(z, yy)), float((z.argmax(1) != yy).double().mean())


def _lerp(a, b, alpha):
    a, b = _f64(a), _f64(b)
    return {k: (v + alpha * (b[k] - v)) if v.is_floating_point() else v for k, v in a.items()}


def _average(states):
    fs = [_f64(s) for s in states]
    return {k: (sum(s[k] for s in fs) / len(fs)) if v.is_floating_point() else v for k, v in fs[0].items()}


def _task_point(pre, fts, lam):
    p, fs = _f64(pre), [_f64(f) for f in fts]
    return {k: (v + sum(float(lam[j]) * (fs[j][k] - v) for j in range(len(fs)))) if v.is_floating_point() else v
            for k, v in p.items()}


def _rounded(sd, like):
    return {k: v.to(like[k].dtype) for k, v in sd.items()}


def _same_state(a, b, exact=False):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def _hand_greedy(model, ings, data):
    """Wortsman et al.'s Algorithm 1 by hand: rank by held-out accuracy, add if the average's does not drop."""
    err = [_evaluate(model, s, data)[1] for s in ings]
    ranking = sorted(range(len(ings)), key=lambda i: (err[i], i))
    soup, cur = [ranking[0]], err[ranking[0]]
    for i in ranking[1:]:
        e = _evaluate(model, _average([ings[j] for j in soup + [i]]), data)[1]
        if e <= cur:
            soup, cur = soup + [i], e
    return ranking, soup, cur, err


def _hand_forward(model, ings, data):
    err = [_evaluate(model, s, data)[1] for s in ings]
    ranking = sorted(range(len(ings)), key=lambda i: (err[i], i))
    soup, cur, rest, sizes = [ranking[0]], err[ranking[0]], ranking[1:], []
    while rest:
        sizes.append(len(rest))
        vals = [_evaluate(model, _average([ings[j] for j in soup + [i]]), data)[1] for i in rest]
        b = int(np.argmin(vals))
        if vals[b] > cur:
            break
        soup, cur = soup + [rest[b]], vals[b]
        rest = rest[:b] + rest[b + 1:]
    return soup, cur, sizes


# ---------------------------------------------------------------------------------------------------------------
# WiSE-FT


def test_wiseft_curves_and_choice_match_the_hand_oracle(setup, tmp_path):
    s = setup
    alphas = np.linspace(0, 1, 11)
    sets = {"low": s["low"], "high": s["high"]}
    oracle = {d: np.array([_evaluate(s["model"], _lerp(s["pre"], s["ft"], a), data) for a in alphas])
              for d, data in sets.items()}
    store = tmp_path / "m.h5"
    r = lerpfast.merge.wiseft(s["model"], s["pre"], s["ft"], sets, "0:1:11", select="high", store=store,
                              precision="fp64")
    assert r.kind == "wiseft" and list(r.results) == ["wiseft.low", "wiseft.high"]
    for d in sets:
        res = r.results[f"wiseft.{d}"]
        np.testing.assert_allclose(res.alphas, alphas)
        np.testing.assert_allclose(res.loss, oracle[d][:, 0], rtol=1e-10)
        np.testing.assert_array_equal(res.error, oracle[d][:, 1])
        assert res.meta["points_computed"] == 11 and res.meta["paths"]  # one sweep, all alphas in one pass
    i = int(np.argmin(oracle["high"][:, 1]))  # first of ties
    assert r.choice["alpha"] == alphas[i] and r.choice["value"] == oracle["high"][i, 1]
    _same_state(r.state_dict, _rounded(_lerp(s["pre"], s["ft"], alphas[i]), s["pre"]))
    # the trade-off on real data: the old task forgotten as alpha grows, the new one learned
    assert oracle["low"][0, 1] < 0.1 < oracle["low"][-1, 1] and oracle["high"][-1, 1] < 0.1 < oracle["high"][0, 1]
    # the store holds one sweep per data set, the same numbers
    with ResultStore(store, "r") as rs:
        assert set(rs.names()) == {"wiseft.low", "wiseft.high"}
        np.testing.assert_array_equal(rs.read("wiseft.high").metrics["error"], oracle["high"][:, 1])


def test_wiseft_fp32_agrees_and_fixed_alpha_and_endpoints_are_exact(setup):
    s = setup
    r = lerpfast.merge.wiseft(s["model"], s["pre"], s["ft"], s["low"], [0.0, 0.5, 1.0], select=0.5)
    oracle = np.array([_evaluate(s["model"], _lerp(s["pre"], s["ft"], a), s["low"]) for a in (0, 0.5, 1)])
    np.testing.assert_allclose(r.results["wiseft.data"].loss, oracle[:, 0], rtol=1e-5)
    assert r.choice["alpha"] == 0.5 and r.choice["value"] == r.results["wiseft.data"].error[1]
    _same_state(r.state_dict, _rounded(_lerp(s["pre"], s["ft"], 0.5), s["pre"]))
    for a, ref in ((0.0, s["pre"]), (1.0, s["ft"])):
        e = lerpfast.merge.wiseft(s["model"], s["pre"], s["ft"], s["low"], [a], select=a)
        _same_state(e.state_dict, ref, exact=True)


def test_wiseft_figure(setup):
    s = setup
    r = lerpfast.merge.wiseft(s["model"], s["pre"], s["ft"], {"low": s["low"], "high": s["high"]}, "0:1:5")
    fig = lerpfast.merge.plot_wiseft(r)
    assert len(fig.axes) == 3  # the curves, ID vs shift, its colour bar
    xs, ys = fig.axes[1].collections[0].get_offsets().T
    np.testing.assert_allclose(xs, 1 - r.results["wiseft.low"].error)
    np.testing.assert_allclose(ys, 1 - r.results["wiseft.high"].error)
    with pytest.raises(ValueError, match="no data set 'nope'"):
        lerpfast.merge.plot_wiseft(r, id="nope")


# ---------------------------------------------------------------------------------------------------------------
# Greedy soup


def test_greedy_soup_is_the_papers_recipe_run_by_hand(setup):
    s = setup
    ranking, soup, cur, err = _hand_greedy(s["model"], s["ings"], s["val"])
    # the data make the recipe both add and reject ingredients (the shuffled-label one, at least)
    assert 1 < len(soup) < len(s["ings"]) and 4 not in soup
    r = lerpfast.merge.greedy_soup(s["model"], s["ings"], s["val"], precision="fp64")
    assert r.meta["ranking"] == ranking and r.meta["individual"] == err
    assert r.choice["ingredients"] == soup and r.choice["value"] == cur
    w = np.zeros(5)
    w[soup] = 1 / len(soup)
    assert r.choice["weights"] == w.tolist()
    _same_state(r.state_dict, _rounded(_average([s["ings"][i] for i in soup]), s["ings"][0]))
    # one pass of N points, then one candidate per pass
    assert [res.K for res in r.results.values()] == [5, 1, 1, 1, 1]
    assert list(r.results) == ["soup.ingredients"] + [f"soup.step{i}" for i in range(1, 5)]
    assert [st["added"] for st in r.steps[1:]] == [i if i in soup else None for i in ranking[1:]]


def test_forward_selection_tries_every_remaining_ingredient_in_one_pass(setup):
    s = setup
    soup, cur, sizes = _hand_forward(s["model"], s["ings"], s["val"])
    r = lerpfast.merge.greedy_soup(s["model"], s["ings"], s["val"], recipe="forward", precision="fp64")
    assert r.choice["ingredients"] == soup and r.choice["value"] == cur
    assert [res.K for res in list(r.results.values())[1:]] == sizes
    _same_state(r.state_dict, _rounded(_average([s["ings"][i] for i in soup]), s["ings"][0]))


def test_soup_of_one_ingredient_is_that_ingredient_and_the_store_resumes(setup, tmp_path):
    s = setup
    ings = [s["ings"][4], s["ings"][1]]  # the shuffled-label one first: the other wins, alone or averaged
    store = tmp_path / "soup.h5"
    r = lerpfast.merge.greedy_soup(s["model"], ings, s["val"], store=store, name="two")
    assert r.choice["ingredients"] == [1] and r.steps[1]["added"] is None
    _same_state(r.state_dict, s["ings"][1], exact=True)
    again = lerpfast.merge.greedy_soup(s["model"], ings, s["val"], store=store, name="two")
    assert [res.meta["points_computed"] for res in again.results.values()] == [0, 0]
    assert again.choice == r.choice


# ---------------------------------------------------------------------------------------------------------------
# Task arithmetic


def _ta_oracle(s, points, data=None):
    data = s["val"] if data is None else data
    return np.array([_evaluate(s["model"], _task_point(s["base"], s["tasks"], p), data) for p in points])


def test_task_arithmetic_shared_lambda_matches_the_hand_oracle(setup):
    s = setup
    lam = np.linspace(0, 1, 6)
    oracle = _ta_oracle(s, [[v] * 3 for v in lam])
    r = lerpfast.merge.task_arithmetic(s["model"], s["base"], s["tasks"], s["val"], "0:1:6")  # fp32
    (res,) = r.results.values()
    np.testing.assert_allclose(res.loss, oracle[:, 0], rtol=1e-5)
    np.testing.assert_array_equal(res.error, oracle[:, 1])
    i = int(np.argmin(oracle[:, 1]))
    assert r.choice["lambdas"] == [lam[i]] * 3 and r.meta["search"] == "shared"
    _same_state(r.state_dict, _rounded(_task_point(s["base"], s["tasks"], [lam[i]] * 3), s["base"]))
    # pretrained (all lambdas 0) is the checkpoint itself
    z = lerpfast.merge.task_arithmetic(s["model"], s["base"], s["tasks"], s["val"], [0.0])
    _same_state(z.state_dict, s["base"], exact=True)


def test_task_arithmetic_grid_and_given_points(setup):
    s = setup
    vals = [0.0, 0.5, 1.0]
    pts = np.array(list(itertools.product(vals, repeat=3)))
    oracle = _ta_oracle(s, pts)
    r = lerpfast.merge.task_arithmetic(s["model"], s["base"], s["tasks"], s["val"], vals, search="grid",
                                       precision="fp64")
    (res,) = r.results.values()
    assert res.K == 27
    np.testing.assert_array_equal(res.coords, pts)
    np.testing.assert_array_equal(res.error, oracle[:, 1])
    i = int(np.argmin(oracle[:, 1]))
    assert r.choice["lambdas"] == pts[i].tolist() and r.choice["value"] == oracle[i, 1]
    given = pts[[5, 13, 20]]
    g = lerpfast.merge.task_arithmetic(s["model"], s["base"], s["tasks"], s["val"], given, precision="fp64")
    j = int(np.argmin(oracle[[5, 13, 20], 1]))
    assert g.meta["search"] == "matrix" and g.choice["lambdas"] == given[j].tolist()
    # a single 1: that fine-tuned checkpoint, bit for bit
    one = lerpfast.merge.task_arithmetic(s["model"], s["base"], s["tasks"], s["val"], [[0.0, 1.0, 0.0]])
    _same_state(one.state_dict, s["tasks"][1], exact=True)


@pytest.mark.parametrize("n_val", [180, 12])  # 12 samples: accuracy ties everywhere, moves must strictly improve
def test_task_arithmetic_coordinate_search_matches_the_hand_run(setup, n_val):
    s = setup
    val = (s["val"][0][:n_val], s["val"][1][:n_val])
    vals = np.array([0.0, 0.4, 0.8, 1.2])
    shared = _ta_oracle(s, [[v] * 3 for v in vals], val)[:, 1]
    cur_pt = np.full(3, vals[int(np.argmin(shared))])
    cur = float(shared.min())
    rounds = []
    while True:
        cands = []
        for j in range(3):
            for v in vals:
                if v != cur_pt[j]:
                    c = cur_pt.copy()
                    c[j] = v
                    cands.append(c)
        e = _ta_oracle(s, cands, val)[:, 1]
        rounds.append(len(cands))
        b = int(np.argmin(e))
        if e[b] >= cur:
            break
        cur_pt, cur = cands[b], float(e[b])
    r = lerpfast.merge.task_arithmetic(s["model"], s["base"], s["tasks"], val, vals, search="coordinate",
                                       precision="fp64")
    assert r.choice["lambdas"] == cur_pt.tolist() and r.choice["value"] == cur
    assert [res.K for res in r.results.values()] == [4] + rounds
    assert list(r.results)[0] == "task_arithmetic.shared"


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument(setup):
    s = setup
    m, val = s["model"], s["val"]
    with pytest.raises(ValueError, match="metric='accuracy'"):
        lerpfast.merge.greedy_soup(m, s["ings"], val, metric="accuracy")
    with pytest.raises(ValueError, match="recipe='best'"):
        lerpfast.merge.greedy_soup(m, s["ings"], val, recipe="best")
    with pytest.raises(ValueError, match="select='mid'.*'low', 'high'"):
        lerpfast.merge.wiseft(m, s["pre"], s["ft"], {"low": s["low"], "high": s["high"]}, select="mid")
    with pytest.raises(TypeError, match="store"):
        lerpfast.merge.task_arithmetic(m, s["base"], s["tasks"], val, ckpts=None)
    with pytest.raises(ValueError, match="search='random'"):
        lerpfast.merge.task_arithmetic(m, s["base"], s["tasks"], val, search="random")
    with pytest.raises(ValueError, match="4096 points, more than max_points=1000.*coordinate"):
        lerpfast.merge.task_arithmetic(m, s["base"], s["tasks"], val, "0:1:16", search="grid", max_points=1000)
    with pytest.raises(ValueError, match=r"lambdas.*\(J = 3\).*width 2"):
        lerpfast.merge.task_arithmetic(m, s["base"], s["tasks"], val, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="search='grid' with a \\(K, J\\) lambdas"):
        lerpfast.merge.task_arithmetic(m, s["base"], s["tasks"], val, [[0.1, 0.2, 0.3]], search="grid")
    other = models.create("mlp", 10, (1, 8, 8), widths=(16,)).state_dict()
    with pytest.raises(CheckpointError, match=r"ingredients\[1\]"):
        lerpfast.merge.greedy_soup(m, [s["ings"][0], other], val)


# ---------------------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def files(setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for key in ("pre", "ft", "base"):
        out[key] = d / f"{key}.pt"
        torch.save(setup[key], out[key])
    out["ings"] = []
    for i, sd in enumerate(setup["ings"][:4]):
        p = d / f"ing{i}.pt"
        torch.save(sd, p)
        out["ings"].append(p)
    out["tasks"] = []
    for i, sd in enumerate(setup["tasks"]):
        p = d / f"task{i}.pt"
        torch.save(sd, p)
        out["tasks"].append(p)
    return out


def _run(args, capsys):
    rc = main([*args, "--model", "mlp", "--model-options", MODEL_OPTIONS, "--device", "cpu", "--progress", "false"])
    return rc, capsys.readouterr()


def test_cli_wiseft_end_to_end(setup, files, tmp_path, capsys):
    store, out = tmp_path / "r.h5", tmp_path / "w.pt"
    rc, cap = _run(["merge", "wiseft", str(files["pre"]), str(files["ft"]), "--data", "digits:test,digits:train",
                    "--alphas", "0:1:5", "--store", str(store), "--out", str(out), "--plot", str(tmp_path / "figs")],
                   capsys)
    assert rc == 0, cap.err
    test = next(iter(ld.load("digits", "test", batch_size=10_000)))
    train = next(iter(ld.load("digits", "train", batch_size=10_000)))
    api = lerpfast.merge.wiseft(setup["model"], setup["pre"], setup["ft"], {"digits:test": test, "digits:train": train},
                                "0:1:5")
    _same_state(torch.load(out, weights_only=True), api.state_dict, exact=True)
    assert f"alpha={api.choice['alpha']:.4g}" in cap.out
    with ResultStore(store, "r") as rs:
        assert set(rs.names()) == {"wiseft.digits:test", "wiseft.digits:train"}
        np.testing.assert_array_equal(rs.read("wiseft.digits:train").metrics["error"],
                                      api.results["wiseft.digits:train"].error)
    assert (tmp_path / "figs" / "wiseft.png").stat().st_size > 1000


def test_cli_soup_and_task_arithmetic_end_to_end(setup, files, tmp_path, capsys):
    val = next(iter(ld.load("digits", "test", batch_size=10_000)))
    store, out = tmp_path / "r.h5", tmp_path / "s.pt"
    rc, cap = _run(["merge", "soup", *map(str, files["ings"]), "--data", "digits", "--store", str(store), "--out",
                    str(out), "--recipe", "forward"], capsys)
    assert rc == 0, cap.err
    api = lerpfast.merge.greedy_soup(setup["model"], setup["ings"][:4], val, recipe="forward")
    _same_state(torch.load(out, weights_only=True), api.state_dict, exact=True)
    assert "chosen: ingredients " + ", ".join(f"ing{i}" for i in api.choice["ingredients"]) in cap.out
    # task arithmetic with a (K, J) matrix from a .csv and a .npy file
    pts = np.array([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    np.savetxt(tmp_path / "p.csv", pts, delimiter=",")
    np.save(tmp_path / "p.npy", pts)
    api = lerpfast.merge.task_arithmetic(setup["model"], setup["base"], setup["tasks"], val, pts)
    for f in ("p.csv", "p.npy"):
        out = tmp_path / f"ta_{f}.pt"
        rc, cap = _run(["merge", "task-arithmetic", str(files["base"]), *map(str, files["tasks"]), "--data",
                        "digits:test", "--lambdas", str(tmp_path / f), "--store", str(store), "--name", f"ta-{f}",
                        "--out", str(out)], capsys)
        assert rc == 0, cap.err
        _same_state(torch.load(out, weights_only=True), api.state_dict, exact=True)
    with ResultStore(store, "r") as rs:
        np.testing.assert_array_equal(rs.read("ta-p.npy").coords, pts)


def test_cli_errors_are_one_line_with_exit_codes(files, tmp_path, capsys):
    base = ["--store", str(tmp_path / "e.h5")]
    cases = [
        (["merge", "wiseft", str(files["pre"]), "--data", "digits"], EXIT_USAGE, "merge wiseft takes 2 checkpoints"),
        (["merge", "task-arithmetic", str(files["base"]), *map(str, files["tasks"]), "--data", "digits",
          "--lambdas", str(tmp_path / "none.npy")], EXIT_DATA, "--lambdas '.*none.npy': no such file"),
        (["merge", "task-arithmetic", str(files["base"]), *map(str, files["tasks"]), "--data", "digits",
          "--search", "random"], EXIT_USAGE, "--search 'random'"),
        (["merge", "soup", *map(str, files["ings"]), "--data", "digits", "--recipe", "best"], EXIT_USAGE,
         "--recipe 'best'"),
        (["merge", "soup", *map(str, files["ings"]), "--data", "digits:test,digits:train"], EXIT_USAGE,
         "takes one held-out"),
        (["merge", "wiseft", str(files["pre"]), str(files["ft"]), "--data", "digits", "--select", "mnist"],
         EXIT_USAGE, "--select 'mnist'"),
        (["merge", "soup", str(files["pre"]), str(tmp_path / "missing.pt"), "--data", "digits"], EXIT_DATA,
         "missing.pt'?: no such file"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("0.1,0.2\n0.3,0.4\n")
    cases.append((["merge", "task-arithmetic", str(files["base"]), *map(str, files["tasks"]), "--data", "digits",
                   "--lambdas", str(bad)], EXIT_USAGE, r"lambdas.*\(J = 3\)"))
    import re

    for args, code, pattern in cases:
        rc, cap = _run([*args, *base], capsys)
        assert rc == code, (args, cap.err)
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lerpfast: error: "), cap.err
        assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The README's workflow block and docs/merging.md's example


def test_readme_workflow_block_runs(monkeypatch, tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first, second = re.findall(r"```python\n(.*?)```", text[text.index("## Merging"):], re.S)[:2]
    assert "lerpfast.merge.task_arithmetic" in second
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(first, "README.md:Merging", "exec"), ns)
    exec(compile(second, "README.md:Merging workflows", "exec"), ns)
    ta, greedy, wft = ns["ta"], ns["greedy"], ns["wft"]
    assert len(ta.choice["lambdas"]) == 3 and ta.meta["search"] == "coordinate"
    assert ta.choice["value"] <= float(ta.results["task_arithmetic.shared"].error.min())
    assert greedy.choice["ingredients"] and set(greedy.choice["ingredients"]) <= {0, 1, 2}
    assert list(wft.results) == ["wiseft.val", "wiseft.rest"] and 0.0 <= wft.choice["alpha"] <= 1.0
    sd = ns["model"].state_dict()
    assert all(torch.equal(sd[k], ta.state_dict[k]) for k in sd)


def test_docs_example_quick_run(tmp_path):
    """scripts/merging_example.py on digits (the docs' figures are the Fashion-MNIST run of the same script)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "merging_example.py"
    spec = importlib.util.spec_from_file_location("merging_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ex"
    summary = mod.run(["--data", "digits", "--quick", "--out", str(out)])
    for f in ("wiseft.png", "task_arithmetic.png"):
        assert (out / f).stat().st_size > 10_000, f
    w = summary["wiseft"]["accuracy"]
    # the trade-off: the first task is forgotten along alpha, the second learned
    assert w["task A (0-4)"][0] > 0.9 > 0.1 > w["task A (0-4)"][-1]
    assert w["task B (5-9)"][-1] > 0.9 > 0.1 > w["task B (5-9)"][0]
    acc = summary["wiseft"]["test_accuracy_all_classes"]
    assert acc["chosen"] > max(acc["zero_shot"], acc["fine_tuned"])  # the ensemble beats both ends on all classes
    ta = summary["task_arithmetic"]
    accs = ta["test_accuracy_all_classes"]
    assert len(ta["lambdas"]) == 16 and accs["shared"] > accs["base"]
    with ResultStore(out / "results.h5", "r") as rs:
        names = rs.names()
    assert {"wiseft.held-out", "ta", "ta-coord.shared"} <= set(names)


# ---------------------------------------------------------------------------------------------------------------
# sweep(..., data={name: data, ...})


def test_sweep_takes_several_data_sets_in_one_call(setup, tmp_path):
    s = setup
    store = tmp_path / "d.h5"
    line = lerpfast.Line(s["pre"], s["ft"], "0:1:6")
    both = lerpfast.sweep(s["model"], line, data={"low": s["low"], "high": s["high"]}, store=store, name="two")
    assert list(both) == ["low", "high"]
    for d in ("low", "high"):
        alone = lerpfast.sweep(s["model"], lerpfast.Line(s["pre"], s["ft"], "0:1:6"), data=s[d])
        for m in ("loss", "error", "distance", "disagreement"):
            np.testing.assert_array_equal(both[d].metrics[m], alone.metrics[m])
        oracle = np.array([_evaluate(s["model"], _lerp(s["pre"], s["ft"], a), s[d]) for a in np.linspace(0, 1, 6)])
        np.testing.assert_allclose(both[d].loss, oracle[:, 0], rtol=1e-5)
        assert both[d].meta["data"]["num_samples"] == len(s[d][1])
    with ResultStore(store, "r") as rs:
        assert set(rs.names()) == {"two.low", "two.high"}
    again = lerpfast.sweep(s["model"], line, data={"low": s["low"], "high": s["high"]}, store=store, name="two")
    assert [r.meta["points_computed"] for r in again.values()] == [0, 0]
    default = lerpfast.sweep(s["model"], line, data={"low": s["low"]}, store=store)
    assert list(default) == ["low"] and "sweep.low" in ResultStore(store, "r").names()
    with pytest.raises(ValueError, match="data: an empty dict"):
        lerpfast.sweep(s["model"], line, data={})
    with pytest.raises(ValueError, match="without '/'.*'a/b'"):
        lerpfast.sweep(s["model"], line, data={"a/b": s["low"]})
    with pytest.raises(ValueError, match=r"data\['low'\] is None"):
        lerpfast.sweep(s["model"], line, data={"low": None})
