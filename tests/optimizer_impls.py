"""Every optimizer implementation the generic properties run on, listed once, and the helpers
the shared harness (`test_optimizer_contract.py`) needs.

In the spirit of torch's ``OptimizerInfo``/``supported_impls``: an `Impl` names one way of
stepping (one code path), says how to build it, what it is compared against and how closely.
A new path is one more entry in `IMPLS`; every property then runs on it.

Comparisons:

* Ranger paths are compared with ``single_tensor`` (the readable reference): bitwise for
  ``foreach``, within ``atol=1e-12`` in float64 for the fused paths (their kernels round
  differently; in float32 eager ``sqrt`` is not correctly rounded, so one ulp there).
* ``lookahead_adamw`` is compared with `PlainLookaheadAdamW` (torch's AdamW on twin params
  plus the README's Lookahead maths written out here) where a property is about the values,
  and with a twin of itself where it is about continuation.
* The low-memory precisions of Ranger (``state_precision``, `ranger_plugins._low_memory`)
  keep their state in other layouts, so their states are compared with the reference's by
  value (`Tolerance.decoded`: decoded here, from the module docstring's encodings, into the
  full layout). ``delta`` (the reformulation slow = fast - d, in full precision) follows
  ``single_tensor`` within the path tolerance; ``16bit`` and ``8bit`` round their state, so
  they follow it only loosely (`Tolerance.of_max`: a share of each tensor's largest
  magnitude, as block-scaled storage errs), and their twin is a run of the same path
  (bitwise: the stochastic rounding is a hash of (step, index), not a random draw).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optim_helpers
import pytest
import torch

from ranger_plugins import (
    Lookahead,
    Ranger,
    Ranger21,
    RangerLars,
    RangerQH,
    RangerVA,
    _cpu_kernel,
)

# Hyperparameters the properties run with (each factory maps them to its own arguments).
# k = 6: with the default betas, steps 1-5 are momentum SGD, step 6 is the first rectified
# step and the first Lookahead sync.
HP: dict[str, Any] = dict(lr=0.02, weight_decay=0.01, k=6, alpha=0.5)

# Param-group keys of the constructor arguments that are stored under another name.
GROUP_KEY = {"k": "lookahead_k", "alpha": "lookahead_alpha"}


# ------------------------------------------------------------------------------ tolerance
@dataclass(frozen=True)
class Tolerance:
    """How closely two tensors must agree; ``rtol == atol == of_max == 0`` means bitwise."""

    rtol: float = 0.0
    atol: float = 0.0
    # Plus this share of the expected tensor's largest magnitude: 16-bit and block-quantized
    # storage err relative to the values stored (a block's largest), not to each element.
    of_max: float = 0.0
    # Compare Ranger states by value in the full layout (`full_layout_state`), so that states
    # kept in different layouts (``state_precision``) can be compared.
    decoded: bool = False
    # For the moments (``exp_avg``, ``exp_avg_sq``), where they err differently.
    moments: Tolerance | None = None

    @property
    def exact(self) -> bool:
        return self.rtol == 0.0 and self.atol == 0.0 and self.of_max == 0.0

    def __str__(self) -> str:
        text = "bitwise" if self.exact else f"rtol={self.rtol:g}, atol={self.atol:g}"
        if self.of_max:
            text += f", {self.of_max:g} of the largest magnitude"
        return text + (", decoded" if self.decoded else "")


EXACT = Tolerance()
FLOAT64_PATH = Tolerance(rtol=0.0, atol=1e-12)
FLOAT32_PATH = Tolerance(rtol=1e-5, atol=1e-6)


def path_tolerance(dtype: torch.dtype) -> Tolerance:
    """What two paths that round differently must agree to in ``dtype``."""
    return FLOAT64_PATH if dtype == torch.float64 else FLOAT32_PATH


def at_least_path_tolerance(tol: Tolerance, dtype: torch.dtype) -> Tolerance:
    """``tol``, or the path tolerance of ``dtype`` where ``tol`` is bitwise (for runs in which
    another path takes some of the steps)."""
    return dataclasses.replace(path_tolerance(dtype), decoded=tol.decoded) if tol.exact else tol


def decoded_path_tolerance(dtype: torch.dtype) -> Tolerance:
    """``delta`` against ``full``: the same maths rearranged (slow = fast - d), so the path
    tolerance, with the states compared by value."""
    return dataclasses.replace(path_tolerance(dtype), decoded=True)


# Low-precision storage against full precision, over the properties' runs (up to ~20 steps
# at lr 0.02 on N(0, 1) gradients), loosely:
# * exp_avg is rounded at every step and remembers its errors for about 1 / (1 - beta1) = 20
#   steps: bf16 (a relative error up to 2**-9 per rounding) leaves it within 20 * 2**-9 = 4%
#   of its largest magnitude, which near a zero crossing is its past one (atol: |m| ~ 1);
#   exp_avg_sq's stochastic rounding (up to one ulp, 2**-7) is unbiased, a random walk.
# * 8-bit codes: exp_avg's square-root code has steps up to 2/127 of the block's largest |m|,
#   exp_avg_sq's fourth-root code steps of up to 4/255 of its largest v near the top.
# * The params and slow weights inherit the moments' relative error times lr per step, plus
#   bf16's rounding of slow_delta (a few steps' updates): well under 1% of their magnitude.
SIXTEEN_BIT_VS_FULL = Tolerance(
    of_max=5e-3, atol=1e-3, decoded=True, moments=Tolerance(of_max=5e-2, atol=5e-3)
)
EIGHT_BIT_VS_FULL = Tolerance(
    of_max=1e-2, atol=2e-3, decoded=True, moments=Tolerance(of_max=1e-1, atol=1e-2)
)
# Each low-memory precision against full precision, per dtype.
LOW_MEMORY_VS_FULL: dict[str, Callable[[torch.dtype], Tolerance]] = {
    "delta": decoded_path_tolerance,
    "16bit": lambda dtype: SIXTEEN_BIT_VS_FULL,
    "8bit": lambda dtype: EIGHT_BIT_VS_FULL,
}


# ------------------------------------------------------------------------- implementations
def _lookahead_adamw(params, *, k: int = 6, alpha: float = 0.5, **adamw_kwargs):
    return Lookahead(torch.optim.AdamW(params, **adamw_kwargs), k=k, alpha=alpha)


@functools.cache
def _cpu_kernel_missing() -> str | None:
    """Why the fused path's C++ CPU kernel cannot be built here, or None if it can. The
    kernel's getter is private and was renamed in the redesign, so both names are tried; the
    fused step also warns when the build fails (the README's fallback contract)."""
    for name in ("step_kernel", "rows_kernel"):
        getter = getattr(_cpu_kernel, name, None)
        if callable(getter):
            return None if getter() is not None else f"_cpu_kernel.{name}() gave None"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        param = torch.nn.Parameter(torch.zeros(2, 2))
        param.grad = torch.ones(2, 2)
        Ranger([param], fused=True).step()
    for warning in caught:
        if "kernel" in str(warning.message):
            return str(warning.message)
    return None


def _use_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu_kernel, "enabled", True)
    reason = _cpu_kernel_missing()
    if reason is not None:
        pytest.skip(f"fused: the C++ CPU kernel cannot be built on this machine ({reason})")


