"""Merging slices with any number of endpoints (issue 20 parts 1, 2's J and 5): ``TaskVectors`` and ``Soup``.

Every point is checked against a float64 state-dict oracle written here from the papers' formulas (each point's
state dict built in float64, loaded into a float64 copy of the model, run): fp32 sweeps agree to 1e-5, with J and N
up to 16 on an MLP and a small conv net with batch norm. The pretrained point (all lambdas 0), single-task rows and
single-ingredient rows are the checkpoints themselves, bit for bit. Also: bad input (widths, non-finite values,
mismatched checkpoints, soup weights that do not sum to 1), the HDF5 store (coordinates, description, resume),
plots, the ``loss_fn`` contract, J = 16 under every backend the CPU can force, and the README's Merging example.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lerpfast
from lerpfast import Soup, TaskVectors, sweep
from lerpfast.checkpoints import CheckpointError, load_checkpoints
from lerpfast.engine import functional as Fe
from lerpfast.engine.functional import ParamSlice, Points

README = Path(__file__).resolve().parent.parent / "README.md"

# ---------------------------------------------------------------------------------------------------------------
# Models, checkpoints, data


class MLP(nn.Module):
    def __init__(self, d_in=12, classes=6, hidden=(24, 24)):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden[0]), nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], classes)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    def __init__(self, classes=5, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _model(name: str, *, rows=40, d_in=12, classes=6, hidden=(24, 24), images=24, width=8,
           size=(6, 6)) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A small MLP ("mlp") or conv net with batch norm (anything else) in eval mode, and random data for it
    (tests/test_curves.py takes other, odd, sizes)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = MLP(d_in, classes, hidden).eval()
        x = torch.randn(rows, d_in, generator=g)
        y = torch.randint(0, classes, (rows,), generator=g)
    else:
        model = ConvBN(width=width).eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
        x = torch.randn(images, 3, *size, generator=g)
        y = torch.randint(0, 5, (images,), generator=g)
    return model, (x, y)


def _perturbed(model: nn.Module, n: int, seed: int = 10, scale: float = 0.1,
               var_step: float = 0.02) -> list[dict[str, torch.Tensor]]:
    """n fine-tuned stand-ins: every floating tensor moved; running variances scaled by at most ``var_step`` (2 %)
    so that every combination these tests form keeps them positive."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sd = {}
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                sd[k] = v.clone()
            elif k.endswith("running_var"):
                sd[k] = v * (1 + var_step * torch.rand(v.shape, generator=g))
            else:
                sd[k] = v + scale * torch.randn(v.shape, generator=g)
        out.append(sd)
    return out


def _oracle(model: nn.Module, states: list[dict[str, torch.Tensor]], data) -> tuple[np.ndarray, np.ndarray]:
    """(loss, error) of each state dict: float64 copy of the model, float64 data, cross-entropy mean."""
    net = copy.deepcopy(model).double().eval()
    x, y = data
    loss, err = [], []
    with torch.no_grad():
        for sd in states:
            net.load_state_dict(sd)
            z = net(x.double())
            loss.append(float(F.cross_entropy(z, y)))
            err.append(float((z.argmax(1) != y).double().mean()))
    return np.asarray(loss), np.asarray(err)


def _f64(sd: dict) -> dict:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def _task_point(pre: dict, fts: list[dict], lam: np.ndarray) -> dict:
    """theta = pretrained + sum_j lam_j (finetuned_j - pretrained), in float64 (Ilharco et al.)."""
    p, fs = _f64(pre), [_f64(f) for f in fts]
    out = {}
    for k, v in p.items():
        if v.is_floating_point():
            out[k] = v + sum(float(lam[j]) * (fs[j][k] - v) for j in range(len(fs)))
        else:
            out[k] = v
    return out


def _soup_point(ings: list[dict], w: np.ndarray) -> dict:
    """theta = sum_n w_n ingredient_n, in float64 (Wortsman et al.)."""
    fs = [_f64(f) for f in ings]
    return {k: (sum(float(w[n]) * fs[n][k] for n in range(len(fs))) if v.is_floating_point() else v)
            for k, v in fs[0].items()}


def _assert_oracle(res, loss, err, n):
    assert np.allclose(res.loss, loss, rtol=1e-5, atol=1e-5), np.abs(res.loss - loss).max()
    assert np.all(np.abs(res.error - err) <= 1.01 / n)  # a near-tie may flip one sample in fp32


