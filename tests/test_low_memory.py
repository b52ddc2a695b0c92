"""Ranger's low-memory state (``state_precision``, `ranger_plugins._low_memory`): the
properties of its own that the generic contract (`test_optimizer_contract.py`, where
``delta``, ``16bit`` and ``8bit`` are implementations of `optimizer_impls.IMPLS`) does not
cover: the reformulation slow = fast - d against the standard step and the maths, the bytes
per param, the encodings, conversion between layouts, changes of precision and dtype between
steps, bf16 params, memory layouts, and evaluation on the slow weights.

Comparisons with full precision go through `optimizer_impls.full_layout_state`, which decodes
a state from the module docstring's encodings independently of the module's code.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from optimizer_impls import (
    BLOCK,
    EIGHT_BIT_VS_FULL,
    HP,
    IMPLS_BY_ID,
    MIN_8BIT_NUMEL,
    SIXTEEN_BIT_VS_FULL,
    Tolerance,
    assert_plain_equal,
    assert_same_run,
    assert_tensors_close,
    clone_params,
    expect_error,
    expected_state_dtypes,
    full_layout_state,
    make_params,
    run,
    save_and_load,
    set_grads,
    slow_weights,
    snapshot,
    two_groups,
)

from ranger_plugins import Ranger, _cpu_kernel
from ranger_plugins import _low_memory as low_memory
from ranger_plugins.lookahead import slow_weights_of

PRECISIONS = ("full", "delta", "16bit", "8bit")
LOW_MEMORY = PRECISIONS[1:]
# The harness's implementation of each precision (for its declared layout).
IMPL_OF = {"full": IMPLS_BY_ID["foreach"], **{p: IMPLS_BY_ID[p] for p in LOW_MEMORY}}
# What a precision keeps of the full run over a short one (see `optimizer_impls`).
VS_FULL = {
    "full": Tolerance(),
    "delta": Tolerance(rtol=1e-5, atol=1e-6, decoded=True),
    "16bit": SIXTEEN_BIT_VS_FULL,
    "8bit": EIGHT_BIT_VS_FULL,
}
# Small params (a conv weight, a vector, a scalar) and ones of 8-bit state: 4096 elements
# exactly, and 4290 (17 blocks, the last one partial).
SHAPES = ((4, 3, 3, 3), (6,), (), (64, 64), (65, 66))
# bf16 keeps 8 significant bits: an ulp is at most 2**-7 of the value, so rounding to
# nearest errs by at most 2**-8 of it, stochastic rounding by at most 2**-7.
BF16_NEAREST, BF16_STOCHASTIC = 2.0**-8, 2.0**-7


def ranger(params, precision: str, **hyperparameters) -> Ranger:
    return Ranger(params, **{**HP, **hyperparameters}, state_precision=precision)


def assert_layout(label: str, optimizer, precision: str) -> None:
    """Every state of ``optimizer`` is in ``precision``'s layout: keys and dtypes."""
    impl = IMPL_OF[precision]
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            expected = expected_state_dtypes(impl, param)
            found = {k: v.dtype for k, v in state.items() if k != "step"}
            assert found == expected, f"{label}: {tuple(param.shape)}: {found} != {expected}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# =============================================== the reformulation slow = fast - d (delta)


def test_delta_follows_the_standard_step_in_float32():
    """102 steps on fp32 params (GC on the conv weight and matrices, weight decay, k = 6: 17
    syncs; steps 1-5 momentum SGD, then rectified): ``delta`` keeps the params and the slow
    weights within 1e-6 of ``full``'s, relative to their magnitude, and the moments equal."""
    params = make_params(torch.float32, SHAPES[:4])
    twins = clone_params(params)
    delta = ranger(params, "delta", lr=0.01, weight_decay=0.05)
    full = ranger(twins, "full", lr=0.01, weight_decay=0.05)
    for step in range(102):
        set_grads(params, step)
        set_grads(twins, step)
        delta.step()
        full.step()
    for param, twin in zip(params, twins):
        label = f"delta vs full after 102 steps, {tuple(param.shape)}"
        state, reference = delta.state[param], full.state[twin]
        assert state["step"] == reference["step"] == 102
        assert relative_error(param.detach(), twin.detach()) < 1e-6, label
        slow = slow_weights_of(param, state)
        assert relative_error(slow, reference["slow_param"]) < 1e-6, f"{label}: slow weights"
        for key in ("exp_avg", "exp_avg_sq"):
            assert relative_error(state[key], reference[key]) < 1e-6, f"{label}: {key}"


