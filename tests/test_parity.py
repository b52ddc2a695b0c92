"""`Ranger` against real peers and against the REFERENCE maths, in float64 over >= 13 steps.

Every hyperparameter is pinned explicitly on both sides: the peers' defaults differ from ours
(see shared/REFERENCE.md, "How the peers differ").
"""

from __future__ import annotations

import math
import warnings

import optim_helpers
import pytest
import torch

from ranger_plugins import Ranger, rectification

STEPS = 14  # syncs at 6 and 12 (k = 6)
SHAPES = [(4, 3, 3, 3), (5, 7), (6,), ()]


def make_params(seed=0, shapes=SHAPES):
    return optim_helpers.make_params(torch.float64, shapes, seed)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def gradients(params, step, seed=1):
    generator = torch.Generator().manual_seed(seed * 10_000 + step)
    return [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]


class Theta0Lookahead:
    """Lookahead written plainly: slow weights from theta_0; every k steps
    slow += alpha * (fast - slow), fast = slow."""

    def __init__(self, params, k, alpha):
        self.params, self.k, self.alpha = params, k, alpha
        self.slow = [p.detach().clone() for p in params]
        self.count = 0

    @torch.no_grad()
    def after_inner_step(self):
        self.count += 1
        if self.count % self.k == 0:
            for param, slow in zip(self.params, self.slow):
                slow += self.alpha * (param - slow)
                param.copy_(slow)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("beta2", [0.999, 0.99])
def test_matches_torch_radam_with_decoupled_wd_and_theta0_lookahead(foreach, beta2):
    """GC off, wd > 0. torch's RAdam(decoupled_weight_decay=True) applies
    p *= 1 - lr*wd before the update, switches at rho_t > 5, and uses m/(sqrt(v)+eps)
    as we do; eps is pinned to ours (its default is 1e-8)."""
    lr, betas, eps, weight_decay, k, alpha = 0.01, (0.95, beta2), 1e-5, 0.05, 6, 0.5
    ours = make_params()
    theirs = clone_params(ours)
    optimizer = Ranger(
        ours,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        k=k,
        alpha=alpha,
        use_gc=False,
        foreach=foreach,
    )
    radam = torch.optim.RAdam(
        theirs,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
        foreach=False,
    )
    lookahead = Theta0Lookahead(theirs, k=k, alpha=alpha)
    for step in range(STEPS):
        for a, b, grad in zip(ours, theirs, gradients(ours, step)):
            a.grad, b.grad = grad.clone(), grad.clone()
        optimizer.step()
        radam.step()
        lookahead.after_inner_step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"step {step + 1}")
    for a, b, slow in zip(ours, theirs, lookahead.slow):
        torch.testing.assert_close(optimizer.state[a]["slow_param"], slow, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            optimizer.state[a]["exp_avg_sq"], radam.state[b]["exp_avg_sq"], rtol=1e-12, atol=0
        )


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_torch_optimizer_ranger_without_gc(foreach):
    """GC off, wd = 0: torch_optimizer.Ranger (pytorch-ranger, the pre-GC original). It
    computes in fp32 internally (`p.data.float()`), so agreement is to fp32 precision; a
    real difference (theta_k slow start, another threshold, eps placement) is ~lr."""
    import torch_optimizer

    lr, betas, eps, k, alpha = 0.01, (0.95, 0.999), 1e-5, 6, 0.5
    ours = make_params()
    theirs = clone_params(ours)
    optimizer = Ranger(
        ours, lr=lr, betas=betas, eps=eps, k=k, alpha=alpha, use_gc=False, foreach=foreach
    )
    peer = torch_optimizer.Ranger(
        theirs, lr=lr, alpha=alpha, k=k, N_sma_threshhold=5, betas=betas, eps=eps, weight_decay=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its deprecated add_/addcmul_ overloads
        for step in range(STEPS):
            for a, b, grad in zip(ours, theirs, gradients(ours, step)):
                a.grad, b.grad = grad.clone(), grad.clone()
            optimizer.step()
            peer.step()
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step + 1}")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(
            optimizer.state[a]["slow_param"], peer.state[b]["slow_buffer"], rtol=1e-5, atol=1e-6
        )


