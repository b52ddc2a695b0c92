"""The fastai adapter with real `Learner`s on CPU: every fastai mechanism, parity with
fastai's own `ranger`, `LookaheadCallback`, and the variants' opt_funcs."""

from __future__ import annotations

import inspect
import warnings
from functools import partial

import pytest
import torch

pytest.importorskip("fastai")

from fastai.callback.core import (  # noqa: E402
    Callback,
    CancelFitException,
    CancelStepException,
    CancelValidException,
)
from fastai.callback.schedule import ParamScheduler, SchedLin  # noqa: E402
from fastai.callback.tracker import SaveModelCallback  # noqa: E402
from fastai.callback.training import GradientAccumulation, GradientClip  # noqa: E402
from fastai.learner import load_learner  # noqa: E402
from fastai.optimizer import Adam as fastai_adam  # noqa: E402
from fastai.optimizer import OptimWrapper  # noqa: E402
from fastai.optimizer import ranger as fastai_ranger  # noqa: E402
from fastai_helpers import body_head_splitter, quiet, tiny_learner, tiny_model, weights  # noqa: E402

from ranger_plugins import OPTIMIZERS, Lookahead, _cpu_kernel  # noqa: E402
from ranger_plugins import ranger21 as ranger21_module  # noqa: E402
from ranger_plugins.fastai import (  # noqa: E402
    BEFORE_FINISH_KEY,
    OPT_FUNCS,
    LookaheadCallback,
    RangerOptimWrapper,
    opt_func_for,
    ranger,
    ranger21,
    ranger_lars,
    ranger_qh,
    ranger_va,
)
from ranger_plugins.lookahead import slow_weights_of  # noqa: E402

STEPS_PER_EPOCH = 6  # tiny_learner: 48 training samples, bs 8


@pytest.fixture(autouse=True)
def _one_thread_and_quiet():
    # Tiny models: intra-op threads only contend for the shared cores (50x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        # fastai/torch chatter: load_learner's pickle warning, AMP disabled without CUDA.
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


def _max_relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))


def _core(learn):
    return learn.opt.opt


class _RecordEachStep(Callback):
    """Records the core optimizer's hyperparameters right before each step."""

    order = 70

    def before_fit(self):
        self.groups = []

    def before_step(self):
        self.groups.append([dict(g, params=None) for g in self.learn.opt.opt.param_groups])


class _WeightsAfterTrain(Callback):
    """Copies the (fast) weights at the end of each training phase."""

    def before_fit(self):
        self.snapshots = []

    def after_train(self):
        self.snapshots.append(weights(self.learn))


# --- the opt_func ----------------------------------------------------------------------


def test_defaults_and_hyperparameter_names_match_fastai_ranger():
    model = torch.nn.Linear(3, 2)
    theirs = fastai_ranger(list(model.parameters()), lr=1e-3)
    ours = ranger(list(model.parameters()), lr=1e-3)
    assert isinstance(ours, RangerOptimWrapper)
    for name in ("lr", "mom", "sqr_mom", "eps", "wd"):
        assert ours.hypers[0][name] == theirs.hypers[0][name], name
    assert (ours.hypers[0]["k"], ours.hypers[0]["alpha"]) == (theirs.k, theirs.alpha)
    assert ours.hypers[0]["gc"] is False
    defaults = inspect.signature(ranger).parameters
    assert {n: defaults[n].default for n in ("mom", "sqr_mom", "eps", "wd", "k", "alpha")} == {
        "mom": 0.95,
        "sqr_mom": 0.99,
        "eps": 1e-6,
        "wd": 0.01,
        "k": 6,
        "alpha": 0.5,
    }


def test_partial_application_is_how_options_are_bound():
    learn = tiny_learner(partial(ranger, gc=True, k=4, lr=3e-3))
    learn.create_opt()
    groups = _core(learn).param_groups
    assert all(g["use_gc"] and g["lookahead_k"] == 4 for g in groups)
    assert learn.lr == 3e-3  # fastai's create_opt reads `lr` out of a partial
    with pytest.raises(TypeError, match="params"):
        ranger(gc=True)


def test_bad_hyperparameters_raise_value_error_and_change_nothing():
    params = list(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match="betas"):
        ranger(params, mom=1.0)
    with pytest.raises(ValueError, match="eps"):
        ranger(params, eps=0.0)
    opt = ranger(params)
    with pytest.raises(ValueError, match="betas"):
        opt.set_hyper("mom", 1.5)
    with pytest.raises(ValueError, match="lr"):
        opt.set_hypers(lr=-1.0)
    assert opt.hypers[0]["mom"] == 0.95 and opt.hypers[0]["lr"] == 1e-3


def test_closure_is_evaluated_by_the_core():
    model = torch.nn.Linear(3, 1)
    opt = ranger(list(model.parameters()), lr=0.1)
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = weights_of(model)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert all(not torch.equal(a, b) for a, b in zip(before, weights_of(model)))


def weights_of(model):
    return [p.detach().clone() for p in model.parameters()]


# --- parity with fastai's own ranger ---------------------------------------------------


def test_parity_with_fastai_ranger_tiny_eps_float64():
    """24 steps (4 syncs at k = 6) in a Learner, wd 0.01 with wd_bn_bias=False, eps 1e-12.

    fastai computes m / (sqrt(v / bc2) + eps), we compute m / (sqrt(v) + eps) with
    sqrt(bc2) folded into the step size: identical maths as eps -> 0. But eps must stay
    above rounding noise: the conv bias before BatchNorm has a gradient that is zero in
    exact arithmetic and ~1e-9 (fp32) or ~1e-17 (fp64) in practice, and m / sqrt(v) turns
    that noise into O(1) steps that differ between the two. Hence fp64 and eps 1e-12
    (measured: 1.2e-7; eps 1e-16 gives 6e-4, fp32 with eps 1e-12 gives 1e-2).
    """
    ours = tiny_learner(partial(ranger, eps=1e-12), dtype=torch.float64)
    theirs = tiny_learner(partial(fastai_ranger, eps=1e-12), dtype=torch.float64)
    initial = weights(ours)
    ours.fit(4, 1e-2)
    theirs.fit(4, 1e-2)
    assert {s["step"] for s in _core(ours).state.values()} == {4 * STEPS_PER_EPOCH}
    assert theirs.opt.count == 4 * STEPS_PER_EPOCH
    assert _max_relative_difference(weights(ours), weights(theirs)) < 1e-6
    assert _max_relative_difference(weights(ours), initial) > 1e-2  # it did train


def test_parity_with_fastai_ranger_tiny_eps_float32_except_the_noise_driven_bias():
    """The same in fp32: every parameter but the conv bias (whose true gradient is zero,
    see above) matches to 1e-6 relative (measured 1.3e-7)."""
    ours = tiny_learner(partial(ranger, eps=1e-12))
    theirs = tiny_learner(partial(fastai_ranger, eps=1e-12))
    ours.fit(4, 1e-2)
    theirs.fit(4, 1e-2)
    names = [name for name, _ in ours.model.named_parameters()]
    kept = [i for i, name in enumerate(names) if name != "0.0.bias"]
    ours_weights, theirs_weights = weights(ours), weights(theirs)
    assert len(kept) == len(names) - 1
    assert (
        _max_relative_difference([ours_weights[i] for i in kept], [theirs_weights[i] for i in kept])
        < 1e-6
    )


