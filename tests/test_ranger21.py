"""Ranger21: the maths (written plainly here), parity with `pytorch_optimizer.Ranger21`, its
schedule and how it combines with external ones, and the optimizer contract (foreach ==
single bitwise, closure, exact resume, deepcopy, GradScaler, checks before any change,
Lookahead controls).

`reference_step` below is Ranger21 written out from the original (lessw2020/Ranger21,
``ranger21/ranger21.py``) with its bugs fixed as `Ranger21`'s docstring lists. With
``peer_quirks=True`` it does what `pytorch_optimizer.Ranger21` does instead in two places:

* its stable-weight-decay sum starts at 1 instead of 0 (with small gradient variances, as
  with clipped, unnormalized gradients, that changes the decay many times over);
* the gradient is centralized and normalized a second time before the momentum update (as in
  the original's code; it scales the gradient by about 1 + 1e-8 / std(g)).

So: `Ranger21` matches the reference (all features on, defaults), the reference with the two
quirks matches the peer, and where the quirks do nothing (no weight decay, no gradient
normalization) `Ranger21` matches the peer directly.
"""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F
from optim_helpers import assert_same, assert_same_state, clone_params, make_params, run, set_grads

from ranger_plugins.ranger21 import Ranger21, Ranger21Schedule

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

T = 20  # num_iterations: automatic warmup int(0.22 * 20) = 4 steps, warmdown from step 14
STEPS = 15  # syncs at 5, 10, 15 (k = 5); steps 14 and 15 in the warmdown


# ------------------------------------------------------------------------------ reference
def row_norm(x):
    """The original's unit_norm."""
    if x.dim() <= 1:
        return x.norm()
    if x.dim() in (2, 3):
        return x.norm(p=2, dim=1, keepdim=True)
    return x.norm(p=2, dim=tuple(range(1, x.dim())), keepdim=True)


def clip(p, g, hp):
    max_norm = torch.clamp(row_norm(p), min=hp["agc_eps"]) * hp["agc_clipping_value"]
    g_norm = row_norm(g)
    return torch.where(g_norm > max_norm, g * max_norm / torch.clamp(g_norm, min=1e-6), g)


def centralize(g):
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g


def normalize(g):
    return g / (g.std() + 1e-8) if g.numel() > 2 else g


def plain_schedule_lr(lr, t, hp):
    """The original's warmup_dampening then get_warm_down, with the group's lr `lr` in place
    of the constructor's (starting_lr)."""
    total, warmup, scheduled = hp["num_iterations"], hp["num_warmup_iterations"], lr
    if hp["use_warmup"]:
        if warmup is None:
            warmup = math.ceil(2 / (1 - hp["betas"][1]))
            if warmup / total > 0.45:
                warmup = int(hp["warmup_pct_default"] * total)
        if t <= warmup:
            scheduled = lr * min(1.0, t / warmup)
    if hp["warmdown_active"] and t >= (start := int(hp["warmdown_start_pct"] * total)):
        pct = min(((t + 1) - start) / (total - start + 1), 1.0)
        scheduled = max(lr - (lr - hp["warmdown_min_lr"]) * pct, hp["warmdown_min_lr"])
    return scheduled


