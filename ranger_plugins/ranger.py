"""Ranger: RAdam + Lookahead + Gradient Centralization, as a `torch.optim.Optimizer`.

Layout follows torch.optim: the class (thin: its hyperparameters, state keys and dispatch;
the optimizer contract it shares with the family lives in `_base.LookaheadOptimizer`), then
`_single_tensor_ranger` (the readable ground truth), then the functional `ranger` that picks
an implementation. The fast paths live beside it: `_multi_tensor.py` (`torch._foreach_*`,
grouped by device, dtype and step; the default) and `_fused.py` (the opt-in C++ step).
"""

from __future__ import annotations

from typing import Any

import torch

from ._base import GroupLists, LookaheadOptimizer, ParamsT
from ._fused import fused_low_memory_ranger, fused_ranger
from ._low_memory import (
    STATE_PRECISIONS,
    check_low_memory_supported,
    check_saved_state,
    convert_state,
    layout_for,
    low_memory_ranger,
    new_state,
    state_fits,
)
from ._math import (
    centralize_gradient,
    rectification,
    step_hyperparameters,
)
from ._multi_tensor import _multi_tensor_ranger
from ._state import (
    check_lookahead_args,
    check_real,
    check_step,
    saved_entries,
    state_location,
)

__all__ = ["Ranger", "centralize_gradient", "rectification"]


# The group keys `step()` reads, and the flags that groups of older versions may lack
# (`__setstate__` fills those in).
REQUIRED_GROUP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
)
OPTIONAL_GROUP_DEFAULTS = {
    "foreach": None,
    "fused": False,
    "gc_conv_only": False,
    "rectify_threshold": 5.0,
    "state_precision": "full",
}