def _lambda_rows(J: int) -> np.ndarray:
    g = np.random.default_rng(J)
    rows = [np.zeros(J), np.eye(J)[J - 1], np.full(J, 1.0 / J), g.uniform(-0.5, 1.0, J), g.uniform(0, 0.3, J)]
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# Against the float64 oracle


@pytest.mark.parametrize("name", ["mlp", "convbn"])
@pytest.mark.parametrize("J", [1, 4, 16])
def test_task_vectors_match_float64_oracle(name, J):
    model, data = _model(name)
    pre = model.state_dict()
    fts = _perturbed(model, J)
    lambdas = _lambda_rows(J)
    res = sweep(model, TaskVectors(pre, fts, lambdas), data=data, batch_size=16)
    assert res.meta["J"] == J and res.coords.shape == (len(lambdas), J)
    assert res.coord_names == tuple(f"lambda_{j}" for j in range(J))
    loss, err = _oracle(model, [_task_point(pre, fts, lam) for lam in lambdas], data)
    _assert_oracle(res, loss, err, len(data[1]))


@pytest.mark.parametrize("name", ["mlp", "convbn"])
@pytest.mark.parametrize("N", [2, 5, 16])
def test_soup_matches_float64_oracle(name, N):
    model, data = _model(name)
    ings = _perturbed(model, N, seed=N)
    g = np.random.default_rng(N)
    w = np.stack([np.eye(N)[0], np.eye(N)[N - 1], np.full(N, 1.0 / N), g.dirichlet(np.ones(N)),
                  g.uniform(-0.2, 0.6, N)])
    w[-1] /= w[-1].sum()  # an affine combination (a negative weight), rows summing to 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row sums to 1: no warning
        spec = Soup(ings, w)
    res = sweep(model, spec, data=data, batch_size=16)
    assert res.coords.shape == (len(w), N) and res.coord_names == tuple(f"w_{n}" for n in range(N))
    loss, err = _oracle(model, [_soup_point(ings, row) for row in w], data)
    _assert_oracle(res, loss, err, len(data[1]))


def test_soup_rows_not_summing_to_one_warn_once_and_are_the_weighted_sum():
    model, data = _model("convbn")
    ings = _perturbed(model, 3)
    w = np.array([[0.5, 0.5, 0.2], [0.3, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]])
    with pytest.warns(UserWarning) as rec:
        spec = Soup(ings, w)
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 1, msgs
    assert "3 of 4" in msgs[0] and "row 0" in msgs[0] and "1.2" in msgs[0] and "not a soup" in msgs[0]
    mlp, mdata = _model("mlp")
    mings = _perturbed(mlp, 3)
    with pytest.warns(UserWarning):
        res = sweep(mlp, Soup(mings, w[:3]), data=mdata)
    loss, err = _oracle(mlp, [_soup_point(mings, row) for row in w[:3]], mdata)
    _assert_oracle(res, loss, err, len(mdata[1]))
    # the all-zero row is the zero model, exactly
    aff = spec.resolve(load_checkpoints(spec.sources, model), model, torch.float32)
    zero = aff.state_dict(3)
    assert all(not torch.any(v) for k, v in zero.items() if v.is_floating_point())


@pytest.mark.parametrize("lambdas", ["0:1:5", [0.0, 0.25, 0.5, 0.75, 1.0], np.linspace(0, 1, 5)])
def test_shared_lambda_is_one_coordinate(lambdas):
    model, data = _model("mlp")
    pre, fts = model.state_dict(), _perturbed(model, 6)
    spec = TaskVectors(pre, fts, lambdas)
    res = sweep(model, spec, data=data)
    assert res.coord_names == ("lambda",) and np.allclose(res.alphas, np.linspace(0, 1, 5))
    assert spec.describe()["shared_lambda"] is True
    loss, err = _oracle(model, [_task_point(pre, fts, np.full(6, t)) for t in np.linspace(0, 1, 5)], data)
    _assert_oracle(res, loss, err, len(data[1]))


def test_lambdas_default_to_sweeps_alphas():
    model, data = _model("mlp")
    res = sweep(model, TaskVectors(model, _perturbed(model, 2)), "0:1:3", data)
    assert res.coord_names == ("lambda",) and res.K == 3


# ---------------------------------------------------------------------------------------------------------------
# Bit-exact endpoints