def test_parity_with_fastai_ranger_default_eps_loss_curves():
    """Default eps 1e-6 (fp32): the 24 per-batch training losses agree to 1e-4 relative
    (measured 5e-7), the weights to 1e-3 (measured 2e-4)."""
    ours = tiny_learner(ranger)
    theirs = tiny_learner(fastai_ranger)
    ours.fit(4, 1e-2)
    theirs.fit(4, 1e-2)
    ours_losses = torch.stack(ours.recorder.losses)
    theirs_losses = torch.stack(theirs.recorder.losses)
    assert len(ours_losses) == 4 * STEPS_PER_EPOCH
    assert ((ours_losses - theirs_losses).abs() / theirs_losses).max() < 1e-4
    assert _max_relative_difference(weights(ours), weights(theirs)) < 1e-3


# --- schedulers and hyperparameters --------------------------------------------------


def test_fit_one_cycle_schedules_lr_and_mom_on_the_core():
    learn = tiny_learner(ranger)
    spy = _RecordEachStep()
    learn.fit_one_cycle(2, 1e-2, cbs=spy)
    lrs = [groups[0]["lr"] for groups in spy.groups]
    beta1s = [groups[0]["betas"][0] for groups in spy.groups]
    assert len(lrs) == 2 * STEPS_PER_EPOCH
    assert max(lrs) > 5 * min(lrs)
    assert max(beta1s) - min(beta1s) > 0.05  # moms (0.95, 0.85, 0.95)
    # What fastai recorded is what the core used, in every core group (both wd twins).
    assert lrs == pytest.approx(learn.recorder.hps["lr"])
    assert beta1s == pytest.approx(learn.recorder.hps["mom"])
    for groups in spy.groups:
        assert len({(g["lr"], g["betas"]) for g in groups}) == 1
        assert all(g["betas"][1] == 0.99 and g["lookahead_alpha"] == 0.5 for g in groups)


def test_fit_flat_cos_keeps_lr_flat_then_anneals():
    learn = tiny_learner(ranger)
    spy = _RecordEachStep()
    learn.fit_flat_cos(2, 1e-2, pct_start=0.5)
    learn.fit_flat_cos(2, 1e-2, pct_start=0.5, cbs=spy)
    lrs = [groups[0]["lr"] for groups in spy.groups]
    assert lrs[:STEPS_PER_EPOCH] == pytest.approx([1e-2] * STEPS_PER_EPOCH)
    assert all(a > b for a, b in zip(lrs[STEPS_PER_EPOCH:], lrs[STEPS_PER_EPOCH + 1 :]))
    assert lrs[-1] < 1e-3


def test_scheduling_sqr_mom_never_touches_lookahead_alpha_and_vice_versa():
    learn = tiny_learner(ranger)
    spy = _RecordEachStep()
    learn.fit(1, 1e-2, cbs=[ParamScheduler({"sqr_mom": SchedLin(0.99, 0.9)}), spy])
    beta2s = [groups[0]["betas"][1] for groups in spy.groups]
    assert beta2s[0] == pytest.approx(0.99) and beta2s[-1] < 0.92
    assert all(g["lookahead_alpha"] == 0.5 for groups in spy.groups for g in groups)

    learn.fit(1, 1e-2, cbs=[ParamScheduler({"alpha": SchedLin(0.5, 0.2)}), spy])
    alphas = [groups[0]["lookahead_alpha"] for groups in spy.groups]
    assert alphas[0] == pytest.approx(0.5) and alphas[-1] < 0.3
    last_beta2 = beta2s[-1]
    assert all(g["betas"][1] == last_beta2 for groups in spy.groups for g in groups)
    # And the hypers fastai sees are named apart.
    assert learn.opt.bwd_map["alpha"] == "lookahead_alpha"
    assert learn.opt.bwd_map["sqr_mom"] == "betas__1"


def test_discriminative_learning_rates_with_slice_over_splitter_groups():
    learn = tiny_learner(ranger)
    learn.fit(1, slice(1e-4, 1e-2))
    assert len(learn.opt.hypers) == 2  # the splitter's groups, not the core's four
    direct = ranger(body_head_splitter(learn.model), lr=slice(1e-4, 1e-2))
    assert [h["lr"] for h in direct.hypers] == pytest.approx([1e-4, 1e-2])
    body_decayed, body_exempt, head_decayed, head_exempt = _core(learn).param_groups
    assert body_decayed["lr"] == body_exempt["lr"] == pytest.approx(1e-4)
    assert head_decayed["lr"] == head_exempt["lr"] == pytest.approx(1e-2)


# --- freezing ---------------------------------------------------------------------------


def test_freeze_then_unfreeze_frozen_params_do_not_move():
    learn = tiny_learner(ranger)
    learn.fit(1, 1e-2)  # state exists before freezing
    learn.freeze()
    assert len(_core(learn).state) == 0  # Learner.freeze_to -> opt.clear_state()
    conv, bn = learn.model[0][0], learn.model[0][1]
    frozen = [conv.weight.detach().clone(), conv.bias.detach().clone()]
    bn_before = bn.weight.detach().clone()
    head_before = weights_of(learn.model[1])
    learn.fit(2, 1e-2)
    assert torch.equal(conv.weight, frozen[0]) and torch.equal(conv.bias, frozen[1])
    assert conv.weight not in _core(learn).state
    assert not torch.equal(bn.weight, bn_before)  # train_bn=True keeps norm layers training
    assert all(not torch.equal(a, b) for a, b in zip(head_before, weights_of(learn.model[1])))

    learn.unfreeze()
    learn.fit(1, 1e-2)
    assert not torch.equal(conv.weight, frozen[0])


def test_fine_tune_freezes_then_trains_everything_with_discriminative_lrs():
    per_step = _RecordEachStep()
    learn = tiny_learner(ranger, cbs=per_step)
    initial_conv = learn.model[0][0].weight.detach().clone()
    learn.fine_tune(1, 1e-2, freeze_epochs=1)
    # `fine_tune` = freeze, fit_one_cycle, unfreeze, fit_one_cycle; the spy sees the last.
    body, _, head, _ = per_step.groups[-1]
    assert body["lr"] == pytest.approx(head["lr"] / 100)
    assert not torch.equal(learn.model[0][0].weight, initial_conv)

    frozen = tiny_learner(ranger)
    frozen.freeze()
    frozen.fit_one_cycle(1, 1e-2, pct_start=0.99)  # fine_tune's first phase
    assert torch.equal(frozen.model[0][0].weight, initial_conv)


def test_frozen_params_do_not_drift_through_lookahead_even_with_old_slow_weights():
    """`opt.freeze_to` without clearing the state: the conv weight has slow weights far
    from its fast weights, and still does not move when later syncs happen."""
    learn = tiny_learner(ranger)
    learn.fit(1, 1e-2, cbs=[])  # 6 steps
    learn.fit(1, 1e-2)  # 12 steps; then 4 more below so slow != fast
    core = _core(learn)
    learn.fit(1, 1e-2, cbs=_StopAfter(4))
    conv = learn.model[0][0].weight
    assert not torch.equal(core.state[conv]["slow_param"], conv)
    conv.grad = torch.ones_like(conv)  # as if a step had been cancelled before zero_grad
    learn.opt.freeze_to(1)  # fastai's OptimWrapper-level freeze: state kept
    assert conv.grad is None  # else the stale gradient would be applied at every step
    before = conv.detach().clone()
    learn.fit(2, 1e-2)  # passes several sync points of the other params
    assert torch.equal(conv, before)
    assert core.state[conv]["step"] == 16


class _StopAfter(Callback):
    """Ends the fit after `n_steps` optimizer steps (after `zero_grad`, as LRFinder does)."""

    def __init__(self, n_steps):
        self.n_steps = n_steps

    def after_step(self):
        self.n_steps -= 1

    def after_batch(self):
        if self.n_steps == 0:
            raise CancelFitException()


