"""`RangerQH`: QHAdam + Lookahead, against its peer, its maths and the optimizer contract.

The peer is ``torch_optimizer.RangerQH`` (``pytorch_ranger`` 0.1.1, the original author's
``rangerqh.py``). It is compared on the same params and gradients in float64, with every
hyperparameter pinned. With decoupled weight decay the peer differs from the maths: it
decays the param *before* taking the slow weights at the first step, so its slow weights
start at theta_0 * (1 - lr * wd) instead of theta_0; that case is tested against the maths
written out in `plain_ranger_qh` (and the difference is asserted, so it stays documented).
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

from ranger_plugins.ranger_qh import RangerQH

# Every hyperparameter pinned (the defaults of the original, with a larger lr).
HP = dict(
    lr=0.02,
    betas=(0.9, 0.999),
    nus=(0.7, 1.0),
    weight_decay=0.0,
    k=6,
    alpha=0.5,
    decouple_weight_decay=False,
    eps=1e-8,
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
    """One step on copies of ``grads`` (the peer adds L2 decay to ``p.grad`` in place)."""
    for index, (param, grad) in enumerate(zip(params, grads)):
        param.grad = None if index in skip else grad.to(param.dtype).clone()
    optimizer.step()


def plain_ranger_qh(theta0, grads, *, lr, betas, nus, eps, weight_decay, decouple, k, alpha):
    """The docstring's maths, for one tensor, written out plainly."""
    (beta1, beta2), (nu1, nu2) = betas, nus
    theta, slow = theta0.clone(), theta0.clone()
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    w1 = w2 = 0.0
    for t, g in enumerate(grads, start=1):
        if weight_decay and decouple:
            theta = theta * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * theta
        w1, w2 = 1 + beta1 * w1, 1 + beta2 * w2
        m = (1 - 1 / w1) * m + g / w1
        v = (1 - 1 / w2) * v + g * g / w2
        numerator = (1 - nu1) * g + nu1 * m
        theta = theta - lr * numerator / (torch.sqrt((1 - nu2) * g * g + nu2 * v) + eps)
        if t % k == 0:
            slow = slow + alpha * (theta - slow)
            theta = slow.clone()
    return theta, slow


# ------------------------------------------------------------------------ peer and maths


def test_defaults_follow_the_original():
    ours = inspect.signature(RangerQH).parameters
    peer = inspect.signature(torch_optimizer.RangerQH).parameters
    for name in (
        "lr",
        "betas",
        "nus",
        "weight_decay",
        "k",
        "alpha",
        "decouple_weight_decay",
        "eps",
    ):
        assert ours[name].default == peer[name].default, name