def _resolve(spec, model, dtype=torch.float32):
    return spec.resolve(load_checkpoints(spec.sources, model), model, dtype)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pretrained_and_single_task_rows_are_bit_exact(dtype):
    model, _ = _model("convbn")
    pre, fts = model.state_dict(), _perturbed(model, 16)
    lam = np.zeros((18, 16))
    lam[1:17] = np.eye(16)
    lam[17] = 0.3
    aff = _resolve(TaskVectors(pre, fts, lam), model, dtype)
    assert _equal_states(aff.state_dict(0), pre)
    for j in range(16):
        assert _equal_states(aff.state_dict(1 + j), fts[j]), j
    assert not _equal_states(aff.state_dict(17), pre)
    # the shared form: lambda 0 is the pretrained point; with one task, lambda 1 is that task
    aff = _resolve(TaskVectors(pre, fts[:1], "0:1:3"), model, dtype)
    assert _equal_states(aff.state_dict(0), pre) and _equal_states(aff.state_dict(2), fts[0])


def test_single_ingredient_rows_are_bit_exact():
    model, _ = _model("convbn")
    ings = _perturbed(model, 16)
    w = np.vstack([np.eye(16), np.full((1, 16), 1 / 16)])
    aff = _resolve(Soup(ings, w), model)
    for n in range(16):
        assert _equal_states(aff.state_dict(n), ings[n]), n
    assert not _equal_states(aff.state_dict(16), ings[0])


def test_engine_at_an_ingredient_row_equals_the_ingredient_alone():
    """The sweep's value at a one-hot row is the loop oracle's value for the ingredient itself, bit for bit."""
    model, data = _model("mlp")
    ings = _perturbed(model, 5)
    res = sweep(model, Soup(ings, np.eye(5)[[3, 1]]), data=data, method="loop")
    alone = sweep(model, (ings[3], ings[1]), [0.0, 1.0], data, method="loop")
    assert np.array_equal(res.loss, alone.loss) and np.array_equal(res.error, alone.error)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_lambdas_of_the_wrong_width_name_J():
    model, _ = _model("mlp")
    fts = _perturbed(model, 5)
    with pytest.raises(ValueError, match=r"lambdas.*J = 5.*width 3"):
        TaskVectors(model, fts, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"lambdas.*3-d"):
        TaskVectors(model, fts, np.zeros((4, 5, 1)))