def test_clear_state_empties_the_core_state_in_place():
    learn = tiny_learner(ranger)
    learn.fit(1, 1e-2)
    state = _core(learn).state
    assert len(state) > 0
    learn.opt.clear_state()
    assert _core(learn).state is state and len(state) == 0
    learn.fit(1, 1e-2)  # restarts cleanly: step counts from 1 again
    assert {s["step"] for s in state.values()} == {STEPS_PER_EPOCH}


# --- weight decay on norm layers and biases ---------------------------------------------


def _decay_only_step(learn, lr=0.1, wd=0.5):
    """With zero gradients Ranger's update is zero, so only weight decay moves params.
    Returns {name: (before, after)} and the decay factor 1 - lr * wd."""
    learn.create_opt()
    learn.opt.set_hypers(lr=lr, wd=wd)
    for p in learn.model.parameters():
        p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in learn.model.named_parameters()}
    learn.opt.step()
    after = dict(learn.model.named_parameters())
    return {name: (before[name], after[name].detach()) for name in before}, 1 - lr * wd


def test_wd_bn_bias_false_default_decays_conv_weight_but_not_bn_or_biases():
    learn = tiny_learner(ranger)
    assert learn.wd_bn_bias is False
    moved, decay = _decay_only_step(learn)
    for name in ("0.0.weight", "1.0.weight", "1.2.weight"):  # conv and linear weights
        before, after = moved[name]
        assert torch.allclose(after, before * decay), name
    for name in ("0.1.weight", "0.1.bias", "0.0.bias", "1.0.bias", "1.2.bias"):
        before, after = moved[name]  # BatchNorm weight and bias, biases
        assert torch.equal(after, before), name
    assert [g["weight_decay"] for g in _core(learn).param_groups] == [0.5, 0.0, 0.5, 0.0]


def test_wd_bn_bias_true_decays_everything():
    learn = tiny_learner(ranger, wd_bn_bias=True)
    moved, decay = _decay_only_step(learn)
    for name, (before, after) in moved.items():
        assert torch.allclose(after, before * decay), name
        assert not torch.equal(after, before) or not before.any(), name


def test_learner_wd_argument_is_applied_to_decayed_groups_only():
    learn = tiny_learner(ranger, wd=0.1)
    learn.fit(1, 1e-3)
    assert [g["weight_decay"] for g in _core(learn).param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert learn.opt.hypers[0]["wd"] == 0.1


# --- lr_find, save/load, export ----------------------------------------------------------


def test_lr_find_leaves_weights_and_optimizer_state_as_they_were(tmp_path):
    learn = tiny_learner(ranger, path=tmp_path, cbs=LookaheadCallback())
    learn.fit(1, 1e-2, cbs=_StopAfter(4))
    before_weights = weights(learn)
    before_state = {
        id(p): {k: _clone(v) for k, v in s.items()} for p, s in _core(learn).state.items()
    }
    by_id = {id(p): p for p in learn.model.parameters()}
    # fastai's `fit` sets lr to `learn.lr` before LRFinder saves, so lr comes back as that.
    before_hypers = [{**h, "lr": learn.lr} for h in learn.opt.hypers]
    learn.lr_find(num_it=12, show_plot=False)
    assert learn.opt.hypers == before_hypers
    assert all(torch.equal(a, b) for a, b in zip(before_weights, weights(learn)))
    state = _core(learn).state
    assert len(state) == len(before_state)
    for param_id, saved in before_state.items():
        for key, value in saved.items():
            assert _equal(state[by_id[param_id]][key], value), key


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _equal(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_save_with_opt_then_load_continues_exactly_like_an_uninterrupted_run(tmp_path):
    uninterrupted = tiny_learner(ranger, path=tmp_path)
    uninterrupted.fit(1, 1e-2, cbs=_StopAfter(4))
    uninterrupted.fit(1, 1e-2)

    first = tiny_learner(ranger, path=tmp_path)
    first.fit(1, 1e-2, cbs=_StopAfter(4))
    file = first.save("checkpoint", with_opt=True)
    # Plain tensors and Python values only (fastai's schedulers hand out numpy scalars).
    saved = torch.load(file, weights_only=True)
    assert saved["opt"]["state"]

    resumed = tiny_learner(ranger, path=tmp_path, seed=1)
    resumed.load("checkpoint", with_opt=True)
    resumed.fit(1, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(weights(uninterrupted), weights(resumed)))
    # The sync schedule carried over: 4 + 6 = 10 steps per param.
    assert {s["step"] for s in _core(resumed).state.values()} == {10}


def _core_state(learn):
    return {
        index: {key: _clone(value) for key, value in state.items()}
        for index, state in _core(learn).state_dict()["state"].items()
    }


def _assert_same_training_state(learn, other):
    assert all(torch.equal(a, b) for a, b in zip(weights(learn), weights(other)))
    mine, theirs = _core_state(learn), _core_state(other)
    assert mine.keys() == theirs.keys()
    for index, state in mine.items():
        assert state.keys() == theirs[index].keys()
        assert all(_equal(value, theirs[index][key]) for key, value in state.items()), index


# With LookaheadCallback, k = 4 and 6 steps per epoch: a fit of one epoch ends between syncs,
# so the end-of-fit weights differ from the fast weights training goes on from.
WEIGHTS_AFTER_FIT = ["synced", "slow", "fast"]
# Ranger's state_precision: the slow weights as `slow_param` ("full") or as `slow_delta`
# (bf16, which "synced" and "slow" zero at the end of fit); "8bit" with a head large enough
# for 8-bit moments.
STATE_PRECISIONS = ["full", "16bit", "8bit"]


def _lookahead_learner(weights_after_fit, state_precision="full", **kwargs):
    kwargs.setdefault("hidden", 1024 if state_precision == "8bit" else 8)
    return tiny_learner(
        partial(ranger, k=4, state_precision=state_precision),
        cbs=LookaheadCallback(weights_after_fit),
        **kwargs,
    )


@pytest.mark.parametrize("state_precision", STATE_PRECISIONS)
@pytest.mark.parametrize("weights_after_fit", WEIGHTS_AFTER_FIT)
def test_fit_then_fit_again_trains_like_one_longer_fit(
    tmp_path, weights_after_fit, state_precision
):
    uninterrupted = _lookahead_learner(weights_after_fit, state_precision)
    uninterrupted.fit(2, 1e-2)

    learn = _lookahead_learner(weights_after_fit, state_precision, path=tmp_path)
    learn.fit(1, 1e-2)
    after_fit = weights(learn)
    # Neither export (which rebuilds the optimizer from its state dict) nor lr_find (which
    # saves and reloads the Learner) loses the state from before the end of fit.
    learn.export(tmp_path / "export.pkl")
    learn.lr_find(num_it=5, show_plot=False)
    assert all(torch.equal(a, b) for a, b in zip(weights(learn), after_fit))
    learn.fit(1, 1e-2)
    _assert_same_training_state(learn, uninterrupted)
    assert {s["step"] for s in _core(learn).state.values()} == {12}


@pytest.mark.parametrize("state_precision", STATE_PRECISIONS)
@pytest.mark.parametrize("weights_after_fit", WEIGHTS_AFTER_FIT)
def test_save_after_fit_then_load_trains_on_like_one_longer_fit(
    tmp_path, weights_after_fit, state_precision
):
    uninterrupted = _lookahead_learner(weights_after_fit, state_precision)
    uninterrupted.fit(2, 1e-2)

    first = _lookahead_learner(weights_after_fit, state_precision, path=tmp_path)
    first.fit(1, 1e-2)
    after_fit = weights(first)
    saved = torch.load(first.save("after_fit", with_opt=True), weights_only=True)
    # The file holds the end-of-fit weights (what to evaluate or ship)...
    names = [name for name, _ in first.model.named_parameters()]
    assert all(torch.equal(saved["model"][n], w) for n, w in zip(names, after_fit))
    # ...and, beside the optimizer state, the training state they replaced.
    assert (BEFORE_FINISH_KEY in saved["opt"]) == (weights_after_fit != "fast")

    resumed = _lookahead_learner(weights_after_fit, state_precision, path=tmp_path, seed=1)
    resumed.load("after_fit", with_opt=True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), after_fit))
    assert resumed.validate() == first.validate()  # the same evaluation
    resumed.fit(1, 1e-2)
    _assert_same_training_state(resumed, uninterrupted)