def _without_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu_kernel, "enabled", False)


def _use_low_memory_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused low-memory step's own C++ kernel (without it the fused path falls back to
    the default one, and the comparison would be vacuous)."""
    monkeypatch.setattr(_cpu_kernel, "enabled", True)
    if _cpu_kernel.low_memory_step_kernel() is None:
        pytest.skip("fused low-memory: the C++ CPU kernel cannot be built on this machine")


@dataclass(frozen=True)
class Impl:
    """One implementation: ``make(params_or_groups, **hyperparameters) -> optimizer``."""

    id: str
    # "ranger" (a Ranger path), "lookahead" (the generic wrapper), or "variant" (another
    # member of the Ranger family, compared with its own single-tensor path)
    family: str
    factory: Callable[..., torch.optim.Optimizer]
    # Against the family's reference (and the twin, unless `twin_factory` says otherwise):
    # bitwise, or `path_tolerance` of the dtype, unless `reference_tolerance` is given.
    exact: bool
    # Run before each test (through pytest's monkeypatch, undone after it); may skip.
    prepare: Callable[[pytest.MonkeyPatch], None] | None = None
    # Per-param step counters in `optimizer.state[p]`.
    counters: tuple[str, ...] = ("step",)
    note: str = field(default="", compare=False)
    # A variant's reference and twin: the same class with foreach=False.
    reference_factory: Callable[..., torch.optim.Optimizer] | None = None
    # Whether a step of one group depends on the others (Ranger21's stable weight decay
    # divides by a mean over every param), so groups cannot be stepped as separate optimizers.
    couples_groups: bool = False
    # Ranger's ``state_precision`` (the layout of the state; "full" for every other family).
    precision: str = "full"
    # Against the reference, per dtype, where neither bitwise nor `path_tolerance`.
    reference_tolerance: Callable[[torch.dtype], Tolerance] | None = None
    # The twin that goes through the same operations between steps, where it is not the
    # reference (a low-memory path is its own twin), and whether it agrees bitwise.
    twin_factory: Callable[..., torch.optim.Optimizer] | None = None
    twin_exact: bool = True
    # Properties (test function names) that cannot apply, and why; the harness skips them
    # with that reason.
    skips: Mapping[str, str] = field(default_factory=dict, compare=False)
    # Properties that apply but fail because of a known bug or an open question in the
    # library, and which: marked xfail(strict=True), so a fix shows.
    xfails: Mapping[str, str] = field(default_factory=dict, compare=False)

    def make(self, params_or_groups, **hyperparameters) -> torch.optim.Optimizer:
        return self.factory(params_or_groups, **hyperparameters)

    @property
    def is_ranger(self) -> bool:
        return self.family == "ranger"

    @property
    def slow_key(self) -> str:
        """The state key of the Lookahead slow weights: ``slow_param``, or their difference
        from the fast weights, ``slow_delta``, in the low-memory precisions."""
        return "slow_param" if self.precision == "full" else "slow_delta"

    def tolerance(self, dtype: torch.dtype = torch.float64) -> Tolerance:
        """Against the reference (`make_reference`)."""
        if self.reference_tolerance is not None:
            return self.reference_tolerance(dtype)
        return EXACT if self.exact else path_tolerance(dtype)

    def tolerance_to_full(self, dtype: torch.dtype = torch.float64) -> Tolerance:
        """Against Ranger's full precision (the ``single_tensor`` path), for a Ranger path."""
        if self.precision == "full":
            return self.tolerance(dtype)
        return LOW_MEMORY_VS_FULL[self.precision](dtype)

    def twin_tolerance(self, dtype: torch.dtype = torch.float64) -> Tolerance:
        """Against the twin (`make_twin`)."""
        if self.twin_factory is not None:
            return EXACT if self.twin_exact else path_tolerance(dtype)
        return self.tolerance(dtype)

    def __str__(self) -> str:
        return self.id