def reference_ranger(params, grads_per_step, lr, betas, eps, weight_decay, k, alpha, conv_only):
    """REFERENCE's Ranger, one tensor op at a time (ranger2020.py with decoupled wd)."""
    beta1, beta2 = betas
    params = [p.detach().clone() for p in params]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    slow = [p.clone() for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, grad in enumerate(grads):
            g = grad.clone()
            if g.dim() > (3 if conv_only else 1):
                g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * g * g
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * g
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            rho_inf = 2 / (1 - beta2) - 1
            rho_t = rho_inf - 2 * t * beta2**t / bc2
            p = params[i] * (1 - lr * weight_decay)
            if rho_t > 5:
                r_t = math.sqrt(
                    (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
                )
                p = p - lr * (r_t * math.sqrt(bc2) / bc1) * exp_avg[i] / (
                    exp_avg_sq[i].sqrt() + eps
                )
            else:
                p = p - lr * (1 / bc1) * exp_avg[i]
            if t % k == 0:
                slow[i] = slow[i] + alpha * (p - slow[i])
                p = slow[i].clone()
            params[i] = p
    return params, exp_avg, exp_avg_sq, slow


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("gc_conv_only", [False, True])
def test_matches_the_reference_maths_with_gc(foreach, weight_decay, gc_conv_only):
    settings = dict(lr=0.01, betas=(0.95, 0.999), eps=1e-5, weight_decay=weight_decay, k=6)
    settings["alpha"] = 0.5
    params = make_params()
    grads_per_step = [gradients(params, step) for step in range(STEPS)]
    expected = reference_ranger(params, grads_per_step, conv_only=gc_conv_only, **settings)

    optimizer = Ranger(params, use_gc=True, gc_conv_only=gc_conv_only, foreach=foreach, **settings)
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
    expected_params, expected_m, expected_v, expected_slow = expected
    tolerance = dict(rtol=1e-12, atol=1e-12)
    for i, param in enumerate(params):
        state = optimizer.state[param]
        assert state["step"] == STEPS
        torch.testing.assert_close(param.detach(), expected_params[i], **tolerance)
        torch.testing.assert_close(state["exp_avg"], expected_m[i], **tolerance)
        torch.testing.assert_close(state["exp_avg_sq"], expected_v[i], **tolerance)
        torch.testing.assert_close(state["slow_param"], expected_slow[i], **tolerance)


def rho(t, beta2):
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * t * beta2**t / (1 - beta2**t)


@pytest.mark.parametrize(("beta2", "rho_5", "rho_6"), [(0.999, 4.996, 5.994), (0.99, 4.960, 5.941)])
def test_rectification_switches_at_step_6(beta2, rho_5, rho_6):
    assert rho(5, beta2) == pytest.approx(rho_5, abs=1e-3)
    assert rho(6, beta2) == pytest.approx(rho_6, abs=1e-3)
    beta1 = 0.95
    for t in range(1, 6):
        multiplier, adaptive = rectification(t, beta1, beta2)
        assert not adaptive
        assert multiplier == pytest.approx(1 / (1 - beta1**t), rel=1e-15)
    for t in range(6, 30):
        multiplier, adaptive = rectification(t, beta1, beta2)
        assert adaptive
        rho_inf, rho_t = 2 / (1 - beta2) - 1, rho(t, beta2)
        r_t = math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        assert multiplier == pytest.approx(r_t * math.sqrt(1 - beta2**t) / (1 - beta1**t))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("beta2", [0.999, 0.99])
def test_steps_1_to_5_are_momentum_sgd_and_step_6_is_rectified_and_syncs(foreach, beta2):
    lr, beta1, eps, alpha = 0.01, 0.95, 1e-5, 0.5
    (param,) = make_params(shapes=[(5, 7)])
    theta0 = param.detach().clone()
    optimizer = Ranger(
        [param], lr=lr, betas=(beta1, beta2), eps=eps, alpha=alpha, use_gc=False, foreach=foreach
    )
    m = torch.zeros_like(theta0)
    v = torch.zeros_like(theta0)
    for t in range(1, 7):
        (grad,) = gradients([param], t)
        param.grad = grad.clone()
        before = param.detach().clone()
        optimizer.step()
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        if t <= 5:  # momentum SGD at lr / bc1
            torch.testing.assert_close(param.detach(), before - lr / bc1 * m, rtol=1e-13, atol=0)
        else:  # first rectified step, then (k = 6) the first sync, from theta_0
            rho_inf, rho_t = 2 / (1 - beta2) - 1, rho(t, beta2)
            r_t = math.sqrt(
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            )
            fast = before - lr * r_t * math.sqrt(bc2) / bc1 * m / (v.sqrt() + eps)
            synced = theta0 + alpha * (fast - theta0)
            torch.testing.assert_close(param.detach(), synced, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(optimizer.state[param]["slow_param"], synced)