@pytest.mark.parametrize("state_precision", STATE_PRECISIONS)
def test_after_fit_a_changed_model_or_optimizer_state_is_trained_on_as_it_is(
    tmp_path, state_precision
):
    """Weights loaded after fit, or an optimizer state reset by freeze: the next fit starts
    from what the model holds, exactly as a run without the callback that synced by hand.
    (In the ``slow_delta`` form the loaded weights are the slow weights too, as the end of
    fit left them: only the weights themselves tell that they changed.)"""
    runs = {}
    for name, callback in (("callback", True), ("by hand", False)):
        learn = tiny_learner(
            partial(ranger, k=4, state_precision=state_precision),
            path=tmp_path,
            cbs=[LookaheadCallback()] if callback else [],
            hidden=1024 if state_precision == "8bit" else 8,
        )
        learn.save(f"init-{name}", with_opt=False)
        learn.fit(1, 1e-2)
        if not callback:
            learn.opt.sync_lookahead()
        learn.load(f"init-{name}", with_opt=False)  # weights from before the fit
        learn.fit(1, 1e-2)
        if not callback:
            learn.opt.sync_lookahead()
        learn.freeze()  # resets the optimizer state
        learn.fit(1, 1e-2)
        if not callback:
            learn.opt.sync_lookahead()
        runs[name] = learn
    _assert_same_training_state(runs["callback"], runs["by hand"])


def test_a_saved_state_from_before_the_end_of_fit_that_does_not_fit_raises():
    learn = _lookahead_learner("synced")
    learn.fit(1, 1e-2)
    before_weights, before_state = weights(learn), _core_state(learn)
    kept = learn.opt.state_dict()[BEFORE_FINISH_KEY]
    for bad in (
        {"fast": {**kept["fast"], 0: kept["fast"][0][:1]}, "slow_param": kept["slow_param"]},
        {"fast": {**kept["fast"], 99: kept["fast"][0]}, "slow_param": kept["slow_param"]},
        {"fast": {}, "slow_param": kept["slow_param"]},
        {"fast": kept["fast"]},
    ):
        state_dict = {**learn.opt.state_dict(), BEFORE_FINISH_KEY: bad}
        with pytest.raises(ValueError, match=BEFORE_FINISH_KEY):
            learn.opt.load_state_dict(state_dict)
    # Nothing changed: weights, optimizer state, and the kept state.
    assert all(torch.equal(a, b) for a, b in zip(weights(learn), before_weights))
    assert _core_state(learn).keys() == before_state.keys()
    for index, state in _core_state(learn).items():
        assert all(_equal(value, before_state[index][key]) for key, value in state.items())
    still_kept = learn.opt.state_dict()[BEFORE_FINISH_KEY]
    for kind in ("fast", "slow_param"):
        assert kept[kind].keys() == still_kept[kind].keys()
        assert all(torch.equal(t, still_kept[kind][i]) for i, t in kept[kind].items())


def test_the_old_callback_name_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="LookaheadCallback"):
        from ranger_plugins.fastai import LookaheadEvalCallback
    assert LookaheadEvalCallback is LookaheadCallback


def test_checkpoint_after_one_cycle_loads_with_weights_only(tmp_path):
    learn = tiny_learner(ranger, path=tmp_path)
    learn.fit_one_cycle(1, 1e-2)
    saved = torch.load(learn.save("cycled", with_opt=True), weights_only=True)
    assert all(type(b) is float for g in saved["opt"]["param_groups"] for b in g["betas"])


def test_export_then_load_learner(tmp_path):
    learn = tiny_learner(partial(ranger, gc=True), path=tmp_path, cbs=LookaheadCallback())
    learn.fit(1, 1e-2, cbs=_StopAfter(4))
    learn.export("exported.pkl")
    assert _core(learn).state  # export restores the optimizer state afterwards
    loaded = quiet(load_learner(tmp_path / "exported.pkl"))
    assert loaded.opt is None
    assert loaded.opt_func.func is ranger and loaded.opt_func.keywords["gc"] is True
    assert any(isinstance(cb, LookaheadCallback) for cb in loaded.cbs)
    x = torch.randn(5, 2, 6, 6)
    learn.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(learn.model(x), loaded.model(x))
    loaded.dls = learn.dls
    loaded.fit(1, 1e-2)  # a new optimizer from the pickled opt_func
    assert isinstance(loaded.opt, RangerOptimWrapper)
    assert all(g["use_gc"] for g in _core(loaded).param_groups)


# --- mixed precision, gradient accumulation and clipping --------------------------------


@pytest.mark.parametrize("precision", ["to_fp16", "to_bf16"])
def test_fastai_mixed_precision_callbacks_run_on_cpu(precision):
    """fastai's MixedPrecision hard-codes CUDA autocast and GradScaler; without CUDA both
    disable themselves, so on CPU the run is the fp32 run, step for step."""
    plain = tiny_learner(ranger)
    plain.fit(1, 1e-2)
    mixed = getattr(tiny_learner(ranger), precision)()
    mixed.fit(1, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(weights(plain), weights(mixed)))
    assert {s["step"] for s in _core(mixed).state.values()} == {STEPS_PER_EPOCH}


def test_bf16_model_trains_with_fp32_optimizer_state():
    learn = tiny_learner(ranger, dtype=torch.bfloat16)
    before = weights(learn)
    learn.fit(1, 1e-2)
    for p in learn.model.parameters():
        state = _core(learn).state[p]
        assert p.dtype == torch.bfloat16
        assert state["exp_avg"].dtype == state["slow_param"].dtype == torch.float32
    # Pure bf16 weights round away updates below half an ulp (the BatchNorm weight at 1.0
    # stays put in 6 steps at lr 1e-2); the head's weights move.
    after = weights(learn)
    assert not torch.equal(before[-2], after[-2]) and not torch.equal(before[-1], after[-1])
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


class _SkipEveryStep(Callback):
    """What MixedPrecision does when GradScaler finds inf/nan gradients."""

    order = 20

    def before_step(self):
        raise CancelStepException()


def test_a_cancelled_step_changes_nothing_in_the_optimizer():
    learn = tiny_learner(ranger, cbs=LookaheadCallback())
    before = weights(learn)
    learn.fit(1, 1e-2, cbs=_SkipEveryStep())
    assert len(_core(learn).state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(learn)))


def test_gradient_accumulation_of_two_batches_matches_batches_twice_as_large():
    # No BatchNorm: its batch statistics would differ between 8 and 16 samples.
    accumulated = tiny_learner(ranger, batchnorm=False, cbs=GradientAccumulation(n_acc=16))
    accumulated.fit(2, 1e-2)
    large = tiny_learner(ranger, batchnorm=False, bs=16)
    large.fit(2, 1e-2)
    assert {s["step"] for s in _core(accumulated).state.values()} == {STEPS_PER_EPOCH}
    assert _max_relative_difference(weights(accumulated), weights(large)) < 1e-5