def reference_step(optimizer, state, peer_quirks=False):
    """One Ranger21 step in float64 over `optimizer.param_groups`, written plainly, keeping
    its own state in `state` (per param)."""
    total, numel = (1.0 if peer_quirks else 0.0), 0
    stepping = []
    for hp in optimizer.param_groups:
        for p in hp["params"]:
            if p.grad is None:
                continue
            zeros = torch.zeros_like(p)
            st = state.setdefault(p, dict(t=0, m1=zeros, m2=zeros, v=zeros, vmax=zeros))
            st.setdefault("slow", p.detach().clone())
            st["t"] += 1
            beta2 = hp["betas"][1]
            g = normalize(centralize(clip(p.detach(), p.grad, hp)))
            st["v"] = beta2 * st["v"] + (1 - beta2) * g * g
            total += (st["v"] / (1 - beta2 ** st["t"])).sum().item()
            numel += p.numel()
            st["g"] = normalize(centralize(g)) if peer_quirks else g
            stepping.append((p, hp))
    sigma = math.sqrt(total / numel)
    for p, hp in stepping:
        st = state[p]
        t, (beta1, beta2), eps, beta0 = st["t"], hp["betas"], hp["eps"], hp["pnm_momentum_factor"]
        lr = plain_schedule_lr(hp["lr"], t, hp)
        theta = p.detach().clone()
        theta = theta * (1 - hp["weight_decay"] * lr / sigma)
        theta = theta * (1 - lr * 2 * hp["norm_loss_factor"] * (1 - 1 / (row_norm(theta) + eps)))
        st["vmax"] = torch.maximum(st["vmax"], st["v"])
        denom = F.softplus(
            st["vmax"].sqrt() / math.sqrt(1 - beta2**t) + eps, beta=hp["beta_softplus"]
        )
        if t % 2 == 1:
            st["m1"] = beta1**2 * st["m1"] + (1 - beta1**2) * st["g"]
            m, n = st["m1"], st["m2"]
        else:
            st["m2"] = beta1**2 * st["m2"] + (1 - beta1**2) * st["g"]
            m, n = st["m2"], st["m1"]
        pn = ((1 + beta0) * m - beta0 * n) / math.sqrt((1 + beta0) ** 2 + beta0**2)
        theta = theta - lr / (1 - beta1**t) * pn / denom
        if t % hp["lookahead_k"] == 0:
            st["slow"] = st["slow"] + hp["lookahead_alpha"] * (theta - st["slow"])
            theta = st["slow"].clone()
        p.data.copy_(theta)


def max_abs_diff(params_a, params_b):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(params_a, params_b))


def run_pair(opt_a, params_a, step_b, params_b, steps=STEPS, skip=()):
    """Step `opt_a` and `step_b()` on the same gradients; the largest difference seen."""
    worst = 0.0
    for step in range(steps):
        set_grads(params_a, step, skip=skip(step) if callable(skip) else skip)
        set_grads(params_b, step, skip=skip(step) if callable(skip) else skip)
        opt_a.step()
        step_b()
        worst = max(worst, max_abs_diff(params_a, params_b))
    return worst


# ------------------------------------------------------------------------------ maths
def test_defaults_follow_the_original():
    defaults = {
        name: p.default for name, p in inspect.signature(Ranger21.__init__).parameters.items()
    }
    assert defaults["lr"] == 1e-3 and defaults["betas"] == (0.9, 0.999)
    assert defaults["eps"] == 1e-8 and defaults["weight_decay"] == 1e-4
    assert (defaults["k"], defaults["alpha"]) == (5, 0.5)
    assert defaults["agc_clipping_value"] == 1e-2 and defaults["agc_eps"] == 1e-3
    assert defaults["pnm_momentum_factor"] == 1.0 and defaults["norm_loss_factor"] == 1e-4
    assert defaults["beta_softplus"] == 50.0 and defaults["warmup_pct_default"] == 0.22
    assert defaults["warmdown_start_pct"] == 0.72 and defaults["warmdown_min_lr"] == 3e-5
    for flag in ("use_gc", "normalize_gradients", "use_agc", "use_softplus", "use_warmup"):
        assert defaults[flag] is True
    assert defaults["warmdown_active"] is True and defaults["gc_conv_only"] is False


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_plain_maths_with_every_part_on(foreach):
    """Defaults (beta0 = 1, gradient normalization, norm loss, softplus, clipping, GC), a
    weight decay large enough to matter, two groups (the normalizer spans both), and params
    that miss gradients (their own step counts; not in the normalizer)."""
    params = make_params()
    twins = clone_params(params)
    groups = [
        {"params": params[:2]},
        {"params": params[2:], "lr": 0.03, "betas": (0.8, 0.99), "norm_loss_factor": 0.05},
    ]
    optimizer = Ranger21(groups, T, lr=0.05, weight_decay=0.1, foreach=foreach)
    twin_groups = [
        {**group, "params": twins[:2] if index == 0 else twins[2:]}
        for index, group in enumerate(optimizer.param_groups)
    ]
    holder = torch.optim.SGD(twin_groups, lr=0.0)  # just keeps the twin groups
    state: dict = {}
    worst = run_pair(
        optimizer,
        params,
        lambda: reference_step(holder, state),
        twins,
        skip=lambda step: {1} if step % 4 == 2 else ({3} if step == 5 else ()),
    )
    assert worst <= 1e-12, worst
    assert optimizer.state[params[1]]["step"] == STEPS - 4
    assert optimizer.state[params[1]]["step"] == state[twins[1]]["t"]


