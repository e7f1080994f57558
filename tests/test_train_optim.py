"""Optimizers: RK2 steps against hand-computed steps on a quadratic, and the registry."""

import math

import pytest
import torch

from lerpfast.train import optim

# L(theta) = 1/2 theta^T A theta - b^T theta, gradient A theta - b (float64 throughout).
A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, -0.2], [0.0, -0.2, 2.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
THETA0 = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
LR = 0.1


def _grad(theta):
    return A @ theta - B


def _step(name, steps=1, weight_decay=0.0):
    theta = torch.nn.Parameter(THETA0.clone())
    opt = optim.create(name, [theta], LR, weight_decay=weight_decay)
    calls = []

    def closure():
        opt.zero_grad()
        loss = 0.5 * theta @ A @ theta - B @ theta
        loss.backward()
        calls.append(theta.detach().clone())
        return loss

    losses = [opt.step(closure) for _ in range(steps)]
    return theta.detach(), calls, losses, opt


# (a1, a2, c) written out per method, independently of optim.RK_TABLEAUS
HAND = {"midpoint": (0.0, 1.0, 0.5), "heun": (0.5, 0.5, 1.0), "ralston": (1 / 3, 2 / 3, 3 / 4)}


@pytest.mark.parametrize("method", ["midpoint", "heun", "ralston"])
def test_rk_sgd_single_step_matches_hand_computation(method):
    a1, a2, c = HAND[method]
    k1 = -_grad(THETA0)
    k2 = -_grad(THETA0 + c * LR * k1)
    expected = THETA0 + LR * (a1 * k1 + a2 * k2)
    theta, calls, losses, _ = _step(f"rk_sgd_{method}")
    torch.testing.assert_close(theta, expected, rtol=1e-14, atol=1e-15)
    # two gradient evaluations on the same minibatch: at theta0 and at the probe point
    assert len(calls) == 2
    torch.testing.assert_close(calls[1], THETA0 + c * LR * k1, rtol=1e-14, atol=1e-15)
    assert losses[0].item() == pytest.approx((0.5 * THETA0 @ A @ THETA0 - B @ THETA0).item(), rel=1e-14)


def test_rk_sgd_methods_differ_and_beat_euler_on_the_flow():
    # On the gradient flow of a quadratic, one RK2 step is closer to the exact flow exp(-h A) than an Euler step.
    evals, evecs = torch.linalg.eigh(A)
    flow = evecs @ torch.diag(torch.exp(-LR * evals)) @ evecs.T
    exact = flow @ (THETA0 - torch.linalg.solve(A, B)) + torch.linalg.solve(A, B)
    euler = THETA0 - LR * _grad(THETA0)
    for method in HAND:
        theta = _step(f"rk_sgd_{method}")[0]
        assert (theta - exact).norm() < 0.2 * (euler - exact).norm()


def test_rk_sgd_weight_decay_is_l2_at_each_stage():
    wd = 0.05
    a1, a2, c = HAND["heun"]
    k1 = -(_grad(THETA0) + wd * THETA0)
    probe = THETA0 + c * LR * k1
    k2 = -(_grad(probe) + wd * probe)
    theta = _step("rk_sgd_heun", weight_decay=wd)[0]
    torch.testing.assert_close(theta, THETA0 + LR * (a1 * k1 + a2 * k2), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("method", ["midpoint", "heun", "ralston"])
def test_rk_adam_two_steps_match_hand_computation(method):
    a1, a2, c = HAND[method]
    b1, b2, eps = 0.9, 0.999, 1e-8
    theta, m, v = THETA0.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in (1, 2):
        g1 = _grad(theta)
        m1, v1 = b1 * m + (1 - b1) * g1, b2 * v + (1 - b2) * g1 * g1
        k1 = -(m1 / (1 - b1**t)) / (torch.sqrt(v1 / (1 - b2**t)) + eps)
        g2 = _grad(theta + c * LR * k1)
        m2, v2 = b1 * m + (1 - b1) * g2, b2 * v + (1 - b2) * g2 * g2
        k2 = -(m2 / (1 - b1**t)) / (torch.sqrt(v2 / (1 - b2**t)) + eps)
        theta = theta + LR * (a1 * k1 + a2 * k2)
        m, v = a1 * m1 + a2 * m2, a1 * v1 + a2 * v2
    got, calls, _, opt = _step(f"rk_adam_{method}", steps=2)
    assert len(calls) == 4
    torch.testing.assert_close(got, theta, rtol=1e-13, atol=1e-14)
    state = next(iter(opt.state.values()))
    assert state["step"] == 2
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-13, atol=1e-15)


def test_rk_needs_a_closure_and_state_round_trips():
    theta = torch.nn.Parameter(THETA0.clone())
    opt = optim.create("rk_adam_ralston", [theta], LR)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    _, _, _, opt = _step("rk_adam_ralston", steps=3)
    theta2 = torch.nn.Parameter(THETA0.clone())
    opt2 = optim.create("rk_adam_ralston", [theta2], LR)
    opt2.load_state_dict(opt.state_dict())
    s1, s2 = next(iter(opt.state.values())), next(iter(opt2.state.values()))
    assert s2["step"] == 3 and torch.equal(s1["exp_avg"], s2["exp_avg"])


@pytest.mark.parametrize("name", ["sgd", "sgdm", "nesterov", "rmsprop", "adadelta", "adam"])
def test_base_optimizers_follow_closure_protocol(name):
    theta, calls, losses, opt = _step(name)
    assert len(calls) == 1 and math.isfinite(losses[0].item())
    assert not torch.equal(theta, THETA0)
    if name == "sgd":
        torch.testing.assert_close(theta, THETA0 - LR * _grad(THETA0))
    if name == "nesterov":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_registry():
    names = optim.available()
    assert {"sgd", "sgdm", "rmsprop", "adadelta", "adam"} <= set(names)
    assert {f"rk_{b}_{m}" for b in ("sgd", "adam") for m in ("midpoint", "heun", "ralston")} <= set(names)
    assert optim.requires_closure("rk_sgd_heun") and not optim.requires_closure("adam")
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.create("lbfgs2", [torch.nn.Parameter(torch.zeros(1))], 0.1)
