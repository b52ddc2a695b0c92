"""GradScaler on CPU with fp16 autocast: a skipped step (inf gradients) changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ranger_plugins import Lookahead, Ranger

K = 3


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    )


OPTIMIZERS = {
    "ranger_foreach": lambda ps: Ranger(ps, lr=0.01, k=K, weight_decay=0.01, foreach=True),
    "ranger_single": lambda ps: Ranger(ps, lr=0.01, k=K, weight_decay=0.01, foreach=False),
    "ranger_fused": lambda ps: Ranger(ps, lr=0.01, k=K, weight_decay=0.01, fused=True),
    "lookahead_adamw_fused": lambda ps: Lookahead(torch.optim.AdamW(ps, lr=0.01, fused=True), k=K),
    "lookahead_adamw_foreach": lambda ps: Lookahead(
        torch.optim.AdamW(ps, lr=0.01, foreach=True), k=K
    ),
}

COUNTER = {"ranger": "step", "lookahead": "lookahead_step"}


def train_step(model, optimizer, scaler, step, inject_inf=False):
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(8, 2, 5, 5, generator=generator)
    targets = torch.randn(8, 3, generator=generator)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        output = model(inputs)
    assert output.dtype == torch.float16
    loss = F.mse_loss(output.float(), targets)
    scaler.scale(loss).backward()
    if inject_inf:
        model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    return params, [copy.deepcopy(optimizer.state[p]) for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_skipped_by_grad_scaler_changes_nothing(name):
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    counter = COUNTER[name.split("_")[0]]
    scaler = torch.amp.GradScaler("cpu")
    for step in range(K - 1):
        train_step(model, optimizer, scaler, step)
    params_before, state_before = snapshot(model, optimizer)
    scale_before = scaler.get_scale()

    train_step(model, optimizer, scaler, K - 1, inject_inf=True)  # would be the sync step

    assert scaler.get_scale() == scale_before / 2
    for param, before, saved in zip(model.parameters(), params_before, state_before):
        assert torch.equal(param, before)
        state = optimizer.state[param]
        assert state.keys() == saved.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, saved[key]), key
            else:
                assert value == saved[key], key
        assert state[counter] == K - 1

    # Normal steps proceed, and the skipped step did not count towards Lookahead's k.
    train_step(model, optimizer, scaler, K)
    for param, before in zip(model.parameters(), params_before):
        state = optimizer.state[param]
        assert state[counter] == K
        assert not torch.equal(param, before)
        assert torch.equal(param, state["slow_param"])  # step K synced
    train_step(model, optimizer, scaler, K + 1)
    assert all(optimizer.state[p][counter] == K + 1 for p in model.parameters())


def test_grad_scaler_steps_match_unscaled_steps_without_overflow():
    """With no overflow, GradScaler only unscales: the run equals one without a scaler."""
    model = make_model()
    twin = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=0.01, k=K)
    twin_optimizer = Ranger(twin.parameters(), lr=0.01, k=K)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(2 * K + 1):
        train_step(model, optimizer, scaler, step)
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 2, 5, 5, generator=generator)
        targets = torch.randn(8, 3, generator=generator)
        twin_optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            output = twin(inputs)
        F.mse_loss(output.float(), targets).backward()
        twin_optimizer.step()
    assert scaler.get_scale() == 2.0**10
    for param, other in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(param, other, rtol=1e-3, atol=1e-5)
        assert optimizer.state[param]["step"] == 2 * K + 1
