"""The generic optimizer contract, written once and run on every implementation.

The implementations are listed once, in `optimizer_impls.IMPLS`; the ``impl`` fixture runs a
property on each of them (test ids end in the implementation's id), ``ranger_impl`` on the
Ranger paths only, for properties of Ranger's own step and state (sparse/complex errors,
state-dict validation of Ranger's keys, peers' state dicts, ``model.to(dtype)``).

Properties (numbered as in the spec):
 0. the trajectory matches the reference (the baseline the others build on)
 1. constructor and ``add_param_group`` errors; a 0-d tensor lr
 2. ``step(closure)``
 3. params without a grad and frozen params
 4. sparse gradients and complex params
 5. ``state_dict`` round trips, deepcopy, pickle, loading across Ranger paths
 6. ``load_state_dict`` validation, peers' state dicts, the forms torch.optim writes
 7. hooks
 8. operations between steps
 9. no aliasing between params, grads and state
10. a step ``GradScaler`` skips changes nothing

Every assertion message starts with ``[<implementation>] <property>``.
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from optimizer_impls import (
    EXACT,
    GROUP_KEY,
    HP,
    IMPLS,
    RANGER_IMPLS,
    REFERENCE,
    SCALE_KEYS,
    Impl,
    all_params,
    assert_plain_equal,
    assert_same_run,
    assert_tensors_close,
    at_least_path_tolerance,
    clone_params,
    expect_error,
    expected_state_dtypes,
    gradient,
    make_params,
    make_reference,
    make_twin,
    own_bytes,
    prepared,
    run,
    save_and_load,
    saved_bytes,
    set_grads,
    slow_weights,
    snapshot,
    two_groups,
)


@pytest.fixture(params=IMPLS, ids=str)
def impl(request, monkeypatch) -> Impl:
    """Every implementation in `IMPLS` (but where it declares the property inapplicable)."""
    return prepared(request.param, monkeypatch, request)


@pytest.fixture(params=RANGER_IMPLS, ids=str)
def ranger_impl(request, monkeypatch) -> Impl:
    """The Ranger paths of `IMPLS`."""
    return prepared(request.param, monkeypatch, request)


def impl_cases(cases, applies: Callable[[Impl, Any], bool] = lambda impl, case: True):
    """``(impl, case)`` pairs for an indirect parametrization of the ``impl`` fixture, only
    where the case applies to the implementation."""
    return [
        pytest.param(impl, case, id=f"{case.id}-{impl.id}")
        for case in cases
        for impl in IMPLS
        if applies(impl, case)
    ]


N, M = 8, 7  # save after N steps (between the syncs at 6 and 12), continue M (past 12)


def trained(impl: Impl, steps: int = N, seed: int = 0, **hyperparameters):
    """An optimizer of ``impl`` over `make_params` in `two_groups`, after ``steps`` steps."""
    params = make_params(seed=seed)
    optimizer = impl.make(two_groups(params), **{**HP, **hyperparameters})
    run(optimizer, params, steps)
    return optimizer, params


def counter_values(impl: Impl, optimizer, param) -> dict[str, int]:
    state = optimizer.state.get(param, {})
    return {key: int(state[key]) for key in impl.counters if key in state}


def assert_state_dtypes(label: str, impl: Impl, param: torch.Tensor, state: dict) -> None:
    """The state tensors (``step`` aside) have the dtypes of ``impl``'s layout for the param
    (`expected_state_dtypes`): the working dtype of its dtype, or the low-memory encodings."""
    expected = expected_state_dtypes(impl, param)
    tensors = {k: v.dtype for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)}
    if expected is None:
        work = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
        expected = {key: work for key, dtype in tensors.items() if dtype.is_floating_point}
        tensors = {key: dtype for key, dtype in tensors.items() if dtype.is_floating_point}
    assert tensors == expected, f"{label}: state dtypes {tensors}, expected {expected}"


def test_state_is_in_the_declared_layout(ranger_impl):
    """After steps in two groups, each param's state holds exactly the keys and dtypes of the
    implementation's ``state_precision`` (the module docstring's table), and its tensors have
    the param's shape (the 8-bit block scales: one per 256 elements)."""
    impl = ranger_impl
    optimizer, params = trained(impl)
    for index, param in enumerate(params):
        label = f"[{impl}] layout of param {index} {tuple(param.shape)}"
        state = optimizer.state[param]
        assert_state_dtypes(label, impl, param, state)
        for key, value in state.items():
            if key.endswith("_scale"):
                assert value.shape == (-(-param.numel() // 256),), f"{label}: {key} {value.shape}"
            elif key != "step":
                assert value.shape == param.shape, f"{label}: {key} {tuple(value.shape)}"


# =================================================================== 0. trajectory baseline


def test_trajectory_matches_the_reference(impl):
    """14 steps (two syncs) in two groups of different lr; param 1 misses steps 3 and 8, so
    step counts differ. The reference steps each group as an optimizer of its own."""
    params = make_params()
    twins = clone_params(params)
    optimizer = impl.make(two_groups(params, lr=0.01), **HP)
    twins_first, twins_second = twins[:2], twins[2:]
    if impl.couples_groups:  # one reference optimizer holding both groups
        reference_first = reference_second = make_reference(impl, two_groups(twins, lr=0.01), **HP)
    else:
        reference_first = make_reference(impl, twins_first, **HP)
        reference_second = make_reference(impl, twins_second, **{**HP, "lr": 0.01})

    def skip(step):
        return (1,) if step in (2, 7) else ()

    for step in range(14):
        set_grads(params, step, skip(step))
        set_grads(twins, step, skip(step))
        optimizer.step()
        reference_first.step()
        if reference_second is not reference_first:
            reference_second.step()
        label = f"[{impl}] trajectory, step {step + 1}"
        tol = impl.tolerance()
        assert_same_run(label, params[:2], optimizer, twins_first, reference_first, tol)
        assert_same_run(label, params[2:], optimizer, twins_second, reference_second, tol)
    assert counter_values(impl, optimizer, params[1])["step"] == 12


# =============================================================== 1. constructor arguments


@dataclass(frozen=True)
class BadArgument:
    name: str  # constructor argument
    value: Any
    ranger_only: bool = False  # an argument of the inner torch optimizer for Lookahead

    @property
    def id(self) -> str:
        value = "tensor2" if isinstance(self.value, torch.Tensor) else repr(self.value)
        return f"{self.name}={value}"


# How an error message names each argument.
ARGUMENT_NAMES = {
    "lr": r"\blr\b",
    "betas": r"\bbetas\b",
    "eps": r"\beps\b",
    "weight_decay": r"\bweight_decay\b",
    "k": r"\bk\b|\blookahead_k\b",
    "alpha": r"\balpha\b|\blookahead_alpha\b",
    "rectify_threshold": r"\brectify_threshold\b",
}

BAD_ARGUMENTS = [
    BadArgument("lr", -1e-3, ranger_only=True),
    BadArgument("lr", float("nan"), ranger_only=True),
    BadArgument("lr", torch.tensor([0.01, 0.02]), ranger_only=True),
    BadArgument("betas", (1.0, 0.999), ranger_only=True),
    BadArgument("betas", (-0.1, 0.999), ranger_only=True),
    BadArgument("betas", (0.9, 1.0), ranger_only=True),
    BadArgument("betas", (0.9, 1.5), ranger_only=True),
    BadArgument("betas", (0.9,), ranger_only=True),
    BadArgument("betas", (0.9, 0.99, 0.999), ranger_only=True),
    BadArgument("eps", 0.0, ranger_only=True),
    BadArgument("eps", -1e-8, ranger_only=True),
    BadArgument("weight_decay", -0.01, ranger_only=True),
    BadArgument("k", 0),
    BadArgument("k", -3),
    BadArgument("k", 2.5),
    BadArgument("k", 6.0),
    BadArgument("k", True),
    BadArgument("alpha", 0.0),
    BadArgument("alpha", -0.5),
    BadArgument("alpha", 1.5),
    BadArgument("rectify_threshold", 3.0, ranger_only=True),
]


def _argument_applies(impl: Impl, case: BadArgument) -> bool:
    # Lookahead(AdamW): lr, betas, eps and weight_decay are torch's AdamW's (torch's checks,
    # torch's messages); Lookahead's own arguments are k and alpha.
    return impl.is_ranger or not case.ranger_only


@pytest.mark.parametrize(
    ("impl", "case"), impl_cases(BAD_ARGUMENTS, _argument_applies), indirect=["impl"]
)
def test_constructor_rejects_out_of_range_argument(impl, case):
    label = f"[{impl}] constructor({case.id})"
    with expect_error(label, ValueError, ARGUMENT_NAMES[case.name]):
        impl.make(make_params(), **{**HP, case.name: case.value})


@pytest.mark.parametrize(
    ("impl", "case"), impl_cases(BAD_ARGUMENTS, _argument_applies), indirect=["impl"]
)
def test_add_param_group_rejects_bad_value_and_changes_nothing(impl, case):
    params = make_params()
    optimizer = impl.make(params[:3], **HP)
    run(optimizer, params[:3], 2)
    groups_before = [
        ({k: v for k, v in g.items() if k != "params"}, list(g["params"]))
        for g in optimizer.param_groups
    ]
    state_before = snapshot(optimizer)
    bad_group = {"params": params[3:], GROUP_KEY.get(case.name, case.name): case.value}
    label = f"[{impl}] add_param_group({case.id})"
    with expect_error(label, ValueError, ARGUMENT_NAMES[case.name]):
        optimizer.add_param_group(bad_group)
    assert len(optimizer.param_groups) == len(groups_before), f"{label}: a group was added"
    for index, (group, (settings, params_before)) in enumerate(
        zip(optimizer.param_groups, groups_before)
    ):
        assert [id(p) for p in group["params"]] == [id(p) for p in params_before], label
        assert_plain_equal(
            f"{label}: group {index}", {k: v for k, v in group.items() if k != "params"}, settings
        )
    assert_plain_equal(f"{label}: state_dict", snapshot(optimizer), state_before)


def test_zero_dim_tensor_lr_matches_float_lr(impl):
    params = make_params()
    twins = clone_params(params)
    optimizer = impl.make(params, **{**HP, "lr": torch.tensor(HP["lr"], dtype=torch.float64)})
    float_lr = impl.make(twins, **HP)
    run(optimizer, params, 13)
    run(float_lr, twins, 13)
    assert_same_run(f"[{impl}] 0-d tensor lr", params, optimizer, twins, float_lr, EXACT)


# ======================================================================= 2. step(closure)


def test_step_runs_the_closure_once_under_grad_mode_and_returns_its_loss(impl):
    params = make_params()
    twins = clone_params(params)
    optimizer = impl.make(params, **HP)
    reference = make_reference(impl, twins, **HP)
    grads = [gradient(p, 0, index) for index, p in enumerate(params)]
    calls, losses = [], []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grads))
        loss.backward()
        losses.append(loss)
        return loss

    with torch.no_grad():
        returned = optimizer.step(closure)
    label = f"[{impl}] step(closure)"
    assert calls == [True], f"{label}: closure calls (grad mode of each): {calls}"
    assert returned is losses[0], f"{label}: returned {returned!r}, not the closure's loss"
    # The step used the gradients the closure computed.
    set_grads(twins, 0)
    reference.step()
    assert_same_run(label, params, optimizer, twins, reference, impl.tolerance())
    set_grads(params, 1)
    assert optimizer.step() is None, f"{label}: step() without a closure must return None"


