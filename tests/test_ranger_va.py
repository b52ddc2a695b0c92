"""`RangerVA`: Ranger with a softplus-calibrated adaptive lr (ranger913A), against its peer,
its maths and the optimizer contract.

The peer is ``torch_optimizer.RangerVA`` (``pytorch_ranger`` 0.1.1, the original author's
``ranger913A.py``). Two things of the peer's are not the maths, so the maths are also
written out plainly in `plain_ranger_va` and tested in float64:

* it computes in float32 whatever the param dtype (``p.grad.float()``, ``p.data.float()``),
  so on float64 params it agrees with us only to float32 precision;
* with ``transformer="none"`` it multiplies the step by lr a second time (and ignores
  amsgrad and grad_transformer there); we take s_t * m / (d + eps).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from optim_helpers import assert_same_state, clone_params, make_params, run

from ranger_plugins.ranger_va import RangerVA

# Every hyperparameter pinned (the defaults of the original, with a larger lr).
HP = dict(
    lr=0.02,
    betas=(0.95, 0.999),
    eps=1e-5,
    weight_decay=0.0,
    k=6,
    alpha=0.5,
    amsgrad=True,
    transformer="softplus",
    smooth=50.0,
    grad_transformer="square",
)
GROUP_KEY = {"k": "lookahead_k", "alpha": "lookahead_alpha"}
STEPS = 14  # Lookahead syncs at steps 6 and 12


def gradients(params, steps, seed=1):
    """Fixed gradients: one list per step."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        for _ in range(steps)
    ]


def step_with(optimizer, params, grads, skip=()):
    for index, (param, grad) in enumerate(zip(params, grads)):
        param.grad = None if index in skip else grad.to(param.dtype).clone()
    optimizer.step()


def softplus(x, beta, threshold=20.0):
    """torch's documented softplus: log(1 + exp(beta x)) / beta, linear above threshold."""
    return torch.where(beta * x > threshold, x, torch.log1p(torch.exp(beta * x)) / beta)


def plain_ranger_va(theta0, grads, *, lr, betas, eps, weight_decay, k, alpha, **calibration):
    """The docstring's maths, for one tensor, written out plainly."""
    beta1, beta2 = betas
    theta, slow = theta0.clone(), theta0.clone()
    m, v, v_max = (torch.zeros_like(theta) for _ in range(3))
    square = calibration["grad_transformer"] == "square"
    for t, g in enumerate(grads, start=1):
        v = beta2 * v + (1 - beta2) * g * g
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * (g * g if square else g.abs())
        v_max = torch.maximum(v_max, v)
        d = v_max if calibration["amsgrad"] else v
        d = torch.sqrt(d) if square else d
        if calibration["transformer"] == "softplus":
            denominator = softplus(d, calibration["smooth"])
        else:
            denominator = d + eps
        theta = theta * (1 - lr * weight_decay)
        theta = theta - lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) * m / denominator
        if t % k == 0:
            slow = slow + alpha * (theta - slow)
            theta = slow.clone()
    return theta, slow


# ------------------------------------------------------------------------ peer and maths


def test_defaults_follow_the_original():
    ours = inspect.signature(RangerVA).parameters
    peer = inspect.signature(torch_optimizer.RangerVA).parameters
    names = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "k",
        "alpha",
        "amsgrad",
        "transformer",
        "smooth",
        "grad_transformer",
    )
    for name in names:
        assert ours[name].default == peer[name].default, name


