"""Optimizers by name, including the Runge-Kutta (RK2) variants of Im, Tao & Branson (2016, appendix A.3).

Every optimizer is driven the same way, ``loss = optimizer.step(closure)``, where ``closure()`` zeroes the
gradients, recomputes the loss on the *current* minibatch at the *current* parameters, back-propagates and
returns the loss. The torch optimizers call it once; the RK2 optimizers call it twice (two gradient
evaluations on the same minibatch) and return the loss of the first call, i.e. at the parameters the step
started from.

RK2 on the gradient flow ``dtheta/dt = -D(grad L(theta))`` with step ``h = lr``::

    k1 = -D(g(theta))
    k2 = -D(g(theta + c * lr * k1))
    theta <- theta + lr * (a1 * k1 + a2 * k2)

with ``(a1, a2, c)`` = midpoint ``(0, 1, 1/2)``, Heun ``(1/2, 1/2, 1)``, Ralston ``(1/3, 2/3, 3/4)``.
For SGD, ``D`` is the identity (weight decay added to the gradient as L2); this is exactly the RK2 update of the
paper. For Adam, ``D(g)`` is Adam's bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)`` computed from the
moments *before* the step (both stages see the same optimizer state, as both RK stages evaluate the same
vector field), and the moments then advance with the same weights: ``m <- a1 * m(g1) + a2 * m(g2)`` (likewise
``v``), i.e. ``m <- beta1 m + (1 - beta1)(a1 g1 + a2 g2)`` and ``v <- beta2 v + (1 - beta2)(a1 g1^2 + a2 g2^2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["create", "available", "RK2", "RK_TABLEAUS", "requires_closure"]

# (a1, a2, c): theta_{t+1} = theta_t + h (a1 k1 + a2 k2),  k2 evaluated at theta_t + c h k1
RK_TABLEAUS: dict[str, tuple[float, float, float]] = {
    "midpoint": (0.0, 1.0, 0.5),
    "heun": (0.5, 0.5, 1.0),
    "ralston": (1.0 / 3.0, 2.0 / 3.0, 0.75),
}

_BASE = ("sgd", "sgdm", "nesterov", "rmsprop", "adadelta", "adam")
_RK = tuple(f"rk_{base}_{method}" for base in ("sgd", "adam") for method in RK_TABLEAUS)


def available() -> list[str]:
    """Optimizer names accepted by :func:`create`."""
    return list(_BASE + _RK)


def requires_closure(name: str) -> bool:
    """Whether the optimizer evaluates the loss more than once per step (the RK2 variants)."""
    return name.startswith("rk_")


class RK2(torch.optim.Optimizer):
    """Second-order Runge-Kutta SGD or Adam (Im et al. 2016, appendix A.3).

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups.
    lr : float
        Step size ``h``.
    method : {"midpoint", "heun", "ralston"}
        Butcher tableau.
    base : {"sgd", "adam"}
        The direction ``D``: identity (SGD) or Adam's normalized moment.
    betas : tuple of float
        Adam's moment decay rates.
    eps : float
        Adam's denominator guard.
    weight_decay : float
        L2 penalty added to every gradient evaluation (``g + wd * theta`` at the point where ``g`` is taken).

    Notes
    -----
    ``step`` requires a closure and calls it twice; the model's batch-norm running statistics are therefore
    updated twice per step, and stochastic layers (dropout) draw a new mask for the second evaluation.
    """

    def __init__(self, params: Iterable, lr: float, method: str = "heun", base: str = "sgd",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if method not in RK_TABLEAUS:
            raise ValueError(f"unknown RK2 method {method!r}; choose from {sorted(RK_TABLEAUS)}")
        if base not in ("sgd", "adam"):
            raise ValueError(f"RK2 base must be 'sgd' or 'adam', got {base!r}")
        if lr < 0:
            raise ValueError(f"invalid lr {lr}")
        defaults = dict(lr=lr, method=method, base=base, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _grads(self, group: dict) -> list[torch.Tensor]:
        out = []
        for p in group["params"]:
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            if group["weight_decay"] != 0:
                g.add_(p.detach(), alpha=group["weight_decay"])
            out.append(g)
        return out

    def _direction(self, group: dict, p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Return ``(D(g), new_state_parts)`` without touching the stored state."""
        if group["base"] == "sgd":
            return g, ()
        beta1, beta2 = group["betas"]
        state = self.state[p]
        t = state.get("step", 0) + 1
        m = state["exp_avg"] * beta1 + g * (1 - beta1) if "exp_avg" in state else g * (1 - beta1)
        v = state["exp_avg_sq"] * beta2 + g * g * (1 - beta2) if "exp_avg_sq" in state else g * g * (1 - beta2)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        return m_hat / (v_hat.sqrt() + group["eps"]), (m, v)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one RK2 step; ``closure`` recomputes the loss and gradients and is called twice.

        Returns
        -------
        torch.Tensor
            The loss of the first evaluation (at the parameters the step started from).
        """
        if closure is None:
            raise RuntimeError("RK2 optimizers need a closure that recomputes the loss (two evaluations per step)")
        with torch.enable_grad():
            loss = closure()
        saved = []
        for group in self.param_groups:
            a1, a2, c = RK_TABLEAUS[group["method"]]
            g1 = self._grads(group)
            k1, parts1, theta0 = [], [], []
            for p, g in zip(group["params"], g1):
                d, parts = self._direction(group, p, g)
                k1.append(-d)
                parts1.append(parts)
                theta0.append(p.detach().clone())
                p.add_(k1[-1], alpha=c * group["lr"])  # probe point theta + c * h * k1
            saved.append((k1, parts1, theta0))
        with torch.enable_grad():
            closure()
        for group, (k1, parts1, theta0) in zip(self.param_groups, saved):
            a1, a2, c = RK_TABLEAUS[group["method"]]
            g2 = self._grads(group)
            for p, g, k1_p, parts1_p, theta0_p in zip(group["params"], g2, k1, parts1, theta0):
                d, parts2 = self._direction(group, p, g)
                k2_p = -d
                update = k1_p * a1 + k2_p * a2  # (a1 k1 + a2 k2)
                p.copy_(theta0_p).add_(update, alpha=group["lr"])
                if group["base"] == "adam":
                    state = self.state[p]
                    state["step"] = state.get("step", 0) + 1
                    state["exp_avg"] = parts1_p[0] * a1 + parts2[0] * a2
                    state["exp_avg_sq"] = parts1_p[1] * a1 + parts2[1] * a2
        return loss


def create(name: str, params: Iterable, lr: float, *, momentum: float = 0.9, nesterov: bool = False,
           weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
           alpha: float = 0.99, rho: float = 0.9) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    Parameters
    ----------
    name : str
        ``sgd`` (plain), ``sgdm`` (momentum; Nesterov with ``nesterov=True``), ``nesterov`` (= sgdm with
        Nesterov), ``rmsprop``, ``adadelta``, ``adam``, or an RK2 variant ``rk_{sgd,adam}_{midpoint,heun,ralston}``.
    params : iterable
        Parameters or parameter groups.
    lr : float
        Learning rate.
    momentum : float
        Momentum of ``sgdm`` / ``nesterov`` (ignored by the others).
    nesterov : bool
        Nesterov momentum for ``sgdm``.
    weight_decay : float
        L2 penalty (added to the gradient).
    betas : tuple of float
        Adam's (and RK-Adam's) moment decay rates.
    eps : float, optional
        Denominator guard; default per optimizer (1e-8; 1e-6 for adadelta).
    alpha : float
        RMSprop's squared-gradient smoothing constant.
    rho : float
        Adadelta's smoothing constant.

    Returns
    -------
    torch.optim.Optimizer
        Call ``optimizer.step(closure)`` with a closure that recomputes the loss (needed by the RK2 variants,
        accepted by every optimizer).
    """
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    if name in ("sgdm", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov or name == "nesterov",
                               weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=1e-8 if eps is None else eps,
                                   weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, rho=rho, eps=1e-6 if eps is None else eps, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8 if eps is None else eps,
                                weight_decay=weight_decay)
    if name in _RK:
        _, base, method = name.split("_")
        return RK2(params, lr=lr, method=method, base=base, betas=betas, eps=1e-8 if eps is None else eps,
                   weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available())}")