IMPLS: tuple[Impl, ...] = (
    Impl(
        "single_tensor",
        "ranger",
        lambda params, **hp: Ranger(params, **hp, foreach=False),
        exact=True,
        note="the readable reference",
    ),
    Impl("foreach", "ranger", lambda params, **hp: Ranger(params, **hp), exact=True),
    Impl(
        "fused",
        "ranger",
        lambda params, **hp: Ranger(params, **hp, fused=True),
        exact=False,
        prepare=_use_cpu_kernel,
        note="with the C++ CPU kernel",
    ),
    Impl(
        "fused_fallback",
        "ranger",
        lambda params, **hp: Ranger(params, **hp, fused=True),
        exact=False,
        prepare=_without_cpu_kernel,
        note="the fused path without its C++ kernel",
    ),
    Impl(
        "lookahead_adamw",
        "lookahead",
        _lookahead_adamw,
        exact=False,
        counters=("step", "lookahead_step"),
        note="Lookahead(torch.optim.AdamW)",
    ),
)


# The documented difference of the low-memory precisions (README, "Low-memory state"; tested
# in test_low_memory.py): its twin, the full precision, keeps the slow weights themselves.
WRITES_MOVE_SLOW_WEIGHTS = (
    "a write into a param between steps (model.load_state_dict, p.data = ...) moves its "
    "slow weights too when they are kept as slow = fast - slow_delta (documented), where "
    "the full precision, this implementation's twin, keeps them"
)


