"""Bad input that used to be accepted or crash (issue 18 section 2) and the metric rule for non-finite logits
(issue 15 section 0): a sample whose logits contain NaN or +inf is wrong for top-1 / top-5, its loss and
distance are NaN and it disagrees with the reference."""

import math

import numpy as np
import pytest
import torch

from lerpfast.geometry import parse_coords
from lerpfast.metrics import PointMetrics


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
