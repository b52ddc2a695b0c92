"""Ranger: RAdam + Lookahead + Gradient Centralization, as a `torch.optim.Optimizer`.

Layout follows torch.optim: the class (thin: validation, lazy state, dispatch), then
`_single_tensor_ranger` (the readable ground truth), then the functional `ranger` that picks
an implementation. The fast paths live beside it: `_multi_tensor.py` (`torch._foreach_*`,
grouped by device, dtype and step; the default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ._fused import fused_step
from ._math import centralize_gradient, rectification, step_hyperparameters
from ._multi_tensor import _multi_tensor_ranger
from ._state import check_lookahead_args, load_state_dict_safely, state_dtype
from .lookahead import LookaheadControls

__all__ = ["Ranger", "centralize_gradient", "rectification"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class Ranger(LookaheadControls, Optimizer):
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
        fused: the opt-in fused step (`ranger_plugins._fused`): parameters, gradients and
            state move into flat buffers per device and dtype (``param.data``, ``param.grad``
            and ``state[param]`` become views into them) and one compiled kernel updates
            them. Same results as the default path up to rounding; the first steps compile.
        foreach: use the multi-tensor implementation (default: yes, unless a param is not a
            strided tensor).

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
        )
        check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the merged group before the base class appends it, so a bad group
        # leaves the optimizer as it was.
        check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups pickled by an older version get the flags added since.
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", False)
            group.setdefault("gc_conv_only", False)
            group.setdefault("rectify_threshold", 5.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; a mismatched one raises and leaves the optimizer unchanged."""
        for group in state_dict.get("param_groups", []):
            check_hyperparameters({**self.defaults, **group})
        load_state_dict_safely(self, state_dict, super().load_state_dict)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        slow_params: list[torch.Tensor],
        steps: list[int],
    ) -> None:
        with_grad = [p for p in group["params"] if p.grad is not None]
        if not with_grad:
            return
        grads += [p.grad for p in with_grad]
        # Check everything before touching any state, so an error changes nothing.
        if any(grad.is_sparse for grad in grads):
            raise RuntimeError("Ranger does not support sparse gradients")
        if any(dtype.is_complex for dtype in {p.dtype for p in with_grad}):
            raise RuntimeError(
                "Ranger does not support complex parameters; optimize "
                "torch.view_as_real(param) instead"
            )
        if group["use_gc"]:  # also 1-D params: FSDP1 flattens every param to 1-D
            # The check looks at marks a param keeps for life: skip the params already checked.
            checked = self._gc_checked_params
            for param in with_grad:
                if id(param) not in checked:
                    _check_gc_supported(param)
            checked.update(map(id, with_grad))
        states = [self.state[param] for param in with_grad]
        for param, state in zip(with_grad, states):
            if not state:
                dtype = state_dtype(param)
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(
                    param, dtype=dtype, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    param, dtype=dtype, memory_format=torch.preserve_format
                )
                state["slow_param"] = param.detach().to(dtype, copy=True)
        for state in states:
            state["step"] += 1
        # Comprehensions: a model of many small tensors pays this per tensor on every step.
        exp_avgs += [state["exp_avg"] for state in states]
        exp_avg_sqs += [state["exp_avg_sq"] for state in states]
        slow_params += [state["slow_param"] for state in states]
        steps += [state["step"] for state in states]
        params += with_grad

    @property
    def _gc_checked_params(self) -> set[int]:
        # ids of params that passed `_check_gc_supported`; the groups keep them alive, so an id
        # is not reused while its param can still be stepped.
        checked = self.__dict__.get("_gc_checked")
        if checked is None:
            checked = self.__dict__["_gc_checked"] = set()
        return checked

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; evaluate ``closure`` first if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Wave layouts of the default path, per group, reused while the params stay the same.
        plan_caches = self.__dict__.setdefault("_plan_caches", {})
        for group_index, group in enumerate(self.param_groups):
            if group.get("fused") and fused_step(self, group_index, group):
                continue
            params, grads, exp_avgs, exp_avg_sqs, slow_params, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, slow_params, steps)
            if not params:
                continue
            ranger(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                slow_params,
                steps,
                foreach=group["foreach"],
                plan_cache=plan_caches.setdefault(group_index, {}),
                **step_hyperparameters(group),
            )
        return loss


def check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise a `ValueError` naming the first out-of-range hyperparameter."""
    lr = group["lr"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid lr: {lr!r} (must be >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{index}]: {beta!r} (must be in [0, 1))")
    if not group["eps"] > 0.0:
        raise ValueError(f"Invalid eps: {group['eps']!r} (must be > 0)")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r} (must be >= 0)")
    check_lookahead_args(group["lookahead_k"], group["lookahead_alpha"])
    if not group["rectify_threshold"] >= 4.0:
        raise ValueError(
            f"Invalid rectify_threshold: {group['rectify_threshold']!r} (must be >= 4, "
            "since the rectification term needs rho_t > 4)"
        )


def _check_gc_supported(param: torch.Tensor) -> None:
    """GC needs whole rows (dims 1..n) on each device; refuse shardings that split them."""
    # FSDP1 marks the params it flattens (its FlatParameter, and with use_orig_params the 1-D
    # views of it). Their type is plain `Parameter`, so look at the marks, not the type.
    if getattr(param, "_fsdp_flattened", False) or getattr(param, "_is_flat_param", False):
        raise RuntimeError(
            "Gradient Centralization cannot run on FSDP1's flattened 1-D parameters (it would "
            "be silently skipped). Use FSDP2 (fully_shard), or pass use_gc=False."
        )
    for placement in getattr(param, "placements", ()):  # DTensor
        if placement.is_shard() and placement.dim != 0:
            raise RuntimeError(
                f"Gradient Centralization needs each row of a parameter on one rank, but a "
                f"parameter of shape {tuple(param.shape)} is sharded on dim {placement.dim} "
                f"(placements {tuple(param.placements)}; only Shard(0) keeps rows whole). "
                "Shard on dim 0, or pass use_gc=False."
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
    plan_cache: dict | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional Ranger: picks the multi-tensor path unless told otherwise.

    ``steps`` are the parameters' step counts *after* this step's increment. ``plan_cache``
    lets the multi-tensor path keep its wave layout between calls (`Ranger.step` keeps one
    per param group).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params, steps)
    if foreach is None:
        # foreach kernels want plain strided tensors; DTensors dispatch them per shard.
        foreach = all(p.layout == torch.strided for p in params)
    if foreach:
        _multi_tensor_ranger(*lists, **hyperparameters, plan_cache=plan_cache)
    else:
        _single_tensor_ranger(*lists, **hyperparameters)
