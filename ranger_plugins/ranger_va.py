"""RangerVA: Ranger's moments and Lookahead with a softplus-calibrated adaptive learning rate
("ranger913A"), as a `torch.optim.Optimizer`.

Layout follows torch.optim and `ranger.py`: the class (its hyperparameters, state keys and
dispatch; the optimizer contract lives in `_base.LookaheadOptimizer`), then
`_single_tensor_ranger_va` (the readable ground truth), `_multi_tensor_ranger_va`
(`torch._foreach_*`, grouped by device, dtype and step; the default) and the functional
`ranger_va` that picks one of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._base import GroupLists, LookaheadOptimizer, ParamsT
from ._math import centralize_gradient, centralize_gradients
from ._multi_tensor import bucket_indices, foreach_waves
from ._state import as_float, check_flags, check_lookahead_args, check_pair, check_real
from .lookahead import copy_into, lookahead_sync_

__all__ = ["RangerVA", "ranger_va"]

REQUIRED_GROUP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "amsgrad",
    "transformer",
    "smooth",
    "grad_transformer",
    "use_gc",
)
OPTIONAL_GROUP_DEFAULTS: dict[str, Any] = {"foreach": None, "gc_conv_only": False}
TRANSFORMERS = ("softplus", "none")
GRAD_TRANSFORMERS = ("square", "abs")


class RangerVA(LookaheadOptimizer):
    r"""RangerVA: Adam moments with a softplus-calibrated denominator ("Calibrating the
    adaptive learning rate to improve convergence of ADAM", Tong, Liang and Bi, 2019,
    arXiv:1908.00700) and Lookahead.

    Follows the original author's ``ranger913A.py``, version 9.13.19A
    (lessw2020/Ranger-Deep-Learning-Optimizer ``ranger/ranger913A.py``, commits 6fde475 and
    b14eba2, whose maths are the same; ``pytorch_ranger`` 0.1.1 ships it, and
    ``torch_optimizer`` 0.3.0 re-exports it as ``torch_optimizer.RangerVA``): its defaults
    and its maths, including what is not Ranger's (no RAdam rectification, AMSGrad's
    maximum, and two updates of :math:`v` per step).

    For each parameter with a gradient, with its own step count :math:`t` (from 1):

    .. math::
        g &\leftarrow g - \operatorname{mean}_{\dim \ge 1}(g)
            \quad\text{(GC, only if use\_gc and } g \text{ has more than one dim)} \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \qquad
        m \leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, \tau(g), \qquad
            \tau(g) = g^2 \text{ (grad\_transformer="square") or } |g| \text{ ("abs")} \\
        \hat v &\leftarrow \max(\hat v, v) \text{ if amsgrad}, \qquad
        d = \hat v \text{ if amsgrad else } v, \qquad
        d \leftarrow \sqrt{d} \text{ if "square"} \\
        \theta &\leftarrow \theta\,(1 - \gamma\lambda) \quad\text{(decoupled weight decay)} \\
        s_t &= \gamma\, \sqrt{1-\beta_2^t} \,/\, (1-\beta_1^t) \\
        \theta &\leftarrow \theta - s_t\, \frac{m}{\operatorname{softplus}_\sigma(d)},
            \quad \operatorname{softplus}_\sigma(x) = \tfrac{1}{\sigma}\log(1 + e^{\sigma x})
            \quad\text{(transformer="softplus")} \\
        \theta &\leftarrow \theta - s_t\, \frac{m}{d + \epsilon}
            \quad\text{(transformer="none")} \\
        \text{if } t \bmod k = 0:&\quad \phi \leftarrow \phi + \alpha(\theta - \phi),
            \quad \theta \leftarrow \phi \quad\text{(Lookahead; } \phi = \theta_0
            \text{ at the first step)}

    As in the original, :math:`v` is updated twice per step (Ranger's update, then the
    calibrated one): with "square" that is one moving average of :math:`g^2` with decay
    :math:`\beta_2^2`, bias-corrected with :math:`\beta_2^t`. The softplus
    (:math:`\sigma` = ``smooth``; torch's ``softplus`` with its default threshold of 20)
    keeps the denominator at least :math:`\log 2/\sigma`, so ``eps`` is used only by
    ``transformer="none"``.

    Args:
        params: parameters or param groups. Every hyperparameter below can be set per group
            and is read from the group at each step (so LR schedulers drive it).
        lr: learning rate (>= 0).
        betas: (beta1, beta2) decays of the moments, each in [0, 1).
        eps: added to the denominator with ``transformer="none"`` (> 0).
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * weight_decay``
            before the update (>= 0).
        k: Lookahead sync period in steps (int >= 1). Stored in groups as ``lookahead_k``.
        alpha: Lookahead slow step in (0, 1]. Stored in groups as ``lookahead_alpha``.
        amsgrad: normalize by the running maximum of :math:`v` (AMSGrad).
        transformer: ``"softplus"`` (the calibrated denominator) or ``"none"`` (Adam's
            ``d + eps``).
        smooth: the softplus sharpness :math:`\sigma` (> 0).
        grad_transformer: ``"square"`` (moments of :math:`g^2`, square-rooted) or ``"abs"``
            (of :math:`|g|`, not square-rooted).
        use_gc: Gradient Centralization on gradients with more than one dimension (not in
            the original; off by default).
        gc_conv_only: restrict GC to gradients with more than three dimensions.
        foreach: use the multi-tensor implementation (default: yes, unless a param is not a
            strided tensor). It gives the same bits as the single-tensor one.

    Notes:
        * State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq``,
          ``max_exp_avg_sq`` (kept, at zero, also while ``amsgrad`` is off, so that it can
          be switched per group) and ``slow_param`` (the Lookahead slow weights, taken from
          the parameter at its first step). ``state_dict()`` holds only tensors and plain
          values and loads with ``torch.load(weights_only=True)``.
        * Differences from the original and ``torch_optimizer.RangerVA``:

          - ``transformer="none"``: the original steps by
            :math:`\gamma s_t\, m/(\sqrt{v} + \epsilon)` (lr twice, and neither amsgrad
            nor grad_transformer applied); here it is :math:`s_t\, m/(d + \epsilon)`, the
            same denominator as the softplus branch without the softplus.
          - State and arithmetic are in the param's dtype for float32/float64 params, in
            fp32 for bf16/fp16 ones (the original computes in fp32 for every dtype, float64
            included, and keeps ``max_exp_avg_sq`` and the slow weights in the param's
            dtype).
          - The closure is evaluated (the original ignores it); every hyperparameter, alpha
            included, is read from the param group (the original keeps alpha on the
            optimizer); the unused ``n_sma_threshhold`` is not an argument (RangerVA has
            no rectification); values are checked (transformer, grad_transformer, smooth
            were not), and ``lr = 0`` is allowed (for schedules).
          - Weight decay multiplies by ``1 - lr * weight_decay`` (the original adds
            ``-lr * weight_decay * p``: the same up to rounding).

          Like the original, each param counts its own steps, and its slow weights start
          from its value at its first step.
        * Gradient Centralization (``use_gc``) is applied to ``p.grad`` in place, as in
          `Ranger`.
        * Parameters without a gradient are skipped: neither they nor their step count or
          Lookahead schedule change.
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
        amsgrad: bool = True,
        transformer: str = "softplus",
        smooth: float = 50.0,
        grad_transformer: str = "square",
        use_gc: bool = False,
        gc_conv_only: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            lookahead_k=k,
            lookahead_alpha=alpha,
            amsgrad=amsgrad,
            transformer=transformer,
            smooth=smooth,
            grad_transformer=grad_transformer,
            use_gc=use_gc,
            gc_conv_only=gc_conv_only,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "slow_param")
    required_group_keys = REQUIRED_GROUP_KEYS
    optional_group_defaults = OPTIONAL_GROUP_DEFAULTS
    foreign_group_keys = {
        "n_sma_threshhold": "torch_optimizer.RangerVA or the original ranger913A.py",
        "rectify_threshold": "ranger_plugins.Ranger",
    }

    @classmethod
    def check_group(cls, group: dict[str, Any], where: str = "") -> None:
        missing = [key for key in REQUIRED_GROUP_KEYS if key not in group]
        if missing:
            raise ValueError(f"{where}missing hyperparameter {missing[0]!r}")
        check_real("lr", group["lr"], low=0.0, where=where, tensor_ok=True)
        check_pair("betas", group["betas"], where, high=1.0, high_open=True)
        check_real("eps", group["eps"], low=0.0, low_open=True, where=where)
        check_real("weight_decay", group["weight_decay"], low=0.0, where=where)
        check_lookahead_args(group["lookahead_k"], group["lookahead_alpha"], where=where)
        check_real("smooth", group["smooth"], low=0.0, low_open=True, high_open=True, where=where)
        for key, choices in (
            ("transformer", TRANSFORMERS),
            ("grad_transformer", GRAD_TRANSFORMERS),
        ):
            if group[key] not in choices:
                raise ValueError(f"{where}Invalid {key}: {group[key]!r} (must be one of {choices})")
        check_flags(group, ("amsgrad", "use_gc", "gc_conv_only"), where)

    def _update(self, group_index: int, group: dict[str, Any], lists: GroupLists) -> None:
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slow_params = lists.states
        ranger_va(
            lists.params,
            lists.grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            slow_params,
            lists.steps,
            foreach=group["foreach"],
            lr=as_float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            lookahead_k=group["lookahead_k"],
            lookahead_alpha=group["lookahead_alpha"],
            amsgrad=group["amsgrad"],
            transformer=group["transformer"],
            smooth=group["smooth"],
            grad_transformer=group["grad_transformer"],
            use_gc=group["use_gc"],
            gc_conv_only=group["gc_conv_only"],
        )