# ================================================== 3. params without a grad, frozen params


def test_params_without_grad_and_frozen_params_are_untouched(impl):
    """Param 1 has no grad at steps 4-8 (frozen mid-run); ``never`` never gets one, ``frozen``
    does not require grad. Neither changes, in value or state; the others step as usual, and
    param 1 then resumes its own schedule."""
    params = make_params()
    never = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.randn(4, dtype=torch.float64), requires_grad=False)
    everything = params + [never, frozen]
    twins = clone_params(everything)
    optimizer = impl.make(everything, **HP)
    reference = make_reference(impl, twins, **HP)
    untouched = {id(p): p.detach().clone() for p in (never, frozen)}

    def skip(step):
        return {len(params)} | ({1} if 4 <= step <= 8 else set())  # `never`

    label = f"[{impl}] params without grad"
    for step in range(14):
        if step == 4:
            value = params[1].detach().clone()
            state = copy.deepcopy(dict(optimizer.state[params[1]]))
        set_grads(everything, step, skip(step))
        set_grads(twins, step, skip(step))
        optimizer.step()
        reference.step()
        if 4 <= step <= 8:
            where = f"{label}, step {step + 1}, param frozen mid-run"
            assert_tensors_close(where, params[1].detach(), value, EXACT)
            assert_plain_equal(f"{where}: state", dict(optimizer.state[params[1]]), state)
    for param in (never, frozen):
        where = f"{label}: param {tuple(param.shape)} that never had a grad"
        assert torch.equal(param, untouched[id(param)]), f"{where} changed"
        assert param not in optimizer.state, f"{where} has a state entry: {optimizer.state[param]}"
    assert_same_run(label, everything, optimizer, twins, reference, impl.tolerance())
    assert counter_values(impl, optimizer, params[1])["step"] == 14 - 5
    assert counter_values(impl, optimizer, params[0])["step"] == 14