def _low_memory_ranger(precision: str, **fixed) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, **hp: Ranger(params, **hp, **fixed, state_precision=precision)


# Ranger's low-memory state (issue 14). 8bit quantizes only params of at least 4096 elements
# (`SHAPES` has one, and so do the models of the aliasing and GradScaler properties); smaller
# ones keep the 16bit layout. The default (torch) paths are compared with full precision;
# the fused ones with the default path of their precision, bitwise (`_low_memory`: "the
# fused C++ step does the same float32 operations in the same order").
IMPLS += (
    Impl(
        "delta",
        "ranger",
        _low_memory_ranger("delta"),
        exact=False,
        precision="delta",
        reference_tolerance=LOW_MEMORY_VS_FULL["delta"],
        skips=dict.fromkeys(
            (
                "test_model_load_state_dict_between_steps",
                "test_params_grads_and_state_do_not_alias",
            ),
            WRITES_MOVE_SLOW_WEIGHTS,
        ),
        note="slow weights kept as slow_delta = fast - slow, in full precision",
    ),
    Impl(
        "16bit",
        "ranger",
        _low_memory_ranger("16bit"),
        exact=False,
        precision="16bit",
        reference_tolerance=LOW_MEMORY_VS_FULL["16bit"],
        twin_factory=_low_memory_ranger("16bit"),
        note="bf16 moments and slow_delta (torch reference step)",
    ),
    Impl(
        "8bit",
        "ranger",
        _low_memory_ranger("8bit"),
        exact=False,
        precision="8bit",
        reference_tolerance=LOW_MEMORY_VS_FULL["8bit"],
        twin_factory=_low_memory_ranger("8bit"),
        note="8-bit block-quantized moments, bf16 slow_delta (torch reference step)",
    ),
    *(
        Impl(
            f"{precision}_fused",
            "ranger",
            _low_memory_ranger(precision, fused=True),
            exact=True,
            prepare=_use_low_memory_cpu_kernel,
            precision=precision,
            reference_factory=_low_memory_ranger(precision),
            note=f"the C++ low-memory step, against the {precision} default path",
        )
        for precision in ("16bit", "8bit")
    ),
)


def _variant(cls, **fixed) -> tuple[Callable, Callable]:
    """(foreach factory, single-tensor factory) of a family member, its own schedule off."""
    return (
        lambda params, **hp: cls(params, **fixed, **hp),
        lambda params, **hp: cls(params, **fixed, **hp, foreach=False),
    )


_VARIANTS = {
    "ranger_qh": _variant(RangerQH),
    "ranger_va": _variant(RangerVA),
    "ranger21": _variant(Ranger21, use_warmup=False, warmdown_active=False),
    "ranger_lars": _variant(RangerLars),
}
# The Ranger family's other members run every property that is not about Ranger's own
# hyperparameters or paths, against their single-tensor step.
IMPLS += tuple(
    Impl(
        name,
        "variant",
        foreach,
        exact=True,
        reference_factory=single,
        couples_groups=name == "ranger21",
        note="foreach path",
    )
    for name, (foreach, single) in _VARIANTS.items()
)
IMPLS_BY_ID = {impl.id: impl for impl in IMPLS}
RANGER_IMPLS = tuple(impl for impl in IMPLS if impl.is_ranger)
REFERENCE = IMPLS_BY_ID["single_tensor"]


def prepared(impl: Impl, monkeypatch: pytest.MonkeyPatch, request=None) -> Impl:
    """``impl`` ready for a test (``request``: pytest's, of the test): skipped with the
    implementation's stated reason where the property cannot apply to it, marked xfail where
    it declares a known failure, and prepared."""
    name = request.function.__name__ if request is not None else ""
    reason = impl.skips.get(name)
    if reason:
        pytest.skip(f"{impl}: {reason}")
    reason = impl.xfails.get(name)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{impl}: {reason}"))
    if impl.prepare is not None:
        impl.prepare(monkeypatch)
    return impl