class _GradNormBeforeStep(Callback):
    order = GradientClip.order + 1

    def before_fit(self):
        self.norms = []

    def before_step(self):
        grads = [p.grad for p in self.learn.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def test_gradient_clip_clips_what_the_optimizer_sees():
    learn = tiny_learner(ranger, cbs=GradientClip(max_norm=1e-3))
    spy = _GradNormBeforeStep()
    learn.fit(1, 1e-2, cbs=spy)
    assert len(spy.norms) == STEPS_PER_EPOCH
    assert max(spy.norms) <= 1e-3 * (1 + 1e-4)
    unclipped = tiny_learner(ranger)
    unclipped.fit(1, 1e-2)
    assert not torch.equal(weights(learn)[0], weights(unclipped)[0])


# --- LookaheadCallback -----------------------------------------------------------------


def _loss_on(learn, dl) -> float:
    """The size-weighted mean validation loss, as fastai's Recorder computes it."""
    learn.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in dl:
            total += learn.loss_func(learn.model(x), y).item() * len(y)
            count += len(y)
    return total / count


def test_validation_uses_slow_weights_and_training_is_bitwise_unchanged():
    """k = 4 with 6 steps per epoch: at every validation slow != fast."""
    with_callback = tiny_learner(
        partial(ranger, k=4), cbs=LookaheadCallback(weights_after_fit="fast")
    )
    plain = tiny_learner(partial(ranger, k=4))
    spies = _WeightsAfterTrain(), _WeightsAfterTrain()
    with_callback.fit(3, 1e-2, cbs=spies[0])
    plain.fit(3, 1e-2, cbs=spies[1])
    for ours, theirs in zip(*(spy.snapshots for spy in spies)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(a, b) for a, b in zip(weights(with_callback), weights(plain)))

    core = _core(with_callback)
    valid = with_callback.dls.valid
    fast_loss = _loss_on(with_callback, valid)
    with core.slow_weights():
        slow_loss = _loss_on(with_callback, valid)
    recorded = with_callback.recorder.values[-1][1]
    assert recorded == pytest.approx(slow_loss, rel=1e-6)
    assert recorded != pytest.approx(fast_loss, rel=1e-4)
    assert plain.recorder.values[-1][1] == pytest.approx(fast_loss, rel=1e-6)


class _SkipValidation(Callback):
    order = 0

    def before_validate(self):
        raise CancelValidException()


class _SlowWeightsAtValidation(Callback):
    order = LookaheadCallback.order + 1

    def before_fit(self):
        self.slow, self.in_model = [], []

    def after_validate(self):
        state = self.learn.opt.opt.state
        self.slow.append([state[p]["slow_param"].clone() for p in self.learn.model.parameters()])
        self.in_model.append(weights(self.learn))


def test_training_is_bitwise_the_same_without_any_validation():
    validated = tiny_learner(partial(ranger, k=4), cbs=LookaheadCallback())
    skipped = tiny_learner(partial(ranger, k=4), cbs=[LookaheadCallback(), _SkipValidation()])
    spies = _WeightsAfterTrain(), _WeightsAfterTrain()
    validated.fit(3, 1e-2, cbs=spies[0])
    skipped.fit(3, 1e-2, cbs=spies[1])
    assert len(spies[0].snapshots) == 3
    for ours, theirs in zip(*(spy.snapshots for spy in spies)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(a, b) for a, b in zip(weights(validated), weights(skipped)))


def test_save_model_callback_saves_the_slow_weights_it_judged(tmp_path):
    spy, fast = _SlowWeightsAtValidation(), _WeightsAfterTrain()
    learn = tiny_learner(
        partial(ranger, k=4),
        path=tmp_path,
        cbs=[LookaheadCallback(weights_after_fit="fast"), spy, fast],
    )
    learn.fit(2, 1e-2, cbs=SaveModelCallback(every_epoch=True, fname="epoch"))
    for epoch in range(2):
        saved = torch.load(tmp_path / "models" / f"epoch_{epoch}.pth", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(spy.slow[epoch], spy.in_model[epoch]))
        names = [name for name, _ in learn.model.named_parameters()]
        for name, slow in zip(names, spy.slow[epoch]):
            assert torch.equal(saved[name], slow), (epoch, name)
    # ... which after epoch 0 (6 steps, k = 4) differ from the fast weights.
    assert not torch.equal(spy.slow[0][0], fast.snapshots[0][0])


def test_model_holds_the_synced_slow_weights_after_fit():
    with_callback = tiny_learner(partial(ranger, k=4), cbs=LookaheadCallback())
    plain = tiny_learner(partial(ranger, k=4))
    with_callback.fit(1, 1e-2)
    plain.fit(1, 1e-2)
    plain.opt.sync_lookahead()  # what the callback should have done, done by hand
    assert all(torch.equal(a, b) for a, b in zip(weights(with_callback), weights(plain)))
    for p in with_callback.model.parameters():
        assert torch.equal(_core(with_callback).state[p]["slow_param"], p)


def test_weights_after_fit_slow_leaves_exactly_the_slow_weights():
    with_callback = tiny_learner(
        partial(ranger, k=4), cbs=LookaheadCallback(weights_after_fit="slow")
    )
    plain = tiny_learner(partial(ranger, k=4))
    with_callback.fit(1, 1e-2)  # 6 steps, k = 4: the slow weights lag the fast ones
    plain.fit(1, 1e-2)
    slow = [_core(plain).state[p]["slow_param"] for p in plain.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights(with_callback), slow))
    assert not all(torch.equal(a, b) for a, b in zip(weights(plain), slow))


def test_weights_after_fit_must_be_a_known_choice():
    with pytest.raises(ValueError, match="weights_after_fit"):
        LookaheadCallback(weights_after_fit="average")


def test_validate_and_get_preds_after_fit_use_slow_weights_and_do_not_sync():
    learn = tiny_learner(partial(ranger, k=4), cbs=LookaheadCallback(weights_after_fit="fast"))
    learn.fit(1, 1e-2)
    fast = weights(learn)
    with _core(learn).slow_weights():
        slow_loss = _loss_on(learn, learn.dls.valid)
        learn.model.eval()
        with torch.no_grad():
            slow_logits = torch.cat([learn.model(x) for x, _ in learn.dls.valid])
    assert learn.validate()[0] == pytest.approx(slow_loss, rel=1e-6)
    preds, _ = learn.get_preds()
    assert torch.allclose(preds, slow_logits, atol=1e-6)  # our loss has no activation
    assert all(torch.equal(a, b) for a, b in zip(fast, weights(learn)))  # no sync, no swap left


def _lookahead_adamw(params, lr):
    """A plain fastai OptimWrapper around the core's generic Lookahead(AdamW)."""
    return OptimWrapper(params, _build_lookahead_adamw, lr=lr)


def _build_lookahead_adamw(groups, lr):
    return Lookahead(torch.optim.AdamW(groups, lr=lr), k=4)


def test_callback_works_with_any_optimwrapper_around_a_core_lookahead():
    learn = tiny_learner(_lookahead_adamw, cbs=LookaheadCallback(weights_after_fit="fast"))
    learn.fit(1, 1e-2)  # 6 steps, k = 4: slow != fast
    core = learn.opt.opt
    assert isinstance(core, Lookahead)
    fast_loss = _loss_on(learn, learn.dls.valid)
    with core.slow_weights():
        slow_loss = _loss_on(learn, learn.dls.valid)
    assert learn.recorder.values[-1][1] == pytest.approx(slow_loss, rel=1e-6)
    assert slow_loss != pytest.approx(fast_loss, rel=1e-4)


