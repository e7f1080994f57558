"""GraphedForward's bookkeeping on the CPU (issue 15): no capture while the dispatcher compiles or measures, one
memory pool for every graph (the partial last batch included), out of memory during capture propagates."""

import warnings

import pytest
import torch
from torch import nn

from lerpfast.engine import model as engine_model


class _FakeGraph:
    """Stands in for a captured CUDA graph: replay recomputes the forward from the static input."""

    def __init__(self, fn, static_x, out):
        self.fn, self.static_x, self.out = fn, static_x, out

    def replay(self):
        self.out.copy_(self.fn(self.static_x))


class _Net:
    def __init__(self):
        self.lin = nn.Linear(4, 3)
        self.calls = 0

    def __call__(self, x, batch):
        self.calls += 1
        return self.lin(x)


@pytest.fixture
def graphed(monkeypatch):
    """A GraphedForward on CPU tensors with a fake capture recording which pool each capture got."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    net = _Net()
    g = engine_model.GraphedForward(net)
    state = {"compiling": True, "pools": [], "fail": None}
    monkeypatch.setattr(g, "_on_device", lambda tensors: True)
    monkeypatch.setattr(g, "_compiling", lambda: state["compiling"])
    monkeypatch.setattr(g, "_pool", lambda: g.pool or setattr(g, "pool", object()) or g.pool)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)

    def capture(leaves, spec, batch, pool):
        if state["fail"] is not None:
            raise state["fail"]
        state["pools"].append(pool)
        static = [t.clone() for t in leaves]
        with torch.no_grad():
            out = net(static[0], batch)
        return _FakeGraph(lambda x: net(x, batch), static[0], out), static, out

    monkeypatch.setattr(g, "_capture", capture)
    return g, net, state


def test_no_capture_until_the_dispatcher_has_settled(graphed):
    g, net, state = graphed
    x = torch.randn(6, 4)
    with torch.no_grad():
        want = net.lin(x)
        for _ in range(3):  # first sight, then two calls while kernels compile: eager
            torch.testing.assert_close(g(x, 6), want)
        assert g.graphs == {} and g.stats["eager_while_compiling"] == 2
        state["compiling"] = False
        torch.testing.assert_close(g(x, 6), want)  # captured now, then replayed
        torch.testing.assert_close(g(x + 1, 6), net.lin(x + 1))  # replay reads the new input
    assert g.stats["captures"] == 1 and g.stats["replays"] == 2


def test_partial_last_batch_shares_the_pool(graphed):
    g, net, state = graphed
    state["compiling"] = False
    with torch.no_grad():
        for n in (8, 8, 8, 3, 3):  # two shapes: full batches, then the partial last batch
            x = torch.randn(n, 4)
            torch.testing.assert_close(g(x, n), net.lin(x))
    assert g.stats["captures"] == 2 and len(state["pools"]) == 2
    assert state["pools"][0] is state["pools"][1] is g.pool  # one private pool for both graphs
    g.reset()  # a new chunk of points: shapes known, choices settled -> captured at the first call
    with torch.no_grad():
        g(torch.randn(8, 4), 8)
    assert g.stats["captures"] == 3 and state["pools"][2] is g.pool


def _captures_will_fail(graphed, error: Exception):
    """Kernels settled, the shape seen once (eager); every capture from now on raises ``error``."""
    g, net, state = graphed
    state["compiling"] = False
    x = torch.randn(5, 4)
    with torch.no_grad():
        g(x, 5)
    state["fail"] = error
    return g, net, state, x


def test_oom_during_capture_propagates_and_keeps_graphs_on(graphed):
    g, net, state, x = _captures_will_fail(graphed, RuntimeError("CUDA error: out of memory"))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="out of memory"):
            g(x, 5)
        assert not g.failed
        state["fail"] = None
        g(x, 5)
    assert g.stats["captures"] == 1


def test_other_capture_failure_runs_eagerly(graphed):
    g, net, state, x = _captures_will_fail(graphed, RuntimeError("operation not permitted when stream is capturing"))
    with torch.no_grad():
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.testing.assert_close(g(x, 5), net.lin(x))
    assert g.failed and any("capture failed" in str(r.message) for r in rec)