PEER_CASES = {
    "defaults": {},
    "l2_decay": dict(weight_decay=0.1),
    "adam_nus": dict(nus=(1.0, 1.0)),
    "both_nus_no_eps": dict(nus=(0.5, 0.8), eps=0.0),
    "k4_alpha08": dict(k=4, alpha=0.8, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", PEER_CASES)
def test_matches_the_peer_in_float64(case, foreach):
    """14 steps (two syncs); param 1 misses step 3, so per-param step counts differ."""
    settings = {**HP, **PEER_CASES[case]}
    params = make_params()
    twins = clone_params(params)
    ours = RangerQH(params, **settings, foreach=foreach)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peer's deprecated add_(scalar, tensor) calls
        peer = torch_optimizer.RangerQH(twins, **settings)
        for step, grads in enumerate(gradients(params, STEPS)):
            skip = (1,) if step == 3 else ()
            step_with(ours, params, grads, skip)
            step_with(peer, twins, grads, skip)
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param, twin, rtol=1e-12, atol=1e-14)
        state, peer_state = ours.state[param], peer.state[twin]
        assert state["step"] == peer_state["step"]
        for key, peer_key in (("exp_avg",) * 2, ("exp_avg_sq",) * 2, ("slow_param", "slow_buffer")):
            torch.testing.assert_close(state[key], peer_state[peer_key], rtol=1e-12, atol=1e-14)
        for key in ("beta1_weight", "beta2_weight"):
            assert state[key] == pytest.approx(peer_state[key], rel=1e-15)


def test_changing_betas_use_the_running_weights_like_the_peer():
    """beta1 and beta2 change every step (as fastai's one-cycle does to beta1): the running
    weights w <- 1 + beta * w, not (1 - beta^t) / (1 - beta), normalize the averages."""
    params = make_params()
    twins = clone_params(params)
    ours = RangerQH(params, **HP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch_optimizer.RangerQH(twins, **HP)
        for step, grads in enumerate(gradients(params, STEPS)):
            for optimizer in (ours, peer):
                optimizer.param_groups[0]["betas"] = (0.95 - 0.01 * step, 0.99 + 0.0005 * step)
            step_with(ours, params, grads)
            step_with(peer, twins, grads)
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param, twin, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "settings",
    [{}, dict(weight_decay=0.1), dict(weight_decay=0.1, decouple_weight_decay=True)],
    ids=["no_decay", "l2", "decoupled"],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_the_maths_written_plainly(settings, foreach):
    settings = {**HP, **settings}
    params = make_params()
    theta0 = [p.detach().clone() for p in params]
    optimizer = RangerQH(params, **settings, foreach=foreach)
    all_grads = gradients(params, STEPS)
    for grads in all_grads:
        step_with(optimizer, params, grads)
    for index, param in enumerate(params):
        theta, slow = plain_ranger_qh(
            theta0[index],
            [grads[index] for grads in all_grads],
            lr=settings["lr"],
            betas=settings["betas"],
            nus=settings["nus"],
            eps=settings["eps"],
            weight_decay=settings["weight_decay"],
            decouple=settings["decouple_weight_decay"],
            k=settings["k"],
            alpha=settings["alpha"],
        )
        torch.testing.assert_close(param.detach(), theta, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            optimizer.state[param]["slow_param"], slow, rtol=1e-12, atol=1e-14
        )


def test_decoupled_decay_slow_weights_start_at_theta0_not_at_the_peers_decayed_value():
    """The peer decays the param before copying it into its slow weights at step 1."""
    settings = {**HP, "weight_decay": 0.1, "decouple_weight_decay": True}
    params = make_params()
    theta0 = [p.detach().clone() for p in params]
    twins = clone_params(params)
    ours = RangerQH(params, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch_optimizer.RangerQH(twins, **settings)
        grads = gradients(params, 1)[0]
        step_with(ours, params, grads)
        step_with(peer, twins, grads)
    decay = 1 - settings["lr"] * settings["weight_decay"]
    for index, (param, twin) in enumerate(zip(params, twins)):
        assert torch.equal(ours.state[param]["slow_param"], theta0[index])
        torch.testing.assert_close(peer.state[twin]["slow_buffer"], theta0[index] * decay)
        torch.testing.assert_close(param, twin, rtol=1e-12, atol=1e-14)  # same fast step


def test_gc_centralizes_matrix_gradients_in_place():
    params = make_params(shapes=[(5, 7), (6,)])
    gc_params, no_gc_params = params, clone_params(params)
    gc = RangerQH(gc_params, **HP, use_gc=True)
    no_gc = RangerQH(no_gc_params, **HP)
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
        dict(weight_decay=0.05, use_gc=True),
        dict(weight_decay=0.05, decouple_weight_decay=True, nus=(0.5, 0.8)),
    ],
    ids=["plain", "l2_gc", "decoupled_nus"],
)
def test_foreach_equals_single_tensor_bitwise(dtypes, settings):
    params = make_params(dtypes=dtypes)
    twins = clone_params(params)
    multi = RangerQH(params, **{**HP, **settings}, foreach=True)
    single = RangerQH(twins, **{**HP, **settings}, foreach=False)

    def skip(step):  # params 1 and 2 miss steps: buckets of different steps and weights
        return {2: (1,), 7: (1, 2)}.get(step, ())

    run(multi, params, STEPS, skip=skip)
    run(single, twins, STEPS, skip=skip)
    assert multi.state[params[1]]["step"] == STEPS - 2
    assert_same_state(multi, params, single, twins)  # bitwise, every param and state entry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state_and_compute_in_fp32(dtype):
    params = make_params(dtypes=(dtype,))
    twins = [torch.nn.Parameter(p.detach().float()) for p in params]
    optimizer = RangerQH(params, **{**HP, "weight_decay": 0.1})
    twin_optimizer = RangerQH(twins, **{**HP, "weight_decay": 0.1})
    grads = [g.to(dtype) for g in gradients(params, 1)[0]]
    step_with(optimizer, params, grads)
    step_with(twin_optimizer, twins, [g.float() for g in grads])
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin.to(dtype))
        for key in ("exp_avg", "exp_avg_sq", "slow_param"):
            state = optimizer.state[param][key]
            assert state.dtype == torch.float32
            assert torch.equal(state, twin_optimizer.state[twin][key])


# ------------------------------------------------------------------------------- contract


