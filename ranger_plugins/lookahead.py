"""Lookahead: a slow copy of the weights that every k steps moves a fraction alpha toward
the fast weights, which are then reset to it (Zhang, Lucas, Hinton and Ba, NeurIPS 2019).

`LookaheadControls` holds what `Ranger` and the generic `Lookahead` share: forcing a sync,
and evaluating on the slow weights. Both keep the slow weights in `state[p]["slow_param"]`
and k/alpha in each param group as `lookahead_k`/`lookahead_alpha`, so `state_dict()` needs
no special case. The group keys are not called `alpha` because fastai's `OptimWrapper` maps
`alpha` to `sqr_mom` (beta2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from ._low_memory import copy_stochastic_
from ._state import (
    LOW_PRECISION,
    PLAIN_TENSOR_TYPES,
    check_lookahead_args,
    check_param_states,
    check_state_dict_matches,
    load_state_dict_safely,
    state_dtype,
    steps_to_int,
)

__all__ = ["WEIGHTS_AFTER_FIT", "Lookahead", "LookaheadControls", "check_weights_after_fit"]

#: What a model can hold when training ends: see `LookaheadControls.finish_training`.
WEIGHTS_AFTER_FIT = ("synced", "slow", "fast")


def check_weights_after_fit(weights_after_fit: str) -> None:
    """Raise a `ValueError` unless ``weights_after_fit`` is one of `WEIGHTS_AFTER_FIT`."""
    if weights_after_fit not in WEIGHTS_AFTER_FIT:
        raise ValueError(
            f"Invalid weights_after_fit: {weights_after_fit!r} (must be one of {WEIGHTS_AFTER_FIT})"
        )


def copy_into(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    # `torch._foreach_copy_` has no DTensor rule (FSDP2), and it needs matching dtypes.
    # Plain params count as plain tensors (`nn.Parameter` of a DTensor has the DTensor type).
    if not destinations:
        return
    if all(
        type(d) in PLAIN_TENSOR_TYPES and d.dtype == s.dtype for d, s in zip(destinations, sources)
    ):
        torch._foreach_copy_(destinations, sources)
    else:
        for destination, source in zip(destinations, sources):
            destination.copy_(source)


def lookahead_sync_(
    params: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    k: int,
    alpha: float,
    *,
    foreach: bool,
) -> None:
    """Lookahead's sync for the params whose step count is a multiple of ``k``: the slow
    weights move a fraction ``alpha`` toward the fast ones, which are then reset to them
    (``slow += alpha * (fast - slow); fast = slow``). Slow weights of bf16/fp16 params are
    fp32. The foreach and the per-tensor forms give the same bits."""
    due = [index for index, step in enumerate(steps) if step % k == 0]
    if not due:
        return
    fast = [params[index] for index in due]
    slow = [slow_params[index] for index in due]
    fast_in_slow_dtype = [p if p.dtype == s.dtype else p.to(s.dtype) for p, s in zip(fast, slow)]
    if foreach:
        torch._foreach_lerp_(slow, fast_in_slow_dtype, alpha)
        copy_into(fast, slow)
        return
    for param, weights, target in zip(fast, slow, fast_in_slow_dtype):
        weights.lerp_(target, alpha)
        param.copy_(weights)


#: The ``slow_precision`` choices of the generic `Lookahead`.
SLOW_PRECISIONS = ("full", "16bit")

#: The two forms of a param's Lookahead state: the slow weights themselves, or (the
#: low-memory precisions of `Ranger`) their difference from the fast weights, fast - slow.
SLOW_WEIGHTS_KEYS = ("slow_param", "slow_delta")


def slow_weights_key(state: dict) -> str | None:
    """The key under which a state holds its Lookahead slow weights, or None."""
    return (
        "slow_param" if "slow_param" in state else "slow_delta" if "slow_delta" in state else None
    )


def slow_weights_of(param: torch.Tensor, state: dict) -> torch.Tensor:
    """A param's slow weights: the stored tensor, or ``fast - d`` computed in the working
    dtype (a new tensor of the param's size)."""
    if "slow_param" in state:
        return state["slow_param"]
    work = state_dtype(param)
    return param.detach().to(work) - state["slow_delta"].to(work)


def sync_one_(param: torch.Tensor, state: dict, alpha: float, step: int = 0) -> None:
    """Lookahead's sync of one param: ``slow += alpha * (fast - slow); fast = slow``; in the
    difference form ``fast -= (1 - alpha) * d; d = 0``, the same value. Slow weights kept in
    a narrower dtype than the param (`Lookahead`'s ``slow_precision="16bit"``) are
    interpolated in the param's precision and rounded stochastically (seeded by ``step``),
    and the fast weights take exactly that value."""
    if "slow_param" in state:
        slow = state["slow_param"]
        if slow.dtype.itemsize < param.dtype.itemsize and slow.dtype == torch.bfloat16:
            interpolated = slow.to(param.dtype).lerp_(param, alpha)
            copy_stochastic_(slow, interpolated, step)
        else:
            slow.lerp_(param.to(slow.dtype), alpha)
        param.copy_(slow)
        return
    delta = state["slow_delta"]
    work = state_dtype(param)
    param.copy_(torch.sub(param.to(work), delta.to(work), alpha=1.0 - alpha))
    delta.zero_()


class LookaheadControls:
    """Mixin for optimizers whose state holds Lookahead's slow weights per parameter (as
    ``slow_param``, or as ``slow_delta``: see `SLOW_WEIGHTS_KEYS`)."""

    # Provided by the `torch.optim.Optimizer` this is mixed into.
    param_groups: list[dict[str, Any]]
    state: Any

    def _params_with_slow_weights(self) -> Iterator[tuple[dict, torch.Tensor, dict]]:
        """(group, param, state) of each param that has slow weights."""
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param, {})
                if slow_weights_key(state) is not None:
                    yield group, param, state

    @property
    def has_slow_weights(self) -> bool:
        """Whether any parameter has stepped, and so has slow weights."""
        return next(self._params_with_slow_weights(), None) is not None

    @torch.no_grad()
    def load_slow_weights(self) -> None:
        """Overwrite the fast weights with the slow weights, without interpolating.

        The model then holds exactly what `slow_weights()` evaluates; the fast weights are
        gone (fast = slow: a ``slow_delta`` becomes 0). Params that have not stepped yet keep
        their value.
        """
        for _, param, state in self._params_with_slow_weights():
            param.copy_(slow_weights_of(param, state))
            if "slow_delta" in state:
                state["slow_delta"].zero_()

    def finish_training(self, weights_after_fit: str = "synced") -> None:
        """Leave the model holding ``"synced"`` weights (`sync_lookahead`), the ``"slow"``
        weights (`load_slow_weights`) or the ``"fast"`` weights (nothing to do)."""
        check_weights_after_fit(weights_after_fit)
        if weights_after_fit == "synced":
            self.sync_lookahead()
        elif weights_after_fit == "slow":
            self.load_slow_weights()

    @torch.no_grad()
    def sync_lookahead(self) -> None:
        """Sync now: move the slow weights a fraction alpha toward the fast weights, then
        reset the fast weights to them. The k-step schedule is not shifted by this."""
        for group, param, state in self._params_with_slow_weights():
            step = state.get("step", state.get("lookahead_step", 0))
            sync_one_(param, state, group["lookahead_alpha"], step)

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Put the slow weights into the model for evaluation; restore the fast weights on exit.

        The fast weights are restored exactly (a backup copy, not a round trip through the
        slow weights' dtype), so training continues as if evaluation never happened. Params
        that have not stepped yet have no slow weights and keep their value.

        Memory: the backup is one copy of the stepped params (their bytes) for the duration;
        where the state holds ``slow_delta``, each param's slow weights are also computed in
        turn (one param's size in fp32 at a time).
        """
        entries = list(self._params_with_slow_weights())
        params = [param for _, param, _ in entries]
        with torch.no_grad():
            backups = [param.detach().clone() for param in params]
            for _, param, state in entries:
                param.copy_(slow_weights_of(param, state))
        try:
            yield
        finally:
            with torch.no_grad():
                copy_into(params, backups)


def _shared_with_inner(name: str) -> property:
    """`Lookahead`'s ``state``, ``param_groups`` and ``defaults`` are the inner optimizer's,
    read and written through, so code that replaces them (fastai's
    `OptimWrapper.clear_state` assigns a new `state`) keeps the wrapper and the inner
    optimizer in step."""

    def get(self):
        return getattr(self.optimizer, name)

    def set(self, value) -> None:
        if self.__dict__.get("_sharing"):
            setattr(self.optimizer, name, value)

    return property(get, set, doc=f"The inner optimizer's `{name}`.")


class Lookahead(LookaheadControls, Optimizer):
    """Lookahead around any torch optimizer.

    Args:
        optimizer: the inner ("fast") optimizer, for example `torch.optim.AdamW(fused=True)`.
        k: sync every k steps of each parameter.
        alpha: the slow weights move this fraction of the way to the fast weights at a sync.
        slow_precision: ``"full"`` (the default) keeps the slow weights in fp32 (fp64 for
            fp64 params): 4 bytes per fp32 param. ``"16bit"`` keeps them in bf16 (fp16/bf16
            params: their own dtype), 2 bytes per param: each sync interpolates in the
            param's precision, rounds stochastically (unbiased) to bf16, and sets the fast
            weights to exactly that value, so fast = slow holds after every sync; the slow
            weights start as theta_0 rounded the same way. (The wrapper cannot see the inner
            optimizer's updates, so it cannot keep the difference fast - slow as `Ranger`'s
            low-memory precisions do; `Ranger(state_precision=...)` is the more exact choice.)

    It is a real `torch.optim.Optimizer` that shares the inner optimizer's `param_groups`
    and `state`, so LR schedulers, GradScaler and checkpoints see one optimizer. The slow
    weights start from each parameter's value at its first step (theta_0), so the first sync
    already interpolates (timm's starts them at theta_k, making its first sync a no-op).
    Each parameter counts its own steps (`state[p]["lookahead_step"]`), and only steps in
    which it had a gradient count. Slow weights of bf16/fp16 params are kept in fp32.

    A closure is evaluated once, before the inner step (so optimizers that re-evaluate
    their closure, such as LBFGS, are not supported).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 6,
        alpha: float = 0.5,
        *,
        slow_precision: str = "full",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        check_lookahead_args(k, alpha)
        if slow_precision not in SLOW_PRECISIONS:
            raise ValueError(
                f"Invalid slow_precision: {slow_precision!r} (must be one of {SLOW_PRECISIONS})"
            )
        self.slow_precision = slow_precision
        self.optimizer = optimizer
        # The base class sets up hooks and bookkeeping; its assignments to state,
        # param_groups and defaults are ignored until `_sharing` is set (see the properties).
        super().__init__([{"params": g["params"]} for g in optimizer.param_groups], {})
        self._sharing = True
        for group in self.param_groups:
            group.setdefault("lookahead_k", k)
            group.setdefault("lookahead_alpha", alpha)
        self._lookahead_defaults = {"lookahead_k": k, "lookahead_alpha": alpha}

    state = _shared_with_inner("state")
    param_groups = _shared_with_inner("param_groups")
    defaults = _shared_with_inner("defaults")

    def __repr__(self) -> str:
        k, alpha = self._lookahead_defaults.values()
        return (
            f"Lookahead(k={k}, alpha={alpha}, slow_precision={self.slow_precision!r}, "
            f"optimizer={self.optimizer!r})"
        )

    def _slow_dtype(self, param: torch.Tensor) -> torch.dtype:
        if self.slow_precision == "16bit":
            return param.dtype if param.dtype in LOW_PRECISION else torch.bfloat16
        return state_dtype(param)

    def _slow_copy(self, weights: torch.Tensor, param: torch.Tensor, step: int) -> torch.Tensor:
        """``weights`` in the slow weights' dtype for ``param``; narrowed stochastically."""
        dtype = self._slow_dtype(param)
        if dtype.itemsize >= weights.dtype.itemsize:
            return weights.detach().to(dtype, copy=True)
        slow = torch.empty_like(weights, dtype=dtype, memory_format=torch.preserve_format)
        copy_stochastic_(slow, weights, step)
        return slow

    def add_param_group(self, param_group: dict) -> None:
        if not self.__dict__.get("_sharing"):  # Optimizer.__init__: the groups already exist
            return
        check_lookahead_args(
            param_group.get("lookahead_k", self._lookahead_defaults["lookahead_k"]),
            param_group.get("lookahead_alpha", self._lookahead_defaults["lookahead_alpha"]),
        )
        self.optimizer.add_param_group(param_group)
        for key, value in self._lookahead_defaults.items():
            self.param_groups[-1].setdefault(key, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults/state/param_groups; the wrapper also needs
        # the inner optimizer (pickled in the same memo, so the containers stay shared).
        return {
            **super().__getstate__(),
            "optimizer": self.optimizer,
            "_lookahead_defaults": self._lookahead_defaults,
            "slow_precision": self.slow_precision,
            "_sharing": True,
        }

    def __setstate__(self, state: dict) -> None:
        # The shared containers come back through the inner optimizer, pickled beside them.
        for name in ("state", "param_groups", "defaults"):
            state.pop(name, None)
        state.setdefault("slow_precision", "full")  # pickled by an older version
        super().__setstate__(state)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Run the closure (if any) under ``enable_grad``, the inner step, then due syncs."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [
            (group, param)
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        with torch.no_grad():
            # theta_0 of the params stepping for the first time. It is stored only after the
            # inner step: torch optimizers initialize a param's state when state[p] is empty.
            initial_weights = {
                param: self._slow_copy(param, param, 0)
                for _, param in stepped
                if "slow_param" not in self.state.get(param, {})
            }
        self.optimizer.step()
        with torch.no_grad():
            for group, param in stepped:
                state = self.state[param]
                if param in initial_weights:
                    state["slow_param"] = initial_weights[param]
                    state["lookahead_step"] = 0
                state["lookahead_step"] += 1
                if state["lookahead_step"] % group["lookahead_k"] == 0:
                    sync_one_(param, state, group["lookahead_alpha"], state["lookahead_step"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this wrapper (or of the bare inner optimizer, which then
        gets this wrapper's k and alpha) after checking what `step()` reads from it; one
        that does not fit raises a `ValueError` and leaves the optimizer unchanged. The hooks
        registered on the wrapper run once, those on the inner optimizer by its own load."""
        load_state_dict_safely(
            self, state_dict, self.optimizer.load_state_dict, self._check_state_dict
        )
        steps_to_int(self, "lookahead_step")
        for group in self.param_groups:
            for key, value in self._lookahead_defaults.items():
                group.setdefault(key, value)
        self._slow_weights_to_precision()

    @torch.no_grad()
    def _slow_weights_to_precision(self) -> None:
        """Slow weights saved in another precision take this wrapper's."""
        for _, param, state in self._params_with_slow_weights():
            slow = state["slow_param"]
            if slow.dtype != self._slow_dtype(param):
                step = state.get("lookahead_step", 0)
                state["slow_param"] = self._slow_copy(slow.to(param.device), param, step)

    def _check_state_dict(self, state_dict: dict) -> None:
        check_state_dict_matches(self, state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            check_lookahead_args(
                group.get("lookahead_k", self._lookahead_defaults["lookahead_k"]),
                group.get("lookahead_alpha", self._lookahead_defaults["lookahead_alpha"]),
                where=f"group {index} of the loaded state dict: ",
            )
        # The inner optimizer's own state is its business; Lookahead's two keys go together.
        check_param_states(self, state_dict, "lookahead_step", ("slow_param",), required=False)
