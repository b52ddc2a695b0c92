"""RangerQH: QHAdam (quasi-hyperbolic Adam) with Lookahead, as a `torch.optim.Optimizer`.

Layout follows torch.optim and `ranger.py`: the class (its hyperparameters, state keys and
dispatch; the optimizer contract lives in `_base.LookaheadOptimizer`), then
`_single_tensor_ranger_qh` (the readable ground truth), `_multi_tensor_ranger_qh`
(`torch._foreach_*`, grouped by device, dtype, step and bias-correction weights; the default)
and the functional `ranger_qh` that picks one of them.
"""

from __future__ import annotations

from typing import Any

import torch

from ._base import GroupLists, LookaheadOptimizer, ParamsT
from ._math import centralize_gradient, centralize_gradients
from ._multi_tensor import bucket_indices, foreach_waves
from ._state import (
    check_flags,
    check_lookahead_args,
    check_pair,
    check_real,
    check_scalar_states,
    step_arguments,
)
from .lookahead import copy_into, lookahead_sync_

__all__ = ["RangerQH", "ranger_qh"]

REQUIRED_GROUP_KEYS = (
    "lr",
    "betas",
    "nus",
    "eps",
    "weight_decay",
    "decouple_weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
)
OPTIONAL_GROUP_DEFAULTS: dict[str, Any] = {"foreach": None, "gc_conv_only": False}
#: Per-param scalars beside the state tensors: QHAdam's running bias-correction weights.
WEIGHT_KEYS = ("beta1_weight", "beta2_weight")


