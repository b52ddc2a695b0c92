"""What every optimizer of the Ranger family shares: the `torch.optim.Optimizer` contract.

`LookaheadOptimizer` is the base class of `Ranger` and its variants. It owns everything that
is not the update rule: hyperparameter checks before any change, lazy per-param state (the
Lookahead slow weights among it), the closure, gradient checks, Gradient Centralization's
support check, state that follows ``model.to()``, and loading that checks everything
``step()`` reads before changing anything. A variant declares its state keys and group keys,
checks its hyperparameters, and implements `_update` (normally by calling its functional
step, which picks a single-tensor or foreach implementation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from ._math import check_gc_supported
from ._state import (
    PLAIN_TENSOR_TYPES,
    check_gradients,
    check_param_states,
    check_real,
    check_state_dict_matches,
    load_state_dict_safely,
    move_state_to_param,
    params_whose_state_moved,
    state_dtype,
    steps_to_int,
)
from .lookahead import LookaheadControls

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass
class GroupLists:
    """The params of a group that have a gradient this step, their gradients, their state
    tensors (one list per `LookaheadOptimizer.state_keys` entry, in that order) and their
    step counts after this step's increment."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[list[torch.Tensor]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    #: The params' whole state dicts (for updates whose state keys vary by param).
    state_dicts: list[dict[str, Any]] = field(default_factory=list)


class LookaheadOptimizer(LookaheadControls, Optimizer):
    """Base class of the Ranger family (see the module docstring)."""

    #: Per-param state tensors of the param's shape, in the order the update takes them. The
    #: slow weights (``slow_param``) start as a copy of the param, the others at zero.
    state_keys: ClassVar[tuple[str, ...]] = ("slow_param",)
    #: Group keys ``step()`` reads: a loaded group must hold each of them.
    required_group_keys: ClassVar[tuple[str, ...]] = ("lr", "lookahead_k", "lookahead_alpha")
    #: Group flags added after a release, given their default when an older state lacks them.
    optional_group_defaults: ClassVar[dict[str, Any]] = {}
    #: Group keys that mark other optimizers' state dicts, and whose they are.
    foreign_group_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.check_group(defaults)
        super().__init__(params, defaults)

    @classmethod
    def check_group(cls, group: dict[str, Any], where: str = "") -> None:
        """Raise a `ValueError` naming the first missing or out-of-range hyperparameter of
        ``group``; ``where`` says which group, for messages about a loaded state dict."""
        raise NotImplementedError

    def _update(self, group_index: int, group: dict[str, Any], lists: GroupLists) -> None:
        """Step the params of ``lists`` (their state already created and counted)."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Checked merged with the defaults before the base class appends it, so a bad group
        # leaves the optimizer as it was.
        self.check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups pickled or saved by an older version get the flags added since.
        for group in self.param_groups:
            for key, value in self.optional_group_defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking everything `step()` will read from it; a state
        dict that does not fit raises a `ValueError` naming the group, param and key, and
        leaves the optimizer unchanged."""
        load_state_dict_safely(
            self, state_dict, super().load_state_dict, partial(self._check_state_dict)
        )
        steps_to_int(self, "step")

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict_matches(self, state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            where = f"group {index} of the loaded state dict: "
            self._check_not_foreign(group, where)
            self.check_group({**self.optional_group_defaults, **group}, where=where)
        self._check_param_states(state_dict)

    def _check_param_states(self, state_dict: dict[str, Any]) -> None:
        check_param_states(self, state_dict, "step", self.state_keys)

    def _check_not_foreign(self, group: dict[str, Any], where: str) -> None:
        missing = [key for key in self.required_group_keys if key not in group]
        if not missing:
            return
        guesses = [name for key, name in self.foreign_group_keys.items() if key in group]
        origin = f" (it looks like {guesses[0]}'s)" if guesses else ""
        raise ValueError(
            f"{where}missing {missing[0]!r}: this is not a ranger_plugins "
            f"{type(self).__name__} state dict{origin}. Other optimizers keep their moments "
            "and slow weights differently; load the model weights only and start the "
            "optimizer afresh."
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; evaluate ``closure`` first if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups_before_step()
        for group_index, group in enumerate(self.param_groups):
            lists = self._init_group(group)
            if lists.params:
                self._update(group_index, group, lists)
        return loss

    def _check_groups_before_step(self) -> None:
        # Schedulers and users write lr into the groups between steps: a NaN or negative lr
        # would silently wreck every weight, so each step checks it before anything changes.
        for index, group in enumerate(self.param_groups):
            check_real("lr", group["lr"], low=0.0, where=f"group {index}: ", tensor_ok=True)

    def _init_group(self, group: dict[str, Any]) -> GroupLists:
        """The group's params that have a gradient and their state (created at a param's
        first step), after this step's increment of the step counts. Everything is checked
        before any state changes, so an error changes nothing."""
        lists = GroupLists()
        with_grad = [p for p in group["params"] if p.grad is not None]
        if not with_grad:
            return lists
        grads = [p.grad for p in with_grad]
        check_gradients(with_grad, grads)
        if group.get("use_gc"):  # also 1-D params: FSDP1 flattens every param to 1-D
            self._check_gc_supported(with_grad)
        states = [self.state[param] for param in with_grad]
        for param, state in zip(with_grad, states):
            if not state:
                self._init_state(param, state, group)
        for param, state in self._states_to_fix(with_grad, states, group):
            self._fix_state(param, state, group)
        for state in states:
            state["step"] += 1
        # Comprehensions: a model of many small tensors pays this per tensor on every step.
        lists.params, lists.grads, lists.state_dicts = with_grad, grads, states
        lists.states = self._state_lists(group, states)
        lists.steps = [state["step"] for state in states]
        return lists

    def _states_to_fix(
        self, params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """(param, state) whose state is not what the update reads (here: its dtype or device
        no longer matches the param's, after ``model.to()``)."""
        return params_whose_state_moved(params, states)

    def _fix_state(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Bring a state `_states_to_fix` found into what the update reads."""
        move_state_to_param(state, param, self.state_keys)

    def _state_lists(
        self, group: dict[str, Any], states: list[dict[str, Any]]
    ) -> list[list[torch.Tensor]]:
        """One list per `state_keys` entry, for the update."""
        return [[state[key] for state in states] for key in self.state_keys]

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """A param's state at its first step: zeros, and slow weights copied from it."""
        dtype = state_dtype(param)
        state["step"] = 0
        for key in self.state_keys:
            if key == "slow_param":
                state[key] = param.detach().to(dtype, copy=True)
            else:
                state[key] = torch.zeros_like(
                    param, dtype=dtype, memory_format=torch.preserve_format
                )

    @staticmethod
    def _check_gc_supported(params: list[torch.Tensor]) -> None:
        # Only a param with marks can fail the check: a tensor subclass (DTensor, FSDP1's
        # FlatParameter) or a param with attributes of its own (FSDP1 sets
        # `_fsdp_flattened` on the views it makes). Plain params pass without the call.
        for param in params:
            if type(param) not in PLAIN_TENSOR_TYPES or param.__dict__:
                check_gc_supported(param)