# ==================================================== 4. sparse gradients, complex params


@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_sparse_gradient_or_complex_param_raises_before_any_change(ranger_impl, kind, steps_before):
    impl = ranger_impl
    params = make_params()
    if kind == "sparse":
        odd = torch.nn.Parameter(torch.randn(10, 3, dtype=torch.float64))
        message = "does not support sparse gradients"
    else:
        odd = torch.nn.Parameter(torch.randn(3, dtype=torch.complex128))
        message = "does not support complex"
    everything = params[:2] + [odd] + params[2:]  # in the middle: earlier params come first
    twins = clone_params(everything)
    optimizer = impl.make(everything, **HP)
    twin = impl.make(twins, **HP)
    odd_index = 2
    # Before: the sparse param has dense gradients; the complex one has none (so it is skipped).
    skip = (odd_index,) if kind == "complex" else ()
    run(optimizer, everything, steps_before, skip=lambda step: skip)
    run(twin, twins, steps_before, skip=lambda step: skip)

    set_grads(everything, steps_before)
    if kind == "sparse":
        rows = torch.tensor([[1, 4, 7]])
        odd.grad = torch.sparse_coo_tensor(rows, torch.randn(3, 3, dtype=torch.float64), (10, 3))
    values = [p.detach().clone() for p in everything]
    state = snapshot(optimizer)
    label = f"[{impl}] {kind} error after {steps_before} steps"
    with expect_error(label, RuntimeError, message):
        optimizer.step()
    for index, (param, value) in enumerate(zip(everything, values)):
        assert torch.equal(param, value), f"{label}: param {index} changed"
    assert_plain_equal(f"{label}: state_dict", snapshot(optimizer), state)

    # Nothing happened: without the offending gradient it steps as if the error never was.
    odd.grad = None
    set_grads(twins, steps_before, skip=(odd_index,))
    for param, twin_param in zip(everything, twins):
        if param.grad is not None:
            param.grad = twin_param.grad.clone()
    optimizer.step()
    twin.step()
    assert_same_run(label, everything, optimizer, twins, twin, EXACT)


# ===================================================== 5. state_dict, deepcopy and pickle


def test_state_dict_round_trip_continues_bitwise(impl):
    """Save after N steps (between syncs), torch.save / torch.load(weights_only=True), load
    into a fresh optimizer made with other hyperparameters, continue M steps."""
    params = make_params()
    optimizer = impl.make(two_groups(params, lr=0.01), **HP)
    run(optimizer, params, N, skip=lambda step: (1,) if step == 3 else ())
    loaded = save_and_load(optimizer.state_dict())
    resumed_params = clone_params(params)
    resumed = impl.make(two_groups(resumed_params), **{**HP, "lr": 0.5, "k": 3, "alpha": 0.1})
    resumed.load_state_dict(loaded)
    label = f"[{impl}] state_dict round trip"
    groups = resumed.param_groups
    assert [g["lr"] for g in groups] == [HP["lr"], 0.01], f"{label}: lr not loaded"
    assert [g["lookahead_k"] for g in groups] == [HP["k"]] * 2, f"{label}: k not loaded"
    run(optimizer, params, M, start=N)
    run(resumed, resumed_params, M, start=N)
    assert_same_run(label, params, optimizer, resumed_params, resumed, EXACT)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_bitwise(impl, how):
    optimizer, params = trained(impl)
    clone = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    clone_params_ = all_params(clone)
    label = f"[{impl}] {how}"
    assert all(c is not p for c, p in zip(clone_params_, params)), f"{label}: params shared"
    assert_same_run(label, params, optimizer, clone_params_, clone, EXACT)
    run(optimizer, params, M, start=N)
    run(clone, clone_params_, M, start=N)
    assert_same_run(label, params, optimizer, clone_params_, clone, EXACT)


@pytest.mark.parametrize("direction", ["from_single_tensor", "to_single_tensor"])
def test_state_dict_loads_across_ranger_paths(ranger_impl, direction):
    """A state dict saved by one Ranger path continues on another within the path tolerance."""
    impl = ranger_impl
    source_impl, target_impl = (
        (REFERENCE, impl) if direction == "from_single_tensor" else (impl, REFERENCE)
    )
    source, params = trained(source_impl)
    target_params = clone_params(params)
    target = target_impl.make(two_groups(target_params), **HP)
    target.load_state_dict(save_and_load(source.state_dict()))
    run(source, params, M, start=N)
    run(target, target_params, M, start=N)
    label = f"[{impl}] state_dict {source_impl} -> {target_impl}"
    assert_same_run(label, target_params, target, params, source, impl.tolerance_to_full())


# ========================================================= 6. load_state_dict validation


@dataclass(frozen=True)
class BadLoad:
    id: str
    mutate: Callable[[dict], None]  # edits a state dict in place
    names: str  # regex: how the message names the offending key
    where: str  # "param" (group 1, position 2), "group" (group 1), "" (not checked)
    families: tuple[str, ...] = ("ranger",)
    # The form of the slow weights the case breaks ("slow_param", or "slow_delta" in the
    # low-memory precisions): it applies where the state holds that form.
    slow_key: str | None = None