def peer(params, **overrides):
    settings = dict(
        num_iterations=T,
        lr=0.05,
        beta0=0.9,  # the peer allows beta0 < 1 only
        weight_decay=0.1,
        norm_loss_factor=0.01,
        lookahead_merge_time=5,
        lookahead_blending_alpha=0.5,
    )
    return pytorch_optimizer.Ranger21(params, **{**settings, **overrides})


@pytest.mark.parametrize("peer_foreach", [False, True])
def test_the_plain_maths_with_the_peers_quirks_is_the_peer(peer_foreach):
    params = make_params()
    twins = clone_params(params)
    optimizer = peer(params, foreach=peer_foreach)
    holder = Ranger21(twins, T, lr=0.05, weight_decay=0.1, norm_loss_factor=0.01)
    holder.param_groups[0]["pnm_momentum_factor"] = 0.9
    state: dict = {}
    worst = run_pair(optimizer, params, lambda: reference_step(holder, state, True), twins)
    assert worst <= 1e-12, worst


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_peer_where_its_quirks_do_nothing(foreach):
    """No weight decay, no gradient normalization (the peer's two quirks are then no-ops):
    clipping, GC, positive-negative momentum, the max of the second moments, softplus,
    norm loss, warmup, warmdown and Lookahead all agree with `pytorch_optimizer.Ranger21`."""
    params = make_params()
    twins = clone_params(params)
    ours = Ranger21(
        params,
        T,
        lr=0.05,
        weight_decay=0.0,
        normalize_gradients=False,
        norm_loss_factor=0.01,
        pnm_momentum_factor=0.9,
        foreach=foreach,
    )
    theirs = peer(twins, weight_decay=0.0, normalize_gradients=False)
    worst = run_pair(ours, params, theirs.step, twins)
    assert worst <= 1e-12, worst


def test_differs_from_the_peer_by_its_quirks_only():
    """With everything on, ours and the peer differ (the quirks matter), and the difference is
    the one between the plain maths with and without them."""
    params, twins, plain = make_params(), make_params(), make_params()
    ours = Ranger21(
        params, T, lr=0.05, weight_decay=0.1, norm_loss_factor=0.01, pnm_momentum_factor=0.9
    )
    theirs = peer(twins)
    run_pair(ours, params, theirs.step, twins)
    holder = Ranger21(plain, T, lr=0.05, weight_decay=0.1, norm_loss_factor=0.01)
    holder.param_groups[0]["pnm_momentum_factor"] = 0.9
    state: dict = {}
    for step in range(STEPS):
        set_grads(plain, step)
        reference_step(holder, state, peer_quirks=True)
    assert max_abs_diff(params, twins) > 1e-9
    assert max_abs_diff(plain, twins) <= 1e-12


# ------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize(
    "total, warmup, beta2",
    [(20, None, 0.999), (10_000, None, 0.999), (400, None, 0.99), (50, 7, 0.999)],
)
def test_schedule_is_the_originals(total, warmup, beta2):
    """Step by step equal to the original's maths (written plainly) and to the peer's
    warm_up_dampening / warm_down, with a constant group lr."""
    hp = dict(
        lr=2e-3,
        betas=(0.9, beta2),
        num_iterations=total,
        use_warmup=True,
        num_warmup_iterations=warmup,
        warmup_pct_default=0.22,
        warmdown_active=True,
        warmdown_start_pct=0.72,
        warmdown_min_lr=3e-5,
    )
    schedule = Ranger21Schedule.from_group(hp)
    theirs = pytorch_optimizer.Ranger21(
        [torch.nn.Parameter(torch.zeros(2))],
        num_iterations=total,
        lr=2e-3,
        betas=(0.9, beta2),
        num_warm_up_iterations=warmup,
    )
    for t in range(1, total + 1):
        ours = schedule.lr(2e-3, t, beta2)
        assert ours == plain_schedule_lr(2e-3, t, hp)
        assert ours == pytest.approx(theirs.warm_down(theirs.warm_up_dampening(2e-3, t), t))
    expected_warmup = warmup if warmup is not None else math.ceil(2 / (1 - beta2))
    if warmup is None and expected_warmup / total > 0.45:
        expected_warmup = int(0.22 * total)
    assert schedule.warmup_iterations(beta2) == expected_warmup
    # the warmdown ends on warmdown_min_lr (lr - (lr - min_lr) * 1, so up to rounding)
    assert schedule.lr(2e-3, total, beta2) == pytest.approx(3e-5, rel=1e-12, abs=0)