def test_callback_is_inert_without_a_lookahead_optimizer():
    learn = tiny_learner(fastai_adam, cbs=LookaheadCallback())
    learn.fit(1, 1e-2)
    plain = tiny_learner(fastai_adam)
    plain.fit(1, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(weights(learn), weights(plain)))


def test_fused_keyword_trains_like_the_default_path():
    # 8 steps with k = 6: the fused kernel runs both without and with the Lookahead sync.
    fused = tiny_learner(partial(ranger, fused=True, gc=True), dtype=torch.float64)
    default = tiny_learner(partial(ranger, gc=True), dtype=torch.float64)
    for learn in (fused, default):
        quiet(learn).fit(1, 1e-2)
        learn.fit(1, 1e-2)
    assert all(group["fused"] for group in _core(fused).param_groups)
    assert not any(group["fused"] for group in _core(default).param_groups)
    assert _cpu_kernel.step_kernel() is not None  # the C++ kernel really ran
    for a, b in zip(weights(fused), weights(default)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the Ranger family: one opt_func per variant ------------------------------------------

VARIANTS = ["ranger_qh", "ranger_va", "ranger21", "ranger_lars"]

# Where an opt_func departs from its class's defaults (each documented in its docstring):
# fastai's `wd` is true weight decay, and fastai's schedulers own the lr.
ADAPTER_DEFAULTS = {
    "ranger": {"betas": (0.95, 0.99), "eps": 1e-6, "weight_decay": 0.01, "use_gc": False},
    "ranger_qh": {"decouple_weight_decay": True},
    "ranger21": {"use_warmup": False, "warmdown_active": False},
}

# fastai hyperparameter -> a value to set, and the core group key and value it must give.
COMMON_HYPERS = {
    "mom": (0.8, "betas", 0),
    "sqr_mom": (0.95, "betas", 1),
    "eps": (1e-7, "eps", None),
    "k": (3, "lookahead_k", None),
    "alpha": (0.3, "lookahead_alpha", None),
    "gc": (True, "use_gc", None),
}
# Each variant's own group keys, set through the wrapper (fastai's names where it has them).
VARIANT_HYPERS = {
    "ranger": {"rectify_threshold": (6.0, "rectify_threshold", None)},
    "ranger_qh": {
        "nu_1": (0.6, "nus", 0),
        "nu_2": (0.9, "nus", 1),
        "decouple_wd": (False, "decouple_weight_decay", None),
    },
    "ranger_va": {"smooth": (20.0, "smooth", None), "amsgrad": (False, "amsgrad", None)},
    "ranger21": {"norm_loss_factor": (1e-3, "norm_loss_factor", None)},
    "ranger_lars": {"gc_conv_only": (True, "gc_conv_only", None)},
}


def _group_value(group, key, index):
    return group[key] if index is None else group[key][index]


def test_every_optimizer_of_the_family_has_an_opt_func_by_its_name():
    assert list(OPT_FUNCS) == list(OPTIMIZERS)
    for name, cls in OPTIMIZERS.items():
        assert opt_func_for(name) is OPT_FUNCS[name] is opt_func_for(cls)
        assert OPT_FUNCS[name].__name__ == name  # fastai names opt_funcs by optimizer
        wrapper = OPT_FUNCS[name](list(torch.nn.Linear(3, 2).parameters()))
        assert isinstance(wrapper, RangerOptimWrapper) and type(wrapper.opt) is cls
    with pytest.raises(ValueError, match="ranger_qh"):
        opt_func_for("rangerqh")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_opt_func_defaults_are_the_variants_own_under_fastai_names(name):
    params = list(torch.nn.Linear(3, 2).parameters())
    core = OPT_FUNCS[name](params).opt
    reference = OPTIMIZERS[name](params, **ADAPTER_DEFAULTS.get(name, {}))
    assert core.defaults == reference.defaults
    # The no-decay twin group differs only in its weight decay.
    decayed, exempt = core.param_groups
    assert {**decayed, "params": None, "weight_decay": 0.0} == {**exempt, "params": None}


def test_the_cores_names_for_fastais_hyperparameters_are_refused_with_fastais():
    params = list(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(TypeError, match="mom and sqr_mom"):
        ranger_qh(params, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="nu_1 and nu_2"):
        ranger_qh(params, nus=(0.7, 1.0))
    with pytest.raises(TypeError, match="pass wd"):
        ranger_lars(params, weight_decay=0.1)
    with pytest.raises(TypeError, match="no_such_option"):
        ranger_va(params, no_such_option=1)


def test_variant_options_pass_through_to_the_class():
    params = list(torch.nn.Linear(3, 2).parameters())
    va = ranger_va(params, amsgrad=False, transformer="none", smooth=20.0).opt
    assert all(
        (g["amsgrad"], g["transformer"], g["smooth"]) == (False, "none", 20.0)
        for g in va.param_groups
    )
    r21 = ranger21(params, norm_loss_factor=0.0, use_agc=False, num_iterations=100).opt
    assert all(
        (g["norm_loss_factor"], g["use_agc"], g["num_iterations"]) == (0.0, False, 100)
        for g in r21.param_groups
    )
    assert all(g["gc_conv_only"] for g in ranger_lars(params, gc_conv_only=True).opt.param_groups)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_wrapper_hypers_set_the_variants_group_keys(name):
    wrapper = OPT_FUNCS[name](body_head_splitter(tiny_model()), lr=slice(1e-4, 1e-2))
    hypers = {**COMMON_HYPERS, **VARIANT_HYPERS[name]}
    for hyper, (value, _, _) in hypers.items():
        wrapper.set_hyper(hyper, value)
    wrapper.set_hyper("wd", 0.05)
    assert len(wrapper.hypers) == 2  # the layer groups; four core groups underneath
    assert [h["lr"] for h in wrapper.hypers] == pytest.approx([1e-4, 1e-2])
    for layer_hypers in wrapper.hypers:
        assert all(layer_hypers[hyper] == value for hyper, (value, _, _) in hypers.items())
    groups = wrapper.opt.param_groups
    for group in groups:
        for hyper, (value, key, index) in hypers.items():
            assert _group_value(group, key, index) == value, hyper
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]  # decayed, no-decay
    # The core's own checks, before anything changes.
    with pytest.raises(ValueError, match="betas"):
        wrapper.set_hyper("mom", 1.5)
    with pytest.raises(ValueError, match="lookahead|k"):
        wrapper.set_hypers(k=0)
    assert all(g["betas"][0] == 0.8 and g["lookahead_k"] == 3 for g in groups)


def _assert_trained(learn, before, steps):
    after = weights(learn)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(w).all() for w in after)
    assert {s["step"] for s in _core(learn).state.values()} == {steps}
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in learn.recorder.values[-1])


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_under_fit_one_cycle_which_moves_lr_and_mom_on_its_groups(name):
    learn = tiny_learner(OPT_FUNCS[name])
    before, spy = weights(learn), _RecordEachStep()
    learn.fit_one_cycle(2, 1e-2, cbs=spy)
    assert type(_core(learn)) is OPTIMIZERS[name]
    _assert_trained(learn, before, 2 * STEPS_PER_EPOCH)
    lrs = [groups[0]["lr"] for groups in spy.groups]
    beta1s = [groups[0]["betas"][0] for groups in spy.groups]
    assert max(lrs) > 5 * min(lrs) and max(beta1s) - min(beta1s) > 0.05
    assert lrs == pytest.approx(learn.recorder.hps["lr"])
    assert beta1s == pytest.approx(learn.recorder.hps["mom"])
    beta2 = _core(learn).defaults["betas"][1]
    for groups in spy.groups:  # every core group (both wd twins of both layer groups)
        assert len({(g["lr"], g["betas"]) for g in groups}) == 1
        assert all(g["betas"][1] == beta2 for g in groups)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_under_fit_flat_cos_which_moves_its_lr(name):
    learn = tiny_learner(OPT_FUNCS[name])
    before, spy = weights(learn), _RecordEachStep()
    learn.fit_flat_cos(2, 1e-2, pct_start=0.5, cbs=spy)
    _assert_trained(learn, before, 2 * STEPS_PER_EPOCH)
    lrs = [groups[0]["lr"] for groups in spy.groups]
    assert lrs[:STEPS_PER_EPOCH] == pytest.approx([1e-2] * STEPS_PER_EPOCH)
    assert all(a > b for a, b in zip(lrs[STEPS_PER_EPOCH:], lrs[STEPS_PER_EPOCH + 1 :]))
    assert lrs == pytest.approx(learn.recorder.hps["lr"])
    beta1 = _core(learn).defaults["betas"][0]
    assert all(g["betas"][0] == beta1 for groups in spy.groups for g in groups)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_save_with_opt_then_load_continues_exactly(tmp_path, name):
    opt_func = OPT_FUNCS[name]
    uninterrupted = tiny_learner(opt_func, path=tmp_path)
    uninterrupted.fit_one_cycle(1, 1e-2, cbs=_StopAfter(4))
    uninterrupted.fit_one_cycle(1, 1e-2)

    first = tiny_learner(opt_func, path=tmp_path)
    first.fit_one_cycle(1, 1e-2, cbs=_StopAfter(4))
    saved = torch.load(first.save("checkpoint", with_opt=True), weights_only=True)
    assert saved["opt"]["state"]

    resumed = tiny_learner(opt_func, path=tmp_path, seed=1)
    resumed.load("checkpoint", with_opt=True)
    resumed.fit_one_cycle(1, 1e-2)
    _assert_same_training_state(resumed, uninterrupted)
    assert {s["step"] for s in _core(resumed).state.values()} == {10}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_with_callback_save_after_fit_then_load_trains_on_like_one_longer_fit(
    tmp_path, name
):
    def learner(**kwargs):
        return tiny_learner(partial(OPT_FUNCS[name], k=4), cbs=LookaheadCallback(), **kwargs)

    uninterrupted = learner()
    uninterrupted.fit(2, 1e-2)

    first = learner(path=tmp_path)
    first.fit(1, 1e-2)  # ends on the synced slow weights, between syncs (6 steps, k = 4)
    after_fit = weights(first)
    saved = torch.load(first.save("after_fit", with_opt=True), weights_only=True)
    assert BEFORE_FINISH_KEY in saved["opt"]

    resumed = learner(path=tmp_path, seed=1)
    resumed.load("after_fit", with_opt=True)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), after_fit))
    resumed.fit(1, 1e-2)
    _assert_same_training_state(resumed, uninterrupted)