class Ranger(LookaheadOptimizer):
    r"""Ranger: RAdam with Lookahead and Gradient Centralization.

    For each parameter with a gradient, with its own step count :math:`t` (from 1):

    .. math::
        g &\leftarrow g - \operatorname{mean}_{\dim \ge 1}(g)
            \quad\text{(GC, if } g \text{ has more than one dim)} \\
        \theta &\leftarrow \theta\,(1 - \gamma\lambda)
            \quad\text{(decoupled weight decay)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \rho_\infty &= \tfrac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t} \\
        \theta &\leftarrow \theta - \gamma\, \tfrac{r_t \sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
            \tfrac{m}{\sqrt{v} + \epsilon}
            \quad\text{if } \rho_t > \rho_{\text{threshold}},\quad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
        \theta &\leftarrow \theta - \tfrac{\gamma}{1-\beta_1^t}\, m
            \quad\text{otherwise (momentum SGD: the automatic warmup)} \\
        \text{if } t \bmod k = 0:&\quad \phi \leftarrow \phi + \alpha(\theta - \phi),
            \quad \theta \leftarrow \phi \quad\text{(Lookahead; } \phi = \theta_0 \text{ at the first step)}

    With the default betas, steps 1-5 are momentum SGD and step 6 is the first rectified
    step and, with k = 6, the first Lookahead sync.

    Args:
        params: parameters or param groups. Every hyperparameter below can be set per group
            and is read from the group at each step (so LR schedulers drive it).
        lr: learning rate (>= 0).
        betas: (beta1, beta2) decays of the first and second moments, each in [0, 1).
        eps: added to sqrt(v) in the denominator (> 0).
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * weight_decay``
            before the update (>= 0). The moments are never touched by it.
        k: Lookahead sync period in steps (int >= 1). Stored in groups as ``lookahead_k``.
        alpha: Lookahead slow step in (0, 1]. Stored in groups as ``lookahead_alpha`` (not
            ``alpha``, which fastai's hyperparameter map sends to beta2).
        use_gc: Gradient Centralization on gradients with more than one dimension.
        gc_conv_only: restrict GC to gradients with more than three dimensions (conv
            weights).
        rectify_threshold: the adaptive step is used once rho_t exceeds this (>= 4, since
            r_t needs rho_t > 4).
        fused: the opt-in fused step (`ranger_plugins._fused`): on CPU one C++ call steps
            every param of the group on its own tensors, in one pass over memory (built on
            first use; without a compiler, and on accelerators, the default path runs). Same
            results as the default path up to rounding; ``p.grad`` is not centralized in place.
        foreach: use the multi-tensor implementation (default: yes, unless a param is not a
            strided tensor).
        state_precision: how the state is stored (`ranger_plugins._low_memory` has the
            details): ``"full"`` (the default: moments and slow weights in fp32, 12 bytes per
            param), ``"16bit"`` (bf16 moments, and the slow weights kept as the bf16
            difference ``fast - slow``: 6 bytes per param), ``"8bit"`` (8-bit block-quantized
            moments and that bf16 difference: about 4.03 bytes per param; params under 4096
            elements keep the 16bit layout), or ``"delta"`` (the difference in fp32: the
            reformulation alone, 12 bytes per param). The low-memory step decodes the state a
            chunk at a time, so it adds little to the peak. Loading a state dict saved in
            another precision converts it to this one.

    Notes:
        * State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` and
          ``slow_param`` (the Lookahead slow weights, taken from the parameter at its first
          step). Nothing else is kept, so ``state_dict()`` holds only tensors and plain
          values and loads with ``torch.load(weights_only=True)``.
        * bf16/fp16 parameters: the arithmetic is done in fp32, and the moments and slow
          weights are kept in fp32; the parameter receives the rounded result.
        * Gradient Centralization is applied to ``p.grad`` in place (as in the original
          Ranger), so after ``step()`` an fp32/fp64 gradient holds its centralized value.
        * Parameters without a gradient are skipped: neither they nor their step count or
          Lookahead schedule change.
        * ``step(closure)`` evaluates the closure under ``torch.enable_grad()`` and returns
          its loss, as Lightning's automatic optimization needs.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        use_gc: bool = True,
        gc_conv_only: bool = False,
        rectify_threshold: float = 5.0,
        *,
        foreach: bool | None = None,
        fused: bool = False,
        state_precision: str = "full",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            lookahead_k=k,
            lookahead_alpha=alpha,
            use_gc=use_gc,
            gc_conv_only=gc_conv_only,
            rectify_threshold=rectify_threshold,
            foreach=foreach,
            fused=fused,
            state_precision=state_precision,
        )
        super().__init__(params, defaults)

    state_keys = ("exp_avg", "exp_avg_sq", "slow_param")
    required_group_keys = REQUIRED_GROUP_KEYS
    optional_group_defaults = OPTIONAL_GROUP_DEFAULTS
    foreign_group_keys = {
        "N_sma_threshhold": "torch_optimizer.Ranger or the original ranger2020.py",
        "n_sma_threshold": "pytorch_optimizer.Ranger",
        "lookahead_step": "timm's Lookahead",
        "decoupled_weight_decay": "torch.optim.RAdam",
    }

    @classmethod
    def check_group(cls, group: dict[str, Any], where: str = "") -> None:
        check_hyperparameters(group, where)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (see `LookaheadOptimizer.load_state_dict`). Each group keeps the
        ``state_precision`` this optimizer has, and the loaded state is converted to it, so a
        checkpoint saved in any precision resumes in the one chosen now."""
        precisions = [group["state_precision"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, precision in zip(self.param_groups, precisions):
            group["state_precision"] = precision
            params = [param for param in group["params"] if self.state.get(param)]
            states = [self.state[param] for param in params]
            for param, state in self._states_to_fix(params, states, group):
                self._fix_state(param, state, group)

    def _check_param_states(self, state_dict: dict[str, Any]) -> None:
        # A saved state may be in any layout (the load converts it): each must be complete.
        for index, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            for position, (param, entry) in enumerate(saved_entries(state_dict, group, saved)):
                if entry:
                    where = state_location(index, position)
                    check_saved_state(entry, param, where)
                    check_step(entry["step"], f"{where}: state 'step'")

    def _check_groups_before_step(self) -> None:
        # state_precision decides how the state is read: one written into a group between
        # steps is checked like lr, before anything changes.
        super()._check_groups_before_step()
        for index, group in enumerate(self.param_groups):
            check_state_precision(group["state_precision"], where=f"group {index}: ")

    def _init_group(self, group: dict[str, Any]) -> GroupLists:
        if group["state_precision"] != "full":  # before any state changes
            check_low_memory_supported([p for p in group["params"] if p.grad is not None])
        return super()._init_group(group)

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        state.update(new_state(param, layout_for(group["state_precision"], param)))

    def _states_to_fix(
        self, params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        # Any state not in the layout of the group's precision is converted before the step
        # reads it: after a change of `state_precision`, a load, or `model.to()`.
        precision = group["state_precision"]
        if precision == "full" and all("slow_param" in state for state in states):
            return super()._states_to_fix(params, states, group)
        return [
            (param, state)
            for param, state in zip(params, states)
            if not state_fits(param, state, layout_for(precision, param))
        ]

    def _fix_state(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        convert_state(param, state, layout_for(group["state_precision"], param))

    def _state_lists(
        self, group: dict[str, Any], states: list[dict[str, Any]]
    ) -> list[list[torch.Tensor]]:
        return super()._state_lists(group, states) if group["state_precision"] == "full" else []

    def _update(self, group_index: int, group: dict[str, Any], lists: GroupLists) -> None:
        if group["state_precision"] != "full":
            low_memory_step = fused_low_memory_ranger if group["fused"] else low_memory_ranger
            low_memory_step(
                lists.params,
                lists.grads,
                lists.state_dicts,
                lists.steps,
                **step_hyperparameters(group),
            )
            return
        # The default path keeps the wave layout of each group between steps (see
        # `_multi_tensor._cached_plan`, which checks that it still fits before using it).
        plan_caches = self.__dict__.setdefault("_plan_caches", {})
        exp_avgs, exp_avg_sqs, slow_params = lists.states
        ranger(
            lists.params,
            lists.grads,
            exp_avgs,
            exp_avg_sqs,
            slow_params,
            lists.steps,
            foreach=group["foreach"],
            fused=group["fused"],
            plan_cache=plan_caches.setdefault(group_index, {}),
            **step_hyperparameters(group),
        )


def check_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Raise a `ValueError` naming the first missing or out-of-range hyperparameter.

    ``where`` says which group, for messages about a loaded state dict."""
    missing = [key for key in REQUIRED_GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(f"{where}missing hyperparameter {missing[0]!r}")
    check_real("lr", group["lr"], low=0.0, where=where, tensor_ok=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        check_real(f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True, where=where)
    check_real("eps", group["eps"], low=0.0, low_open=True, where=where)
    check_real("weight_decay", group["weight_decay"], low=0.0, where=where)
    check_lookahead_args(group["lookahead_k"], group["lookahead_alpha"], where=where)
    check_real(
        "rectify_threshold",
        group.get("rectify_threshold", 5.0),
        low=4.0,
        where=where,
        why="the rectification term needs rho_t > 4",
    )
    for flag in ("use_gc", "gc_conv_only", "fused"):
        if not isinstance(group.get(flag, False), bool):
            raise ValueError(f"{where}Invalid {flag}: {group[flag]!r} (must be True or False)")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"{where}Invalid foreach: {group['foreach']!r} (must be None or a bool)")
    check_state_precision(group.get("state_precision", "full"), where)


def check_state_precision(value: Any, where: str = "") -> None:
    if not isinstance(value, str) or value not in STATE_PRECISIONS:
        raise ValueError(
            f"{where}Invalid state_precision: {value!r} (must be one of {STATE_PRECISIONS})"
        )


def _single_tensor_ranger(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lookahead_k: int,
    lookahead_alpha: float,
    use_gc: bool,
    gc_conv_only: bool,
    rectify_threshold: float,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, slow, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, slow_params, steps
    ):
        work_dtype = exp_avg.dtype  # fp32 for bf16/fp16 params, else the param's dtype
        grad = grad.to(work_dtype)
        if use_gc:
            centralize_gradient(grad, gc_conv_only)
        fast = param if param.dtype == work_dtype else param.to(work_dtype)

        if weight_decay != 0:
            fast.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

        multiplier, adaptive = rectification(step, beta1, beta2, rectify_threshold)
        if adaptive:
            fast.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr * multiplier)
        else:
            fast.add_(exp_avg, alpha=-lr * multiplier)

        if step % lookahead_k == 0:
            slow.lerp_(fast, lookahead_alpha)
            fast.copy_(slow)
        if fast is not param:
            param.copy_(fast)


def ranger(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    foreach: bool | None = None,
    fused: bool = False,
    plan_cache: dict | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional Ranger: the fused step if asked for, else the multi-tensor path unless
    ``foreach=False``.

    ``steps`` are the parameters' step counts *after* this step's increment. ``plan_cache``
    lets the multi-tensor path keep its wave layout between calls (`Ranger.step` keeps one
    per param group).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params, steps)
    if fused:
        fused_ranger(*lists, **hyperparameters)
        return
    if foreach is None:
        # foreach kernels want plain strided tensors; DTensors dispatch them per shard.
        foreach = all(p.layout == torch.strided for p in params)
    if foreach:
        _multi_tensor_ranger(*lists, **hyperparameters, plan_cache=plan_cache)
    else:
        _single_tensor_ranger(*lists, **hyperparameters)