PEER_CASES = {
    "defaults": {},
    "no_amsgrad": dict(amsgrad=False),
    "abs": dict(grad_transformer="abs"),
    "abs_no_amsgrad_smooth10": dict(grad_transformer="abs", amsgrad=False, smooth=10.0),
    "decay_k4": dict(weight_decay=0.1, k=4, alpha=0.8, betas=(0.9, 0.99)),
}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", PEER_CASES)
def test_matches_the_peer_on_float64_params(case, foreach):
    """14 steps (two syncs); param 1 misses step 3, so per-param step counts differ. The
    peer computes in float32 on float64 params, hence float32 tolerances."""
    settings = {**HP, **PEER_CASES[case]}
    params = make_params()
    twins = clone_params(params)
    ours = RangerVA(params, **settings, foreach=foreach)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peer's deprecated add_(scalar, tensor) calls
        peer = torch_optimizer.RangerVA(twins, **settings)
        for step, grads in enumerate(gradients(params, STEPS)):
            skip = (1,) if step == 3 else ()
            step_with(ours, params, grads, skip)
            step_with(peer, twins, grads, skip)
    close = dict(rtol=1e-5, atol=1e-6, check_dtype=False)
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param, twin, **close)
        state, peer_state = ours.state[param], peer.state[twin]
        assert state["step"] == peer_state["step"]
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if settings["amsgrad"] else ()
        for key in keys:
            torch.testing.assert_close(state[key], peer_state[key], **close)
        torch.testing.assert_close(state["slow_param"], peer_state["slow_buffer"], **close)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        dict(amsgrad=False, weight_decay=0.1),
        dict(grad_transformer="abs", smooth=5.0),
        dict(transformer="none"),
        dict(transformer="none", grad_transformer="abs", amsgrad=False),
    ],
    ids=["defaults", "no_amsgrad_decay", "abs", "none", "none_abs"],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_the_maths_written_plainly_in_float64(settings, foreach):
    settings = {**HP, **settings}
    params = make_params()
    theta0 = [p.detach().clone() for p in params]
    optimizer = RangerVA(params, **settings, foreach=foreach)
    all_grads = gradients(params, STEPS)
    for grads in all_grads:
        step_with(optimizer, params, grads)
    for index, param in enumerate(params):
        theta, slow = plain_ranger_va(theta0[index], [g[index] for g in all_grads], **settings)
        torch.testing.assert_close(param.detach(), theta, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            optimizer.state[param]["slow_param"], slow, rtol=1e-12, atol=1e-14
        )


def test_the_peers_transformer_none_applies_lr_twice():
    """One step with transformer="none", amsgrad off: the peer moves by
    lr * s_1 * m / (sqrt(v) + eps), we by s_1 * m / (d + eps) (d = sqrt(v) here)."""
    settings = {**HP, "transformer": "none", "amsgrad": False}
    params = make_params(dtypes=(torch.float32,))
    twins = clone_params(params)
    theta0 = [p.detach().clone() for p in params]
    ours = RangerVA(params, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch_optimizer.RangerVA(twins, **settings)
        grads = gradients(params, 1)[0]
        step_with(ours, params, grads)
        step_with(peer, twins, grads)
    for param, twin, start in zip(params, twins, theta0):
        torch.testing.assert_close(twin - start, (param - start) * settings["lr"])


def test_gc_centralizes_matrix_gradients_in_place():
    params = make_params(shapes=[(5, 7), (6,)])
    gc_params, no_gc_params = params, clone_params(params)
    gc = RangerVA(gc_params, **HP, use_gc=True)
    no_gc = RangerVA(no_gc_params, **HP)
    grads = gradients(params, 1)[0]
    step_with(gc, gc_params, grads)
    centred = grads[0] - grads[0].mean(dim=1, keepdim=True)
    step_with(no_gc, no_gc_params, [centred, grads[1]])
    assert torch.equal(gc_params[0].grad, centred)
    assert_same_state(gc, gc_params, no_gc, no_gc_params)


# ---------------------------------------------------------------- foreach and low precision


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float64,), (torch.bfloat16,), (torch.float64, torch.float32, torch.bfloat16)],
    ids=["f64", "bf16", "mixed"],
)
@pytest.mark.parametrize(
    "settings",
    [
        {},
        dict(weight_decay=0.05, use_gc=True, amsgrad=False),
        dict(grad_transformer="abs", transformer="none", gc_conv_only=True, use_gc=True),
    ],
    ids=["defaults", "decay_gc_no_amsgrad", "abs_none_gc_conv"],
)
def test_foreach_equals_single_tensor_bitwise(dtypes, settings):
    params = make_params(dtypes=dtypes)
    twins = clone_params(params)
    multi = RangerVA(params, **{**HP, **settings}, foreach=True)
    single = RangerVA(twins, **{**HP, **settings}, foreach=False)

    def skip(step):  # params 1 and 2 miss steps: buckets of different steps
        return {2: (1,), 7: (1, 2)}.get(step, ())

    run(multi, params, STEPS, skip=skip)
    run(single, twins, STEPS, skip=skip)
    assert multi.state[params[1]]["step"] == STEPS - 2
    assert_same_state(multi, params, single, twins)  # bitwise, every param and state entry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state_and_compute_in_fp32(dtype):
    params = make_params(dtypes=(dtype,))
    twins = [torch.nn.Parameter(p.detach().float()) for p in params]
    optimizer = RangerVA(params, **{**HP, "weight_decay": 0.1})
    twin_optimizer = RangerVA(twins, **{**HP, "weight_decay": 0.1})
    grads = [g.to(dtype) for g in gradients(params, 1)[0]]
    step_with(optimizer, params, grads)
    step_with(twin_optimizer, twins, [g.float() for g in grads])
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin.to(dtype))
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "slow_param"):
            state = optimizer.state[param][key]
            assert state.dtype == torch.float32
            assert torch.equal(state, twin_optimizer.state[twin][key])