@pytest.mark.parametrize("name", VARIANTS)
def test_callback_validates_each_variant_on_its_slow_weights(name):
    """k = 4 with 6 steps per epoch: at every validation slow != fast."""
    opt_func = partial(OPT_FUNCS[name], k=4)
    with_callback = tiny_learner(opt_func, cbs=LookaheadCallback(weights_after_fit="fast"))
    synced = tiny_learner(opt_func, cbs=LookaheadCallback())
    plain = tiny_learner(opt_func)
    spies = _WeightsAfterTrain(), _WeightsAfterTrain()
    with_callback.fit(3, 1e-2, cbs=spies[0])
    plain.fit(3, 1e-2, cbs=spies[1])
    synced.fit(3, 1e-2)
    for ours, theirs in zip(*(spy.snapshots for spy in spies)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))  # training unchanged

    core, valid = _core(with_callback), with_callback.dls.valid
    fast_loss = _loss_on(with_callback, valid)
    with core.slow_weights():
        slow_loss = _loss_on(with_callback, valid)
    recorded = with_callback.recorder.values[-1][1]
    assert recorded == pytest.approx(slow_loss, rel=1e-6)
    assert recorded != pytest.approx(fast_loss, rel=1e-4)
    # The default ends fit on the synced slow weights: what a sync by hand gives.
    plain.opt.sync_lookahead()
    assert all(torch.equal(a, b) for a, b in zip(weights(synced), weights(plain)))