class PlainLookaheadAdamW:
    """Lookahead(AdamW) written out: torch's AdamW on the params, then the README's maths per
    param: slow weights taken from the param at its first step with a gradient, a count of
    its own steps with a gradient, and every k of them phi <- phi + alpha (theta - phi),
    theta <- phi."""

    def __init__(self, params, *, lr, weight_decay=1e-2, k=6, alpha=0.5, **adamw_kwargs):
        self.params = [p for p in params]
        self.inner = torch.optim.AdamW(
            self.params, lr=lr, weight_decay=weight_decay, **adamw_kwargs
        )
        self.k, self.alpha = k, alpha
        self.slow: dict[torch.Tensor, torch.Tensor] = {}
        self.count: dict[torch.Tensor, int] = {}
        self.state = self.inner.state

    @torch.no_grad()
    def step(self) -> None:
        stepping = [p for p in self.params if p.grad is not None]
        for param in stepping:
            if param not in self.slow:
                self.slow[param] = param.detach().clone()
                self.count[param] = 0
        self.inner.step()
        for param in stepping:
            self.count[param] += 1
            if self.count[param] % self.k == 0:
                self.slow[param] += self.alpha * (param - self.slow[param])
                param.copy_(self.slow[param])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def compared_state(self, param: torch.Tensor) -> dict[str, Any]:
        """The state `Lookahead` keeps for ``param``, under its names."""
        if param not in self.slow:
            return dict(self.inner.state.get(param, {}))
        return {
            **self.inner.state[param],
            "slow_param": self.slow[param],
            "lookahead_step": self.count[param],
        }


def make_reference(impl: Impl, params_or_groups, **hyperparameters):
    """The independent reference a property's values are compared with."""
    if impl.reference_factory is not None:
        return impl.reference_factory(params_or_groups, **hyperparameters)
    if impl.is_ranger:
        return REFERENCE.make(params_or_groups, **hyperparameters)
    return PlainLookaheadAdamW(params_or_groups, **hyperparameters)


def make_twin(impl: Impl, params_or_groups, **hyperparameters) -> torch.optim.Optimizer:
    """The twin that goes through the same operations between steps: the single_tensor
    reference for Ranger paths, another Lookahead(AdamW) for the wrapper, the same path for
    the low-memory precisions (`Impl.twin_factory`)."""
    if impl.twin_factory is not None:
        return impl.twin_factory(params_or_groups, **hyperparameters)
    if impl.reference_factory is not None:
        return impl.reference_factory(params_or_groups, **hyperparameters)
    return (REFERENCE if impl.is_ranger else impl).make(params_or_groups, **hyperparameters)


def state_of(optimizer, param: torch.Tensor) -> dict[str, Any]:
    if isinstance(optimizer, PlainLookaheadAdamW):
        return optimizer.compared_state(param)
    return optimizer.state.get(param, {})


# ------------------------------------------------------- the low-memory layouts, by value
# Written from `ranger_plugins._low_memory`'s docstring, independently of its code.
BLOCK = 256  # elements per 8-bit block, in the param's memory order
MIN_8BIT_NUMEL = 4096  # smaller params keep the 16bit layout in an 8bit group
SIGNED_LEVELS, UNSIGNED_LEVELS = 127, 255
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")
MOMENTS = ("exp_avg", "exp_avg_sq")


def working_dtype(param: torch.Tensor) -> torch.dtype:
    """What the state is computed in: fp32 for bf16/fp16 params, else the param's dtype."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


def layout_of_param(precision: str, param: torch.Tensor) -> str:
    if precision == "8bit" and param.numel() < MIN_8BIT_NUMEL:
        return "16bit"
    return precision


def expected_state_dtypes(impl: Impl, param: torch.Tensor) -> dict[str, torch.dtype] | None:
    """Each state tensor's dtype (besides ``step``) in ``impl``'s layout for ``param``, as the
    module docstring's table gives it; None where every floating state tensor is simply in
    the working dtype (the other families)."""
    if not impl.is_ranger:
        return None
    work = working_dtype(param)
    layout = layout_of_param(impl.precision, param)
    keys = ("exp_avg", "exp_avg_sq", impl.slow_key)
    if layout in ("full", "delta"):
        return dict.fromkeys(keys, work)
    if layout == "16bit":
        return dict.fromkeys(keys, torch.bfloat16)
    return dict(
        zip(keys + SCALE_KEYS, (torch.int8, torch.uint8, torch.bfloat16) + (torch.float32,) * 2)
    )


def memory_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dims of a dense tensor from the outermost in memory to the innermost."""
    return tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d)))


