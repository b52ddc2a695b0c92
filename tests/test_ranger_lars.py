"""`RangerLars` ("Over9000"): the maths of mgrankin/over9000's ralamb.py + Lookahead, and the
optimizer contract of the Ranger family.

There is no installed peer: the reference is the maths written plainly below, in float64.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from optim_helpers import assert_same_state, clone_params, make_params, run, set_grads

from ranger_plugins._base import LookaheadOptimizer
from ranger_plugins.ranger_lars import RangerLars

# ----------------------------------------------------------------------- the plain maths


def plain_ranger_lars(initial, grads_per_step, lr, betas, eps, weight_decay, k, alpha, use_gc):
    """RangerLars written plainly: one param at a time, float64, no in-place tricks.

    ``grads_per_step``: per step, a list with each param's gradient or None (no step for
    it). Returns the params, the slow weights and every trust ratio taken."""
    beta1, beta2 = betas
    theta = [x.clone() for x in initial]
    slow = [x.clone() for x in initial]
    m = [torch.zeros_like(x) for x in initial]
    v = [torch.zeros_like(x) for x in initial]
    t = [0] * len(initial)
    trust_ratios, rectified = [], []
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            if use_gc and g.dim() > 1:
                g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            t[i] += 1
            w = min(math.sqrt((theta[i] ** 2).sum().item()), 10.0)
            theta[i] = theta[i] * (1 - lr * weight_decay)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            rho_inf = 2 / (1 - beta2) - 1
            rho = rho_inf - 2 * t[i] * beta2 ** t[i] / (1 - beta2 ** t[i])
            if rho >= 5:
                r = math.sqrt(
                    (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
                )
                u = (
                    r
                    * math.sqrt(1 - beta2 ** t[i])
                    / (1 - beta1 ** t[i])
                    * m[i]
                    / (v[i].sqrt() + eps)
                )
            else:
                u = m[i] / (1 - beta1 ** t[i])
            rectified.append(rho >= 5)
            q = math.sqrt(((theta[i] - lr * u) ** 2).sum().item())
            tau = 1.0 if w == 0 or q == 0 else w / q
            trust_ratios.append(tau)
            theta[i] = theta[i] - lr * tau * u
            if t[i] % k == 0:
                slow[i] = slow[i] + alpha * (theta[i] - slow[i])
                theta[i] = slow[i].clone()
    return theta, slow, trust_ratios, rectified


def big_params():
    """Mixed shapes; the first has a norm far above the clamp of 10, so its trust ratio is
    well below 1."""
    params = make_params()
    with torch.no_grad():
        params[0].mul_(5.0)
    return params


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("use_gc", [False, True])
def test_matches_the_plain_maths_over_two_lookahead_syncs(foreach, use_gc):
    settings = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, k=6, alpha=0.5)
    params = big_params()
    initial = [p.detach().clone() for p in params]
    optimizer = RangerLars(params, use_gc=use_gc, foreach=foreach, **settings)
    grads_per_step = []
    for step in range(14):
        skip = (2,) if step == 3 else ()  # param 2 lags one step: its own count and syncs
        set_grads(params, step, skip=skip)
        grads_per_step.append([None if p.grad is None else p.grad.clone() for p in params])
        optimizer.step()

    theta, slow, trust_ratios, rectified = plain_ranger_lars(
        initial, grads_per_step, use_gc=use_gc, **settings
    )
    # The run covers what it should: both RAdam branches, a trust ratio well below 1 (the
    # clamped big param) and syncs at steps 6 and 12 of every param.
    assert any(rectified) and not all(rectified)
    assert min(trust_ratios) < 0.5
    assert [optimizer.state[p]["step"] for p in params] == [14, 14, 13, 14]
    for param, expected, expected_slow in zip(params, theta, slow):
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
        state_slow = optimizer.state[param]["slow_param"]
        torch.testing.assert_close(state_slow, expected_slow, rtol=1e-10, atol=1e-12)
        assert not torch.equal(state_slow, param.detach())  # not at a sync now


def test_one_step_by_hand_shows_the_clamp_and_the_stepped_weight_norm():
    """theta = (30, 40) (norm 50, clamped to 10), g = (1, 1), beta1 = 0 so m = g, and step 1
    is momentum SGD: u = g. The trust ratio is 10 / |theta - lr * g|, not |theta| / |g|."""
    param = torch.nn.Parameter(torch.tensor([30.0, 40.0], dtype=torch.float64))
    optimizer = RangerLars([param], lr=1.0, betas=(0.0, 0.999))
    param.grad = torch.ones(2, dtype=torch.float64)
    optimizer.step()
    tau = 10.0 / math.sqrt(29.0**2 + 39.0**2)
    expected = torch.tensor([30.0 - tau, 40.0 - tau], dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_norm_weights_or_stepped_weights_give_no_nan(foreach):
    """A zero param (w = 0) takes the untrusted step; a step that lands the weights exactly
    on zero (q = 0) too; a zero param with a zero gradient stays zero."""
    zero = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    lands_on_zero = torch.nn.Parameter(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64))
    idle = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = RangerLars([zero, lands_on_zero, idle], lr=1.0, betas=(0.0, 0.999), foreach=foreach)
    grad = torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]], dtype=torch.float64)
    zero.grad, lands_on_zero.grad = grad.clone(), lands_on_zero.detach().clone()
    idle.grad = torch.zeros(4, dtype=torch.float64)
    optimizer.step()
    # beta1 = 0 and step 1 (momentum SGD, bias correction 1): the untrusted step is -lr * g.
    assert torch.equal(zero.detach(), -grad)
    assert torch.equal(lands_on_zero.detach(), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(idle.detach(), torch.zeros(4, dtype=torch.float64))
    for _ in range(7):  # on into the rectified steps and a sync, with zero gradients
        for param in (zero, lands_on_zero, idle):
            param.grad = torch.zeros_like(param)
        optimizer.step()
    for param in (zero, lands_on_zero, idle):
        assert torch.isfinite(param).all()
        assert all(
            torch.isfinite(value).all()
            for value in optimizer.state[param].values()
            if isinstance(value, torch.Tensor)
        )


def test_groups_with_other_betas_get_their_own_step_size():
    """ralamb.py caches the step size by step number across groups; here each group's own
    betas decide it: a two-group run equals two one-group runs."""
    params = make_params()
    twins = clone_params(params)
    optimizer = RangerLars(
        [{"params": params[:2]}, {"params": params[2:], "betas": (0.5, 0.9), "lr": 0.2}],
        lr=0.05,
    )
    first = RangerLars(twins[:2], lr=0.05)
    second = RangerLars(twins[2:], lr=0.2, betas=(0.5, 0.9))
    for step in range(8):
        set_grads(params, step)
        set_grads(twins, step)
        for opt in (optimizer, first, second):
            opt.step()
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin)


# -------------------------------------------------------------- foreach == single, bitwise


@pytest.mark.parametrize(
    "dtypes", [(torch.float64,), (torch.bfloat16,), (torch.bfloat16, torch.float32)]
)
@pytest.mark.parametrize(("use_gc", "weight_decay"), [(False, 0.0), (True, 0.1)])
def test_foreach_matches_single_tensor_bitwise_on_every_param_and_state(
    dtypes, use_gc, weight_decay
):
    params = make_params(dtypes=dtypes)
    with torch.no_grad():
        params[0].mul_(5.0)  # a clamped weight norm
    twins = clone_params(params)
    settings = dict(lr=0.05, weight_decay=weight_decay, k=4, use_gc=use_gc)
    single = RangerLars(params, foreach=False, **settings)
    multi = RangerLars(twins, foreach=True, **settings)
    skip = lambda step: (1,) if step in (2, 5) else ()  # noqa: E731 - steps out of line
    run(single, params, 13, skip=skip)
    run(multi, twins, 13, skip=skip)
    assert_same_state(single, params, multi, twins)
    assert single.state[params[1]]["step"] == 11


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_params_keep_fp32_state_and_compute_in_fp32(dtype, foreach):
    params = make_params(dtypes=(dtype,))
    theta0 = [p.detach().float() for p in params]
    twins = [torch.nn.Parameter(t.clone()) for t in theta0]
    optimizer = RangerLars(params, lr=0.01, weight_decay=0.1, foreach=foreach)
    twin_optimizer = RangerLars(twins, lr=0.01, weight_decay=0.1, foreach=foreach)
    set_grads(params, 0)
    for twin, param in zip(twins, params):
        twin.grad = param.grad.float()
    optimizer.step()
    twin_optimizer.step()
    for param, twin, start in zip(params, twins, theta0):
        state = optimizer.state[param]
        assert param.dtype == dtype
        assert all(state[key].dtype == torch.float32 for key in RangerLars.state_keys)
        assert torch.equal(state["slow_param"], start)
        assert torch.equal(param, twin.detach().to(dtype))


# ------------------------------------------------------------------------ the contract


def test_defaults_follow_ralamb_and_rangerlars():
    optimizer = RangerLars(make_params())
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, LookaheadOptimizer)
    assert group["lr"] == 1e-3
    assert group["betas"] == (0.9, 0.999)
    assert group["eps"] == 1e-8
    assert group["weight_decay"] == 0.0
    assert group["lookahead_k"] == 6
    assert group["lookahead_alpha"] == 0.5
    assert group["use_gc"] is False
    assert group["gc_conv_only"] is False
    assert group["foreach"] is None
    assert RangerLars.state_keys[-1] == "slow_param"


def test_closure_runs_once_under_enable_grad_and_its_loss_is_returned():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = RangerLars([weight], lr=0.1, betas=(0.0, 0.999))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert calls == [True]
    assert loss.item() == pytest.approx(5.0)
    # The closure's gradient 2w was used: u = 2w, tau = |w| / |w - 0.1 * 2w| = 1 / 0.8.
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - 0.1 * 2 / 0.8)
    torch.testing.assert_close(weight.detach(), expected)
    assert optimizer.step() is None


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_through_weights_only_load_continues_bitwise(foreach):
    params = make_params(dtypes=(torch.float64, torch.bfloat16))
    settings = dict(lr=0.02, k=4, alpha=0.6, weight_decay=0.05, foreach=foreach)
    optimizer = RangerLars(params, **settings)
    run(optimizer, params, 5, skip=lambda step: (2,) if step == 1 else ())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed_params = clone_params(params)
    resumed = RangerLars(resumed_params, lr=0.5, k=7, alpha=0.1, foreach=foreach)
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["lookahead_k"] == 4
    run(optimizer, params, 8, start=5)  # across the syncs at steps 8 and 12
    run(resumed, resumed_params, 8, start=5)
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_deepcopy_continues_bitwise():
    params = make_params()
    optimizer = RangerLars(params, lr=0.02, k=4, weight_decay=0.01)
    run(optimizer, params, 5)
    clone = copy.deepcopy(optimizer)
    clone_params_ = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(clone_params_, params))
    run(clone, clone_params_, 6, start=5)
    run(optimizer, params, 6, start=5)
    assert_same_state(optimizer, params, clone, clone_params_)


def test_a_step_grad_scaler_skips_changes_nothing():
    k = 3
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    )
    optimizer = RangerLars(model.parameters(), lr=0.01, k=k, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu")

    def train_step(step, inject_inf=False):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 2, 5, 5, generator=generator)
        targets = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(inputs)
        scaler.scale(F.mse_loss(output.float(), targets)).backward()
        if inject_inf:
            model[0].weight.grad[0, 0, 0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()

    for step in range(k - 1):
        train_step(step)
    values = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    scale = scaler.get_scale()
    train_step(k - 1, inject_inf=True)  # would be the sync step
    assert scaler.get_scale() == scale / 2
    for param, value in zip(model.parameters(), values):
        assert torch.equal(param, value)
    assert_state_dicts_equal(optimizer.state_dict(), state)
    train_step(k)  # the k-th real step: counts k and syncs
    for param in model.parameters():
        assert optimizer.state[param]["step"] == k
        assert torch.equal(param, optimizer.state[param]["slow_param"])


BAD_ARGUMENTS = [
    ({"lr": -1e-3}, r"Invalid lr.*>= 0"),
    ({"lr": float("nan")}, r"Invalid lr"),
    ({"betas": (1.0, 0.999)}, r"Invalid betas\[0\].*\[0, 1\)"),
    ({"betas": (0.9, -0.1)}, r"Invalid betas\[1\].*\[0, 1\)"),
    ({"betas": (0.9,)}, r"Invalid betas.*pair"),
    ({"eps": 0.0}, r"Invalid eps.*> 0"),
    ({"weight_decay": -0.01}, r"Invalid weight_decay.*>= 0"),
    ({"k": 0}, r"Invalid k.*int >= 1"),
    ({"k": 2.5}, r"Invalid k.*int >= 1"),
    ({"alpha": 0.0}, r"Invalid alpha.*\(0, 1\]"),
    ({"alpha": 1.5}, r"Invalid alpha.*\(0, 1\]"),
    ({"use_gc": "yes"}, r"Invalid use_gc.*True or False"),
    ({"gc_conv_only": 1}, r"Invalid gc_conv_only.*True or False"),
    ({"foreach": "fast"}, r"Invalid foreach.*None or a bool"),
]
GROUP_KEY = {"k": "lookahead_k", "alpha": "lookahead_alpha"}


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_constructor_rejects_out_of_range_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RangerLars(make_params(), **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_add_param_group_rejects_bad_group_and_changes_nothing(kwargs, message):
    params = make_params()
    optimizer = RangerLars(params[:2])
    groups_before = copy.deepcopy(optimizer.param_groups)
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": params[2:], GROUP_KEY.get(name, name): value})
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0].keys() == groups_before[0].keys()
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in params[:2]]


def assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for key, value in a["state"][index].items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def break_missing_state_key(state_dict):
    del state_dict["state"][1]["exp_avg_sq"]
    return r"param 1 of group 0.*missing state 'exp_avg_sq'"


def break_group_hyperparameter(state_dict):
    state_dict["param_groups"][0]["eps"] = -1.0
    return r"group 0 of the loaded state dict: Invalid eps"


def break_into_over9000s(state_dict):
    """over9000's RangerLars (timm's Lookahead around Ralamb) keeps no use_gc and counts
    Lookahead steps in the group."""
    group = state_dict["param_groups"][0]
    del group["use_gc"], group["gc_conv_only"]
    group["lookahead_step"] = 3
    return r"missing 'use_gc'.*over9000's RangerLars"


@pytest.mark.parametrize(
    "breaks", [break_missing_state_key, break_group_hyperparameter, break_into_over9000s]
)
def test_load_state_dict_that_does_not_fit_raises_and_changes_nothing(breaks):
    params = make_params()
    optimizer = RangerLars(params, lr=0.03, k=4)
    run(optimizer, params, 3)
    bad = copy.deepcopy(optimizer.state_dict())
    message = breaks(bad)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(bad)
    assert_state_dicts_equal(optimizer.state_dict(), before)
    # Still usable, and its state really is the old one.
    twins = clone_params(params)
    twin_optimizer = RangerLars(twins, lr=0.03, k=4)
    twin_optimizer.load_state_dict(before)
    run(optimizer, params, 3, start=3)
    run(twin_optimizer, twins, 3, start=3)
    assert_same_state(optimizer, params, twin_optimizer, twins)


def test_slow_weights_and_sync_lookahead():
    params = make_params()
    optimizer = RangerLars(params, lr=0.05, k=6, alpha=0.5)
    run(optimizer, params, 4)  # no sync yet: slow weights are theta_0
    fast = [p.detach().clone() for p in params]
    slow = [optimizer.state[p]["slow_param"].clone() for p in params]
    assert not any(torch.equal(f, s) for f, s in zip(fast, slow))
    with optimizer.slow_weights():
        for param, expected in zip(params, slow):
            assert torch.equal(param, expected)
    for param, expected in zip(params, fast):
        assert torch.equal(param, expected)

    optimizer.sync_lookahead()
    for param, f, s in zip(params, fast, slow):
        synced = s + 0.5 * (f - s)
        torch.testing.assert_close(param.detach(), synced, rtol=1e-15, atol=1e-15)
        assert torch.equal(optimizer.state[param]["slow_param"], param.detach())
        assert optimizer.state[param]["step"] == 4  # the k-step schedule is not shifted