GROUP, POSITION = 1, 2  # the param whose state is broken: group 1, position 2 (state id 4)
GROUP_RE = re.compile(rf"group\D{{0,20}}?\b{GROUP}\b")
POSITION_RE = re.compile(rf"(param|position)\D{{0,20}}?\b{POSITION}\b")
RANGER_GROUP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
    "gc_conv_only",
    "rectify_threshold",
)
RANGER_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "slow_param")
# Group flags added after the first versions, with the default that gives those versions'
# behaviour: like torch.optim's flags added later (``__setstate__`` fills them in), a state
# dict without them may load with that default instead of raising.
ADDED_LATER = {"gc_conv_only": False, "rectify_threshold": 5.0}
BOTH = ("ranger", "lookahead")


def _key(name: str) -> str:
    return rf"(?<![A-Za-z_]){name}(?![A-Za-z_])"


def _param_state(state_dict: dict) -> dict:
    param_id = state_dict["param_groups"][GROUP]["params"][POSITION]
    return state_dict["state"][param_id]


def _set_state(key, make_value):
    def mutate(state_dict):
        state = _param_state(state_dict)
        state[key] = make_value(state[key])

    return mutate


def _drop_state(key):
    def mutate(state_dict):
        del _param_state(state_dict)[key]

    return mutate


def _set_group(key, value):
    def mutate(state_dict):
        state_dict["param_groups"][GROUP][key] = value

    return mutate


def _drop_group(key):
    def mutate(state_dict):
        del state_dict["param_groups"][GROUP][key]

    return mutate


def _one_group_fewer(state_dict):
    dropped = state_dict["param_groups"].pop()
    for param_id in dropped["params"]:
        state_dict["state"].pop(param_id, None)


def _one_param_fewer(state_dict):
    param_id = state_dict["param_groups"][GROUP]["params"].pop()
    state_dict["state"].pop(param_id, None)


def _one_param_more(state_dict):
    state_dict["param_groups"][GROUP]["params"].append(1 + max(state_dict["state"]))


def _slow_weights_cases(key: str, families: tuple[str, ...]) -> list[BadLoad]:
    """A missing, misshapen, integer or non-tensor slow-weights entry (either form)."""
    return [
        BadLoad(f"missing-{key}", _drop_state(key), _key(key), "param", ("ranger",), key),
        BadLoad(
            f"shape-{key}",
            _set_state(key, lambda t: t[..., None]),
            _key(key),
            "param",
            families,
            key,
        ),
        BadLoad(
            f"dtype-int-{key}",
            _set_state(key, lambda t: t.float().round().int()),
            _key(key),
            "param",
            families,
            key,
        ),
        BadLoad(
            f"nontensor-{key}",
            _set_state(key, lambda t: t.tolist()),
            _key(key),
            "param",
            families,
            key,
        ),
    ]


BAD_LOADS = [
    *(
        BadLoad(f"missing-{key}", _drop_state(key), _key(key), "param")
        for key in RANGER_STATE_KEYS
        if key != "slow_param"
    ),
    *_slow_weights_cases("slow_param", BOTH),
    *_slow_weights_cases("slow_delta", ("ranger",)),
    BadLoad(
        "shape-exp_avg",
        _set_state("exp_avg", lambda t: t.t().contiguous()),
        _key("exp_avg"),
        "param",
    ),
    BadLoad(
        "shape-exp_avg_sq",
        _set_state("exp_avg_sq", lambda t: t.flatten()),
        _key("exp_avg_sq"),
        "param",
    ),
    BadLoad(
        "dtype-int-exp_avg",
        _set_state("exp_avg", lambda t: t.round().long()),
        _key("exp_avg"),
        "param",
    ),
    BadLoad(
        "dtype-complex-exp_avg_sq",
        _set_state("exp_avg_sq", lambda t: t.to(torch.complex128)),
        _key("exp_avg_sq"),
        "param",
    ),
    BadLoad("nontensor-exp_avg", _set_state("exp_avg", lambda t: 0.0), _key("exp_avg"), "param"),
    BadLoad(
        "nontensor-exp_avg_sq",
        _set_state("exp_avg_sq", lambda t: None),
        _key("exp_avg_sq"),
        "param",
    ),
    BadLoad("step-negative", _set_state("step", lambda s: -1), _key("step"), "param"),
    BadLoad("step-fractional", _set_state("step", lambda s: 2.5), _key("step"), "param"),
    BadLoad(
        "step-negative-tensor",
        _set_state("step", lambda s: torch.tensor(-1.0)),
        _key("step"),
        "param",
    ),
    BadLoad(
        "step-fractional-tensor",
        _set_state("step", lambda s: torch.tensor(2.5)),
        _key("step"),
        "param",
    ),
    BadLoad("step-string", _set_state("step", lambda s: str(s)), _key("step"), "param"),
    # Lookahead: the slow weights and their count come together.
    BadLoad(
        "lookahead-missing-lookahead_step",
        _drop_state("lookahead_step"),
        _key("lookahead_step"),
        "param",
        ("lookahead",),
    ),
    BadLoad(
        "lookahead-missing-slow_param",
        _drop_state("slow_param"),
        _key("slow_param"),
        "param",
        ("lookahead",),
    ),
    *(
        BadLoad(
            f"lookahead_step-{name}",
            _set_state("lookahead_step", lambda s, value=value: value),
            _key("lookahead_step"),
            "param",
            ("lookahead",),
        )
        for name, value in [("negative", -1), ("fractional", 2.5), ("string", "8")]
    ),
    *(
        BadLoad(f"group-missing-{key}", _drop_group(key), _key(key), "group")
        for key in RANGER_GROUP_KEYS
        if key not in ADDED_LATER
    ),
    BadLoad("group-lr=-1", _set_group("lr", -1.0), _key("lr"), "group"),
    BadLoad("group-lr=nan", _set_group("lr", float("nan")), _key("lr"), "group"),
    BadLoad("group-betas=(1.5,0.9)", _set_group("betas", (1.5, 0.9)), _key("betas"), "group"),
    BadLoad("group-eps=0", _set_group("eps", 0.0), _key("eps"), "group"),
    BadLoad(
        "group-weight_decay=-1", _set_group("weight_decay", -1.0), _key("weight_decay"), "group"
    ),
    BadLoad(
        "group-rectify_threshold=3",
        _set_group("rectify_threshold", 3.0),
        _key("rectify_threshold"),
        "group",
    ),
    BadLoad(
        "group-lookahead_k=0", _set_group("lookahead_k", 0), _key("lookahead_k"), "group", BOTH
    ),
    BadLoad(
        "group-lookahead_k=2.5",
        _set_group("lookahead_k", 2.5),
        _key("lookahead_k"),
        "group",
        BOTH,
    ),
    BadLoad(
        "group-lookahead_alpha=1.5",
        _set_group("lookahead_alpha", 1.5),
        _key("lookahead_alpha"),
        "group",
        BOTH,
    ),
    BadLoad("one-group-fewer", _one_group_fewer, "group", "", BOTH),
    BadLoad("one-param-fewer", _one_param_fewer, "", "group", BOTH),
    BadLoad("one-param-more", _one_param_more, "", "group", BOTH),
]


