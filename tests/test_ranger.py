"""Generic optimizer properties of `Ranger`, in the spirit of torch's own optimizer tests.

Peers and the REFERENCE maths are in test_parity.py; Lookahead controls and the generic
wrapper in test_lookahead.py; GradScaler in test_amp.py.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from optim_helpers import (
    assert_same_state,
    clone_params,
    make_params,
    run,
    set_grads,
)

from ranger_plugins import OPTIMIZERS, Ranger, centralize_gradient

# ---------------------------------------------------------------------------- construction

BAD_ARGUMENTS = [
    ({"lr": -1e-3}, r"Invalid lr.*>= 0"),
    ({"lr": float("nan")}, r"Invalid lr"),
    ({"betas": (1.0, 0.999)}, r"Invalid betas\[0\].*\[0, 1\)"),
    ({"betas": (-0.1, 0.999)}, r"Invalid betas\[0\].*\[0, 1\)"),
    ({"betas": (0.9, 1.0)}, r"Invalid betas\[1\].*\[0, 1\)"),
    ({"betas": (0.9, 1.5)}, r"Invalid betas\[1\].*\[0, 1\)"),
    ({"betas": (0.9,)}, r"Invalid betas.*pair"),
    ({"eps": 0.0}, r"Invalid eps.*> 0"),
    ({"eps": -1e-8}, r"Invalid eps.*> 0"),
    ({"weight_decay": -0.01}, r"Invalid weight_decay.*>= 0"),
    ({"k": 0}, r"Invalid k.*int >= 1"),
    ({"k": -3}, r"Invalid k.*int >= 1"),
    ({"k": 2.5}, r"Invalid k.*int >= 1"),
    ({"k": 6.0}, r"Invalid k.*int >= 1"),
    ({"k": True}, r"Invalid k.*int >= 1"),
    ({"alpha": 0.0}, r"Invalid alpha.*\(0, 1\]"),
    ({"alpha": 1.5}, r"Invalid alpha.*\(0, 1\]"),
    ({"alpha": -0.5}, r"Invalid alpha.*\(0, 1\]"),
    ({"rectify_threshold": 3.0}, r"Invalid rectify_threshold.*>= 4"),
]

# Constructor argument -> param-group key.
GROUP_KEY = {"k": "lookahead_k", "alpha": "lookahead_alpha"}


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_constructor_rejects_out_of_range_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Ranger(make_params(), **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_add_param_group_rejects_bad_group_without_changing_anything(kwargs, message):
    params = make_params()
    optimizer = Ranger(params[:2])
    groups_before = copy.deepcopy(optimizer.param_groups)
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": params[2:], GROUP_KEY.get(name, name): value})
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0].keys() == groups_before[0].keys()
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in params[:2]]


def test_boundary_values_are_accepted():
    params = make_params()
    optimizer = Ranger(params, lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, k=1, alpha=1.0)
    run(optimizer, params, 3)
    assert all(torch.isfinite(p).all() for p in params)


def test_defaults_match_the_reference():
    optimizer = Ranger(make_params())
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3
    assert group["betas"] == (0.95, 0.999)
    assert group["eps"] == 1e-5
    assert group["weight_decay"] == 0.0
    assert group["lookahead_k"] == 6
    assert group["lookahead_alpha"] == 0.5
    assert group["use_gc"] is True
    assert group["gc_conv_only"] is False
    assert group["rectify_threshold"] == 5.0
    assert "alpha" not in group  # fastai's OptimWrapper maps `alpha` to beta2
    assert isinstance(optimizer, torch.optim.Optimizer)


# ------------------------------------------------------------------------------ step basics


def test_closure_runs_under_enable_grad_and_its_loss_is_returned():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = Ranger([weight], lr=0.1)
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
    # The gradient the closure computed was used: 2*w, momentum SGD at lr/bc1 = lr / 0.05.
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - 0.1 * 2 * 0.05 / 0.05)
    torch.testing.assert_close(weight.detach(), expected)
    assert optimizer.step() is None


@pytest.mark.parametrize("foreach", [False, True])
def test_params_without_grad_are_untouched_and_their_counter_does_not_advance(foreach):
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = Ranger(params, lr=0.1, weight_decay=0.1, foreach=foreach)
    run(optimizer, params, 8, skip=lambda step: (1, 3))
    assert torch.equal(params[1], before[1]) and torch.equal(params[3], before[3])
    assert not optimizer.state.get(params[1]) and not optimizer.state.get(params[3])
    assert optimizer.state[params[0]]["step"] == 8
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("foreach", [False, True])
def test_param_frozen_mid_run_resumes_its_own_schedule(foreach):
    """Frozen for a while, a param keeps its value, step and slow weights; later it
    continues exactly as a param that never saw the frozen steps."""
    params = make_params()
    lone = clone_params(params[1:2])
    optimizer = Ranger(params, lr=0.05, k=4, foreach=foreach)
    lone_optimizer = Ranger(lone, lr=0.05, k=4, foreach=foreach)

    def frozen(step):
        return (1,) if 3 <= step < 8 else ()

    for step in range(13):
        set_grads(params, step, skip=frozen(step))
        if step == 3:
            snapshot = {key: copy.deepcopy(v) for key, v in optimizer.state[params[1]].items()}
            value = params[1].detach().clone()
        grad = None if params[1].grad is None else params[1].grad.clone()
        optimizer.step()
        if 3 <= step < 8:
            assert torch.equal(params[1], value)
            assert optimizer.state[params[1]]["step"] == 3
            assert torch.equal(optimizer.state[params[1]]["slow_param"], snapshot["slow_param"])
            assert torch.equal(optimizer.state[params[1]]["exp_avg"], snapshot["exp_avg"])
        else:
            lone[0].grad = grad  # as given: GC centralizes p.grad in place during step()
            lone_optimizer.step()
    assert optimizer.state[params[1]]["step"] == 13 - 5
    assert optimizer.state[params[0]]["step"] == 13
    assert_same_state(optimizer, params[1:2], lone_optimizer, lone)


GROUP_SETTINGS = [
    dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, k=3, alpha=0.8, use_gc=True),
    dict(lr=0.005, betas=(0.95, 0.999), eps=1e-4, weight_decay=0.0, k=5, alpha=0.3, use_gc=False),
]


@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups_with_different_hyperparameters_are_independent(foreach):
    """Two groups in one optimizer behave exactly like two optimizers (no shared caches)."""
    params = make_params()
    twins = clone_params(params)
    first, second = GROUP_SETTINGS
    group_key = {"k": "lookahead_k", "alpha": "lookahead_alpha"}
    optimizer = Ranger(
        [
            {"params": params[:2], **{group_key.get(k, k): v for k, v in first.items()}},
            {"params": params[2:], **{group_key.get(k, k): v for k, v in second.items()}},
        ],
        foreach=foreach,
    )
    separate = [
        Ranger(twins[:2], foreach=foreach, **first),
        Ranger(twins[2:], foreach=foreach, **second),
    ]
    for step in range(13):
        set_grads(params, step)
        set_grads(twins, step)
        optimizer.step()
        for opt in separate:
            opt.step()
    assert_same_state(optimizer, params[:2], separate[0], twins[:2])
    assert_same_state(optimizer, params[2:], separate[1], twins[2:])
    # The groups really differ: each param synced on its own group's k.
    assert optimizer.state[params[0]]["step"] == 13


def test_hyperparameters_are_read_from_the_group_at_each_step():
    params = make_params()
    twins = clone_params(params)
    optimizer = Ranger(params, lr=0.01, k=100)
    reference = Ranger(twins, lr=0.01, k=100)
    run(optimizer, params, 3)
    run(reference, twins, 3)
    optimizer.param_groups[0]["lookahead_k"] = 4  # step 4 now syncs
    set_grads(params, 3)
    optimizer.step()
    set_grads(twins, 3)
    reference.step()
    # A sync at step 4 moved the params halfway back to theta_0.
    assert not torch.allclose(params[0], twins[0])
    assert torch.equal(params[0], optimizer.state[params[0]]["slow_param"])


def test_lr_scheduler_drives_lr():
    """LambdaLR sets lr to 0 on odd steps: those steps leave the params where they are."""
    params = make_params()
    optimizer = Ranger(params, lr=0.05, k=100, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: float(epoch % 2 == 0))
    for step in range(8):
        before = [p.detach().clone() for p in params]
        set_grads(params, step)
        optimizer.step()
        moved = not torch.equal(params[0], before[0])
        assert moved == (step % 2 == 0), step
        scheduler.step()


def test_one_cycle_lr_drives_lr_and_beta1():
    params = make_params()
    twins = clone_params(params)
    optimizer = Ranger(params, lr=0.01)
    twin_optimizer = Ranger(twins, lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=13)
    seen = set()
    for step in range(13):
        group = optimizer.param_groups[0]
        seen.add((group["lr"], group["betas"][0]))
        twin_optimizer.param_groups[0]["lr"] = group["lr"]
        twin_optimizer.param_groups[0]["betas"] = group["betas"]
        set_grads(params, step)
        set_grads(twins, step)
        optimizer.step()
        twin_optimizer.step()
        scheduler.step()
    assert len({lr for lr, _ in seen}) > 5 and len({beta1 for _, beta1 in seen}) > 5
    assert_same_state(optimizer, params, twin_optimizer, twins)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_dim_param_minimizes_a_quadratic(foreach):
    scalar = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
    optimizer = Ranger([scalar], lr=0.1, foreach=foreach)
    for _ in range(400):
        optimizer.zero_grad()
        ((scalar - 3.0) ** 2).backward()
        optimizer.step()
    assert scalar.dim() == 0 and optimizer.state[scalar]["exp_avg"].dim() == 0
    assert abs(scalar.item() - 3.0) < 0.05


@pytest.mark.parametrize("foreach", [False, True])
def test_sparse_gradients_raise_before_any_change(foreach):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = Ranger([dense, embedding.weight], foreach=foreach)
    before = embedding.weight.detach().clone(), dense.detach().clone()
    (embedding(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert torch.equal(embedding.weight, before[0]) and torch.equal(dense, before[1])
    assert not optimizer.state


def test_complex_params_raise_before_any_change():
    real = torch.nn.Parameter(torch.randn(3))
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    optimizer = Ranger([real, complex_param])
    real.grad, complex_param.grad = torch.randn(3), torch.randn(3, dtype=torch.complex64)
    before = real.detach().clone()
    with pytest.raises(RuntimeError, match="complex"):
        optimizer.step()
    assert torch.equal(real, before) and not optimizer.state


@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_lr_matches_float_lr(foreach):
    """torch optimizers accept a tensor lr; it must drive both paths like a float."""
    params = make_params()
    twins = clone_params(params)
    lr = torch.tensor(0.01, dtype=torch.float64)  # a float32 tensor would round 0.01
    optimizer = Ranger(params, lr=lr, weight_decay=0.1, foreach=foreach)
    reference = Ranger(twins, lr=0.01, weight_decay=0.1, foreach=foreach)
    run(optimizer, params, 13)
    run(reference, twins, 13)
    assert_same_state(optimizer, params, reference, twins)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradients_leave_params_unchanged(foreach):
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = Ranger(params, lr=0.1, foreach=foreach)
    for _ in range(13):
        for param in params:
            param.grad = torch.zeros_like(param)
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert optimizer.state[params[0]]["step"] == 13


def test_step_hooks_fire_once_per_step():
    params = make_params()
    optimizer = Ranger(params)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    run(optimizer, params, 2)
    assert calls == ["pre", "post", "pre", "post"]
    assert "Ranger" in repr(optimizer) and "lookahead_k" in repr(optimizer)


# ---------------------------------------------------------------------------- checkpoints


def state_dict_is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(state_dict_is_plain(k) and state_dict_is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(state_dict_is_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, int, float, bool, str))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("resume_at", [9, 4])
def test_state_dict_round_trip_continues_bitwise(foreach, resume_at):
    """Save after `resume_at` steps (k = 4: across a sync, 9 is not a multiple of k), load
    through torch.save/torch.load(weights_only=True) into a fresh optimizer, and continue:
    identical to an uninterrupted run."""
    params = make_params(dtypes=(torch.float64, torch.float32))
    settings = dict(lr=0.02, k=4, alpha=0.6, weight_decay=0.05, foreach=foreach)
    optimizer = Ranger(params, **settings)
    run(optimizer, params, resume_at, skip=lambda step: (2,) if step == 1 else ())
    state_dict = optimizer.state_dict()
    assert state_dict_is_plain(state_dict)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed_params = clone_params(params)
    resumed = Ranger(resumed_params, lr=0.5, k=7, alpha=0.1, foreach=foreach)
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["lookahead_k"] == 4
    assert resumed.param_groups[0]["lr"] == 0.02

    run(optimizer, params, 13 - resume_at, start=resume_at)
    run(resumed, resumed_params, 13 - resume_at, start=resume_at)
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_deepcopy_and_pickle_continue_identically():
    params = make_params()
    optimizer = Ranger(params, lr=0.02, k=4, weight_decay=0.01)
    run(optimizer, params, 5)
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        clone_params_ = [p for g in clone.param_groups for p in g["params"]]
        assert all(c is not p for c, p in zip(clone_params_, params))
        assert_same_state(optimizer, params, clone, clone_params_)
        run(clone, clone_params_, 6, start=5)
    run(optimizer, params, 6, start=5)
    assert_same_state(optimizer, params, clone, clone_params_)


def snapshot(optimizer):
    return copy.deepcopy(optimizer.state_dict())


def assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key, value in a["state"][index].items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def mismatched_state_dicts(params):
    """State dicts that do not fit an optimizer over `params` in one group."""
    other = Ranger([{"params": params[:2]}, {"params": clone_params(params[2:])}])
    too_few = Ranger(clone_params(params[:3]))
    wrong_shapes = Ranger(make_params(shapes=[(3, 4, 1, 1), (7, 5), (6,), ()]))
    for opt in (other, too_few, wrong_shapes):
        opt_params = [p for g in opt.param_groups for p in g["params"]]
        run(opt, opt_params, 2)
    bad_hyperparameter = Ranger(clone_params(params))
    run(bad_hyperparameter, [p for p in bad_hyperparameter.param_groups[0]["params"]], 2)
    bad_hyperparameter_dict = bad_hyperparameter.state_dict()
    bad_hyperparameter_dict["param_groups"][0]["lookahead_k"] = 0
    return {
        "groups": other.state_dict(),
        "sizes": too_few.state_dict(),
        "shapes": wrong_shapes.state_dict(),
        "hyperparameter": bad_hyperparameter_dict,
    }


def test_state_of_a_scalar_param_does_not_load_into_a_vector_param():
    params = make_params()
    optimizer = Ranger(params)
    run(optimizer, params, 2)
    vector_params = make_params(shapes=[(4, 3, 3, 3), (5, 7), (6,), (3,)])
    other = Ranger(vector_params)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        other.load_state_dict(optimizer.state_dict())
    assert_state_dicts_equal(snapshot(other), before)


@pytest.mark.parametrize("mismatch", ["groups", "sizes", "shapes", "hyperparameter"])
def test_mismatched_load_state_dict_raises_and_changes_nothing(mismatch):
    params = make_params()
    optimizer = Ranger(params, lr=0.03, k=4)
    run(optimizer, params, 3)
    bad = mismatched_state_dicts(params)[mismatch]
    before = snapshot(optimizer)
    state_object, groups_object = optimizer.state, optimizer.param_groups
    with pytest.raises(ValueError):
        optimizer.load_state_dict(bad)
    assert optimizer.state is state_object and optimizer.param_groups is groups_object
    assert_state_dicts_equal(snapshot(optimizer), before)
    # Still usable, and the state really is the old one.
    twins = clone_params(params)
    twin_optimizer = Ranger(twins, lr=0.03, k=4)
    twin_optimizer.load_state_dict(before)
    run(optimizer, params, 3, start=3)
    run(twin_optimizer, twins, 3, start=3)
    assert_same_state(optimizer, params, twin_optimizer, twins)


# ------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_params_keep_fp32_state_and_compute_in_fp32(dtype, foreach):
    params = make_params(dtypes=(dtype,))
    theta0 = [p.detach().float() for p in params]
    optimizer = Ranger(params, lr=0.01, weight_decay=0.1, k=3, foreach=foreach)
    # fp32 twin on the upcast values and gradients: the low-precision run must equal it
    # rounded, after one step (later steps start from the rounded params).
    twins = [torch.nn.Parameter(t.clone()) for t in theta0]
    twin_optimizer = Ranger(twins, lr=0.01, weight_decay=0.1, k=3, foreach=foreach)
    set_grads(params, 0)
    for twin, param in zip(twins, params):
        twin.grad = param.grad.float()
    optimizer.step()
    twin_optimizer.step()
    for param, twin, start in zip(params, twins, theta0):
        state = optimizer.state[param]
        assert param.dtype == dtype
        for key in ("exp_avg", "exp_avg_sq", "slow_param"):
            assert state[key].dtype == torch.float32, key
        assert torch.equal(state["slow_param"], start)
        assert torch.equal(state["exp_avg"], twin_optimizer.state[twin]["exp_avg"])
        assert torch.equal(param, twin.detach().to(dtype))

    run(optimizer, params, 4, start=1)  # through the sync at step 3
    state_dict = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    resumed_params = clone_params(params)
    resumed = Ranger(resumed_params, lr=0.01, weight_decay=0.1, k=3, foreach=foreach)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(optimizer, params, resumed, resumed_params)
    # An fp32 slow weight that is not representable in the low-precision dtype survived.
    slow = resumed.state[resumed_params[0]]["slow_param"]
    assert not torch.equal(slow, slow.to(dtype).float())
    run(optimizer, params, 4, start=5)
    run(resumed, resumed_params, 4, start=5)
    assert_same_state(optimizer, params, resumed, resumed_params)


# --------------------------------------------------------------- foreach vs single tensor


@pytest.mark.parametrize("use_gc", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float64,), (torch.float64, torch.float32, torch.bfloat16)],
    ids=["f64", "mixed"],
)
def test_foreach_matches_single_tensor_on_every_param_and_state(use_gc, weight_decay, dtypes):
    params = make_params(dtypes=dtypes)
    twins = clone_params(params)
    settings = dict(lr=0.02, weight_decay=weight_decay, use_gc=use_gc, k=6, alpha=0.5)
    multi = Ranger(params, foreach=True, **settings)
    single = Ranger(twins, foreach=False, **settings)

    def skip(step):  # one param misses steps, so steps differ between params
        return (1,) if step in (2, 7) else ()

    run(multi, params, 14, skip=skip)
    run(single, twins, 14, skip=skip)
    assert multi.state[params[1]]["step"] == 12 and multi.state[params[0]]["step"] == 14
    for a, b in zip(params, twins):
        tolerance = dict(rtol=1e-12, atol=1e-12) if a.dtype == torch.float64 else {}
        torch.testing.assert_close(a, b, **tolerance)
        for key in ("exp_avg", "exp_avg_sq", "slow_param"):
            torch.testing.assert_close(multi.state[a][key], single.state[b][key], **tolerance)
        assert multi.state[a]["step"] == single.state[b]["step"]
        # GC changes p.grad in place on both paths alike.
        torch.testing.assert_close(a.grad, b.grad, **tolerance)


def test_gc_conv_only_foreach_matches_single_tensor():
    params = make_params()
    twins = clone_params(params)
    multi = Ranger(params, lr=0.02, gc_conv_only=True, foreach=True)
    single = Ranger(twins, lr=0.02, gc_conv_only=True, foreach=False)
    run(multi, params, 13)
    run(single, twins, 13)
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- Gradient Centralization


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 5), (4, 3, 3, 3), (2, 3, 2, 2, 2)])
def test_centralized_gradient_has_zero_mean_over_dims_1_to_n(shape):
    grad = torch.randn(shape, dtype=torch.float64) + 3.0
    original = grad.clone()
    result = centralize_gradient(grad)
    assert result is grad and result.shape == shape
    dims = tuple(range(1, len(shape)))
    torch.testing.assert_close(result.mean(dim=dims), torch.zeros(shape[0], dtype=torch.float64))
    # It subtracts the row mean and nothing else.
    torch.testing.assert_close(result, original - original.mean(dim=dims, keepdim=True))


@pytest.mark.parametrize("shape", [(7,), ()])
def test_gc_leaves_vectors_and_scalars_untouched(shape):
    grad = torch.randn(shape) + 3.0
    original = grad.clone()
    assert torch.equal(centralize_gradient(grad), original)


@pytest.mark.parametrize(
    ("shape", "touched"), [((5, 7), False), ((4, 3, 5), False), ((4, 3, 3, 3), True)]
)
def test_gc_conv_only_touches_only_4d_grads(shape, touched):
    grad = torch.randn(shape) + 3.0
    original = grad.clone()
    centralize_gradient(grad, gc_conv_only=True)
    assert torch.equal(grad, original) != touched


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("gc_conv_only", [False, True])
def test_optimizer_applies_gc_per_the_flags(foreach, gc_conv_only):
    """Row-constant gradients are all mean: GC zeroes them, so a GC'd param does not move."""
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = Ranger(params, lr=0.1, gc_conv_only=gc_conv_only, foreach=foreach)
    for _ in range(3):
        for param in params:
            # Integer rows: their mean is exact, so GC gives exactly zero.
            rows = torch.randint(1, 9, param.shape[:1], dtype=torch.float64)
            param.grad = (
                rows.reshape(rows.shape + (1,) * (param.dim() - 1)).expand_as(param).clone()
            )
        optimizer.step()
    conv, matrix, vector, scalar = params
    assert torch.equal(conv, before[0])
    assert torch.equal(matrix, before[1]) != gc_conv_only
    assert not torch.equal(vector, before[2]) and not torch.equal(scalar, before[3])


def test_use_gc_false_leaves_grads_alone():
    params = make_params()
    optimizer = Ranger(params, use_gc=False)
    set_grads(params, 0)
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert math.isclose(optimizer.param_groups[0]["lr"], 1e-3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad_lr", [float("nan"), -1.0, torch.tensor([1e-3, 1e-3])])
def test_a_bad_lr_written_between_steps_raises_before_any_change(name, bad_lr):
    """Schedulers and users set lr in the groups between steps; a NaN, negative or
    multi-element lr is refused at the next step, with nothing changed."""
    params = make_params()
    own_schedule_off = {"use_warmup": False, "warmdown_active": False} if name == "ranger21" else {}
    optimizer = OPTIMIZERS[name](params, lr=1e-2, **own_schedule_off)
    set_grads(params, 0)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(optimizer.state_dict())
    optimizer.param_groups[0]["lr"] = bad_lr
    set_grads(params, 1)
    with pytest.raises(ValueError, match="Invalid lr"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert optimizer.state_dict()["state"][0]["step"] == state_before["state"][0]["step"]