def test_weights_of_the_wrong_width_name_N():
    model, _ = _model("mlp")
    ings = _perturbed(model, 4)
    with pytest.raises(ValueError, match=r"weights.*N = 4.*width 6"):
        Soup(ings, np.full((2, 6), 0.25))
    with pytest.raises(ValueError, match=r"weights.*\(K, N\) = \(K, 4\).*1-d"):
        Soup(ings, [0.25] * 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coefficients_are_rejected(bad):
    model, _ = _model("mlp")
    fts = _perturbed(model, 3)
    lam = np.zeros((2, 3))
    lam[1, 2] = bad
    with pytest.raises(ValueError, match="lambdas: coordinates must be finite"):
        TaskVectors(model, fts, lam)
    with pytest.raises(ValueError, match="lambdas: coordinates must be finite"):
        TaskVectors(model, fts, [0.0, bad])
    with pytest.raises(ValueError, match="weights: coordinates must be finite"):
        Soup(fts, lam)


def test_no_checkpoints_and_no_coefficients():
    model, data = _model("mlp")
    with pytest.raises(ValueError, match="finetuned"):
        TaskVectors(model, [], [0.5])
    with pytest.raises(ValueError, match="ingredients"):
        Soup([], np.zeros((1, 0)))
    with pytest.raises(ValueError, match="no weights"):
        sweep(model, Soup(_perturbed(model, 2)), data=data)


def test_ingredient_with_another_head_is_a_named_checkpoint_error():
    model, data = _model("mlp")
    ings = _perturbed(model, 3)
    other = MLP(classes=9).state_dict()  # another head: out.weight / out.bias of another shape
    with pytest.raises(CheckpointError, match=r"ingredients\[2\].*out\.weight.*model \(6, 24\), checkpoint \(9, 24\)"):
        sweep(model, Soup([*ings[:2], other], np.full((1, 3), 1 / 3)), data=data)
    extra = dict(ings[1], **{"adapter.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"finetuned\[1\].*unexpected key.*adapter\.weight"):
        sweep(model, TaskVectors(model, [ings[0], extra], "0:1:2"), data=data)


# ---------------------------------------------------------------------------------------------------------------
# Store, resume, plots


def test_store_resume_and_plots(tmp_path, capsys):
    from lerpfast.plot import plot_store
    from lerpfast.store import ResultStore

    model, data = _model("convbn")
    pre, fts = model.state_dict(), _perturbed(model, 5)
    path = tmp_path / "merge.h5"
    lam = _lambda_rows(5)
    w = np.vstack([np.eye(5)[:2], np.full((1, 5), 0.2)])
    runs = {"tasks": TaskVectors(pre, fts, lam), "shared": TaskVectors(pre, fts, "0:1:4"), "soup": Soup(fts, w)}
    first = {n: sweep(model, s, data=data, store=path, name=n) for n, s in runs.items()}
    for n, r in first.items():
        assert r.meta["points_computed"] == r.K, n
    again = {n: sweep(model, s, data=data, store=path, name=n) for n, s in
             {"tasks": TaskVectors(pre, fts, lam), "shared": TaskVectors(pre, fts, "0:1:4"),
              "soup": Soup(fts, w)}.items()}
    for n, r in again.items():
        assert r.meta["points_computed"] == 0, n  # resumed: nothing to compute
        assert np.array_equal(r.loss, first[n].loss)
    with ResultStore(path, "r") as st:
        tasks, soup = st.read("tasks"), st.read("soup")
        assert tasks.coord_names == tuple(f"lambda_{j}" for j in range(5)) and np.array_equal(tasks.coords, lam)
        assert soup.coord_names == tuple(f"w_{n}" for n in range(5)) and np.array_equal(soup.coords, w)
        assert st.read("shared").coord_names == ("lambda",)
        desc = st.attrs("soup")["slice"]
        assert desc["kind"] == "soup" and desc["N"] == 5 and np.array_equal(desc["weights"], w)
        desc = st.attrs("tasks")["slice"]
        assert desc["kind"] == "task_vectors" and desc["J"] == 5 and desc["shared_lambda"] is False
    from lerpfast.cli import main

    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [ln.split()[:3] for ln in shown[1:]] == [["shared", "task_vectors", "4/4"], ["soup", "soup", "3/3"],
                                                    ["tasks", "task_vectors", "5/5"]], shown
    written = {p.name for p in plot_store(path, tmp_path / "fig")}
    assert "lines.png" in written  # the shared-lambda sweep is a line
    assert {"tasks_points.png", "soup_points.png"} <= written
    # a different lambda matrix under the same name is another sweep: refused, not mixed
    from lerpfast.store import SweepMismatchError

    with pytest.raises(SweepMismatchError):
        sweep(model, TaskVectors(pre, fts, lam * 0.5), data=data, store=path, name="tasks")


def test_task_vector_line_plot_labels_lambda():
    from lerpfast.plot import plot_lines

    model, data = _model("mlp")
    res = sweep(model, TaskVectors(model, _perturbed(model, 3), "0:1:3"), data=data)
    fig = plot_lines({"tv": res})
    assert "task" in fig.axes[0].get_xlabel() and "distance" not in fig.axes[0].get_xlabel()


# ---------------------------------------------------------------------------------------------------------------
# The engine with J = 16: every path the CPU can take, one layer at a time


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_j16_under_forced_backends(monkeypatch, clean_dispatch, backend):
    from lerpfast.kernels import ext

    if backend == "cuda" and not ext.available():
        pytest.fail("lerpfast._C is not built: copy or build it (python setup.py build_ext --inplace)")
    model, data = _model("convbn")
    pre, fts = model.state_dict(), _perturbed(model, 16)
    lam = _lambda_rows(16)
    ref = sweep(model, TaskVectors(pre, fts, lam), data=data, precision="fp64", method="loop")
    monkeypatch.setenv("LERPFAST_BACKEND", backend)
    res = sweep(model, TaskVectors(pre, fts, lam), data=data, fuse=False)
    assert np.allclose(res.loss, ref.loss, rtol=1e-5, atol=1e-5)


class _Allocations(TorchDispatchMode):
    """The numel of every tensor an op allocates (an output whose storage is none of its inputs': not a view)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in ins:
                self.sizes.append((str(func), t.numel()))
        return out


class Deep(nn.Module):
    """Eight 64x64 layers: one layer is an eighth of the model, so a model copy per point would show."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))

    def forward(self, x):
        for m in self.layers:
            x = torch.relu(m(x))
        return x


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_j16_forward_builds_one_layer_at_a_time(monkeypatch, clean_dispatch, backend):
    """Inside the batched forward of a 16-task slice, no tensor larger than one layer's K weight settings is ever
    allocated (the K points' weights of one layer, never a model copy per point), and every layer's are."""
    from lerpfast.engine.model import MultiPointModel

    monkeypatch.setenv("LERPFAST_BACKEND", backend)
    torch.manual_seed(0)
    model = Deep().eval()
    spec = TaskVectors(model, _perturbed(model, 16), np.random.default_rng(0).uniform(0, 1, (6, 16)))
    aff = _resolve(spec, model)
    mp = MultiPointModel(model, aff, fuse=False)
    mp.set_points(aff.points())
    x = torch.randn(8, 64)
    with torch.inference_mode(), _Allocations() as log:
        out = mp(x, 8)
    layer = 6 * 64 * 64  # K x one weight
    biggest = max(n for _, n in log.sizes)
    assert out.shape[-1] == 64 and biggest <= layer, sorted(log.sizes, key=lambda e: -e[1])[:3]
    if backend == "torch":  # the C++ op builds its weights inside one call
        assert sum(n == layer for _, n in log.sizes) >= 8  # each layer's K weights, one layer at a time


def test_j16_with_fusion_and_chunks():
    model, data = _model("convbn")
    pre, fts = model.state_dict(), _perturbed(model, 16)
    lam = _lambda_rows(16)
    ref = sweep(model, TaskVectors(pre, fts, lam), data=data, precision="fp64", method="loop")
    res = sweep(model, TaskVectors(pre, fts, lam), data=data, fuse=True, points_per_pass=2)
    assert res.meta["fusion"]["chains"] >= 2
    assert np.allclose(res.loss, ref.loss, rtol=1e-5, atol=1e-5)


def _tv16():
    model, data = _model("mlp")
    return model, TaskVectors(model.state_dict(), _perturbed(model, 16), _lambda_rows(16)), data


def _dist_worker(rank: int, world: int, port: int, out_dir: str):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, spec, data = _tv16()
        r = sweep(model, spec, data=data, points_per_pass=2, batch_size=16)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), loss=r.loss, error=r.error, world=r.meta["world_size"])
    finally:
        dist.destroy_process_group()


def test_j16_sharded_over_two_ranks(tmp_path):
    """torchrun's path: the points of a 16-task sweep sharded over 2 gloo ranks give the single-process result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model, spec, data = _tv16()
    single = sweep(model, spec, data=data, batch_size=16)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert int(got["world"]) == 2
        np.testing.assert_allclose(got["loss"], single.loss, rtol=1e-6)
        np.testing.assert_array_equal(got["error"], single.error)


class _OpLog(TorchDispatchMode):
    """The aten ops a piece of code runs, with their output shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), tuple(out.shape) if torch.is_tensor(out) else ()))
        return out