class _Ranger21LearningRates:
    """The lr each Ranger21 step uses (after its own schedule), and the group lr it got."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = ranger21_module._step_scalars

        def spy(step, **kwargs):
            scalars = original(step, **kwargs)
            self.calls.append((step, kwargs["lr"], scalars.lr))
            return scalars

        monkeypatch.setattr(ranger21_module, "_step_scalars", spy)

    def per_step(self):
        """(group lr, lr used) of each step (every group steps with the same lr here)."""
        by_step = {}
        for step, given, used in self.calls:
            by_step.setdefault(step, set()).add((given, used))
        assert all(len(pairs) == 1 for pairs in by_step.values())
        return [next(iter(by_step[step])) for step in sorted(by_step)]


@pytest.mark.parametrize("fit", ["fit_one_cycle", "fit_flat_cos"])
def test_ranger21_steps_with_exactly_the_lr_fastais_scheduler_sets(monkeypatch, fit):
    lrs = _Ranger21LearningRates(monkeypatch)
    learn = tiny_learner(ranger21)
    getattr(learn, fit)(2, 1e-2)
    groups = _core(learn).param_groups
    assert not any(g["use_warmup"] or g["warmdown_active"] for g in groups)
    per_step = lrs.per_step()
    assert len(per_step) == 2 * STEPS_PER_EPOCH
    assert all(given == used for given, used in per_step)  # Ranger21's schedule is off
    assert [used for _, used in per_step] == pytest.approx(learn.recorder.hps["lr"])


def test_ranger21_own_schedule_passed_on_composes_with_fastais(monkeypatch):
    lrs = _Ranger21LearningRates(monkeypatch)
    warmup = 4
    learn = tiny_learner(partial(ranger21, use_warmup=True, num_warmup_iterations=warmup))
    learn.fit_flat_cos(1, 1e-2)
    per_step = lrs.per_step()
    # The warmups multiply: fastai's flat 1e-2, times step / 4 over the first 4 steps.
    expected = [1e-2 * min(1.0, step / warmup) for step in range(1, STEPS_PER_EPOCH + 1)]
    assert [used for _, used in per_step][:warmup] == pytest.approx(expected[:warmup])
    assert [given for given, _ in per_step][:warmup] == pytest.approx([1e-2] * warmup)
    # The warmdown needs the run's length.
    with pytest.raises(ValueError, match="num_iterations"):
        tiny_learner(partial(ranger21, warmdown_active=True)).create_opt()
    learn = tiny_learner(partial(ranger21, warmdown_active=True, num_iterations=6))
    learn.create_opt()
    assert all(g["warmdown_active"] and g["num_iterations"] == 6 for g in _core(learn).param_groups)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_export_then_load_learner_builds_the_variant_again(tmp_path, name):
    learn = tiny_learner(partial(OPT_FUNCS[name], k=3), path=tmp_path, cbs=LookaheadCallback())
    learn.fit(1, 1e-2)
    learn.export("exported.pkl")
    loaded = quiet(load_learner(tmp_path / "exported.pkl"))
    assert loaded.opt_func.func is OPT_FUNCS[name]
    loaded.dls = learn.dls
    loaded.fit(1, 1e-2)
    assert type(_core(loaded)) is OPTIMIZERS[name]
    assert all(g["lookahead_k"] == 3 for g in _core(loaded).param_groups)


# --- Ranger's low-memory state (state_precision) -----------------------------------------

# 8-bit moments need 4096 elements (MIN_8BIT_NUMEL); smaller params keep 16-bit ones.
LARGE = 4096
BF16_STATE = dict.fromkeys(("exp_avg", "exp_avg_sq", "slow_delta"), torch.bfloat16)
EXPECTED_STATE_DTYPES = {
    "full": lambda p: dict.fromkeys(("exp_avg", "exp_avg_sq", "slow_param"), torch.float32),
    "16bit": lambda p: BF16_STATE,
    "8bit": lambda p: (
        BF16_STATE
        if p.numel() < LARGE
        else {
            "exp_avg": torch.int8,
            "exp_avg_sq": torch.uint8,
            "slow_delta": torch.bfloat16,
            "exp_avg_scale": torch.float32,
            "exp_avg_sq_scale": torch.float32,
        }
    ),
}


def _state_dtypes(state):
    return {key: value.dtype for key, value in state.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("state_precision", STATE_PRECISIONS)
def test_state_precision_trains_and_keeps_the_state_in_its_dtypes(state_precision):
    learn = tiny_learner(partial(ranger, state_precision=state_precision), hidden=1024)
    initial_loss = learn.validate()[0]
    before = weights(learn)
    learn.fit(2, 1e-2)
    _assert_trained(learn, before, 2 * STEPS_PER_EPOCH)
    assert learn.validate()[0] < initial_loss
    core = _core(learn)
    assert {group["state_precision"] for group in core.param_groups} == {state_precision}
    params = list(learn.model.parameters())
    assert any(p.numel() >= LARGE for p in params) and any(p.numel() < LARGE for p in params)
    for param in params:
        assert _state_dtypes(core.state[param]) == EXPECTED_STATE_DTYPES[state_precision](param)


def test_a_bad_state_precision_raises_rangers_value_error_before_anything_changes():
    learn = tiny_learner(partial(ranger, state_precision="4bit"))
    before = weights(learn)
    with pytest.raises(ValueError, match="state_precision") as raised:
        learn.fit(1, 1e-2)
    assert "'4bit'" in str(raised.value)
    assert all(choice in str(raised.value) for choice in ("full", "delta", "16bit", "8bit"))
    assert learn.opt is None
    assert all(torch.equal(a, b) for a, b in zip(weights(learn), before))


@pytest.mark.parametrize("name", VARIANTS)
def test_the_variants_opt_funcs_do_not_take_state_precision(name):
    # Ranger's option alone: a variant refuses it rather than ignoring it.
    with pytest.raises(TypeError, match="state_precision"):
        OPT_FUNCS[name](tiny_model().parameters(), state_precision="8bit")


@pytest.mark.parametrize("state_precision", STATE_PRECISIONS)
def test_validation_on_the_slow_weights_restores_the_fast_weights_bitwise(state_precision):
    hidden = 1024 if state_precision == "8bit" else 8
    opt_func = partial(ranger, k=4, state_precision=state_precision)
    with_callback = tiny_learner(
        opt_func, cbs=LookaheadCallback(weights_after_fit="fast"), hidden=hidden
    )
    plain = tiny_learner(opt_func, hidden=hidden)
    spies = _WeightsAfterTrain(), _WeightsAfterTrain()
    with_callback.fit(2, 1e-2, cbs=spies[0])
    plain.fit(2, 1e-2, cbs=spies[1])
    for ours, theirs in zip(*(spy.snapshots for spy in spies)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(a, b) for a, b in zip(weights(with_callback), weights(plain)))
    assert _core_state(with_callback).keys() == _core_state(plain).keys()
    for index, state in _core_state(with_callback).items():
        assert all(_equal(v, _core_state(plain)[index][k]) for k, v in state.items())
    # The validation metrics are the slow weights' (12 steps, k = 4: synced at step 12, so
    # compare the first epoch's: 6 steps, 2 after the sync at 4).
    core, valid = _core(with_callback), with_callback.dls.valid
    fast = weights(with_callback)
    with core.slow_weights():
        slow_loss = _loss_on(with_callback, valid)
    assert with_callback.validate()[0] == pytest.approx(slow_loss, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(weights(with_callback), fast))
    first_epoch = with_callback.recorder.values[0][1], plain.recorder.values[0][1]
    assert first_epoch[0] != pytest.approx(first_epoch[1], rel=1e-6)  # slow != fast


class _TrainingStateAt(Callback):
    """The fast weights and the slow weights (as values) at a point of the fit: at the end of
    training, before `LookaheadCallback.after_fit`, or where the next fit starts training."""

    def __init__(self, event):
        self.event = event

    def _record(self):
        core = _core(self.learn)
        self.fast = weights(self.learn)
        self.slow = [
            slow_weights_of(p, core.state[p]).to(p.dtype).clone()
            for p in self.learn.model.parameters()
        ]

    def after_train(self):
        if self.event == "after_train":
            self._record()

    def before_train(self):
        if self.event == "before_train":
            self._record()


@pytest.mark.parametrize(
    ("saved_in", "resumed_in"), [("full", "8bit"), ("8bit", "full"), ("16bit", "8bit")]
)
def test_saved_after_fit_in_one_precision_trains_on_in_another(tmp_path, saved_in, resumed_in):
    first = _lookahead_learner("synced", saved_in, path=tmp_path, hidden=1024)
    before_finish = _TrainingStateAt("after_train")
    first.fit(1, 1e-2, cbs=before_finish)
    first.save("after_fit", with_opt=True)

    resumed = _lookahead_learner("synced", resumed_in, path=tmp_path, seed=1, hidden=1024)
    resumed.load("after_fit", with_opt=True)
    at_start = _TrainingStateAt("before_train")
    resumed.fit(1, 1e-2, cbs=at_start)
    # Training went on from the fast weights from before the end of fit, exactly, and from
    # their slow weights up to the bf16 rounding of fast - slow.
    assert all(torch.equal(a, b) for a, b in zip(at_start.fast, before_finish.fast))
    for slow, saved, fast in zip(at_start.slow, before_finish.slow, before_finish.fast):
        assert (slow - saved).abs().max() <= 2**-7 * (fast - saved).abs().max()
    assert any(not torch.equal(a, b) for a, b in zip(before_finish.slow, before_finish.fast))
    # ...in the new precision's layout, for 6 more steps.
    core = _core(resumed)
    for param in resumed.model.parameters():
        assert _state_dtypes(core.state[param]) == EXPECTED_STATE_DTYPES[resumed_in](param)
    _assert_trained(resumed, at_start.fast, 2 * STEPS_PER_EPOCH)


def test_a_kept_slow_delta_state_that_does_not_fit_raises():
    learn = _lookahead_learner("synced", "16bit")
    learn.fit(1, 1e-2)
    kept = learn.opt.state_dict()[BEFORE_FINISH_KEY]
    assert kept["slow_param"] == {} and kept["slow_delta"].keys() == kept["fast"].keys()
    assert set(kept["alpha"].values()) == {0.5}
    for bad in (
        {**kept, "slow_delta": {**kept["slow_delta"], 99: kept["slow_delta"][0]}},
        {**kept, "slow_param": {0: kept["slow_delta"][0]}},  # both forms for one param
        {**kept, "alpha": {**kept["alpha"], 0: "half"}},
        {**kept, "slow_delta": {0: kept["slow_delta"][0][:1]}},
    ):
        state_dict = {**learn.opt.state_dict(), BEFORE_FINISH_KEY: bad}
        with pytest.raises(ValueError, match=BEFORE_FINISH_KEY):
            learn.opt.load_state_dict(state_dict)