def _step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """s_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t), in the original's order of operations."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _denominator(
    second_moment: torch.Tensor, transformer: str, smooth: float, grad_transformer: str, eps: float
) -> torch.Tensor:
    """softplus(d) or d + eps, with d = sqrt(second_moment) for "square" (a new tensor)."""
    calibrated = second_moment.sqrt() if grad_transformer == "square" else second_moment
    if transformer == "softplus":
        return F.softplus(calibrated, beta=smooth)
    return calibrated.add(eps)


def _single_tensor_ranger_va(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
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
    amsgrad: bool,
    transformer: str,
    smooth: float,
    grad_transformer: str,
    use_gc: bool,
    gc_conv_only: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, slow, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slow_params, steps
    ):
        work_dtype = exp_avg.dtype  # fp32 for bf16/fp16 params, else the param's dtype
        grad = grad.to(work_dtype)
        if use_gc:
            centralize_gradient(grad, gc_conv_only)
        fast = param if param.dtype == work_dtype else param.to(work_dtype)

        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        transformed = grad.mul(grad) if grad_transformer == "square" else grad.abs()
        exp_avg_sq.mul_(beta2).add_(transformed, alpha=1.0 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denominator = _denominator(
            max_exp_avg_sq if amsgrad else exp_avg_sq, transformer, smooth, grad_transformer, eps
        )

        if weight_decay != 0:
            fast.mul_(1.0 - lr * weight_decay)
        fast.addcdiv_(exp_avg, denominator, value=-_step_size(lr, beta1, beta2, step))

        lookahead_sync_([fast], [slow], [step], lookahead_k, lookahead_alpha, foreach=False)
        if fast is not param:
            param.copy_(fast)


def _multi_tensor_ranger_va(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
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
    amsgrad: bool,
    transformer: str,
    smooth: float,
    grad_transformer: str,
    use_gc: bool,
    gc_conv_only: bool,
) -> None:
    """`_single_tensor_ranger_va` with `torch._foreach_*` ops: the same operations in the
    same order on every element, one bucket of params (device, dtype, step) at a time. The
    softplus has no foreach form: it runs per tensor, as in the single-tensor path."""
    for (_, _, step), positions in bucket_indices(params, steps):
        indices = range(len(params)) if positions is None else positions
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
        state = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slow_params)
        bucket = [fast, bucket_grads, *([values[i] for i in indices] for values in state)]
        for wave_fast, wave_grads, wave_m, wave_v, wave_max_v, wave_slow in foreach_waves(bucket):
            _va_wave_step(
                wave_fast,
                wave_grads,
                wave_m,
                wave_v,
                wave_max_v,
                wave_slow,
                step,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                lookahead_k=lookahead_k,
                lookahead_alpha=lookahead_alpha,
                amsgrad=amsgrad,
                transformer=transformer,
                smooth=smooth,
                grad_transformer=grad_transformer,
            )
        if fast is not bucket_params:
            copy_into(bucket_params, fast)


def _va_wave_step(
    fast: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    slow: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lookahead_k: int,
    lookahead_alpha: float,
    amsgrad: bool,
    transformer: str,
    smooth: float,
    grad_transformer: str,
) -> None:
    """All of one wave's step (see `foreach_waves`), in `_single_tensor_ranger_va`'s order."""
    second_moment = _va_moments(
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else None,
        beta1,
        beta2,
        grad_transformer,
    )
    if grad_transformer == "square":
        second_moment = list(torch._foreach_sqrt(second_moment))
    if transformer == "softplus":
        denominators = [F.softplus(d, beta=smooth) for d in second_moment]
    else:
        denominators = list(torch._foreach_add(second_moment, eps))
    if weight_decay != 0:
        torch._foreach_mul_(fast, 1.0 - lr * weight_decay)
    step_size = _step_size(lr, beta1, beta2, step)
    torch._foreach_addcdiv_(fast, exp_avgs, denominators, value=-step_size)
    lookahead_sync_(fast, slow, [step] * len(fast), lookahead_k, lookahead_alpha, foreach=True)


def _va_moments(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    beta1: float,
    beta2: float,
    grad_transformer: str,
) -> list[torch.Tensor]:
    """One bucket's moment updates; returns the second moments the denominator uses (the
    running maxima with amsgrad, not to be changed)."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    if grad_transformer == "square":
        transformed = torch._foreach_mul(grads, grads)
    else:
        transformed = torch._foreach_abs(grads)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, transformed, alpha=1.0 - beta2)
    if max_exp_avg_sqs is None:
        return exp_avg_sqs
    torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
    return max_exp_avg_sqs


def ranger_va(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    foreach: bool | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional RangerVA: the multi-tensor path unless ``foreach=False``.

    ``steps`` are the parameters' step counts *after* this step's increment. The
    hyperparameters are ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``,
    ``lookahead_k``, ``lookahead_alpha``, ``amsgrad``, ``transformer``, ``smooth``,
    ``grad_transformer``, ``use_gc`` and ``gc_conv_only``.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slow_params, steps)
    if foreach is None:
        # foreach kernels want plain strided tensors; DTensors dispatch them per shard.
        foreach = all(p.layout == torch.strided for p in params)
    implementation = _multi_tensor_ranger_va if foreach else _single_tensor_ranger_va
    implementation(*lists, **hyperparameters)
