"""Lookahead controls (`sync_lookahead`, `slow_weights`) and the generic `Lookahead` wrapper."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from optim_helpers import (
    assert_same,
    assert_same_state,
    clone_params,
    make_params,
    run,
    set_grads,
)

from ranger_plugins import Lookahead, Ranger

INNER = {
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=0.01, foreach=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=0.01),
}


def ranger(params, k=6, alpha=0.5):
    return Ranger(params, lr=0.01, k=k, alpha=alpha, weight_decay=0.01)


def wrapped_adamw(params, k=6, alpha=0.5):
    return Lookahead(INNER["adamw_fused"](params), k=k, alpha=alpha)


# Both optimizers that carry the Lookahead controls.
FACTORIES = {"ranger": ranger, "lookahead_adamw": wrapped_adamw}


# ------------------------------------------------------------------------------- controls


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_sync_lookahead_interpolates_then_resets_and_keeps_the_schedule(factory):
    params = make_params()
    untouched = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    untouched_before = untouched.detach().clone()
    alpha = 0.3
    optimizer = factory(params + [untouched], k=6, alpha=alpha)
    run(optimizer, params + [untouched], 3, skip=(len(params),))
    fast = [p.detach().clone() for p in params]
    slow = [optimizer.state[p]["slow_param"].clone() for p in params]
    optimizer.sync_lookahead()
    for param, fast_value, slow_value in zip(params, fast, slow):
        expected = slow_value + alpha * (fast_value - slow_value)
        torch.testing.assert_close(optimizer.state[param]["slow_param"], expected)
        assert torch.equal(param, optimizer.state[param]["slow_param"])
    assert torch.equal(untouched, untouched_before)
    assert "slow_param" not in optimizer.state.get(untouched, {})
    # The schedule is not shifted: the regular sync still happens at step 6, not 9.
    run(optimizer, params, 2, start=3)
    assert not torch.equal(params[0], optimizer.state[params[0]]["slow_param"])
    run(optimizer, params, 1, start=5)
    assert torch.equal(params[0], optimizer.state[params[0]]["slow_param"])


def test_sync_lookahead_uses_each_groups_alpha():
    params = make_params()
    optimizer = Ranger(
        [
            {"params": params[:2], "lookahead_alpha": 0.25},
            {"params": params[2:], "lookahead_alpha": 1.0},
        ],
        lr=0.01,
    )
    run(optimizer, params, 2)
    fast0, slow0 = params[0].detach().clone(), optimizer.state[params[0]]["slow_param"].clone()
    fast2 = params[2].detach().clone()
    optimizer.sync_lookahead()
    torch.testing.assert_close(params[0].detach(), slow0 + 0.25 * (fast0 - slow0))
    assert torch.equal(params[2], fast2)  # alpha = 1: the slow weights jump to the fast ones


@pytest.mark.parametrize("raise_inside", [False, True])
@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_slow_weights_context_swaps_in_slow_and_restores_fast_bitwise(factory, raise_inside):
    params = make_params()
    never_stepped = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    never_before = never_stepped.detach().clone()
    optimizer = factory(params + [never_stepped], k=6)
    twins = clone_params(params + [never_stepped])
    twin_optimizer = factory(twins, k=6)
    run(optimizer, params + [never_stepped], 4, skip=(len(params),))
    run(twin_optimizer, twins, 4, skip=(len(params),))
    fast = [p.detach().clone() for p in params]

    class Boom(Exception):
        pass

    try:
        with optimizer.slow_weights():
            for param, fast_value in zip(params, fast):
                assert torch.equal(param, optimizer.state[param]["slow_param"])
                assert not torch.equal(param, fast_value)
            assert torch.equal(never_stepped, never_before)
            if raise_inside:
                raise Boom
    except Boom:
        assert raise_inside
    assert_same(params, fast)
    assert torch.equal(never_stepped, never_before)
    # Training continues as if the evaluation never happened.
    run(optimizer, params + [never_stepped], 4, start=4, skip=(len(params),))
    run(twin_optimizer, twins, 4, start=4, skip=(len(params),))
    assert_same_state(optimizer, params, twin_optimizer, twins[:-1])


def test_slow_weights_of_bf16_params_are_cast_in_and_fast_restored_exactly():
    params = make_params((torch.bfloat16,))
    optimizer = Ranger(params, lr=0.01, k=6)
    run(optimizer, params, 3)
    fast = [p.detach().clone() for p in params]
    with optimizer.slow_weights():
        for param in params:
            slow = optimizer.state[param]["slow_param"]
            assert slow.dtype == torch.float32
            assert torch.equal(param, slow.to(torch.bfloat16))
    assert_same(params, fast)


# ------------------------------------------------------------------- generic Lookahead


class Theta0Lookahead:
    """Lookahead written plainly around a twin optimizer: slow weights from theta_0."""

    def __init__(self, optimizer, params, k, alpha):
        self.optimizer, self.params, self.k, self.alpha = optimizer, params, k, alpha
        self.slow = [p.detach().clone() for p in params]
        self.count = 0

    @torch.no_grad()
    def step(self):
        self.optimizer.step()
        self.count += 1
        if self.count % self.k == 0:
            for param, slow in zip(self.params, self.slow):
                slow += self.alpha * (param - slow)
                param.copy_(slow)


@pytest.mark.parametrize("inner", INNER.values(), ids=INNER.keys())
def test_generic_lookahead_matches_a_hand_written_theta0_lookahead(inner):
    params = make_params()
    twins = clone_params(params)
    theta0 = [p.detach().clone() for p in params]
    optimizer = Lookahead(inner(params), k=5, alpha=0.6)
    reference = Theta0Lookahead(inner(twins), twins, k=5, alpha=0.6)
    for step in range(13):  # syncs at 5 and 10
        set_grads(params, step)
        set_grads(twins, step)
        optimizer.step()
        reference.step()
        if step == 0:
            for param, start in zip(params, theta0):
                assert torch.equal(optimizer.state[param]["slow_param"], start)
        for a, b in zip(params, twins):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"step {step + 1}")
    for param, slow in zip(params, reference.slow):
        torch.testing.assert_close(optimizer.state[param]["slow_param"], slow, rtol=1e-12, atol=0)
        assert optimizer.state[param]["lookahead_step"] == 13


def test_generic_lookahead_is_an_optimizer_sharing_the_inner_containers():
    params = make_params()
    inner = torch.optim.AdamW(params[:2], lr=0.01)
    optimizer = Lookahead(inner, k=4, alpha=0.25)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.state is inner.state
    assert optimizer.defaults is inner.defaults
    assert optimizer.param_groups[0]["lookahead_k"] == 4
    assert optimizer.param_groups[0]["lookahead_alpha"] == 0.25
    assert "Lookahead" in repr(optimizer)

    optimizer.add_param_group({"params": params[2:], "lookahead_k": 2, "lr": 0.1})
    assert len(inner.param_groups) == 2
    assert inner.param_groups[1]["lookahead_k"] == 2
    assert inner.param_groups[1]["lookahead_alpha"] == 0.25
    assert inner.param_groups[1]["weight_decay"] == inner.defaults["weight_decay"]

    run(optimizer, params, 2)
    # Group 1 synced at step 2 (its own k), group 0 did not.
    assert torch.equal(params[2], optimizer.state[params[2]]["slow_param"])
    assert not torch.equal(params[0], optimizer.state[params[0]]["slow_param"])

    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"Invalid k.*int >= 1"),
        ({"k": 1.5}, r"Invalid k.*int >= 1"),
        ({"alpha": 0.0}, r"Invalid alpha.*\(0, 1\]"),
        ({"alpha": 2.0}, r"Invalid alpha.*\(0, 1\]"),
    ],
)
def test_generic_lookahead_rejects_bad_arguments(kwargs, message):
    params = make_params()
    with pytest.raises(ValueError, match=message):
        Lookahead(torch.optim.SGD(params[:2], lr=0.1), **kwargs)
    optimizer = Lookahead(torch.optim.SGD(params[:2], lr=0.1))
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": params[2:], f"lookahead_{name}": value})
    assert len(optimizer.param_groups) == 1 and len(optimizer.optimizer.param_groups) == 1


def test_generic_lookahead_needs_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Lookahead(make_params())


def test_generic_lookahead_skips_params_without_grad():
    params = make_params()
    before = params[1].detach().clone()
    optimizer = Lookahead(torch.optim.AdamW(params, lr=0.01), k=2)
    run(optimizer, params, 5, skip=(1,))
    assert torch.equal(params[1], before)
    assert "lookahead_step" not in optimizer.state.get(params[1], {})
    assert optimizer.state[params[0]]["lookahead_step"] == 5


def test_generic_lookahead_closure_runs_under_enable_grad_and_returns_loss():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = Lookahead(torch.optim.SGD([weight], lr=0.1), k=2)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert seen == [True] and loss.item() == pytest.approx(5.0)
    torch.testing.assert_close(weight.detach(), torch.tensor([0.8, -1.6]))


def test_generic_lookahead_with_lr_schedulers():
    params = make_params()
    inner = torch.optim.AdamW(params, lr=0.01)
    optimizer = Lookahead(inner, k=3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    for step in range(4):
        set_grads(params, step)
        optimizer.step()
        scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**4)

    one_cycle_params = make_params()
    one_cycle = Lookahead(torch.optim.AdamW(one_cycle_params, lr=0.01), k=3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(one_cycle, max_lr=0.1, total_steps=6)
    betas = set()
    for step in range(6):
        set_grads(one_cycle_params, step)
        one_cycle.step()
        scheduler.step()
        betas.add(one_cycle.optimizer.param_groups[0]["betas"][0])
    assert len(betas) > 3


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("inner", ["adamw_fused", "sgd_momentum", "adafactor"])
def test_generic_lookahead_state_dict_round_trip_continues_bitwise(inner):
    """Adafactor's state has shapes of its own (row/col factors): it must load too."""
    params = make_params()
    optimizer = Lookahead(INNER[inner](params), k=5, alpha=0.6)
    run(optimizer, params, 7)  # across the sync at 5; 7 is not a multiple of k
    loaded = roundtrip(optimizer.state_dict())
    resumed_params = clone_params(params)
    resumed = Lookahead(INNER[inner](resumed_params), k=2, alpha=0.1)
    resumed.load_state_dict(loaded)
    assert resumed.state is resumed.optimizer.state
    assert resumed.param_groups is resumed.optimizer.param_groups
    assert resumed.param_groups[0]["lookahead_k"] == 5
    run(optimizer, params, 6, start=7)
    run(resumed, resumed_params, 6, start=7)
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_generic_lookahead_keeps_fp32_slow_weights_of_bf16_params_through_a_round_trip():
    params = make_params((torch.bfloat16,))
    optimizer = Lookahead(torch.optim.AdamW(params, lr=0.01), k=3)
    run(optimizer, params, 4)
    assert all(optimizer.state[p]["slow_param"].dtype == torch.float32 for p in params)
    resumed_params = clone_params(params)
    resumed = Lookahead(torch.optim.AdamW(resumed_params, lr=0.01), k=3)
    resumed.load_state_dict(roundtrip(optimizer.state_dict()))
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_generic_lookahead_failed_load_changes_nothing_and_keeps_sharing():
    params = make_params()
    optimizer = Lookahead(torch.optim.AdamW(params, lr=0.01), k=3)
    run(optimizer, params, 2)
    before = copy.deepcopy(optimizer.state_dict())
    smaller = Lookahead(torch.optim.AdamW(clone_params(params[:3]), lr=0.01), k=3)
    run(smaller, [p for p in smaller.param_groups[0]["params"]], 2)
    with pytest.raises(ValueError):
        optimizer.load_state_dict(smaller.state_dict())
    bad_k = copy.deepcopy(before)
    bad_k["param_groups"][0]["lookahead_k"] = 0
    with pytest.raises(ValueError, match="Invalid k"):
        optimizer.load_state_dict(bad_k)
    assert optimizer.state is optimizer.optimizer.state
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            other = after["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_generic_lookahead_loads_a_bare_inner_state_dict_with_its_own_k_and_alpha():
    params = make_params()
    inner = torch.optim.AdamW(params, lr=0.01)
    run(inner, params, 2)
    optimizer = Lookahead(torch.optim.AdamW(clone_params(params), lr=0.01), k=3, alpha=0.7)
    optimizer.load_state_dict(inner.state_dict())
    assert optimizer.param_groups[0]["lookahead_k"] == 3
    assert optimizer.param_groups[0]["lookahead_alpha"] == 0.7
    assert optimizer.state is optimizer.optimizer.state


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_generic_lookahead_deepcopy_and_pickle_continue_identically(copier):
    params = make_params()
    optimizer = Lookahead(torch.optim.AdamW(params, lr=0.01), k=3)
    run(optimizer, params, 4)
    clone = copier(optimizer)
    assert clone.state is clone.optimizer.state
    assert clone.param_groups is clone.optimizer.param_groups
    clone_params_ = clone.param_groups[0]["params"]
    assert all(c is not p for c, p in zip(clone_params_, params))
    run(optimizer, params, 5, start=4)
    run(clone, clone_params_, 5, start=4)
    assert_same_state(optimizer, params, clone, clone_params_)


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_controls_before_any_step_change_nothing(factory):
    params = make_params()
    before = clone_params(params)
    optimizer = factory(params)
    with optimizer.slow_weights():
        assert_same(params, before)
    optimizer.sync_lookahead()
    assert_same(params, before)


def test_replacing_the_wrappers_state_replaces_the_inner_optimizers():
    # fastai's OptimWrapper.clear_state assigns a new `state` to the optimizer it wraps.
    params = make_params()
    optimizer = wrapped_adamw(params)
    run(optimizer, params, 2)
    optimizer.state = type(optimizer.state)(dict)
    assert optimizer.state is optimizer.optimizer.state and len(optimizer.optimizer.state) == 0
    run(optimizer, params, 1)
    assert optimizer.optimizer.state[params[0]]["step"] == 1
    assert optimizer.state[params[0]]["lookahead_step"] == 1


def test_fastai_clear_state_resets_the_wrapped_lookahead():
    fastai_optimizer = pytest.importorskip("fastai.optimizer")
    params = make_params()
    optimizer = wrapped_adamw(params)
    run(optimizer, params, 2)
    fastai_optimizer.OptimWrapper(opt=optimizer).clear_state()
    assert len(optimizer.optimizer.state) == 0 and optimizer.state is optimizer.optimizer.state


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_load_slow_weights_overwrites_the_fast_weights_without_interpolating(factory):
    params = make_params()
    optimizer = factory(params, k=4)
    assert not optimizer.has_slow_weights
    run(optimizer, params, 6)  # the last sync was at step 4: slow != fast
    assert optimizer.has_slow_weights
    slow = [optimizer.state[p]["slow_param"].clone() for p in params]
    assert not all(torch.equal(p, s) for p, s in zip(params, slow))
    optimizer.load_slow_weights()
    assert_same(params, slow)
    assert_same([optimizer.state[p]["slow_param"] for p in params], slow)