class RangerQH(LookaheadOptimizer):
    r"""RangerQH: QHAdam (Ma and Yarats, "Quasi-hyperbolic momentum and Adam for deep
    learning", ICLR 2019) with Lookahead.

    Follows the original author's ``rangerqh.py`` (lessw2020/Ranger-Deep-Learning-Optimizer,
    commit 7fbbaec; ``pytorch_ranger`` 0.1.1 ships the same code, which ``torch_optimizer``
    0.3.0 re-exports as ``torch_optimizer.RangerQH``): its defaults and its maths, including
    QHAdam's running bias-correction weights.

    For each parameter with a gradient, with its own step count :math:`t` (from 1):

    .. math::
        g &\leftarrow g - \operatorname{mean}_{\dim \ge 1}(g)
            \quad\text{(GC, only if use\_gc and } g \text{ has more than one dim)} \\
        g &\leftarrow g + \lambda\theta \quad\text{(L2 weight decay), or }
            \theta \leftarrow \theta(1 - \gamma\lambda)
            \quad\text{(decoupled\_weight\_decay)} \\
        w_1 &\leftarrow 1 + \beta_1 w_1, \qquad w_2 \leftarrow 1 + \beta_2 w_2
            \qquad (w_1 = w_2 = 0 \text{ before the first step}) \\
        m &\leftarrow (1 - \tfrac{1}{w_1})\, m + \tfrac{1}{w_1}\, g, \qquad
        v \leftarrow (1 - \tfrac{1}{w_2})\, v + \tfrac{1}{w_2}\, g^2
            \quad\text{(bias-corrected moving averages)} \\
        \theta &\leftarrow \theta - \gamma\,
            \frac{(1-\nu_1)\, g + \nu_1 m}{\sqrt{(1-\nu_2)\, g^2 + \nu_2 v} + \epsilon}
            \quad\text{(QHAdam)} \\
        \text{if } t \bmod k = 0:&\quad \phi \leftarrow \phi + \alpha(\theta - \phi),
            \quad \theta \leftarrow \phi \quad\text{(Lookahead; } \phi = \theta_0
            \text{ at the first step)}

    With constant betas :math:`w = (1-\beta^t)/(1-\beta)`, so :math:`m` and :math:`v` are
    Adam's bias-corrected moments; with betas that change between steps (fastai's
    one-cycle schedules beta1) the running weights keep them normalized. ``nus = (1, 1)``
    is Adam (with Lookahead); ``nu1 = 0`` uses the raw gradient as the numerator.

    Args:
        params: parameters or param groups. Every hyperparameter below can be set per group
            and is read from the group at each step (so LR schedulers drive it).
        lr: learning rate (>= 0).
        betas: (beta1, beta2) decays of the moving averages, each in [0, 1).
        nus: (nu1, nu2) QHAdam's immediate discount factors, each in [0, 1]: the weight of
            the moving average against the current gradient (squared, for nu2).
        weight_decay: weight decay (>= 0), added to the gradient (L2) unless
            ``decouple_weight_decay``.
        k: Lookahead sync period in steps (int >= 1). Stored in groups as ``lookahead_k``.
        alpha: Lookahead slow step in (0, 1]. Stored in groups as ``lookahead_alpha``.
        decouple_weight_decay: apply weight decay as ``p *= 1 - lr * weight_decay`` before
            the update instead of adding it to the gradient.
        eps: added to the denominator (>= 0; 0 adds nothing, as in the original).
        use_gc: Gradient Centralization on gradients with more than one dimension (not in
            the original; off by default).
        gc_conv_only: restrict GC to gradients with more than three dimensions.
        foreach: use the multi-tensor implementation (default: yes, unless a param is not a
            strided tensor). It gives the same bits as the single-tensor one.

    Notes:
        * State per parameter: ``step`` (int), ``beta1_weight`` and ``beta2_weight``
          (floats), ``exp_avg``, ``exp_avg_sq`` and ``slow_param`` (the Lookahead slow
          weights, taken from the parameter at its first step). ``state_dict()`` holds only
          tensors and plain values and loads with ``torch.load(weights_only=True)``.
        * Differences from the original and ``torch_optimizer.RangerQH``, none of which
          changes the maths in float32/float64: every hyperparameter, k and alpha included,
          is read from the param group (the original keeps k and alpha on the optimizer);
          the closure runs under ``torch.enable_grad()``; L2 weight decay is added to a copy
          of the gradient (the original adds it to ``p.grad`` in place); bf16/fp16 params
          get fp32 state, slow weights and arithmetic (the original works in the param's
          dtype); the hyperparameters are checked (nus, the Lookahead k and alpha were not).
          Like the original, each param counts its own steps, and its slow weights start
          from its value at its first step.
        * Gradient Centralization (``use_gc``) is applied to ``p.grad`` in place, as in
          `Ranger`.
        * Parameters without a gradient are skipped: neither they nor their step counts,
          weights or Lookahead schedule change.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        nus: tuple[float, float] = (0.7, 1.0),
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        decouple_weight_decay: bool = False,
        eps: float = 1e-8,
        use_gc: bool = False,
        gc_conv_only: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            nus=tuple(nus) if isinstance(nus, list) else nus,
            eps=eps,
            weight_decay=weight_decay,
            decouple_weight_decay=decouple_weight_decay,
            lookahead_k=k,
            lookahead_alpha=alpha,
            use_gc=use_gc,
            gc_conv_only=gc_conv_only,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    state_keys = ("exp_avg", "exp_avg_sq", "slow_param")
    required_group_keys = REQUIRED_GROUP_KEYS
    optional_group_defaults = OPTIONAL_GROUP_DEFAULTS
    foreign_group_keys = {
        "nus": "torch_optimizer.RangerQH, the original rangerqh.py or QHAdam",
        "rectify_threshold": "ranger_plugins.Ranger",
    }

    @classmethod
    def check_group(cls, group: dict[str, Any], where: str = "") -> None:
        missing = [key for key in REQUIRED_GROUP_KEYS if key not in group]
        if missing:
            raise ValueError(f"{where}missing hyperparameter {missing[0]!r}")
        check_real("lr", group["lr"], low=0.0, where=where, tensor_ok=True)
        check_pair("betas", group["betas"], where, high=1.0, high_open=True)
        check_pair("nus", group["nus"], where, high=1.0)
        check_real("eps", group["eps"], low=0.0, where=where)
        check_real("weight_decay", group["weight_decay"], low=0.0, where=where)
        check_lookahead_args(group["lookahead_k"], group["lookahead_alpha"], where=where)
        check_flags(group, ("decouple_weight_decay", "use_gc", "gc_conv_only"), where)

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        super()._init_state(param, state, group)
        for key in WEIGHT_KEYS:
            state[key] = 0.0

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super()._check_state_dict(state_dict)
        check_scalar_states(self, state_dict, WEIGHT_KEYS)

    def _update(self, group_index: int, group: dict[str, Any], lists: GroupLists) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[param] for param in lists.params]
        for state in states:
            state["beta1_weight"] = 1.0 + beta1 * state["beta1_weight"]
            state["beta2_weight"] = 1.0 + beta2 * state["beta2_weight"]
        exp_avgs, exp_avg_sqs, slow_params = lists.states
        ranger_qh(
            lists.params,
            lists.grads,
            exp_avgs,
            exp_avg_sqs,
            slow_params,
            lists.steps,
            [state["beta1_weight"] for state in states],
            [state["beta2_weight"] for state in states],
            foreach=group["foreach"],
            **_step_hyperparameters(group),
        )


def _step_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return step_arguments(group, _STEP_KEYS)


_STEP_KEYS = (
    "lr",
    "nus",
    "eps",
    "weight_decay",
    "decouple_weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
    "gc_conv_only",
)


# ------------------------------------------------------------------------ implementations


def _single_tensor_ranger_qh(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    beta1_weights: list[float],
    beta2_weights: list[float],
    *,
    lr: float,
    nu1: float,
    nu2: float,
    eps: float,
    weight_decay: float,
    decouple_weight_decay: bool,
    lookahead_k: int,
    lookahead_alpha: float,
    use_gc: bool,
    gc_conv_only: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, slow, step, weight1, weight2 in zip(
        params, grads, exp_avgs, exp_avg_sqs, slow_params, steps, beta1_weights, beta2_weights
    ):
        work_dtype = exp_avg.dtype  # fp32 for bf16/fp16 params, else the param's dtype
        grad = grad.to(work_dtype)
        if use_gc:
            centralize_gradient(grad, gc_conv_only)
        fast = param if param.dtype == work_dtype else param.to(work_dtype)

        if weight_decay != 0 and decouple_weight_decay:
            fast.mul_(1.0 - lr * weight_decay)
        elif weight_decay != 0:
            grad = grad.add(fast, alpha=weight_decay)
        grad_sq = grad.mul(grad)

        beta1_adj, beta2_adj = 1.0 - 1.0 / weight1, 1.0 - 1.0 / weight2
        exp_avg.mul_(beta1_adj).add_(grad, alpha=1.0 - beta1_adj)
        exp_avg_sq.mul_(beta2_adj).add_(grad_sq, alpha=1.0 - beta2_adj)

        numerator = exp_avg.mul(nu1)
        if nu1 != 1.0:
            numerator.add_(grad, alpha=1.0 - nu1)
        denominator = exp_avg_sq.mul(nu2)
        if nu2 != 1.0:
            denominator.add_(grad_sq, alpha=1.0 - nu2)
        denominator.sqrt_()
        if eps != 0.0:
            denominator.add_(eps)
        fast.addcdiv_(numerator, denominator, value=-lr)

        lookahead_sync_([fast], [slow], [step], lookahead_k, lookahead_alpha, foreach=False)
        if fast is not param:
            param.copy_(fast)


def _multi_tensor_ranger_qh(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    beta1_weights: list[float],
    beta2_weights: list[float],
    *,
    lr: float,
    nu1: float,
    nu2: float,
    eps: float,
    weight_decay: float,
    decouple_weight_decay: bool,
    lookahead_k: int,
    lookahead_alpha: float,
    use_gc: bool,
    gc_conv_only: bool,
) -> None:
    """`_single_tensor_ranger_qh` with `torch._foreach_*` ops: the same operations in the
    same order on every element, one bucket of params at a time."""
    state = (exp_avgs, exp_avg_sqs, slow_params)
    # The running bias-correction weights decide the step too.
    for (_, _, step, weight1, weight2), indices in bucket_indices(
        params, steps, beta1_weights, beta2_weights
    ):
        assert indices is not None  # per-param keys: always listed
        bucket_grads = [grads[i].to(exp_avgs[i].dtype) for i in indices]
        if use_gc:
            centralize_gradients(bucket_grads, gc_conv_only)
        bucket_params = [params[i] for i in indices]
        work_dtype = exp_avgs[indices[0]].dtype
        fast = (
            bucket_params
            if bucket_params[0].dtype == work_dtype
            else [p.to(work_dtype) for p in bucket_params]
        )
        bucket = [fast, bucket_grads, *([values[i] for i in indices] for values in state)]
        for wave_fast, wave_grads, wave_exp_avgs, wave_exp_avg_sqs, wave_slow in foreach_waves(
            bucket
        ):
            if weight_decay != 0 and decouple_weight_decay:
                torch._foreach_mul_(wave_fast, 1.0 - lr * weight_decay)
            elif weight_decay != 0:
                wave_grads = list(torch._foreach_add(wave_grads, wave_fast, alpha=weight_decay))
            _qh_update(
                wave_fast,
                wave_grads,
                wave_exp_avgs,
                wave_exp_avg_sqs,
                (1.0 - 1.0 / weight1, 1.0 - 1.0 / weight2),
                lr=lr,
                nu1=nu1,
                nu2=nu2,
                eps=eps,
            )
            lookahead_sync_(
                wave_fast,
                wave_slow,
                [step] * len(wave_fast),
                lookahead_k,
                lookahead_alpha,
                foreach=True,
            )
        if fast is not bucket_params:
            copy_into(bucket_params, fast)


def _qh_update(
    fast: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta_adjs: tuple[float, float],
    *,
    lr: float,
    nu1: float,
    nu2: float,
    eps: float,
) -> None:
    """One bucket's moments and QHAdam update (after weight decay, before Lookahead)."""
    beta1_adj, beta2_adj = beta_adjs
    grad_sqs = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(exp_avgs, beta1_adj)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1_adj)
    torch._foreach_mul_(exp_avg_sqs, beta2_adj)
    torch._foreach_add_(exp_avg_sqs, grad_sqs, alpha=1.0 - beta2_adj)

    numerators = torch._foreach_mul(exp_avgs, nu1)
    if nu1 != 1.0:
        torch._foreach_add_(numerators, grads, alpha=1.0 - nu1)
    denominators = torch._foreach_mul(exp_avg_sqs, nu2)
    if nu2 != 1.0:
        torch._foreach_add_(denominators, grad_sqs, alpha=1.0 - nu2)
    torch._foreach_sqrt_(denominators)
    if eps != 0.0:
        torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(fast, numerators, denominators, value=-lr)


def ranger_qh(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    beta1_weights: list[float],
    beta2_weights: list[float],
    *,
    foreach: bool | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional RangerQH: the multi-tensor path unless ``foreach=False``.

    ``steps`` are the parameters' step counts and ``beta1_weights``/``beta2_weights`` their
    running weights (``w <- 1 + beta * w``), all *after* this step's update. The
    hyperparameters are ``lr``, ``nu1``, ``nu2``, ``eps``, ``weight_decay``,
    ``decouple_weight_decay``, ``lookahead_k``, ``lookahead_alpha``, ``use_gc`` and
    ``gc_conv_only`` (the betas enter only through the weights).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params, steps)
    if foreach is None:
        # foreach kernels want plain strided tensors; DTensors dispatch them per shard.
        foreach = all(p.layout == torch.strided for p in params)
    implementation = _multi_tensor_ranger_qh if foreach else _single_tensor_ranger_qh
    implementation(*lists, beta1_weights, beta2_weights, **hyperparameters)