def test_closure_runs_once_under_grad_mode_and_its_loss_is_returned():
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    optimizer = RangerQH(model.parameters(), **HP)
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
    optimizer = RangerQH(params, **HP)
    before = params[2].detach().clone()
    run(optimizer, params, 3, skip=(2,))
    assert torch.equal(params[2], before) and params[2] not in optimizer.state
    run(optimizer, params, 2, start=3, skip=lambda step: (0,) if step == 4 else ())
    assert [optimizer.state[p]["step"] for p in params] == [4, 5, 2, 5]
    assert optimizer.state[params[2]]["beta1_weight"] == pytest.approx(1 + HP["betas"][0])


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
    optimizer = RangerQH(params, **settings)
    run(optimizer, params, 8, skip=lambda step: (1,) if step == 2 else ())
    loaded = save_and_load(optimizer.state_dict())
    resumed_params = clone_params(params)
    resumed = RangerQH(resumed_params, lr=0.5, nus=(1.0, 1.0), k=3, foreach=foreach)
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["nus"] == (0.7, 1.0)
    run(optimizer, params, STEPS - 8, start=8)
    run(resumed, resumed_params, STEPS - 8, start=8)
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_deepcopy_continues_bitwise():
    params = make_params()
    optimizer = RangerQH(params, **HP)
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
    optimizer = RangerQH(model.parameters(), **{**HP, "k": k, "use_gc": True})
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
    ({"betas": (0.9, -0.1)}, r"Invalid betas\[1\].*\[0, 1\)"),
    ({"betas": (0.9,)}, r"Invalid betas.*pair"),
    ({"nus": (1.5, 1.0)}, r"Invalid nus\[0\].*\[0, 1\]"),
    ({"nus": (0.7, -0.1)}, r"Invalid nus\[1\].*\[0, 1\]"),
    ({"nus": 0.7}, r"Invalid nus.*pair"),
    ({"eps": -1e-8}, r"Invalid eps.*>= 0"),
    ({"weight_decay": -0.1}, r"Invalid weight_decay.*>= 0"),
    ({"k": 0}, r"Invalid k.*int >= 1"),
    ({"k": 2.5}, r"Invalid k.*int >= 1"),
    ({"alpha": 0.0}, r"Invalid alpha.*\(0, 1\]"),
    ({"alpha": 1.5}, r"Invalid alpha.*\(0, 1\]"),
    ({"decouple_weight_decay": "yes"}, r"Invalid decouple_weight_decay.*True or False"),
    ({"use_gc": 1}, r"Invalid use_gc.*True or False"),
    ({"gc_conv_only": None}, r"Invalid gc_conv_only.*True or False"),
    ({"foreach": "yes"}, r"Invalid foreach.*None or a bool"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_constructor_rejects_a_bad_hyperparameter_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RangerQH(make_params(), **{**HP, **kwargs})


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_add_param_group_rejects_a_bad_hyperparameter_and_changes_nothing(kwargs, message):
    params = make_params()
    optimizer = RangerQH(params[:2], **HP)
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


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step", None),
        ("exp_avg", None),
        ("exp_avg_sq", None),
        ("slow_param", None),
        ("beta1_weight", None),
        ("beta2_weight", None),
        ("beta1_weight", math.nan),
        ("beta2_weight", -1.0),
    ],
)
def test_load_state_dict_of_a_bad_per_param_state_raises_and_changes_nothing(key, value):
    """``None``: the key is missing."""
    params = make_params()
    optimizer = RangerQH(params, **HP)
    run(optimizer, params, 3)
    bad = copy.deepcopy(optimizer.state_dict())
    if value is None:
        del bad["state"][1][key]
    else:
        bad["state"][1][key] = value
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=rf"param 1 of group 0.*{key}"):
        optimizer.load_state_dict(bad)
    assert_state_dicts_equal(optimizer.state_dict(), before)


def test_the_peers_state_dict_is_rejected_naming_it():
    params = make_params()
    twins = clone_params(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch_optimizer.RangerQH(twins, **HP)
        run(peer, twins, 2)
    optimizer = RangerQH(params, **HP)
    with pytest.raises(ValueError, match=r"missing 'lookahead_k'.*torch_optimizer\.RangerQH"):
        optimizer.load_state_dict(peer.state_dict())


# ------------------------------------------------------------------------------ Lookahead


def test_slow_weights_and_sync_lookahead():
    params = make_params()
    optimizer = RangerQH(params, **{**HP, "k": 4})
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
