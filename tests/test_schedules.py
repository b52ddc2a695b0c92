"""Step-following LR schedules: fastai's shapes, skipped steps, state round trips."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from ranger_plugins import Ranger
from ranger_plugins.schedules import CombinedCosineLR, FlatCosineLR, OneCycleCosineLR


def _fastai_combined_cos():
    with warnings.catch_warnings():  # fastai's import warns about torch.jit.script
        warnings.simplefilter("ignore")
        from fastai.callback.schedule import combined_cos
    return combined_cos


def _optimizer(lrs=(4e-3,)):
    groups = [{"params": [torch.nn.Parameter(torch.randn(3, 4))], "lr": lr} for lr in lrs]
    return Ranger(groups, lr=lrs[0])


def _step_all(optimizer):
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.randn_like(param)
    optimizer.step()


def _lrs_over(optimizer, scheduler, n):
    """The lrs each of n optimizer steps used (scheduler stepped after each step)."""
    lrs = []
    for _ in range(n):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        _step_all(optimizer)
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total_steps,pct_start", [(40, 0.75), (37, 0.72), (10, 0.0), (9, 1.0)])
def test_flat_cos_matches_fastai_fit_flat_cos(total_steps, pct_start):
    combined_cos = _fastai_combined_cos()
    lrs = (4e-3, 1e-4)
    optimizer = _optimizer(lrs)
    scheduler = FlatCosineLR(optimizer, total_steps, pct_start=pct_start)
    used = _lrs_over(optimizer, scheduler, total_steps)
    # fit_flat_cos: combined_cos(pct_start, lr, lr, lr / div_final) at pct_train = i / total.
    for group_index, lr in enumerate(lrs):
        fastai_schedule = combined_cos(pct_start, lr, lr, lr / 1e5)
        expected = [fastai_schedule(i / total_steps) for i in range(total_steps)]
        ours = [row[group_index] for row in used]
        # fastai computes its phase boundaries in float32: agreement to ~1e-7 relative.
        assert ours == pytest.approx(expected, rel=2e-6, abs=1e-12)
    if pct_start > 0:
        assert used[0] == list(lrs)  # flat start


def test_one_cycle_matches_fastai_fit_one_cycle_lr():
    combined_cos = _fastai_combined_cos()
    total_steps, lr = 50, 8e-3
    optimizer = _optimizer((lr,))
    scheduler = OneCycleCosineLR(optimizer, total_steps)
    used = [row[0] for row in _lrs_over(optimizer, scheduler, total_steps)]
    fastai_schedule = combined_cos(0.25, lr / 25.0, lr, lr / 1e5)
    expected = [fastai_schedule(i / total_steps) for i in range(total_steps)]
    assert used == pytest.approx(expected, rel=2e-6, abs=1e-12)
    assert used[0] == pytest.approx(lr / 25.0)
    assert max(used) == pytest.approx(lr, rel=1e-3)


def test_combined_cos_matches_the_formula_in_float64():
    total, pct, div_start, div_final, lr = 30, 0.4, 10.0, 1e3, 1e-2
    optimizer = _optimizer((lr,))
    scheduler = CombinedCosineLR(optimizer, total, pct, div_start, div_final)
    used = [row[0] for row in _lrs_over(optimizer, scheduler, total + 3)]

    def cos_anneal(start, end, pos):
        return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2

    for i, value in enumerate(used):
        pos = min(i / total, 1.0)
        if pos < pct:
            expected = cos_anneal(lr / div_start, lr, pos / pct)
        else:
            expected = cos_anneal(lr, lr / div_final, (pos - pct) / (1 - pct))
        assert value == pytest.approx(expected, rel=1e-12)
    assert used[-1] == pytest.approx(lr / div_final, rel=1e-12)  # stays at the end value


def test_is_a_torch_lr_scheduler_with_step_count_position():
    optimizer = _optimizer()
    scheduler = FlatCosineLR(optimizer, total_steps=8, pct_start=0.5)
    assert isinstance(scheduler, LRScheduler)
    assert scheduler.last_epoch == 0 and scheduler.optimizer_steps == 0
    _lrs_over(optimizer, scheduler, 5)
    assert scheduler.last_epoch == scheduler.optimizer_steps == 5
    assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]


def test_scheduler_step_without_optimizer_step_does_not_advance():
    optimizer = _optimizer()
    scheduler = FlatCosineLR(optimizer, total_steps=4, pct_start=0.0)
    before = optimizer.param_groups[0]["lr"]
    for _ in range(3):
        scheduler.step()
    assert scheduler.last_epoch == 0
    assert optimizer.param_groups[0]["lr"] == before


def test_scheduler_catches_up_with_several_optimizer_steps():
    reference_optimizer = _optimizer()
    reference = FlatCosineLR(reference_optimizer, total_steps=10, pct_start=0.2)
    _lrs_over(reference_optimizer, reference, 7)
    optimizer = _optimizer()
    scheduler = FlatCosineLR(optimizer, total_steps=10, pct_start=0.2)
    for _ in range(7):
        _step_all(optimizer)
    scheduler.step()  # once, after 7 optimizer steps
    assert scheduler.last_epoch == 7
    assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]


def test_gradscaler_skipped_step_leaves_optimizer_lookahead_and_schedule_untouched():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = Ranger([param], lr=1e-2, k=2)
    scheduler = FlatCosineLR(optimizer, total_steps=6, pct_start=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def train_step(grad):
        optimizer.zero_grad()
        scaler.scale((param * grad).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        train_step(torch.full((4, 3), float("inf")))  # the very first step is skipped
    assert scheduler.last_epoch == 0 and not optimizer.state

    for _ in range(3):
        train_step(torch.randn(4, 3))
    state = optimizer.state[param]
    snapshot = {
        "param": param.detach().clone(),
        "step": state["step"],
        "exp_avg": state["exp_avg"].clone(),
        "exp_avg_sq": state["exp_avg_sq"].clone(),
        "slow_param": state["slow_param"].clone(),
        "lr": optimizer.param_groups[0]["lr"],
        "position": scheduler.last_epoch,
    }
    scale_before = scaler.get_scale()
    bad = torch.randn(4, 3)
    bad[1, 2] = float("inf")
    train_step(bad)
    assert scaler.get_scale() < scale_before  # the scaler did see the inf and skip
    assert torch.equal(param, snapshot["param"])
    assert state["step"] == snapshot["step"] == 3  # the Lookahead counter (k = 2)
    assert torch.equal(state["exp_avg"], snapshot["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], snapshot["exp_avg_sq"])
    assert torch.equal(state["slow_param"], snapshot["slow_param"])
    assert optimizer.param_groups[0]["lr"] == snapshot["lr"]
    assert scheduler.last_epoch == snapshot["position"] == 3
    # The next good step is step 4: a Lookahead sync (4 % 2 == 0) and schedule position 4.
    train_step(torch.randn(4, 3))
    assert state["step"] == 4 and torch.equal(param, state["slow_param"])
    assert scheduler.last_epoch == 4


def test_state_dict_round_trip_resumes_exactly():
    def run(resume_at=None):
        torch.manual_seed(3)
        optimizer = _optimizer((1e-2, 3e-3))
        scheduler = OneCycleCosineLR(optimizer, total_steps=12)
        lrs = _lrs_over(optimizer, scheduler, resume_at or 12)
        if resume_at is None:
            return lrs
        buffer = io.BytesIO()
        torch.save({"opt": optimizer.state_dict(), "sched": scheduler.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)  # plain values only
        fresh_optimizer = _optimizer((1e-2, 3e-3))
        fresh = OneCycleCosineLR(fresh_optimizer, total_steps=12)
        fresh_optimizer.load_state_dict(saved["opt"])
        fresh.load_state_dict(saved["sched"])
        # The hook stays attached to the new optimizer after loading.
        return lrs + _lrs_over(fresh_optimizer, fresh, 12 - resume_at)

    assert run(resume_at=5) == run()


def test_discarded_scheduler_is_not_kept_alive_by_the_optimizer():
    import gc
    import weakref

    optimizer = _optimizer()
    scheduler_ref = weakref.ref(FlatCosineLR(optimizer, total_steps=3))
    gc.collect()
    assert scheduler_ref() is None
    _step_all(optimizer)  # the orphaned hook is harmless


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"total_steps": 5, "pct_start": 1.5}, "pct_start"),
        ({"total_steps": 5, "div_final": 0.0}, "div_final"),
        ({"total_steps": 5, "last_epoch": -2}, "last_epoch"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    optimizer = _optimizer()
    before = dict(optimizer.param_groups[0])
    with pytest.raises(ValueError, match=name):
        FlatCosineLR(optimizer, **kwargs)
    assert optimizer.param_groups[0] == before  # nothing changed (no initial_lr either)
    with pytest.raises(ValueError, match="div_start"):
        OneCycleCosineLR(optimizer, 5, div_start=-1.0)


def test_step_with_epoch_is_refused():
    scheduler = FlatCosineLR(_optimizer(), total_steps=3)
    with pytest.raises(TypeError, match="epoch"):
        scheduler.step(2)


def test_failed_construction_detaches_its_step_hook():
    optimizer = _optimizer()
    with pytest.raises(KeyError, match="initial_lr"):  # resuming needs the optimizer's state
        FlatCosineLR(optimizer, total_steps=5, last_epoch=3)
    assert len(optimizer._optimizer_step_post_hooks) == 0
    scheduler = FlatCosineLR(optimizer, total_steps=5)
    assert len(optimizer._optimizer_step_post_hooks) == 1
    scheduler.remove_hook()
    _step_all(optimizer)
    scheduler.step()
    assert scheduler.optimizer_steps == 0 and scheduler.last_epoch == 0