def _load_applies(impl: Impl, case: BadLoad) -> bool:
    return impl.family in case.families and case.slow_key in (None, impl.slow_key)


def assert_load_rejected(impl: Impl, bad_state_dict: dict, names: str, where: str, label: str):
    """``load_state_dict(bad_state_dict)`` raises a ValueError naming the key (``names``) and
    where it is, and the optimizer is exactly as it was: same state_dict, same params, and
    the next steps equal those of an untouched twin (a deepcopy taken before the load)."""
    optimizer, params = trained(impl)
    twin = copy.deepcopy(optimizer)
    twin_params = all_params(twin)
    before = snapshot(optimizer)
    values = [p.detach().clone() for p in params]
    with expect_error(label, ValueError) as caught:
        optimizer.load_state_dict(bad_state_dict)
    message = str(caught.error)
    if names:
        assert re.search(names, message), f"{label}: the message does not name it: {message!r}"
    if where in ("param", "group"):
        assert GROUP_RE.search(message), f"{label}: the message lacks group {GROUP}: {message!r}"
    if where == "param":
        assert POSITION_RE.search(message), (
            f"{label}: the message lacks the param's position {POSITION} in its group: {message!r}"
        )
    assert_plain_equal(f"{label}: state_dict after the failed load", snapshot(optimizer), before)
    for index, (param, value) in enumerate(zip(params, values)):
        assert torch.equal(param, value), f"{label}: param {index} changed"
    run(optimizer, params, M, start=N)
    run(twin, twin_params, M, start=N)
    assert_same_run(f"{label}: continued", params, optimizer, twin_params, twin, EXACT)


_DONORS: dict[str, dict] = {}


def donor_state_dict(impl: Impl) -> dict:
    """A state dict that fits (same groups and shapes) but holds other values than `trained`'s
    optimizer: a partial load would show. (Made once per implementation; each call gets its
    own deep copy.)"""
    if impl.id not in _DONORS:
        donor, _ = trained(impl, steps=N + 3, seed=5, lr=0.03)
        _DONORS[impl.id] = snapshot(donor)
    return copy.deepcopy(_DONORS[impl.id])


@pytest.mark.parametrize(("impl", "case"), impl_cases(BAD_LOADS, _load_applies), indirect=["impl"])
def test_load_state_dict_rejects_what_step_cannot_use(impl, case):
    bad = donor_state_dict(impl)
    case.mutate(bad)
    label = f"[{impl}] load_state_dict({case.id})"
    assert_load_rejected(impl, bad, case.names, case.where, label)


@pytest.mark.parametrize("key", ADDED_LATER)
def test_group_without_a_flag_added_later_is_rejected_or_gets_its_default(ranger_impl, key):
    """Either a ValueError as for any missing key, or the load gives the group the flag's
    original default (not the optimizer's current value) and steps exactly like a load of
    the state dict with that default written in."""
    impl = ranger_impl
    bad = donor_state_dict(impl)
    del bad["param_groups"][GROUP][key]
    label = f"[{impl}] load_state_dict(group-missing-{key})"
    current = dict(gc_conv_only=True, rectify_threshold=6.0)  # not the defaults
    optimizer, params = trained(impl, **current)
    try:
        optimizer.load_state_dict(copy.deepcopy(bad))
    except ValueError:
        assert_load_rejected(impl, bad, _key(key), "group", label)
        return
    assert optimizer.param_groups[GROUP][key] == ADDED_LATER[key], (
        f"{label}: loaded with {key}={optimizer.param_groups[GROUP][key]!r}, not the default "
        f"{ADDED_LATER[key]!r}"
    )
    explicit = copy.deepcopy(bad)
    explicit["param_groups"][GROUP][key] = ADDED_LATER[key]
    twin, twin_params = trained(impl, **current)
    twin.load_state_dict(explicit)
    run(optimizer, params, M, start=N)
    run(twin, twin_params, M, start=N)
    assert_same_run(f"{label}: continued", params, optimizer, twin_params, twin, EXACT)


def _torch_optimizer_ranger(groups):
    torch_optimizer = pytest.importorskip("torch_optimizer")
    return torch_optimizer.Ranger(groups, lr=0.02)


def _pytorch_optimizer_ranger(groups):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    return pytorch_optimizer.Ranger(groups, lr=0.02)


def _timm_lookahead_radam(groups):
    timm_optim = pytest.importorskip("timm.optim")
    return timm_optim.Lookahead(torch.optim.RAdam(groups, lr=0.02))


