"""Weights read outside their module (issue 18 §3): the engine's error advice must work when followed."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lerpfast import sweep


class TiedAE(nn.Module):
    """A tied, transposed decoder: the root's forward reads ``enc.weight``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 4)

    def forward(self, x):
        return F.linear(torch.relu(self.enc(x)), self.enc.weight.t())


class Nested(nn.Module):
    """The reader is ``body`` (the parent of ``body.enc``); a native layer stays batched beside it."""

    def __init__(self):
        super().__init__()
        self.body = TiedAE()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("make", [TiedAE, Nested], ids=["root_reads", "parent_reads"])
def test_external_read_advice_works_when_followed(make):
    torch.manual_seed(0)
    a, b = make(), make()
    data = (torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))
    alphas = [-0.5, 0.0, 0.3, 1.0, 1.5]
    kw = dict(precision="fp64", batch_size=3, progress=False)
    with pytest.raises(AttributeError, match=r"fallback=\[") as info:
        sweep(a, (a, b.state_dict()), alphas, data, **kw)
    advised = re.search(r"fallback=(\[[^\]]*\])", str(info.value)).group(1)
    res = sweep(a, (a, b.state_dict()), alphas, data, fallback=eval(advised), **kw)  # noqa: S307 - a list literal
    ref = sweep(a, (a, b.state_dict()), alphas, data, method="loop", **kw)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10, atol=0)


def test_advice_when_the_owner_itself_was_named():
    """A user who passed the owner (fallback=['enc']) gets advice naming its reader, and that advice works."""
    torch.manual_seed(0)
    a, b = TiedAE(), TiedAE()
    data = (torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))
    kw = dict(precision="fp64", batch_size=3, progress=False)
    with pytest.raises(AttributeError, match=r"module 'enc' .*fallback=\[''\]"):
        sweep(a, (a, b), [0.0, 0.5, 1.5], data, fallback=["enc"], **kw)
    res = sweep(a, (a, b), [0.0, 0.5, 1.5], data, fallback=[""], **kw)
    ref = sweep(a, (a, b), [0.0, 0.5, 1.5], data, method="loop", **kw)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-10, atol=0)
