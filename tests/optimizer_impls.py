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
"""

from __future__ import annotations

import copy
import functools
import io
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
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
    """How closely two tensors must agree; ``rtol == atol == 0`` means bitwise."""

    rtol: float = 0.0
    atol: float = 0.0

    @property
    def exact(self) -> bool:
        return self.rtol == 0.0 and self.atol == 0.0

    def __str__(self) -> str:
        return "bitwise" if self.exact else f"rtol={self.rtol:g}, atol={self.atol:g}"


EXACT = Tolerance()
FLOAT64_PATH = Tolerance(rtol=0.0, atol=1e-12)
FLOAT32_PATH = Tolerance(rtol=1e-5, atol=1e-6)


def path_tolerance(dtype: torch.dtype) -> Tolerance:
    """What two paths that round differently must agree to in ``dtype``."""
    return FLOAT64_PATH if dtype == torch.float64 else FLOAT32_PATH


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


@dataclass(frozen=True)
class Impl:
    """One implementation: ``make(params_or_groups, **hyperparameters) -> optimizer``."""

    id: str
    # "ranger" (a Ranger path), "lookahead" (the generic wrapper), or "variant" (another
    # member of the Ranger family, compared with its own single-tensor path)
    family: str
    factory: Callable[..., torch.optim.Optimizer]
    # Against the family's reference: bitwise, or `path_tolerance` of the dtype.
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

    def make(self, params_or_groups, **hyperparameters) -> torch.optim.Optimizer:
        return self.factory(params_or_groups, **hyperparameters)

    @property
    def is_ranger(self) -> bool:
        return self.family == "ranger"

    def tolerance(self, dtype: torch.dtype = torch.float64) -> Tolerance:
        """Against the reference (`make_reference`) and the twin (`make_twin`)."""
        return EXACT if self.exact else path_tolerance(dtype)

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


def prepared(impl: Impl, monkeypatch: pytest.MonkeyPatch) -> Impl:
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
    if impl.is_ranger:
        return REFERENCE.make(params_or_groups, **hyperparameters)
    if impl.reference_factory is not None:
        return impl.reference_factory(params_or_groups, **hyperparameters)
    return PlainLookaheadAdamW(params_or_groups, **hyperparameters)


def make_twin(impl: Impl, params_or_groups, **hyperparameters) -> torch.optim.Optimizer:
    """The twin that goes through the same operations between steps: the single_tensor
    reference for Ranger paths, another Lookahead(AdamW) for the wrapper."""
    if impl.reference_factory is not None:
        return impl.reference_factory(params_or_groups, **hyperparameters)
    return (REFERENCE if impl.is_ranger else impl).make(params_or_groups, **hyperparameters)


def state_of(optimizer, param: torch.Tensor) -> dict[str, Any]:
    if isinstance(optimizer, PlainLookaheadAdamW):
        return optimizer.compared_state(param)
    return optimizer.state.get(param, {})


# ------------------------------------------------------------------- params and gradients
# A 4-D conv weight, a vector, a matrix, a scalar and another matrix. In `two_groups` group 0
# is (conv, vector) and group 1 is (matrix, scalar, matrix): group 1 position 2 is a param
# whose state-dict index (4) differs from its position in its group.
SHAPES: tuple[tuple[int, ...], ...] = ((4, 3, 3, 3), (6,), (5, 7), (), (3, 4))


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
    assert a.dtype == b.dtype, f"{label}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{label}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    same = torch.equal(a, b) if tol.exact else torch.allclose(a, b, rtol=tol.rtol, atol=tol.atol)
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
    counts exactly, whether stored as ints or tensors)."""
    assert len(params_a) == len(params_b)
    for index, (a, b) in enumerate(zip(params_a, params_b)):
        where = f"{label}, param {index} {tuple(a.shape)}"
        assert_tensors_close(where, a.detach(), b.detach(), tol)
        state_a, state_b = state_of(opt_a, a), state_of(opt_b, b)
        assert set(state_a) == set(state_b), f"{where}: state keys {set(state_a)} != {set(state_b)}"
        for key, value in state_a.items():
            other = state_b[key]
            if key in ("step", "lookahead_step"):
                assert _number(value) == _number(other), f"{where}: {key} {value} != {other}"
            elif isinstance(value, torch.Tensor):
                assert_tensors_close(f"{where}, state {key!r}", value, other, tol)
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