FOREIGN = {
    "torch_optimizer.Ranger": _torch_optimizer_ranger,
    "pytorch_optimizer.Ranger": _pytorch_optimizer_ranger,
    "timm.Lookahead(RAdam)": _timm_lookahead_radam,
    "torch.optim.RAdam": lambda groups: torch.optim.RAdam(groups, lr=0.02),
}
NOT_A_RANGER_STATE = "|".join(
    ["Ranger", *(_key(key) for key in RANGER_STATE_KEYS + RANGER_GROUP_KEYS)]
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("foreign", FOREIGN)
def test_state_dict_of_another_optimizer_is_rejected(ranger_impl, foreign):
    label = f"[{ranger_impl}] load_state_dict({foreign}'s state dict)"
    assert_load_rejected(ranger_impl, foreign_state_dict(foreign), NOT_A_RANGER_STATE, "", label)


_FOREIGN_STATE_DICTS: dict[str, dict] = {}


def foreign_state_dict(foreign: str) -> dict:
    """The state dict of another optimizer over `make_params` in `two_groups`, after N steps
    (past timm's first sync: it has its slow weights); made once, deep-copied per call."""
    if foreign not in _FOREIGN_STATE_DICTS:
        params = make_params(seed=5)
        other = FOREIGN[foreign](two_groups(params))
        run(other, params, N)
        _FOREIGN_STATE_DICTS[foreign] = snapshot(other)
    return copy.deepcopy(_FOREIGN_STATE_DICTS[foreign])


def test_load_accepts_step_as_a_float_tensor(ranger_impl):
    """torch optimizers store ``step`` as a 0-d float32 tensor."""
    impl = ranger_impl
    source, params = trained(impl)
    ints = snapshot(source)
    tensors = copy.deepcopy(ints)
    for state in tensors["state"].values():
        state["step"] = torch.tensor(float(state["step"]))
    optimizer_params, twin_params = clone_params(params), clone_params(params)
    optimizer = impl.make(two_groups(optimizer_params), **HP)
    twin = impl.make(two_groups(twin_params), **HP)
    optimizer.load_state_dict(tensors)
    twin.load_state_dict(ints)
    run(optimizer, optimizer_params, M, start=N)
    run(twin, twin_params, M, start=N)
    label = f"[{impl}] load with step as a float tensor"
    assert_same_run(label, optimizer_params, optimizer, twin_params, twin, EXACT)
    assert counter_values(impl, optimizer, optimizer_params[0])["step"] == N + M, label


def test_load_casts_state_saved_from_float32_params(impl):
    """A state dict saved from float32 params loads into float64 params: torch's load casts
    the floating state to the param's dtype (``step`` aside), and it steps like a load of the
    same state cast by hand. (The 8-bit block scales are part of an encoding, fp32 whatever
    the param's dtype, as the layout table of `ranger_plugins._low_memory` states: the hand
    cast leaves them, as it leaves the integer codes.)"""
    params32 = make_params(dtype=torch.float32)
    source = impl.make(two_groups(params32), **HP)
    run(source, params32, N)
    saved = snapshot(source)
    cast = copy.deepcopy(saved)
    for state in cast["state"].values():
        for key, value in state.items():
            if key == "step" or key in SCALE_KEYS or not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point():
                state[key] = value.to(torch.float64)
    params = clone_params(params32, dtype=torch.float64)
    twin_params = clone_params(params)
    optimizer = impl.make(two_groups(params), **HP)
    twin = impl.make(two_groups(twin_params), **HP)
    optimizer.load_state_dict(saved)
    twin.load_state_dict(cast)
    label = f"[{impl}] load of a float32 state into float64 params"
    for param in params:
        assert_state_dtypes(label, impl, param, optimizer.state[param])
    run(optimizer, params, M, start=N)
    run(twin, twin_params, M, start=N)
    assert_same_run(label, params, optimizer, twin_params, twin, EXACT)


def test_load_of_an_empty_state_starts_afresh(impl):
    """The state dict of an optimizer that never stepped: the loaded optimizer continues like
    a new one on the current weights."""
    optimizer, params = trained(impl)
    fresh = impl.make(two_groups(clone_params(params)), **{**HP, "lr": 0.03})
    optimizer.load_state_dict(save_and_load(fresh.state_dict()))
    label = f"[{impl}] load of an empty state"
    assert not any(optimizer.state.get(p) for p in params), f"{label}: old state kept"
    new_params = clone_params(params)
    new = impl.make(two_groups(new_params), **{**HP, "lr": 0.03})
    run(optimizer, params, M, start=N)
    run(new, new_params, M, start=N)
    assert_same_run(label, params, optimizer, new_params, new, EXACT)


# ================================================================================ 7. hooks


def test_every_hook_runs_once_per_call(impl):
    params = make_params()
    optimizer = impl.make(params, **HP)
    calls: list[str] = []
    seen: list[Any] = []

    def hook(name):
        def record(opt, *args):
            calls.append(name)
            seen.append(opt)

        return record

    optimizer.register_step_pre_hook(hook("step_pre"))
    optimizer.register_step_post_hook(hook("step_post"))
    optimizer.register_state_dict_pre_hook(hook("state_dict_pre"))
    optimizer.register_state_dict_post_hook(hook("state_dict_post"))
    optimizer.register_load_state_dict_pre_hook(hook("load_state_dict_pre"))
    optimizer.register_load_state_dict_post_hook(hook("load_state_dict_post"))
    label = f"[{impl}] hooks"

    set_grads(params, 0)
    optimizer.step()
    assert calls == ["step_pre", "step_post"], f"{label}: step() ran {calls}"
    calls.clear()
    state_dict = optimizer.state_dict()
    assert calls == ["state_dict_pre", "state_dict_post"], f"{label}: state_dict() ran {calls}"
    calls.clear()
    optimizer.load_state_dict(state_dict)
    assert calls == ["load_state_dict_pre", "load_state_dict_post"], (
        f"{label}: load_state_dict() ran {calls}"
    )
    assert all(opt is optimizer for opt in seen), f"{label}: a hook got another optimizer"


# ============================================================ 8. operations between steps


class Pair:
    """An optimizer of ``impl`` and its twin (`make_twin`), on twin params, put through the
    same operations; ``params``/``twin_params`` are every param of the model (in or out of
    the optimizer) in parallel lists, and get the same gradients."""

    def __init__(self, impl: Impl, groups=two_groups, dtype=torch.float64, **hyperparameters):
        self.impl = impl
        self.params = make_params(dtype=dtype)
        self.twin_params = clone_params(self.params)
        hyperparameters = {**HP, **hyperparameters}
        self.optimizer = impl.make(groups(self.params), **hyperparameters)
        self.twin = make_twin(impl, groups(self.twin_params), **hyperparameters)
        self.tol = impl.twin_tolerance(dtype)

    def step(self, step: int, check: str) -> None:
        set_grads(self.params, step)
        set_grads(self.twin_params, step)
        self.optimizer.step()
        self.twin.step()
        self.check(f"{check}, step {step + 1}")

    def check(self, label: str) -> None:
        assert_same_run(
            f"[{self.impl}] {label}",
            self.params,
            self.optimizer,
            self.twin_params,
            self.twin,
            self.tol,
        )

    def both(self, operation: Callable[[torch.optim.Optimizer, list], None]) -> None:
        operation(self.optimizer, self.params)
        operation(self.twin, self.twin_params)


def _flipped(group: dict, flag: str) -> Any:
    if flag == "fused":
        return not group.get("fused")
    return not group.get("foreach") if group.get("foreach") is not None else True


def test_toggling_fused_and_foreach_between_steps(impl):
    """Per group, ``fused`` and ``foreach`` switched to the other value for a few steps and
    back; the twin keeps its path. Step counts keep increasing and the state keeps being
    updated (the comparison after every step covers ``exp_avg``)."""
    pair = Pair(impl)
    # The fused path takes some of the steps: the path tolerance at least.
    pair.tol = at_least_path_tolerance(impl.twin_tolerance(), torch.float64)
    schedule = [
        ([], 5),
        ([(0, "fused")], 3),
        ([], 2),
        ([(1, "foreach")], 2),
        ([(0, "fused"), (1, "fused")], 2),
        ([(0, "foreach"), (1, "foreach")], 2),
    ]
    if impl.is_ranger:  # torch's AdamW refuses fused and foreach both True
        schedule.append(([(0, "fused"), (0, "foreach"), (1, "fused"), (1, "foreach")], 2))
    schedule.append(([], 2))
    original = [
        dict(fused=g.get("fused"), foreach=g.get("foreach")) for g in pair.optimizer.param_groups
    ]
    step = 0
    for flips, steps in schedule:
        for index, group in enumerate(pair.optimizer.param_groups):
            group.update(original[index])
        for index, flag in flips:
            group = pair.optimizer.param_groups[index]
            group[flag] = _flipped(original[index], flag)
        for _ in range(steps):
            pair.step(step, f"toggled {flips or 'nothing'}")
            for param in pair.params:
                counters = counter_values(impl, pair.optimizer, param)
                assert all(value == step + 1 for value in counters.values()), (
                    f"[{impl}] toggled {flips}: step counts {counters} after step {step + 1}"
                )
            step += 1


def test_add_param_group_between_steps(impl):
    pair = Pair(impl, groups=lambda params: params[:3])
    for step in range(4):
        pair.step(step, "before add_param_group")
    new = make_params(shapes=[(2, 3, 1, 1), (4, 2), (3,)], seed=7)
    twin_new = clone_params(new)
    pair.optimizer.add_param_group({"params": new, "lr": 0.01})
    pair.twin.add_param_group({"params": twin_new, "lr": 0.01})
    pair.params += new
    pair.twin_params += twin_new
    for step in range(4, 13):
        pair.step(step, "after add_param_group")
    for param in new:
        counters = counter_values(impl, pair.optimizer, param)
        assert counters["step"] == 9, f"[{impl}] add_param_group: new param counters {counters}"


@pytest.mark.parametrize("change", ["append", "remove", "replace"])
def test_params_list_changed_between_steps(impl, change):
    """A param appended to, removed from or replaced in (``group["params"][1] = new``) a
    group's list: new params step from then on, removed ones no longer change."""
    pair = Pair(impl)
    for step in range(4):
        pair.step(step, f"before {change}")
    new = make_params(shapes=[pair.params[3].shape], seed=9)[0]  # the scalar's shape
    twin_new = clone_params([new])[0]
    old, twin_old = pair.params[3], pair.twin_params[3]  # group 1, position 1
    if change == "append":
        pair.optimizer.param_groups[1]["params"].append(new)
        pair.twin.param_groups[1]["params"].append(twin_new)
    elif change == "remove":
        pair.optimizer.param_groups[1]["params"].pop(1)
        pair.twin.param_groups[1]["params"].pop(1)
    else:
        pair.optimizer.param_groups[1]["params"][1] = new
        pair.twin.param_groups[1]["params"][1] = twin_new
    if change != "remove":
        pair.params.append(new)
        pair.twin_params.append(twin_new)
    old_value, old_state = old.detach().clone(), copy.deepcopy(dict(pair.optimizer.state[old]))
    twin_old_value = twin_old.detach().clone()
    for step in range(4, 13):
        pair.step(step, f"after {change}")
    label = f"[{impl}] {change} a param between steps"
    if change != "append":
        assert torch.equal(old, old_value), f"{label}: the param no longer in the group changed"
        assert_plain_equal(f"{label}: its state", dict(pair.optimizer.state[old]), old_state)
        assert torch.equal(twin_old, twin_old_value), f"{label}: the twin's removed param changed"
    if change != "remove":
        counters = counter_values(impl, pair.optimizer, new)
        assert counters.get("step") == 9, f"{label}: the new param's counters are {counters}"


@pytest.mark.parametrize("what", ["own_state_dict", "rewind"])
def test_optimizer_load_state_dict_between_steps(impl, what):
    """``own_state_dict``: reload its own state (new tensors, same values) after 5 steps: no
    change. ``rewind``: after 8 steps load the state and weights saved at step 4 and replay
    steps 5-13: the same as a run that never rewound."""
    params = make_params()
    optimizer = impl.make(two_groups(params), **HP)
    twin_params = clone_params(params)
    twin = impl.make(two_groups(twin_params), **HP)
    label = f"[{impl}] optimizer.load_state_dict between steps ({what})"
    if what == "own_state_dict":
        run(optimizer, params, 5)
        optimizer.load_state_dict(save_and_load(optimizer.state_dict()))
        start = 5
    else:
        run(optimizer, params, 4)
        checkpoint = save_and_load(optimizer.state_dict())
        weights = [p.detach().clone() for p in params]
        run(optimizer, params, 4, start=4)
        optimizer.load_state_dict(checkpoint)
        with torch.no_grad():
            for param, weight in zip(params, weights):
                param.copy_(weight)
        start = 4
    run(twin, twin_params, start)
    for step in range(start, 13):
        for opt, ps in ((optimizer, params), (twin, twin_params)):
            set_grads(ps, step)
            opt.step()
        assert_same_run(f"{label}, step {step + 1}", params, optimizer, twin_params, twin, EXACT)


def test_model_load_state_dict_between_steps(impl):
    """``model.load_state_dict`` copies new values into the params in place."""
    pair = Pair(impl)
    model, twin_model = (
        torch.nn.ParameterList(pair.params),
        torch.nn.ParameterList(pair.twin_params),
    )
    for step in range(5):
        pair.step(step, "before model.load_state_dict")
    other = torch.nn.ParameterList(make_params(seed=11)).state_dict()
    model.load_state_dict(other)
    twin_model.load_state_dict(other)
    assert torch.equal(pair.params[0], other["0"])
    for step in range(5, 13):
        pair.step(step, "after model.load_state_dict")


def test_model_to_float32_between_steps(ranger_impl):
    """``model.to(torch.float32)`` on a float64 model: the next steps equal the single_tensor
    twin's after the same ``.to``, and the state follows the params' dtype. Ranger paths
    only: torch's own AdamW cannot step after its params change dtype (``expected dtype
    double for `end` but got dtype float``), so Lookahead(AdamW) has no next step to check."""
    impl = ranger_impl
    pair = Pair(impl)
    model, twin_model = (
        torch.nn.ParameterList(pair.params),
        torch.nn.ParameterList(pair.twin_params),
    )
    for step in range(5):
        pair.step(step, "before model.to(float32)")
    model.to(torch.float32)
    twin_model.to(torch.float32)
    pair.tol = impl.twin_tolerance(torch.float32)
    for step in range(5, 13):
        pair.step(step, "after model.to(float32)")
    for param in pair.params:
        assert_state_dtypes(f"[{impl}] model.to(float32)", impl, param, pair.optimizer.state[param])


def test_zero_grad_set_to_none_alternating(impl):
    """Gradients from backward: after ``zero_grad(set_to_none=False)`` they accumulate into
    the zeroed ``p.grad``; after ``set_to_none=True`` they are new tensors."""
    pair = Pair(impl)
    for step in range(13):
        set_to_none = step % 2 == 0
        pair.optimizer.zero_grad(set_to_none=set_to_none)
        pair.twin.zero_grad(set_to_none=True)
        for params in (pair.params, pair.twin_params):
            grads = [gradient(p, step, index) for index, p in enumerate(params)]
            sum((p * g).sum() for p, g in zip(params, grads)).backward()
        pair.optimizer.step()
        pair.twin.step()
        pair.check(f"zero_grad(set_to_none={set_to_none}), step {step + 1}")


# ============================================================================ 9. aliasing


def _small_model(seed=0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 64), torch.nn.Linear(64, 64)
    ).double()