def scheduled_run(params, use_schedule, lr_at, foreach):
    """Steps where an 'external scheduler' sets the group's lr to lr_at(t) before step t."""
    optimizer = Ranger21(
        params, T, lr=0.05, use_warmup=use_schedule, warmdown_active=use_schedule, foreach=foreach
    )
    for step in range(STEPS):
        optimizer.param_groups[0]["lr"] = lr_at(step + 1)
        set_grads(params, step)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("foreach", [False, True])
def test_internal_schedule_off_uses_exactly_the_external_lr(foreach):
    """Internal schedule on with a constant lr == internal schedule off with an external
    scheduler that sets the internal schedule's lr: bitwise, so with the flags off the step
    uses exactly the group's lr, and with them on it follows the original's shape."""
    schedule = Ranger21Schedule.from_group(Ranger21([torch.zeros(1)], T).param_groups[0])
    internal, external = make_params(), make_params()
    opt_internal = scheduled_run(internal, True, lambda t: 0.05, foreach)
    opt_external = scheduled_run(external, False, lambda t: schedule.lr(0.05, t, 0.999), foreach)
    assert_same_state(opt_internal, internal, opt_external, external)


def test_torch_lr_scheduler_drives_the_lr_when_the_internal_schedule_is_off():
    params, twins = make_params(), make_params()
    optimizer = Ranger21(params, lr=0.05, use_warmup=False, warmdown_active=False)
    assert optimizer.param_groups[0]["num_iterations"] is None  # not needed then
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 / (1 + epoch))
    holder = torch.optim.SGD(
        [{**optimizer.param_groups[0], "params": twins}], lr=0.0
    )  # the reference reads the group's lr; the schedule flags are off
    state: dict = {}
    for step in range(STEPS):
        set_grads(params, step)
        set_grads(twins, step)
        holder.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        reference_step(holder, state)
        scheduler.step()
    assert max_abs_diff(params, twins) <= 1e-12


def test_warmup_multiplies_an_external_lr_and_warmdown_starts_from_it():
    schedule = Ranger21Schedule(T, True, None, 0.22, True, 0.72, 3e-5)
    assert schedule.lr(0.01, 2, 0.999) == 0.01 * 2 / 4
    assert schedule.lr(0.02, 2, 0.999) == 0.02 * 2 / 4
    assert schedule.lr(0.01, 10, 0.999) == 0.01
    start = int(0.72 * T)
    assert schedule.lr(0.01, start, 0.999) == 0.01 - (0.01 - 3e-5) * 1 / (T - start + 1)
    assert schedule.lr(0.0, start, 0.999) == 3e-5  # never below warmdown_min_lr
    off = Ranger21Schedule(None, False, None, 0.22, False, 0.72, 3e-5)
    assert all(off.lr(0.0123, t, 0.999) == 0.0123 for t in range(1, 5000, 7))


# ------------------------------------------------------------------------------ contract
def skip_every_third(step):
    """Param 2 has no gradient at steps 1, 4, 7, ...: the step counts differ per param."""
    return {2} if step % 3 == 1 else ()