def decode_8bit(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """8-bit codes (any dense layout) decoded in float64, per block of 256 in memory order:
    ``S * c * |c| / 127**2`` (signed) or ``S * (c / 255) ** 4`` (unsigned)."""
    dims = memory_order(codes)
    flat = codes.permute(dims).reshape(-1).double()
    block_scales = scales.double().repeat_interleave(BLOCK)[: flat.numel()]
    if signed:
        values = block_scales * flat * flat.abs() / SIGNED_LEVELS**2
    else:
        values = block_scales * (flat / UNSIGNED_LEVELS) ** 4
    permuted = values.reshape([codes.shape[d] for d in dims])
    inverse = [dims.index(d) for d in range(codes.dim())]
    return permuted.permute(inverse)


def full_layout_state(param: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
    """A Ranger state in any layout by value, in the full layout: ``step``, then
    ``exp_avg``, ``exp_avg_sq`` and ``slow_param`` in the param's working dtype."""
    if not state or ("slow_param" not in state and "slow_delta" not in state):
        return dict(state)
    work = working_dtype(param)
    full = {key: value for key, value in state.items() if key in ("step", "lookahead_step")}
    if "exp_avg_scale" in state:
        full["exp_avg"] = decode_8bit(state["exp_avg"], state["exp_avg_scale"], signed=True)
        full["exp_avg_sq"] = decode_8bit(
            state["exp_avg_sq"], state["exp_avg_sq_scale"], signed=False
        )
    elif "exp_avg" in state:
        full["exp_avg"], full["exp_avg_sq"] = state["exp_avg"], state["exp_avg_sq"]
    full = {key: value.to(work) if key.startswith("exp") else value for key, value in full.items()}
    if "slow_param" in state:
        full["slow_param"] = state["slow_param"].to(work)
    else:  # slow = fast - d
        full["slow_param"] = param.detach().to(work) - state["slow_delta"].to(work)
    return full


def slow_weights(optimizer, param: torch.Tensor) -> torch.Tensor:
    """A param's Lookahead slow weights in either form, by value."""
    return full_layout_state(param, state_of(optimizer, param))["slow_param"]


# ------------------------------------------------------------------- params and gradients
# A 4-D conv weight, a vector, a matrix, a scalar, another matrix and a matrix large enough for
# 8-bit state (>= 4096 elements: 17 blocks of 256, the last one partial). In `two_groups`
# group 0 is (conv, vector) and group 1 is (matrix, scalar, matrix, large matrix): group 1
# position 2 is a param whose state-dict index (4) differs from its position in its group.
SHAPES: tuple[tuple[int, ...], ...] = ((4, 3, 3, 3), (6,), (5, 7), (), (3, 4), (65, 66))


def make_params(dtype=torch.float64, shapes: Sequence[tuple[int, ...]] = SHAPES, seed=0):
    return optim_helpers.make_params(dtype, shapes, seed)


def clone_params(params: Iterable[torch.Tensor], dtype=None) -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype), requires_grad=p.requires_grad)
        for p in params
    ]


def two_groups(params: Sequence[torch.Tensor], **group1) -> list[dict[str, Any]]:
    return [{"params": list(params[:2])}, {"params": list(params[2:]), **group1}]