def _train_model(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def test_params_grads_and_state_do_not_alias(impl):
    model = _small_model()
    twin_model = copy.deepcopy(model)
    optimizer = impl.make(model.parameters(), **HP)
    twin = make_twin(impl, twin_model.parameters(), **HP)
    _train_model(model, optimizer, 4)
    _train_model(twin_model, twin, 4)
    label = f"[{impl}] aliasing"

    head = model[0]
    head_bytes = sum(own_bytes(p) for p in head.parameters())
    written = saved_bytes(head.state_dict())
    assert written < 2 * head_bytes + 4096, (
        f"{label}: torch.save(model[0].state_dict()) wrote {written} bytes for "
        f"{head_bytes} bytes of parameters"
    )
    written = saved_bytes(head.weight)
    assert written < 2 * own_bytes(head.weight) + 4096, (
        f"{label}: torch.save(param) wrote {written} bytes for {own_bytes(head.weight)}"
    )
    # The default path keeps the moments of many small tensors as views of one buffer per
    # wave (README, Caveats): the whole optimizer state then saves each byte once.
    state_tensors = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    written = saved_bytes(optimizer.state_dict())
    state_bytes = sum(own_bytes(tensor) for tensor in state_tensors)
    assert written < 1.1 * state_bytes + 8192, (
        f"{label}: torch.save(optimizer.state_dict()) wrote {written} bytes for {state_bytes}"
    )
    for name, param in model.named_parameters():
        tensors = {"param": param, "grad": param.grad}
        if impl.id != "foreach":
            tensors.update(
                (f"state {key!r}", value)
                for key, value in optimizer.state[param].items()
                if isinstance(value, torch.Tensor)
            )
        for what, tensor in tensors.items():
            storage = tensor.untyped_storage().nbytes()
            assert storage == own_bytes(tensor), (
                f"{label}: {name} {what}: its storage holds {storage} bytes, "
                f"the tensor {own_bytes(tensor)}"
            )

    # A param given new storage is stepped from its new value.
    for m in (model, twin_model):
        m[2].weight.data = torch.zeros_like(m[2].weight)
    _train_model(model, optimizer, 4, start=4)
    _train_model(twin_model, twin, 4, start=4)
    assert_same_run(
        f"{label}: after p.data = zeros_like(p)",
        list(model.parameters()),
        optimizer,
        list(twin_model.parameters()),
        twin,
        impl.twin_tolerance(),
    )


# ======================================================================= 10. GradScaler


def test_a_step_grad_scaler_skips_changes_nothing(impl):
    k = 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 41),  # 4100 elements: 8-bit state in the 8bit precision
    )
    optimizer = impl.make(model.parameters(), **{**HP, "lr": 0.01, "k": k})
    scaler = torch.amp.GradScaler("cpu")

    def train_step(step, inject_inf=False):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 2, 5, 5, generator=generator)
        targets = torch.randn(8, 41, generator=generator)
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
    state = snapshot(optimizer)
    scale = scaler.get_scale()
    train_step(k - 1, inject_inf=True)  # would be the sync step
    label = f"[{impl}] GradScaler skipped step"
    assert scaler.get_scale() == scale / 2, f"{label}: the scaler did not skip"
    for index, (param, value) in enumerate(zip(model.parameters(), values)):
        assert torch.equal(param, value), f"{label}: param {index} changed"
    assert_plain_equal(f"{label}: state_dict", snapshot(optimizer), state)
    train_step(k)  # the k-th real step: counts k and syncs
    for param in model.parameters():
        counters = counter_values(impl, optimizer, param)
        assert all(value == k for value in counters.values()), f"{label}: counters {counters}"
        assert torch.equal(param, slow_weights(optimizer, param).to(param.dtype)), (
            f"{label}: step {k} did not sync"
        )