def _slice16(K=11, J=16, shape=(24, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    ad = torch.randn((1 + J, *shape), generator=g)
    idx = torch.zeros(K, dtype=torch.long)
    coefs = (torch.rand((K, J), generator=g) * 2 - 0.5)
    coefs[0] = 0.0  # the anchor itself
    return ParamSlice(ad[:1], ad[1:]), Points(idx, coefs)


def test_combine_of_many_directions_is_one_product():
    """J >= 4 on a CPU: one addmm over the flattened tensor (was 2J elementwise passes), float64-accurate, anchors
    bit-exact; J <= 3 keeps the fused kernels' order (bit-identical to combine_one); no exact fp32 matmul
    (float32_matmul_precision 'medium') keeps the loop."""
    w, pts = _slice16()
    a, d, idx, c = w.anchors, w.dirs, pts.anchor_idx, pts.coefs
    with _OpLog() as log:
        out = Fe.combine(a, d, idx, c)
    assert len(log.ops) <= 4, log.ops
    ref = Fe.combine(a.double(), d.double(), idx, c.double())
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(out[0], a[0])
    for J in (1, 2, 3):
        o = Fe.combine(a, d[:J], idx, c[:, :J])
        assert all(torch.equal(o[k], Fe.combine_one(a[0], d[:J], c[k, :J])) for k in range(len(idx)))
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        loop = Fe.combine(a, d, idx, c)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert all(torch.equal(loop[k], Fe.combine_one(a[0], d, c[k])) for k in range(len(idx)))


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_shared_input_with_more_directions_than_points_uses_the_points_weights(op):
    """A shared input (a first layer) times T = 1 + 16 basis tensors is more work than times the K = 11 points'
    weights: the layer builds the K weights instead (was: a (17, N, out) product), and still matches float64."""
    if op == "linear":
        w, pts = _slice16(shape=(24, 40))
        x = torch.randn(7, 40)
        run = lambda xx, ww, pp: Fe.lerp_linear(xx, ww, None, pp, shared_input=True)  # noqa: E731
    else:
        w, pts = _slice16(shape=(6, 3, 3, 3))
        x = torch.randn(7, 3, 5, 5)
        run = lambda xx, ww, pp: Fe.lerp_conv(xx, ww, None, pp, 1, 1, 1, 1, shared_input=True)  # noqa: E731
    with torch.inference_mode(), _OpLog() as log:
        out = run(x, w, pts)
    assert not any(shape[:1] == (17,) or shape[1:2] == (17 * w.anchors.shape[1],) for _, shape in log.ops), log.ops
    w64 = ParamSlice(w.anchors.double(), w.dirs.double())
    ref = run(x.double(), w64, Points(pts.anchor_idx, pts.coefs.double()))
    assert out.shape == ref.shape and torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    few = Points(pts.anchor_idx[:11], pts.coefs[:, :4])  # T = 5 <= K = 11: the basis form, as before
    with torch.inference_mode(), _OpLog() as log:
        run(x, ParamSlice(w.anchors, w.dirs[:4]), few)
    assert any(shape[:1] == (5,) or shape[1:2] == (5 * w.anchors.shape[1],) for _, shape in log.ops)


# ---------------------------------------------------------------------------------------------------------------
# loss_fn contract


def test_loss_fn_contract():
    """loss_fn gets (R, C) float64 logits and (R,) targets (R = points x samples) and returns R losses; a loss_fn
    that reduces them is a ValueError naming loss_fn, the shape it returned and the shape it must return (was a
    RuntimeError "shape '[3, -1]' is invalid" from metrics.py)."""
    model, data = _model("mlp")
    theta_b = _perturbed(model, 1)[0]

    def mean_loss(logits, target):  # reduces to a scalar: the natural first try
        return F.cross_entropy(logits, target)

    for method in ("engine", "loop"):
        R = 3 * 40 if method == "engine" else 40
        with pytest.raises(ValueError, match=rf"loss_fn .*mean_loss returned shape \(\) .* must return .*\({R},\)"):
            sweep(model, (model, theta_b), [0.0, 0.5, 1.0], data, loss_fn=mean_loss, method=method, batch_size=40,
                  reference=None)
    calls = []

    def per_sample(logits, target):
        calls.append((tuple(logits.shape), tuple(target.shape), logits.dtype))
        return F.cross_entropy(logits, target, reduction="none") * 2

    res = sweep(model, (model, theta_b), [0.0, 1.0], data, loss_fn=per_sample, batch_size=40)
    plain = sweep(model, (model, theta_b), [0.0, 1.0], data, batch_size=40)
    assert np.allclose(res.loss, 2 * plain.loss, rtol=1e-12)
    assert calls[0] == ((2 * 40, 6), (2 * 40,), torch.float64)  # K * B rows of logits, float64


# ---------------------------------------------------------------------------------------------------------------
# README


def _merging_block() -> str:
    text = README.read_text()
    section = text[text.index("## Merging"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_merging_example_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_merging_block(), "README.md:Merging", "exec"), ns)
    tv, soup = ns["tv"], ns["soup"]
    assert tv.coord_names == ("lambda",) and tv.K == 11 and np.isfinite(tv.loss).all()
    assert soup.coord_names == ("w_0", "w_1", "w_2") and np.isfinite(soup.loss).all()
    # the numbers the README quotes: adding the task vectors fixes the classes pre-training never saw
    assert tv.error[0] > 0.5 and tv.error[-1] < 0.15 and soup.error[0] > soup.error[1] > soup.error[2]
    assert np.isclose(soup.error[0], tv.error[np.argmin(abs(tv.alphas - 0.3))], atol=0.02)  # uniform = lambda 1/3
    assert lerpfast.TaskVectors is TaskVectors and lerpfast.Soup is Soup
