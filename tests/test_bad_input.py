"""Bad input that used to be accepted or crash (issue 18 section 2) and the metric rule for non-finite logits
(issue 15 section 0): a sample whose logits contain NaN or +inf is wrong for top-1 / top-5, its loss and
distance are NaN and it disagrees with the reference."""

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (as tests/test_kernels.py does)

import lerpfast  # noqa: E402
import lerpfast.store  # noqa: E402
from lerpfast.geometry import parse_coords  # noqa: E402
from lerpfast.metrics import PointMetrics  # noqa: E402


@pytest.mark.parametrize("spec", ["nan:1:3", "0:nan:3", "inf:1:3", "0:-inf:3"])
def test_string_coords_must_be_finite(spec):
    with pytest.raises(ValueError, match="finite") as e:
        parse_coords(spec)
    assert spec in str(e.value)


def test_list_coords_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        parse_coords([0.0, float("nan")])


@pytest.mark.parametrize("bad", [10, -1])
def test_labels_out_of_range_named(bad):
    m = PointMetrics(2, reference=False)
    z = torch.randn(2, 4, 10, dtype=torch.float64)
    t = torch.tensor([1, 2, bad, 3])
    with pytest.raises(ValueError) as e:
        m.update(z, t)
    msg = str(e.value)
    assert f"label {bad}" in msg and "position 2" in msg and "10 classes" in msg


def _bad_logits():
    """Point 0 finite; point 1: sample 0 NaN in a non-target class, sample 1 +inf in the target class,
    sample 2 -inf in one class (legitimate: probability 0), sample 3 finite."""
    z = torch.zeros(2, 4, 6, dtype=torch.float64)
    z[:, :, 0] = 5.0  # target 0 wins everywhere
    z[1, 0, 3] = float("nan")
    z[1, 1, 0] = float("inf")
    z[1, 2, 4] = float("-inf")
    t = torch.zeros(4, dtype=torch.long)
    r = torch.zeros(4, 6, dtype=torch.float64)
    r[:, 0] = 5.0
    return z, t, r


def test_nan_and_posinf_logits_score_wrong_with_nan_loss():
    z, t, r = _bad_logits()
    m = PointMetrics(2)
    m.update(z, t, r)
    out = m.compute()
    assert np.isfinite(out["loss"][0]) and out["error"][0] == 0 and out["top5_error"][0] == 0
    assert math.isnan(out["loss"][1])
    assert out["error"][1] == 0.5 and out["top5_error"][1] == 0.5  # the two non-finite samples of 4
    assert out["disagreement"][1] == 0.5 and math.isnan(out["distance"][1])
    assert out["disagreement"][0] == 0 and out["distance"][0] < 1e-12


def test_nan_reference_disagrees_everywhere():
    z, t, r = _bad_logits()
    r[2, 1] = float("nan")
    m = PointMetrics(2)
    m.update(z, t, r)
    out = m.compute()
    assert out["disagreement"][0] == 0.25 and math.isnan(out["distance"][0])