def _reference_ranger(params, grads_of_step, steps, lr, weight_decay, k, alpha):
    """Ranger as ../shared/REFERENCE.md states it, in float64 (betas (0.95, 0.999), eps 1e-5,
    threshold 5, GC on every gradient of more than one dim); (params, slow) after ``steps``."""
    beta1, beta2, eps = 0.95, 0.999, 1e-5
    theta = [p.detach().double().clone() for p in params]
    slow = [t.clone() for t in theta]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    rho_inf = 2 / (1 - beta2) - 1
    for t in range(1, steps + 1):
        for i, g in enumerate(grads_of_step(t - 1)):
            g = g.double()
            if g.dim() > 1:
                g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            theta[i] = theta[i] * (1 - lr * weight_decay)
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m[i] = beta1 * m[i] + (1 - beta1) * g
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            rho_t = rho_inf - 2 * t * beta2**t / bc2
            if rho_t > 5:
                r_t = math.sqrt(
                    (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
                )
                theta[i] = theta[i] - lr * (r_t * math.sqrt(bc2) / bc1) * m[i] / (v[i].sqrt() + eps)
            else:
                theta[i] = theta[i] - lr / bc1 * m[i]
            if t % k == 0:
                slow[i] = slow[i] + alpha * (theta[i] - slow[i])
                theta[i] = slow[i].clone()
    return theta, slow


def test_delta_follows_the_maths_of_the_reference_and_the_docstring():
    """In float64, over 20 steps (k = 4, alpha 0.6: five syncs): the params and the slow
    weights ``fast - d`` equal REFERENCE.md's Ranger written out; and, as the module
    docstring says, between syncs ``d`` is the sum of the param's changes since the last
    sync (param - its value then), and a sync leaves ``d = 0``."""
    hyperparameters = dict(lr=0.02, weight_decay=0.01, k=4, alpha=0.6)
    params = make_params(torch.float64, SHAPES[:4])
    start = [p.detach().clone() for p in params]
    optimizer = ranger(params, "delta", **hyperparameters)
    at_sync = [p.detach().clone() for p in params]
    for step in range(20):
        set_grads(params, step)
        optimizer.step()
        for index, param in enumerate(params):
            delta = optimizer.state[param]["slow_delta"]
            label = f"step {step + 1}, {tuple(param.shape)}"
            if (step + 1) % 4 == 0:
                assert torch.equal(delta, torch.zeros_like(delta)), f"{label}: d after a sync"
                at_sync[index] = param.detach().clone()
            else:
                expected = param.detach() - at_sync[index]
                assert_tensors_close(f"{label}: d", delta, expected, Tolerance(atol=1e-13))

    def grads_of_step(step):
        twins = [torch.nn.Parameter(t.clone()) for t in start]
        set_grads(twins, step)
        return [p.grad for p in twins]

    theta, slow = _reference_ranger(start, grads_of_step, 20, **hyperparameters)
    for param, expected, expected_slow in zip(params, theta, slow):
        label = f"delta vs REFERENCE.md, {tuple(param.shape)}"
        assert_tensors_close(label, param.detach(), expected, Tolerance(atol=1e-12))
        assert_tensors_close(
            f"{label}: slow weights",
            slow_weights_of(param, optimizer.state[param]),
            expected_slow,
            Tolerance(atol=1e-12),
        )


# ============================================================ state bytes per param


@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_bytes_per_param(precision):
    """Sum of the state tensors' bytes (``step`` aside) over the params' elements: 12 in
    full and delta, 6 in 16bit; in 8bit at most 4.1 on params of >= 4096 elements (block
    scales included), and 6 on the smaller ones (they keep the 16bit layout)."""
    params = make_params(torch.float32, SHAPES)
    optimizer = ranger(params, precision)
    run(optimizer, params, 2)
    for param in params:
        state = optimizer.state[param]
        state_bytes = sum(
            value.numel() * value.element_size()
            for key, value in state.items()
            if key != "step" and isinstance(value, torch.Tensor)
        )
        per_param = state_bytes / param.numel()
        label = f"{precision}: {tuple(param.shape)}: {per_param:.4f} bytes per param"
        if precision in ("full", "delta"):
            assert per_param == 12, label
        elif precision == "16bit" or param.numel() < MIN_8BIT_NUMEL:
            assert per_param == 6, label
        else:
            assert per_param <= 4.1, label
            blocks = -(-param.numel() // BLOCK)
            assert state_bytes == 4 * param.numel() + 2 * 4 * blocks, label


# ====================================================================== encodings


def _blocks_with_varied_magnitudes(numel: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator)
    # magnitudes over ten orders, so blocks hold both large and tiny values
    return values * torch.exp(torch.rand(numel, generator=generator) * 23 - 20)


def test_signed_code_round_trip_within_its_resolution():
    """``exp_avg``'s code: c = round(127 sqrt(|m| / S)), decoded S c |c| / 127**2: the sign
    kept, and |decoded - m| at most half the step between the neighbouring levels,
    S (|c| + 1/4) / 127**2 (so down to S / 32258 at c = 0); the block's largest magnitude
    comes back to within an fp32 ulp. Three full blocks and a partial one."""
    values = _blocks_with_varied_magnitudes(3 * BLOCK + 17)
    values[5] = 0.0
    codes, scales = low_memory._encode_signed(values)
    assert codes.dtype == torch.int8 and codes.shape == values.shape
    assert scales.shape == (4,)
    decoded = low_memory._decode_signed(codes, scales)
    assert decoded.shape == values.shape
    expected_scales = torch.stack([values[i : i + BLOCK].abs().max() for i in range(0, 785, 256)])
    assert torch.equal(scales, expected_scales), "S is each block's largest magnitude"
    block_scale = scales.double().repeat_interleave(BLOCK)[: values.numel()]
    bound = block_scale * (codes.double().abs() + 0.25) / 127**2
    error = (decoded.double() - values.double()).abs()
    assert (error <= bound * (1 + 1e-5) + 1e-30).all(), (error - bound).max()
    coded = codes != 0
    assert (torch.sign(decoded[coded]) == torch.sign(values[coded])).all()
    assert (decoded[~coded] == 0).all() and decoded[5] == 0
    # relative resolution near 2 / c (the spacing of the levels over the value): a value
    # coded c is at least S (|c| - 1/2)**2 / 127**2, so it errs by (|c| - 1/4) / (|c| - 1/2)**2
    c = codes.double().abs()[coded]
    relative = error[coded] / values.double().abs()[coded]
    assert (relative <= (c - 0.25) / (c - 0.5) ** 2 * (1 + 1e-5)).all()
    assert relative[c >= 64].max() < 2 / 64
    largest = values.abs().argmax()
    assert_tensors_close(
        "largest", decoded[largest], values[largest], Tolerance(rtol=2**-23, atol=0)
    )


def test_unsigned_code_round_trip_never_zero_and_zero_blocks():
    """``exp_avg_sq``'s code: c = floor(255 (v / S) ** 0.25 + u), decoded S (c / 255) ** 4:
    each decoded v lies between the levels just below and above it (stochastic rounding
    picks one of them); a v > 0, however small against its block's largest, never decodes
    to 0; a block of zeros stays zero (no 0/0); a partial last block is encoded alone."""
    values = _blocks_with_varied_magnitudes(2 * BLOCK + 100).square()
    values[: BLOCK // 2] *= 1e-30  # far below S / 255**4: the code's smallest level
    zero_block = torch.zeros(BLOCK)
    values = torch.cat([values[:BLOCK], zero_block, values[BLOCK:]])
    offsets = low_memory.random16(torch.arange(values.numel()), step=7)
    codes, scales = low_memory._encode_unsigned(values, offsets)
    assert codes.dtype == torch.uint8 and scales.shape == (4,)
    decoded = low_memory._decode_unsigned(codes, scales)
    assert decoded.shape == values.shape
    assert scales[1] == 0 and torch.equal(decoded[BLOCK : 2 * BLOCK], zero_block)
    assert (decoded[values > 0] > 0).all(), "a v > 0 decoded to 0"
    assert scales[3] == values[3 * BLOCK :].max(), "the partial block's own scale"
    block_scale = scales.double().repeat_interleave(BLOCK)[: values.numel()]
    nonzero = block_scale > 0
    level = 255 * (values.double()[nonzero] / block_scale[nonzero]) ** 0.25
    below = (torch.floor(level * (1 + 1e-6)) - 1).clamp(min=0) / 255
    above = (torch.floor(level * (1 - 1e-6)) + 2).clamp(max=255) / 255
    normalized = decoded.double()[nonzero] / block_scale[nonzero]
    tiny = values[nonzero] < block_scale[nonzero] * 255.0**-4
    assert (normalized >= below**4 * (1 - 1e-6)).all()
    assert (normalized <= above**4 * (1 + 1e-6))[~tiny].all()
    assert (codes[values > 0] >= 1).all()


def test_bf16_stochastic_rounding_is_unbiased_and_deterministic():
    """An fp32 value between two bf16 neighbours rounds to one of them, up with probability
    equal to its fraction of the gap: the mean of 8192 roundings (offsets of 8192 indices)
    is the value within 5 standard deviations. The same (step, index) gives the same bits;
    another step other offsets."""
    low = torch.tensor(1.0)
    ulp = 2.0**-7
    for fraction in (0.1, 0.3, 0.77):
        value = low + fraction * ulp
        n = 8192
        offsets = low_memory.random16(torch.arange(n), step=3)
        assert offsets.min() >= 0 and offsets.max() < 65536
        rounded = low_memory.bf16_stochastic(value.expand(n).float(), offsets)
        assert rounded.dtype == torch.bfloat16
        outcomes = set(rounded.float().unique().tolist())
        assert outcomes <= {1.0, 1.0 + ulp}, outcomes
        mean = rounded.double().mean().item()
        sigma = ulp * math.sqrt(fraction * (1 - fraction) / n)
        assert abs(mean - value.item()) < 5 * sigma, (fraction, mean, value.item())
        again = low_memory.bf16_stochastic(
            value.expand(n).float(), low_memory.random16(torch.arange(n), step=3)
        )
        assert torch.equal(again, rounded)
    other = low_memory.random16(torch.arange(64), step=4)
    assert not torch.equal(other, low_memory.random16(torch.arange(64), step=3))
    # bf16 values are kept exactly (nothing below the kept bits to round)
    exact = torch.randn(1000).bfloat16().float()
    kept = low_memory.bf16_stochastic(exact.abs(), low_memory.random16(torch.arange(1000), 9))
    assert torch.equal(kept.float(), exact.abs())


def test_16bit_second_moment_is_not_frozen_by_rounding():
    """With beta2 = 0.999 a step moves v by 0.1%, under half a bf16 ulp: v kept in bf16 must
    still follow a gradient that stops (v then decays as beta2**t). After 300 steps of zero
    gradient the 16bit v is within 2% of the full run's on average (rounding to nearest
    would leave it where it was: 35% above)."""
    params = make_params(torch.float32, [(64,)])
    twins = clone_params(params)
    low, full = ranger(params, "16bit", use_gc=False), ranger(twins, "full", use_gc=False)
    for step in range(300):
        for optimizer, ps in ((low, params), (full, twins)):
            ps[0].grad = torch.ones(64) if step < 5 else torch.zeros(64)
            optimizer.step()
    v = full_layout_state(params[0], low.state[params[0]])["exp_avg_sq"]
    reference = full.state[twins[0]]["exp_avg_sq"]
    assert reference.max() < 0.75 * 0.005, "the full run's v decayed"
    # unbiased: the mean of 64 elements within 2%; each (a random walk of roundings) 15%
    assert abs(v.mean() / reference.mean() - 1) < 0.02, (v.mean(), reference.mean())
    assert relative_error(v, reference) < 0.15


# ===================================================================== conversion


def _trained(precision: str, steps: int = 8, seed: int = 0):
    params = make_params(torch.float32, SHAPES, seed=seed)
    optimizer = ranger(two_groups(params, lr=0.01), precision)
    run(optimizer, params, steps)
    return optimizer, params


def _slow_tolerance(precision: str, source_delta: torch.Tensor, param: torch.Tensor) -> Tolerance:
    """What a conversion into ``precision`` keeps of the slow weights: ``fast - d`` rounds
    once in fp32, and a bf16 ``d`` by up to half a bf16 ulp of the largest |d|."""
    atol = 4 * 2.0**-24 * param.detach().abs().max().item()
    if precision in ("16bit", "8bit"):
        atol += BF16_NEAREST * source_delta.abs().max().item()
    return Tolerance(atol=atol + 1e-12)


def _moment_tolerance(precision: str, key: str, param: torch.Tensor) -> Tolerance:
    """What a conversion into ``precision`` keeps of a moment, of its largest magnitude (a
    block's scale is at most the tensor's largest magnitude)."""
    layout = "16bit" if precision == "8bit" and param.numel() < MIN_8BIT_NUMEL else precision
    if layout in ("full", "delta"):  # the decoding's fp32 rounding
        return Tolerance(of_max=1e-6)
    if layout == "16bit":
        return Tolerance(of_max=BF16_NEAREST if key == "exp_avg" else BF16_STOCHASTIC)
    if key == "exp_avg":  # half the square-root code's largest step: S (127 + 1/4) / 127**2
        return Tolerance(of_max=127.25 / 127**2)
    return Tolerance(of_max=1 - (254 / 255) ** 4 + 1e-6)  # the fourth-root code's top step


@pytest.mark.parametrize("target", PRECISIONS)
@pytest.mark.parametrize("source", PRECISIONS)
def test_checkpoint_loads_into_every_precision(source, target):
    """A state dict saved in ``source`` (torch.load(weights_only=True)) loads into an
    optimizer of ``target``: the state is in the target's layout, the moments and the slow
    weights (`slow_weights()`) equal the saved ones within the target's resolution, the
    group keeps the target's precision, and training continues (close to the source's own
    continuation)."""
    optimizer, params = _trained(source)
    saved = save_and_load(optimizer.state_dict())
    saved_full = [full_layout_state(p, optimizer.state[p]) for p in params]
    saved_deltas = [p.detach() - state["slow_param"] for p, state in zip(params, saved_full)]
    loaded_params = clone_params(params)
    loaded = ranger(two_groups(loaded_params), target, lr=0.5)
    loaded.load_state_dict(saved)
    label = f"{source} -> {target}"
    assert [g["state_precision"] for g in loaded.param_groups] == [target] * 2, label
    assert loaded.param_groups[0]["lr"] == HP["lr"], f"{label}: hyperparameters not loaded"
    assert_layout(label, loaded, target)
    with loaded.slow_weights():
        slow = [p.detach().clone() for p in loaded_params]
    for param, old, new, delta, param_slow in zip(
        loaded_params, saved_full, map(loaded.state.get, loaded_params), saved_deltas, slow
    ):
        where = f"{label}, {tuple(param.shape)}"
        assert new["step"] == old["step"], where
        tol = _slow_tolerance(target, delta, param)
        assert_tensors_close(f"{where}: slow weights", param_slow, old["slow_param"], tol)
        decoded = full_layout_state(param, new)
        for key in ("exp_avg", "exp_avg_sq"):
            tol = _moment_tolerance(target, key, param)
            assert_tensors_close(f"{where}: {key}", decoded[key], old[key], tol)
    run(optimizer, params, 6, start=8)
    run(loaded, loaded_params, 6, start=8)
    assert all(torch.isfinite(p).all() for p in loaded_params), label
    if source == target:
        tol = Tolerance()
    else:  # each run within its tolerance of full: the lower precision's
        lower = max(PRECISIONS.index(source), PRECISIONS.index(target))
        tol = dataclasses.replace(VS_FULL[PRECISIONS[lower]], decoded=True)
    assert_same_run(f"{label}: continued", loaded_params, loaded, params, optimizer, tol)


def _corrupt(key: str, make=None):
    """Edit (or, without ``make``, drop) a state entry of the (65, 66) param."""

    def mutate(state_dict):
        param_id = state_dict["param_groups"][1]["params"][2]
        state = state_dict["state"][param_id]
        if make is None:
            del state[key]
        else:
            state[key] = make(state[key])

    return mutate


CORRUPT_8BIT = {
    "scale-shape": ("exp_avg_scale", _corrupt("exp_avg_scale", lambda t: t[:-1])),
    "scale-2d": ("exp_avg_sq_scale", _corrupt("exp_avg_sq_scale", lambda t: t[:, None])),
    "scale-int": ("exp_avg_sq_scale", _corrupt("exp_avg_sq_scale", lambda t: t.int())),
    "float-codes": ("exp_avg", _corrupt("exp_avg", lambda t: t.float())),
    "float-codes-sq": ("exp_avg_sq", _corrupt("exp_avg_sq", lambda t: t.float())),
    "signed-sq-codes": ("exp_avg_sq", _corrupt("exp_avg_sq", lambda t: t.to(torch.int8))),
    "code-shape": ("exp_avg", _corrupt("exp_avg", lambda t: t.flatten())),
    "scale-missing": ("exp_avg_sq_scale", _corrupt("exp_avg_sq_scale")),
}


@pytest.mark.parametrize(
    ("case", "target"),
    [(case, PRECISIONS[index % 4]) for index, case in enumerate(CORRUPT_8BIT)],
)
def test_corrupted_8bit_state_is_rejected_and_changes_nothing(case, target):
    """A saved 8bit state with a wrong block-scale shape or dtype, float or signed codes,
    or a missing scale raises a ValueError naming the key, whatever the loading optimizer's
    precision (each case loads into another), and leaves the optimizer exactly as it was (it
    then steps like an untouched twin)."""
    key, mutate = CORRUPT_8BIT[case]
    donor, _ = _trained("8bit", steps=11, seed=5)
    bad = snapshot(donor)
    mutate(bad)
    optimizer, params = _trained(target)
    twin, twin_params = _trained(target)
    before = snapshot(optimizer)
    label = f"load of a {case} 8bit state into {target}"
    with expect_error(label, ValueError, rf"'{key}'|\b{key}\b"):
        optimizer.load_state_dict(bad)
    assert_plain_equal(f"{label}: state_dict after the failed load", snapshot(optimizer), before)
    run(optimizer, params, 5, start=8)
    run(twin, twin_params, 5, start=8)
    assert_same_run(f"{label}: continued", params, optimizer, twin_params, twin, Tolerance())


def test_state_dict_without_state_precision_loads_as_full():
    """A state dict saved before ``state_precision`` existed (its groups lack the key) loads
    into each precision and is converted to it."""
    optimizer, params = _trained("full")
    saved = snapshot(optimizer)
    for group in saved["param_groups"]:
        del group["state_precision"]
    for precision in PRECISIONS:
        loaded = ranger(two_groups(clone_params(params)), precision)
        loaded.load_state_dict(copy.deepcopy(saved))
        assert_layout(f"old state dict -> {precision}", loaded, precision)


# ======================================================= changes between steps


def test_toggling_state_precision_between_steps_converts_at_the_next_step():
    """Group 1's ``state_precision`` goes full -> 16bit -> 8bit -> delta -> full, a few steps
    each; group 0 stays full. After each step group 1's state is in its new layout (no stale
    layout read), and the run equals one that made each change by saving the state dict and
    loading it into an optimizer of the new precision (bitwise: the same conversion)."""
    params = make_params(torch.float32, SHAPES)
    twins = clone_params(params)
    optimizer = ranger(two_groups(params), "full")
    twin = ranger(two_groups(twins), "full")
    step = 0
    for precision in ("full", "16bit", "8bit", "delta", "full"):
        if precision != optimizer.param_groups[1]["state_precision"]:
            optimizer.param_groups[1]["state_precision"] = precision
            groups = two_groups(twins)
            groups[1]["state_precision"] = precision
            checkpoint = save_and_load(twin.state_dict())
            twin = ranger(groups, "full")
            twin.load_state_dict(checkpoint)
        for _ in range(4):
            for opt, ps in ((optimizer, params), (twin, twins)):
                set_grads(ps, step)
                opt.step()
            step += 1
            label = f"group 1 in {precision}, step {step}"
            for param in params[:2]:
                assert "slow_param" in optimizer.state[param], f"{label}: group 0 converted"
            for index, param in enumerate(params):
                in_group_1 = index >= 2
                expected = expected_state_dtypes(
                    IMPL_OF[precision if in_group_1 else "full"], param
                )
                found = {k: v.dtype for k, v in optimizer.state[param].items() if k != "step"}
                assert found == expected, f"{label}: {tuple(param.shape)}: {found}"
            assert_same_run(label, params, optimizer, twins, twin, Tolerance())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("precision", LOW_MEMORY)
def test_model_to_dtype_between_steps(precision, dtype):
    """``model.to(float64)`` or ``.to(bfloat16)`` after 5 steps on fp32: the next step
    converts the state to the layout of the new dtype (delta: fp64, or fp32 for bf16; 16bit
    and 8bit: their encodings, the 8-bit scales fp32), the slow weights survive the ``.to``
    (up to the param's new rounding), and the run stays close to ``full`` put through the
    same ``.to``."""
    params = make_params(torch.float32, SHAPES)
    twins = clone_params(params)
    model, twin_model = torch.nn.ParameterList(params), torch.nn.ParameterList(twins)
    optimizer, full = ranger(params, precision), ranger(twins, "full")
    run(optimizer, params, 4)
    run(full, twins, 4)
    slow_before = [slow_weights_of(p, optimizer.state[p]).clone() for p in params]
    deltas = [optimizer.state[p]["slow_delta"].float() for p in params]
    model.to(dtype)
    twin_model.to(dtype)
    run(optimizer, params, 1, start=4)  # step 5: no sync, so the slow weights stay
    run(full, twins, 1, start=4)
    label = f"{precision}: model.to({dtype})"
    assert_layout(label, optimizer, precision)
    for param, before, delta in zip(params, slow_before, deltas):
        after = slow_weights_of(param, optimizer.state[param])
        rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23  # the param's new rounding
        atol = 2 * rounding * param.detach().abs().max().item()
        if precision != "delta":  # d rounded to bf16 again after the step
            atol += BF16_NEAREST * delta.abs().max().item()
        tol = Tolerance(atol=atol + 1e-12)
        assert_tensors_close(f"{label}: slow weights", after.float(), before, tol)
    run(optimizer, params, 8, start=5)  # past the sync at 6 and 12
    run(full, twins, 8, start=5)
    assert all(p.dtype == dtype for p in params)
    if dtype == torch.float64:
        tol = VS_FULL[precision]
    else:  # bf16 params: both runs round the params to 8 bits at every step
        tol = Tolerance(of_max=2e-2, atol=2e-2, decoded=True, moments=Tolerance(of_max=0.1))
    assert_same_run(label, params, optimizer, twins, full, tol)


# ============================================================== bf16 params


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_bf16_params_train(precision):
    """A bf16 linear regression (a 64 x 64 weight: 8-bit state in 8bit) trains: the loss
    falls by more than half in 40 steps, within 5% of the full run's loss at each of steps
    10, 20, 30 and 40."""

    def train(state_precision):
        torch.manual_seed(0)
        inputs = torch.randn(256, 64)
        targets = inputs @ (torch.randn(64, 64) / 8).T
        model = torch.nn.Linear(64, 64).to(torch.bfloat16)
        optimizer = Ranger(model.parameters(), lr=0.05, state_precision=state_precision)
        losses = []
        for _ in range(40):
            optimizer.zero_grad()
            loss = (model(inputs.bfloat16()).float() - targets).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert model.weight.dtype == torch.bfloat16
        assert_layout(f"bf16 {state_precision}", optimizer, state_precision)
        return losses

    losses, full = train(precision), train("full")
    assert losses[-1] < 0.5 * losses[0], losses
    for step in (9, 19, 29, 39):
        assert abs(losses[step] - full[step]) <= 0.05 * full[step], (step, losses[step], full[step])


# ================================================================= memory layouts


@pytest.mark.parametrize("precision", PRECISIONS)
def test_channels_last_conv_weight_steps_in_its_memory_order(precision):
    """A channels_last conv weight of 4608 elements (8-bit blocks in 8bit): its state has the
    param's strides, and its run is bitwise that of a contiguous param holding the same
    elements in the same memory order (the weight permuted to (O, H, W, I)); it stays close
    to the same weight stored contiguously (which orders the blocks and the GC sums
    differently)."""
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(32, 16, 3, 3, generator=generator)
    last = torch.nn.Parameter(value.contiguous(memory_format=torch.channels_last))
    permuted = torch.nn.Parameter(value.permute(0, 2, 3, 1).contiguous())
    plain = torch.nn.Parameter(value.clone())
    optimizers = [ranger([p], precision) for p in (last, permuted, plain)]
    for _ in range(14):
        grad = torch.randn(value.shape, generator=generator)
        last.grad = grad.contiguous(memory_format=torch.channels_last)
        permuted.grad = grad.permute(0, 2, 3, 1).contiguous()
        plain.grad = grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    label = f"{precision}: channels_last"
    assert last.is_contiguous(memory_format=torch.channels_last), label
    state = optimizers[0].state[last]
    for key in ("exp_avg", "exp_avg_sq", "slow_delta" if precision != "full" else "slow_param"):
        assert state[key].stride() == last.stride(), f"{label}: {key} {state[key].stride()}"
    assert torch.equal(last.detach().permute(0, 2, 3, 1), permuted.detach()), label
    for key, value_ in state.items():
        if key.endswith("_scale"):
            assert torch.equal(value_, optimizers[1].state[permuted][key]), f"{label}: {key}"
        elif key != "step":
            other = optimizers[1].state[permuted][key]
            assert torch.equal(value_.permute(0, 2, 3, 1), other), f"{label}: {key}"
    tol = Tolerance(rtol=1e-5, atol=1e-6) if precision in ("full", "delta") else VS_FULL[precision]
    assert_tensors_close(f"{label} vs contiguous", last.detach(), plain.detach(), tol)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_transposed_param_steps_like_its_contiguous_twin(precision):
    """A non-contiguous param (a transposed (80, 64) matrix, ``p.t()``): without GC its run is
    bitwise that of the untransposed matrix (the same elements in the same memory order);
    with GC it stays close to the same values stored contiguously; it keeps its strides."""
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(80, 64, generator=generator)
    for use_gc in (False, True):
        transposed = torch.nn.Parameter(base.clone().t())
        untransposed = torch.nn.Parameter(base.clone())
        contiguous = torch.nn.Parameter(base.t().contiguous())
        assert not transposed.is_contiguous()
        params = (transposed, untransposed, contiguous)
        optimizers = [ranger([p], precision, use_gc=use_gc) for p in params]
        for _ in range(14):
            grad = torch.randn(64, 80, generator=generator)
            transposed.grad = grad.t().contiguous().t()
            untransposed.grad = grad.t().contiguous()
            contiguous.grad = grad.clone()
            for optimizer in optimizers:
                optimizer.step()
        label = f"{precision}: transposed param, use_gc={use_gc}"
        assert transposed.stride() == (1, 64), label
        assert torch.isfinite(transposed).all(), label
        if not use_gc:
            assert torch.equal(transposed.detach().t(), untransposed.detach()), label
        tol = (
            Tolerance(rtol=1e-5, atol=1e-6)
            if precision in ("full", "delta")
            else VS_FULL[precision]
        )
        assert_tensors_close(label, transposed.detach(), contiguous.detach(), tol)


# ============================================================ the slow weights


@pytest.mark.parametrize("precision", PRECISIONS)
def test_evaluation_on_slow_weights_restores_the_fast_weights_bitwise(precision):
    """``with optimizer.slow_weights():`` puts ``fast - d`` (or slow_param) into the model
    and restores the fast weights bitwise on exit, with the state untouched: the run then
    continues bitwise like a twin that never evaluated."""
    optimizer, params = _trained(precision)
    twin, twin_params = _trained(precision)
    fast = [p.detach().clone() for p in params]
    before = snapshot(optimizer)
    slow = [slow_weights(optimizer, p).clone() for p in params]  # fast - d, by the harness
    with optimizer.slow_weights():
        for param, expected in zip(params, slow):
            assert torch.equal(param.detach(), expected.to(param.dtype)), precision
    for param, value in zip(params, fast):
        assert torch.equal(param, value), f"{precision}: fast weights not restored"
    assert_plain_equal(f"{precision}: state after evaluation", snapshot(optimizer), before)
    run(optimizer, params, 6, start=8)
    run(twin, twin_params, 6, start=8)
    assert_same_run(f"{precision}: continued", params, optimizer, twin_params, twin, Tolerance())


@pytest.mark.parametrize("how", ["sync_lookahead", "load_slow_weights"])
@pytest.mark.parametrize("precision", LOW_MEMORY)
def test_sync_and_load_slow_weights_match_full(precision, how):
    """From the same state (a full run's checkpoint after 8 steps, loaded into
    ``precision``), ``sync_lookahead()`` and ``load_slow_weights()`` leave the params equal
    to full's up to the rounding of d in the precision, and d = 0 (fast = slow); training
    then continues close to full."""
    full, params = _trained("full")
    low_params = clone_params(params)
    low = ranger(two_groups(low_params, lr=0.01), precision)
    low.load_state_dict(save_and_load(full.state_dict()))
    deltas = [p.detach() - full.state[p]["slow_param"] for p in params]
    getattr(full, how)()
    getattr(low, how)()
    for param, low_param, delta in zip(params, low_params, deltas):
        label = f"{precision}: {how}, {tuple(param.shape)}"
        assert_tensors_close(
            label, low_param.detach(), param.detach(), _slow_tolerance(precision, delta, param)
        )
        d = low.state[low_param]["slow_delta"]
        assert torch.equal(d, torch.zeros_like(d)), f"{label}: d after {how}"
    run(full, params, 6, start=8)
    run(low, low_params, 6, start=8)
    assert_same_run(
        f"{precision}: {how}, continued", low_params, low, params, full, VS_FULL[precision]
    )


# ============================================================ bad state_precision


BAD_PRECISIONS = ["16-bit", "FULL", "fp16", "4bit", None, 8, ""]
# The message names state_precision and lists every allowed value.
NAMES_AND_LISTS = r"(?s)state_precision(?=.*'full')(?=.*'delta')(?=.*'16bit')(?=.*'8bit')"


@pytest.mark.parametrize("value", BAD_PRECISIONS, ids=repr)
def test_bad_state_precision_is_rejected_before_any_change(value):
    """In the constructor and in ``add_param_group``: a ValueError naming state_precision
    and listing the allowed values; ``add_param_group`` leaves the groups and the state as
    they were; so does a load of a state dict whose group holds the bad value."""
    match = NAMES_AND_LISTS
    with expect_error(f"Ranger(state_precision={value!r})", ValueError, match):
        Ranger(make_params(torch.float32), state_precision=value)
    params = make_params(torch.float32, SHAPES)
    optimizer = ranger(params[:3], "16bit")
    run(optimizer, params[:3], 2)
    groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    )
    before = snapshot(optimizer)
    label = f"add_param_group(state_precision={value!r})"
    with expect_error(label, ValueError, match):
        optimizer.add_param_group({"params": params[3:], "state_precision": value})
    assert len(optimizer.param_groups) == 1, f"{label}: a group was added"
    assert_plain_equal(
        label,
        [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        groups,
    )
    assert_plain_equal(f"{label}: state_dict", snapshot(optimizer), before)
    bad = snapshot(optimizer)
    bad["param_groups"][0]["state_precision"] = value
    with expect_error(f"load of a group with state_precision={value!r}", ValueError, match):
        optimizer.load_state_dict(bad)
    assert_plain_equal(f"{label}: state_dict after the failed load", snapshot(optimizer), before)


def test_bad_state_precision_set_between_steps_raises_before_any_change():
    """Like ``lr`` (checked at every step), a ``state_precision`` written into a group
    between steps must be checked before the step changes anything."""
    params = make_params(torch.float32, [(64, 64)])
    optimizer = ranger(params, "16bit")
    run(optimizer, params, 2)
    before = snapshot(optimizer)
    value = params[0].detach().clone()
    optimizer.param_groups[0]["state_precision"] = "16-bit"  # a typo
    set_grads(params, 2)
    with expect_error("step with state_precision='16-bit'", ValueError, "state_precision"):
        optimizer.step()
    assert torch.equal(params[0], value)
    optimizer.param_groups[0]["state_precision"] = "16bit"  # the user's write, undone
    assert_plain_equal("state after the refused step", snapshot(optimizer), before)


@pytest.mark.parametrize("precision", LOW_MEMORY)
def test_a_write_into_the_params_moves_the_slow_weights_with_them(precision):
    """The documented difference (README, "Low-memory state"): after 8 steps (between syncs)
    the model is overwritten in place (``model.load_state_dict``). Full precision keeps its
    slow weights; kept as slow = fast - d, they move with the write (d is untouched), so the
    next sync is taken relative to the new weights."""
    full, params = _trained("full")
    low_params = clone_params(params)
    low = ranger(two_groups(low_params, lr=0.01), precision)
    low.load_state_dict(save_and_load(full.state_dict()))
    deltas = [p.detach() - full.state[p]["slow_param"] for p in params]
    kept = [full.state[p]["slow_param"].clone() for p in params]
    new_values = make_params(torch.float32, SHAPES, seed=11)
    with torch.no_grad():
        for p, q, value in zip(params, low_params, new_values):
            p.copy_(value)
            q.copy_(value)
    for param, low_param, old, slow, value in zip(params, low_params, deltas, kept, new_values):
        label = f"{precision}: slow weights after a write, {tuple(param.shape)}"
        assert torch.equal(full.state[param]["slow_param"], slow), f"full: {label} moved"
        assert_tensors_close(
            label,
            slow_weights_of(low_param, low.state[low_param]),
            value.detach() - old,
            _slow_tolerance(precision, old, param),
        )


# ============================================================ the fused low-memory step


def _fused_cases():
    generator = torch.Generator().manual_seed(6)
    conv = torch.randn(32, 16, 3, 3, generator=generator)
    matrix = torch.randn(80, 64, generator=generator)
    return {
        "fp64-gc": (matrix.double(), True),
        "fp32-no-gc": (matrix, False),
        "bf16-no-gc": (matrix.bfloat16(), False),
        "channels_last-no-gc": (conv.contiguous(memory_format=torch.channels_last), False),
        "transposed-gc": (matrix.t(), True),
        "vector": (torch.randn(5000, generator=generator), True),
    }


def _fused_and_default(monkeypatch, precision, value, use_gc, steps=8):
    monkeypatch.setattr(_cpu_kernel, "enabled", True)
    if _cpu_kernel.low_memory_step_kernel() is None:
        pytest.skip("the C++ low-memory kernel cannot be built on this machine")
    fused = torch.nn.Parameter(value.clone(memory_format=torch.preserve_format))
    default = torch.nn.Parameter(value.clone(memory_format=torch.preserve_format))
    if not value.is_contiguous() and value.dim() == 2 and value.stride(0) == 1:  # keep p.t()
        fused = torch.nn.Parameter(value.t().clone().t())
        default = torch.nn.Parameter(value.t().clone().t())
    optimizers = [
        ranger([p], precision, fused=is_fused, use_gc=use_gc)
        for p, is_fused in ((fused, True), (default, False))
    ]
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        grad = torch.randn(value.shape, generator=generator).to(value.dtype)
        for param, optimizer in zip((fused, default), optimizers):
            param.grad = torch.empty_like(param).copy_(grad)
            optimizer.step()
    return fused, default, optimizers


@pytest.mark.parametrize("case", list(_fused_cases()))
@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_fused_low_memory_step_gives_the_default_paths_bits(monkeypatch, precision, case):
    """``fused=True`` in a low-memory precision (the C++ step, or its fallback on layouts it
    does not take) gives the bits of the default path: params and every state tensor, on
    fp64, fp32 and bf16 params, channels_last and transposed ones."""
    value, use_gc = _fused_cases()[case]
    fused, default, (opt_fused, opt_default) = _fused_and_default(
        monkeypatch, precision, value, use_gc
    )
    assert_same_run(
        f"{precision} fused vs default, {case}",
        [fused],
        opt_fused,
        [default],
        opt_default,
        Tolerance(),
    )


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_fused_low_memory_step_gives_the_default_paths_bits_with_gc_in_float32(
    monkeypatch, precision
):
    """As above, on an fp32 matrix with Gradient Centralization."""
    value = torch.randn(64, 64, generator=torch.Generator().manual_seed(8))
    fused, default, (opt_fused, opt_default) = _fused_and_default(
        monkeypatch, precision, value, use_gc=True, steps=1
    )
    assert torch.equal(fused, default), (fused - default).abs().max()