@pytest.mark.parametrize(
    "dtypes", [(torch.float64,), (torch.bfloat16,), (torch.float32, torch.bfloat16)]
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_foreach_matches_single_tensor_bitwise(dtypes, weight_decay):
    params = make_params(dtypes=dtypes)
    twins = clone_params(params)
    settings = dict(lr=0.05, weight_decay=weight_decay, norm_loss_factor=0.01, k=4)
    single = Ranger21(params, T, foreach=False, **settings)
    multi = Ranger21(twins, T, foreach=True, **settings)
    run(single, params, STEPS, skip=skip_every_third)
    run(multi, twins, STEPS, skip=skip_every_third)
    assert_same_state(single, params, multi, twins)
    for param in params:
        for key in Ranger21.state_keys:
            assert single.state[param][key].dtype == (
                torch.float32 if param.dtype == torch.bfloat16 else param.dtype
            )


def test_closure_is_evaluated_once_under_enable_grad_and_its_loss_returned():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = Ranger21([param], T)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert calls == [True]
    assert loss.item() == 14.0
    assert optimizer.state[param]["step"] == 1


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("resume_at", [4, 7])
def test_state_dict_round_trip_continues_bitwise(foreach, resume_at):
    params = make_params(dtypes=(torch.float64, torch.bfloat16))
    settings = dict(lr=0.05, weight_decay=0.1, k=3, foreach=foreach)
    optimizer = Ranger21(params, T, **settings)
    run(optimizer, params, resume_at, skip=lambda step: {2} if step == 1 else ())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed_params = clone_params(params)
    resumed = Ranger21(resumed_params, 1000, lr=0.5, k=7, use_gc=False, foreach=foreach)
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["num_iterations"] == T
    assert resumed.param_groups[0]["lookahead_k"] == 3 and resumed.param_groups[0]["use_gc"]
    assert resumed.state[resumed_params[4]]["slow_param"].dtype == torch.float32

    run(optimizer, params, STEPS - resume_at, start=resume_at)
    run(resumed, resumed_params, STEPS - resume_at, start=resume_at)
    assert_same_state(optimizer, params, resumed, resumed_params)


def test_deepcopy_continues_identically():
    params = make_params()
    optimizer = Ranger21(params, T, lr=0.05, weight_decay=0.1)
    run(optimizer, params, 6)
    clone = copy.deepcopy(optimizer)
    clone_params_ = clone.param_groups[0]["params"]
    assert all(c is not p for c, p in zip(clone_params_, params))
    run(optimizer, params, 6, start=6)
    run(clone, clone_params_, 6, start=6)
    assert_same_state(optimizer, params, clone, clone_params_)


def test_a_step_skipped_by_grad_scaler_changes_nothing_and_scaled_steps_are_exact():
    params = make_params(dtypes=(torch.float32,))
    twins = clone_params(params)
    optimizer = Ranger21(params, T, lr=0.05, weight_decay=0.1, k=3)
    twin_optimizer = Ranger21(twins, T, lr=0.05, weight_decay=0.1, k=3)
    scaler = torch.amp.GradScaler("cpu")

    def scaled_step(step, inject_inf=False):
        scale = scaler.scale(torch.ones(())).item()  # a power of two: unscaling is exact
        set_grads(params, step)
        for param in params:
            param.grad.mul_(scale)
        if inject_inf:
            params[1].grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()

    for step in range(2):
        scaled_step(step)
    run(twin_optimizer, twins, 2)
    before = copy.deepcopy(optimizer.state_dict())
    values = [p.detach().clone() for p in params]
    scale = scaler.get_scale()
    scaled_step(2, inject_inf=True)  # would be the sync step (k = 3)
    assert scaler.get_scale() == scale / 2
    assert_same(params, values)
    after = optimizer.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            other = after["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    for step in range(2, 5):
        scaled_step(step)
    run(twin_optimizer, twins, 3, start=2)
    assert_same_state(optimizer, params, twin_optimizer, twins)


BAD_HYPERPARAMETERS = [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(k=0), "k"),
    (dict(alpha=0.0), "alpha"),
    (dict(pnm_momentum_factor=-0.5), "pnm_momentum_factor"),
    (dict(norm_loss_factor=float("nan")), "norm_loss_factor"),
    (dict(agc_clipping_value=0.0), "agc_clipping_value"),
    (dict(agc_eps=-1e-3), "agc_eps"),
    (dict(beta_softplus=0.0), "beta_softplus"),
    (dict(warmup_pct_default=1.5), "warmup_pct_default"),
    (dict(warmdown_start_pct=-0.1), "warmdown_start_pct"),
    (dict(warmdown_min_lr=-1e-5), "warmdown_min_lr"),
    (dict(num_iterations=0), "num_iterations"),
    (dict(num_iterations=12.5), "num_iterations"),
    (dict(num_iterations=None), "num_iterations"),
    (dict(num_iterations=None, use_warmup=False), "num_iterations"),  # warmdown needs it
    (dict(num_warmup_iterations=-1), "num_warmup_iterations"),
    (dict(use_gc=1), "use_gc"),
    (dict(use_softplus="yes"), "use_softplus"),
    (dict(warmdown_active=None), "warmdown_active"),
    (dict(foreach="no"), "foreach"),
]


@pytest.mark.parametrize("kwargs, name", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_a_value_error_naming_them(kwargs, name):
    settings = {"num_iterations": T, **kwargs}
    with pytest.raises(ValueError, match=name):
        Ranger21(make_params(), **settings)
    optimizer = Ranger21(make_params()[:2], T)
    before = copy.deepcopy(optimizer.param_groups)
    group_key = {"k": "lookahead_k", "alpha": "lookahead_alpha"}
    group = {group_key.get(key, key): value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=name):
        optimizer.add_param_group({"params": make_params()[2:], **group})
    assert len(optimizer.param_groups) == 1
    assert repr(optimizer.param_groups) == repr(before)


def test_the_schedule_flags_off_need_no_num_iterations():
    optimizer = Ranger21(make_params(), use_warmup=False, warmdown_active=False)
    run(optimizer, optimizer.param_groups[0]["params"], 2)
    Ranger21(make_params(), warmdown_active=False, num_warmup_iterations=10)


@pytest.mark.parametrize("missing", ["step", "neg_grad_ma", "max_variance_ma", "slow_param"])
def test_load_state_dict_missing_a_state_key_raises_and_changes_nothing(missing):
    params = make_params()
    optimizer = Ranger21(params, T, lr=0.05)
    run(optimizer, params, 3)
    bad = copy.deepcopy(optimizer.state_dict())
    del bad["state"][1][missing]
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=f"param 1 of group 0.*{missing}"):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        assert entry.keys() == after["state"][index].keys()
        for key, value in entry.items():
            other = after["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_the_peers_state_dict_is_refused_by_name():
    params = make_params()
    theirs = peer(clone_params(params))
    run(theirs, theirs.param_groups[0]["params"], 2)
    optimizer = Ranger21(params, T)
    with pytest.raises(ValueError, match="pytorch_optimizer.Ranger21"):
        optimizer.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("foreach", [False, True])
def test_slow_weights_and_sync_lookahead(foreach):
    params = make_params()
    optimizer = Ranger21(params, T, lr=0.05, k=5, alpha=0.3, foreach=foreach)
    run(optimizer, params, 7)  # synced at 5, two fast steps since
    fast = [p.detach().clone() for p in params]
    slow = [optimizer.state[p]["slow_param"].clone() for p in params]
    assert not all(torch.equal(a, b) for a, b in zip(fast, slow))
    with optimizer.slow_weights():
        assert_same(params, slow)
    assert_same(params, fast)

    optimizer.sync_lookahead()
    expected = [s + 0.3 * (f - s) for s, f in zip(slow, fast)]
    for param, value in zip(params, expected):
        assert torch.allclose(param, value, rtol=0, atol=1e-15)
        assert torch.equal(optimizer.state[param]["slow_param"], param)
    assert all(optimizer.state[p]["step"] == 7 for p in params)  # the k-schedule is unchanged


def test_gradients_are_processed_in_place_and_the_lookahead_syncs_every_k_steps():
    params = make_params()
    optimizer = Ranger21(params, T, lr=0.05, k=5)
    initial = [p.detach().clone() for p in params]
    run(optimizer, params, 4)
    assert all(torch.equal(optimizer.state[p]["slow_param"], v) for p, v in zip(params, initial))
    grad = params[1].grad  # clipped (std ~0.01), centralized, then divided by std + 1e-8
    assert grad.std().item() == pytest.approx(1.0, abs=1e-5)
    assert grad.mean(dim=1).abs().max().item() < 1e-12
    run(optimizer, params, 1, start=4)
    assert all(torch.equal(optimizer.state[p]["slow_param"], p) for p in params)