# ------------------------------------------------------------------------------- contract


def test_closure_runs_once_under_grad_mode_and_its_loss_is_returned():
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    optimizer = RangerVA(model.parameters(), **HP)
    inputs = torch.randn(4, 3, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = model(inputs).pow(2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_params_without_grad_are_skipped_and_their_step_does_not_advance():
    params = make_params()
    optimizer = RangerVA(params, **HP)
    before = params[2].detach().clone()
    run(optimizer, params, 3, skip=(2,))
    assert torch.equal(params[2], before) and params[2] not in optimizer.state
    run(optimizer, params, 2, start=3, skip=lambda step: (0,) if step == 4 else ())
    assert [optimizer.state[p]["step"] for p in params] == [4, 5, 2, 5]


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip_continues_bitwise(foreach):
    """Saved after 8 steps (between the syncs at 6 and 12), loaded through
    torch.load(weights_only=True) into an optimizer built with other values, continued to 14:
    the same as an uninterrupted run."""
    settings = {**HP, "weight_decay": 0.05, "foreach": foreach}
    params = make_params(dtypes=(torch.float64, torch.bfloat16))
    optimizer = RangerVA(params, **settings)
    run(optimizer, params, 8, skip=lambda step: (1,) if step == 2 else ())
    loaded = save_and_load(optimizer.state_dict())
    resumed_params = clone_params(params)
    resumed = RangerVA(resumed_params, lr=0.5, amsgrad=False, smooth=3.0, k=3, foreach=foreach)
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["amsgrad"] is True
    run(optimizer, params, STEPS - 8, start=8)
    run(resumed, resumed_params, STEPS - 8, start=8)
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_deepcopy_continues_bitwise():
    params = make_params()
    optimizer = RangerVA(params, **HP)
    run(optimizer, params, 5)
    clone = copy.deepcopy(optimizer)
    clone_params_ = clone.param_groups[0]["params"]
    assert all(c is not p for c, p in zip(clone_params_, params))
    run(optimizer, params, 8, start=5)
    run(clone, clone_params_, 8, start=5)
    assert_same_state(optimizer, params, clone, clone_params_)


def test_a_step_grad_scaler_skips_changes_nothing():
    k = 3
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Flatten())
    optimizer = RangerVA(model.parameters(), **{**HP, "k": k, "use_gc": True})
    scaler = torch.amp.GradScaler("cpu")

    def train_step(step, inject_inf=False):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(3, 2, 4, 4, generator=generator)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(inputs)
        scaler.scale(F.mse_loss(output.float(), torch.zeros_like(output.float()))).backward()
        if inject_inf:
            model[0].weight.grad[0, 0, 0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()

    for step in range(k - 1):
        train_step(step)
    values = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    scale = scaler.get_scale()
    train_step(k - 1, inject_inf=True)
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
    assert_state_dicts_equal(optimizer.state_dict(), state)
    train_step(k)  # the k-th real step syncs
    for param in model.parameters():
        assert optimizer.state[param]["step"] == k
        assert torch.equal(param, optimizer.state[param]["slow_param"])


# ------------------------------------------------------------------------ bad arguments

BAD_ARGUMENTS = [
    ({"lr": -1e-3}, r"Invalid lr.*>= 0"),
    ({"lr": float("nan")}, r"Invalid lr"),
    ({"betas": (1.0, 0.999)}, r"Invalid betas\[0\].*\[0, 1\)"),
    ({"betas": (0.9, 1.0)}, r"Invalid betas\[1\].*\[0, 1\)"),
    ({"betas": (0.9,)}, r"Invalid betas.*pair"),
    ({"eps": 0.0}, r"Invalid eps.*> 0"),
    ({"weight_decay": -0.1}, r"Invalid weight_decay.*>= 0"),
    ({"k": 0}, r"Invalid k.*int >= 1"),
    ({"k": 6.0}, r"Invalid k.*int >= 1"),
    ({"alpha": 0.0}, r"Invalid alpha.*\(0, 1\]"),
    ({"alpha": 1.5}, r"Invalid alpha.*\(0, 1\]"),
    ({"amsgrad": "yes"}, r"Invalid amsgrad.*True or False"),
    ({"transformer": "relu"}, r"Invalid transformer.*'softplus', 'none'"),
    ({"grad_transformer": "cube"}, r"Invalid grad_transformer.*'square', 'abs'"),
    ({"smooth": 0.0}, r"Invalid smooth.*> 0"),
    ({"smooth": float("inf")}, r"Invalid smooth"),
    ({"use_gc": 1}, r"Invalid use_gc.*True or False"),
    ({"gc_conv_only": None}, r"Invalid gc_conv_only.*True or False"),
    ({"foreach": "yes"}, r"Invalid foreach.*None or a bool"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_constructor_rejects_a_bad_hyperparameter_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RangerVA(make_params(), **{**HP, **kwargs})


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_add_param_group_rejects_a_bad_hyperparameter_and_changes_nothing(kwargs, message):
    params = make_params()
    optimizer = RangerVA(params[:2], **HP)
    run(optimizer, params[:2], 2)
    before = copy.deepcopy(optimizer.state_dict())
    group = {GROUP_KEY.get(key, key): value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": params[2:], **group})
    assert len(optimizer.param_groups) == 1
    assert_state_dicts_equal(optimizer.state_dict(), before)


# --------------------------------------------------------------------------------- loading


def assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        assert entry.keys() == b["state"][index].keys()
        for key, value in entry.items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("key", ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "slow_param"])
def test_load_state_dict_missing_a_per_param_key_raises_and_changes_nothing(key):
    params = make_params()
    optimizer = RangerVA(params, **HP)
    run(optimizer, params, 3)
    bad = copy.deepcopy(optimizer.state_dict())
    del bad["state"][1][key]
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=rf"param 1 of group 0.*missing state '{key}'"):
        optimizer.load_state_dict(bad)
    assert_state_dicts_equal(optimizer.state_dict(), before)


def test_the_peers_state_dict_is_rejected_naming_it():
    params = make_params()
    twins = clone_params(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch_optimizer.RangerVA(twins, **HP)
        run(peer, twins, 2)
    optimizer = RangerVA(params, **HP)
    with pytest.raises(ValueError, match=r"missing 'lookahead_k'.*torch_optimizer\.RangerVA"):
        optimizer.load_state_dict(peer.state_dict())


# ------------------------------------------------------------------------------ Lookahead


def test_slow_weights_and_sync_lookahead():
    params = make_params()
    optimizer = RangerVA(params, **{**HP, "k": 4})
    run(optimizer, params, 6)  # synced at 4, two fast steps since
    fast = [p.detach().clone() for p in params]
    slow = [optimizer.state[p]["slow_param"].clone() for p in params]
    assert not any(torch.equal(f, s) for f, s in zip(fast, slow))
    with optimizer.slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(params, slow))
    assert all(torch.equal(p, f) for p, f in zip(params, fast))  # restored exactly

    optimizer.sync_lookahead()
    for param, f, s in zip(params, fast, slow):
        assert torch.equal(param, torch.lerp(s, f, HP["alpha"]))
        assert torch.equal(optimizer.state[param]["slow_param"], param)
        assert optimizer.state[param]["step"] == 6  # the schedule does not shift
    run(optimizer, params, 2, start=6)  # step 8 syncs
    assert all(torch.equal(p, optimizer.state[p]["slow_param"]) for p in params)