def _bn_mlp_negative_variance():
    """The 16-32-BN-10 MLP of issue 15 section 0: at alpha = 2 the interpolated running variance of every
    channel is 2 * var_b - var_a < 0, so the BN output (and the logits) are NaN in PyTorch."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).eval()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    a["1.running_var"] = torch.full((32,), 2.0)
    b["1.running_var"] = torch.full((32,), 0.5)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(12, 16, generator=g), torch.randint(0, 10, (12,), generator=g))
    return model, a, b, data


def _assert_nan_point_scored(res, oracle):
    for name in ("loss", "error", "top5_error"):
        got, want = np.asarray(res.metrics[name]), np.asarray(oracle.metrics[name])
        assert np.array_equal(np.isnan(got), np.isnan(want)), (name, got, want)
        fin = ~np.isnan(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.isnan(oracle.metrics["loss"][-1]) and oracle.metrics["error"][-1] == 1
    assert oracle.metrics["top5_error"][-1] == 1 and np.isfinite(oracle.metrics["loss"][:-1]).all()


@pytest.mark.parametrize("method", ["loop", "engine", "vmap"])
def test_nan_point_scores_like_the_oracle_on_every_method(method):
    from lerpfast import sweep

    model, a, b, data = _bn_mlp_negative_variance()
    kw = dict(bn="interpolate", batch_size=5, reference=None)
    oracle = sweep(model, (a, b), [0.0, 1.0, 2.0], [data], precision="fp64", method="loop", **kw)
    res = sweep(model, (a, b), [0.0, 1.0, 2.0], [data], precision="fp32", method=method, **kw)
    _assert_nan_point_scored(res, oracle)


@pytest.mark.parametrize("method", ["loop", "engine"])
def test_nan_point_scores_like_the_oracle_under_triton(monkeypatch, method):
    """LERPFAST_BACKEND=triton (interpreter without a GPU): the fused metrics kernel (loop) and the fused
    Linear + BN kernels (engine) agree with the oracle on the NaN point."""
    pytest.importorskip("triton")
    from test_fusion import _triton_modules

    from lerpfast import sweep
    from lerpfast.engine import dispatch

    _triton_modules()
    model, a, b, data = _bn_mlp_negative_variance()
    kw = dict(bn="interpolate", batch_size=5, reference=None)
    oracle = sweep(model, (a, b), [0.0, 1.0, 2.0], [data], precision="fp64", method="loop", **kw)
    monkeypatch.setenv("LERPFAST_BACKEND", "triton")
    dispatch.reset()
    res = sweep(model, (a, b), [0.0, 1.0, 2.0], [data], precision="fp32", method=method, **kw)
    used = dispatch.report()
    assert used.get("point_metrics", {}).get("triton", 0) > 0, used
    _assert_nan_point_scored(res, oracle)


class _TwoHeads(torch.nn.Module):
    """A forward returning (features, logits): the default rule scores item 0, the features."""

    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return h, self.head(h)


@pytest.mark.parametrize("method", ["engine", "loop", "vmap"])
def test_output_selects_the_logits(method):
    torch.manual_seed(0)
    a, b = _TwoHeads(), _TwoHeads()
    data = (torch.randn(12, 5), torch.randint(0, 3, (12,)))
    got = lerpfast.sweep(a, (a, b), "0:1:3", data, method=method, output=1, precision="fp64")
    pick = lerpfast.sweep(a, (a, b), "0:1:3", data, method=method, output=lambda out: out[1], precision="fp64")
    want = []
    for alpha in (0.0, 0.5, 1.0):
        sd = {k: torch.lerp(a.state_dict()[k].double(), b.state_dict()[k].double(), alpha) for k in a.state_dict()}
        m = _TwoHeads().double()
        m.load_state_dict(sd)
        want.append(float(torch.nn.functional.cross_entropy(m(data[0].double())[1], data[1])))
    np.testing.assert_allclose(got.loss, want, rtol=1e-10)
    np.testing.assert_allclose(pick.loss, want, rtol=1e-10)
    assert got.meta["output"] == 1
    with pytest.raises(TypeError, match="output=5 selects NoneType .* with 2 items"):
        lerpfast.sweep(a, (a, b), "0:1:3", data, method=method, output=5)


def test_output_is_part_of_a_stored_sweeps_identity(tmp_path):
    torch.manual_seed(0)
    a, b = _TwoHeads(), _TwoHeads()
    data = (torch.randn(12, 5), torch.randint(0, 3, (12,)))
    lerpfast.sweep(a, (a, b), "0:1:3", data, output=1, store=tmp_path / "s.h5", name="l")
    with pytest.raises(lerpfast.store.SweepMismatchError, match="output"):
        lerpfast.sweep(a, (a, b), "0:1:3", data, output=0, store=tmp_path / "s.h5", name="l")