def gradient(param: torch.Tensor, step: int, index: int, seed: int = 1) -> torch.Tensor:
    """A deterministic gradient for the param at ``index`` of a list, at ``step``: adding or
    replacing params does not change the gradients of the others."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + index)
    grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
    return grad.to(param.dtype)


def set_grads(params: Sequence[torch.Tensor], step: int, skip: Iterable[int] = ()) -> None:
    """Fresh gradients (as after ``zero_grad(set_to_none=True)``); params whose index is in
    ``skip`` and params that do not require grad get none."""
    skip = set(skip)
    for index, param in enumerate(params):
        if index in skip or not param.requires_grad:
            param.grad = None
        else:
            param.grad = gradient(param, step, index)


def run(optimizer, params, steps: int, start: int = 0, skip=None) -> None:
    """``steps`` steps on `set_grads` gradients; ``skip(step)`` gives indices without one."""
    for step in range(start, start + steps):
        set_grads(params, step, skip(step) if skip else ())
        optimizer.step()


def all_params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# ----------------------------------------------------------------------------- comparisons
def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def assert_tensors_close(label: str, a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> None:
    """``a`` as close to ``b`` (the expected values) as ``tol`` allows."""
    assert a.dtype == b.dtype, f"{label}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{label}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    atol = tol.atol
    if tol.of_max and b.numel():
        atol += tol.of_max * b.detach().abs().max().item()
    same = torch.equal(a, b) if tol.exact else torch.allclose(a, b, rtol=tol.rtol, atol=atol)
    if not same:
        difference = (a.detach().double() - b.detach().double()).abs().max().item()
        raise AssertionError(f"{label}: not equal ({tol}); max abs difference {difference:.3g}")


def assert_same_run(
    label: str,
    params_a: Sequence[torch.Tensor],
    opt_a,
    params_b: Sequence[torch.Tensor],
    opt_b,
    tol: Tolerance,
) -> None:
    """Params and every state entry of ``opt_a`` equal those of ``opt_b`` (``tol``; step
    counts exactly, whether stored as ints or tensors; by value in the full layout if
    ``tol.decoded``)."""
    assert len(params_a) == len(params_b)
    for index, (a, b) in enumerate(zip(params_a, params_b)):
        where = f"{label}, param {index} {tuple(a.shape)}"
        assert_tensors_close(where, a.detach(), b.detach(), tol)
        state_a, state_b = state_of(opt_a, a), state_of(opt_b, b)
        if tol.decoded:
            state_a, state_b = full_layout_state(a, state_a), full_layout_state(b, state_b)
        assert set(state_a) == set(state_b), f"{where}: state keys {set(state_a)} != {set(state_b)}"
        for key, value in state_a.items():
            other = state_b[key]
            if key in ("step", "lookahead_step"):
                assert _number(value) == _number(other), f"{where}: {key} {value} != {other}"
            elif isinstance(value, torch.Tensor):
                key_tol = tol.moments if tol.moments and key in MOMENTS else tol
                assert_tensors_close(f"{where}, state {key!r}", value, other, key_tol)
            else:
                assert value == other, f"{where}: state {key!r} {value!r} != {other!r}"


def assert_plain_equal(label: str, a: Any, b: Any) -> None:
    """Nested dicts/lists/tuples of tensors and plain values equal, tensors bitwise (and of
    the same dtype)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{label}: {a!r} {b!r}"
        assert_tensors_close(label, a, b, EXACT)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{label}: keys {set(a)} != {set(b)}"
        for key in a:
            assert_plain_equal(f"{label}[{key!r}]", a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{label}: {a!r} != {b!r}"
        for index, (x, y) in enumerate(zip(a, b)):
            assert_plain_equal(f"{label}[{index}]", x, y)
    else:
        assert a == b or (a != a and b != b), f"{label}: {a!r} != {b!r}"


def snapshot(optimizer) -> dict[str, Any]:
    """A deep copy of ``optimizer.state_dict()`` (later steps cannot change it)."""
    return copy.deepcopy(optimizer.state_dict())


def save_and_load(obj: Any) -> Any:
    """Through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def saved_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def own_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class expect_error:
    """``with expect_error(label, ValueError, match) as caught:`` like ``pytest.raises``, but
    a failure (no error, another type, a message that does not match) says ``label`` (the
    property and the implementation). ``caught.error`` is the error raised."""

    def __init__(self, label: str, error_type: type[BaseException], match: str | None = None):
        self.label, self.error_type, self.match = label, error_type, match
        self.error: BaseException | None = None

    def __enter__(self) -> expect_error:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        expected = self.error_type.__name__
        if error is None:
            raise AssertionError(f"{self.label}: did not raise {expected}")
        if not isinstance(error, self.error_type):
            raise AssertionError(
                f"{self.label}: raised {kind.__name__} ({error}), not {expected}"
            ) from error
        if self.match is not None and not re.search(self.match, str(error)):
            raise AssertionError(
                f"{self.label}: the {expected} message {str(error)!r} does not match {self.match!r}"
            ) from error
        self.error = error
        return True
