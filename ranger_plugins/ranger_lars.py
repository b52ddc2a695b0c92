"""RangerLars ("Over9000"): RAdam + LARS's layer-wise trust ratio + Lookahead.

The original is Mikhail Grankin's mgrankin/over9000 (the fastai forums' Imagenette and
Imagewoof leaderboard runs): ``rangerlars.py`` / ``over9000.py`` wrap ``ralamb.py``'s
``Ralamb`` (RAdam + LARS, after Federico Lois' gist) in ``lookahead.py``'s ``Lookahead``.
The maths and defaults here are those of ``ralamb.py`` as of commit ffcafbc (the version
whose trust ratio takes the norm of the weights after the RAdam step) and of
``rangerlars.py`` as of commit b90c600 (k = 6, alpha = 0.5). LARS itself: You, Gitman and
Ginsburg, "Large Batch Training of Convolutional Networks" (2017).

Layout follows torch.optim: the class (its hyperparameters, state keys and dispatch; the
optimizer contract lives in `_base.LookaheadOptimizer`), `_single_tensor_ranger_lars` (the
readable ground truth), `_multi_tensor_ranger_lars` (``torch._foreach_*``, grouped by device,
dtype and step; the default), and the functional `ranger_lars` that picks one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._base import GroupLists, LookaheadOptimizer, ParamsT
from ._math import centralize_gradient, centralize_gradients, rectification
from ._multi_tensor import bucket_indices, pick
from ._state import (
    PLAIN_TENSOR_TYPES,
    check_flags,
    check_lookahead_args,
    check_real,
    step_arguments,
)
from .lookahead import copy_into, lookahead_sync_

__all__ = ["RangerLars", "ranger_lars"]

#: The weight norm in the trust ratio is clamped to [0, 10], as in ``ralamb.py``.
MAX_WEIGHT_NORM = 10.0
# ``ralamb.py`` takes the rectified step when rho_t >= 5; `rectification` tests
# rho_t > threshold, so the threshold is the largest float below 5.
_RECTIFY_THRESHOLD = math.nextafter(5.0, -math.inf)

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
    "gc_conv_only",
)
OPTIONAL_GROUP_DEFAULTS: dict[str, Any] = {"foreach": None}


class RangerLars(LookaheadOptimizer):
    r"""RangerLars ("Over9000"): RAdam with a LARS-style layer-wise trust ratio, and
    Lookahead.

    For each parameter with a gradient, with its own step count :math:`t` (from 1), learning
    rate :math:`\gamma`, decoupled weight decay :math:`\lambda` and slow weights :math:`\phi`:

    .. math::
        g &\leftarrow g - \operatorname{mean}_{\dim \ge 1}(g)
            \quad\text{(GC, only if use\_gc; not in the original)} \\
        w &= \min(\lVert\theta\rVert_2,\ 10)
            \quad\text{(the weight norm, before weight decay)} \\
        \theta &\leftarrow \theta\,(1 - \gamma\lambda)
            \quad\text{(decoupled weight decay)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \rho_\infty &= \tfrac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t} \\
        u &= \tfrac{r_t \sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\tfrac{m}{\sqrt{v} + \epsilon}
            \quad\text{if } \rho_t \ge 5,\quad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
        u &= \tfrac{m}{1-\beta_1^t}
            \quad\text{otherwise (momentum SGD: RAdam's warmup)} \\
        q &= \lVert\theta - \gamma u\rVert_2, \qquad
        \tau = w / q \quad (\tau = 1 \text{ if } w = 0 \text{ or } q = 0)
            \quad\text{(the trust ratio)} \\
        \theta &\leftarrow \theta - \gamma\,\tau\,u \\
        \text{if } t \bmod k = 0:&\quad \phi \leftarrow \phi + \alpha(\theta - \phi),
            \quad \theta \leftarrow \phi \quad\text{(Lookahead; } \phi = \theta_0 \text{ at the first step)}

    The original's quirks, kept (they are what its leaderboard runs used):

    * The trust ratio divides the weight norm by :math:`q`, the norm of the *weights after
      the RAdam step* (``ralamb.py`` clones the weights and applies the step to the clone),
      not by the norm of the step as in LARS (:math:`\lVert\theta\rVert /
      \lVert\nabla L + \lambda\theta\rVert`). So :math:`\tau \approx 1` while
      :math:`\lVert\theta\rVert \le 10` and the step is small next to the weights, and
      :math:`\tau \approx 10 / \lVert\theta\rVert` for larger weights: it mostly damps the
      steps of large-norm layers.
    * The weight norm is clamped to at most 10 and taken before weight decay; :math:`q` is
      taken after it. Weight decay is decoupled (AdamW-style), applied before the step, and
      is not scaled by the trust ratio.
    * Steps whose :math:`\rho_t` is exactly 5 are rectified (``>=``; Ranger uses ``>``).

    Where the contract of this package makes us differ from the original:

    * Slow weights start at each parameter's value at its first step (:math:`\theta_0`), and
      each parameter counts its own Lookahead steps (only steps with a gradient count). The
      original's Lookahead (timm's, in over9000's ``lookahead.py``) counts steps per group
      and copies the slow weights at the first sync, making that sync a no-op.
    * The step size is computed per parameter from its group's betas; ``ralamb.py`` caches it
      by step number in one buffer shared by all groups (a group with other betas got the
      first group's step size).
    * ``ralamb.py`` also stores ``weight_norm``, ``adam_norm`` and ``trust_ratio`` in the state
      as diagnostics; they are not kept (nothing reads them).
    * bf16/fp16 parameters: the weight norm is taken in fp32 (``ralamb.py`` takes it in the
      parameter's dtype).

    Args:
        params: parameters or param groups. Every hyperparameter below can be set per group
            and is read from the group at each step (so LR schedulers drive it).
        lr: learning rate (>= 0).
        betas: (beta1, beta2) decays of the first and second moments, each in [0, 1).
        eps: added to sqrt(v) in the denominator (> 0).
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * weight_decay``
            before the step (>= 0).
        k: Lookahead sync period in steps (int >= 1). Stored in groups as ``lookahead_k``.
        alpha: Lookahead slow step in (0, 1]. Stored in groups as ``lookahead_alpha`` (not
            ``alpha``, which fastai's hyperparameter map sends to beta2).
        use_gc: Gradient Centralization on gradients with more than one dimension (off, as in
            the original, which has none). Applied to ``p.grad`` in place, as in `Ranger`.
        gc_conv_only: restrict GC to gradients with more than three dimensions.
        foreach: use the multi-tensor implementation (default: yes, unless a param is not a
            plain tensor, e.g. a DTensor).

    Notes:
        * State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` and
          ``slow_param``, so ``state_dict()`` loads with ``torch.load(weights_only=True)``.
        * bf16/fp16 parameters: the arithmetic is done in fp32, and the moments and slow
          weights are kept in fp32; the parameter receives the rounded result.
        * The trust ratio is computed on the device (no host synchronization).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
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
            use_gc=use_gc,
            gc_conv_only=gc_conv_only,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    state_keys = ("exp_avg", "exp_avg_sq", "slow_param")
    required_group_keys = REQUIRED_GROUP_KEYS
    optional_group_defaults = OPTIONAL_GROUP_DEFAULTS
    foreign_group_keys = {
        "lookahead_step": "over9000's RangerLars (timm's Lookahead around Ralamb)",
        "step_counter": "over9000's first RangerLars (lonePatient's Lookahead around Ralamb)",
    }

    @classmethod
    def check_group(cls, group: dict[str, Any], where: str = "") -> None:
        check_hyperparameters(group, where)

    def _update(self, group_index: int, group: dict[str, Any], lists: GroupLists) -> None:
        exp_avgs, exp_avg_sqs, slow_params = lists.states
        ranger_lars(
            lists.params,
            lists.grads,
            exp_avgs,
            exp_avg_sqs,
            slow_params,
            lists.steps,
            foreach=group["foreach"],
            **step_hyperparameters(group),
        )


def check_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Raise a `ValueError` naming the first missing or out-of-range hyperparameter.

    ``where`` says which group, for messages about a loaded state dict."""
    missing = [key for key in REQUIRED_GROUP_KEYS if key not in group]
    if missing:
        raise ValueError(f"{where}missing hyperparameter {missing[0]!r}")
    check_real("lr", group["lr"], low=0.0, where=where, tensor_ok=True)
    _check_betas(group["betas"], where)
    check_real("eps", group["eps"], low=0.0, low_open=True, where=where)
    check_real("weight_decay", group["weight_decay"], low=0.0, where=where)
    check_lookahead_args(group["lookahead_k"], group["lookahead_alpha"], where=where)
    check_flags(group, ("use_gc", "gc_conv_only"), where)


def _check_betas(betas: Any, where: str) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        check_real(f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True, where=where)


def step_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters as the step functions take them."""
    return step_arguments(group, _STEP_KEYS)


_STEP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
    "gc_conv_only",
)


def _l2_norm(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm of ``tensor`` as a 0-dim tensor. Taken with ``torch._foreach_norm`` (of a
    one-tensor list) so that it has the same bits as the multi-tensor path's norms: on CUDA
    ``_foreach_norm`` has its own kernel, which may round differently from
    ``torch.linalg.vector_norm`` (on CPU the two are the same)."""
    return torch._foreach_norm([tensor])[0]


def trust_ratio(weight_norms: torch.Tensor, stepped_norms: torch.Tensor) -> torch.Tensor:
    """The original's trust ratio: ``weight_norms / stepped_norms`` (the clamped weight norms
    over the norms of the weights after the untrusted step), elementwise, and 1 where either
    norm is 0 (no NaN or inf: ``torch.where`` drops the division's value there)."""
    undefined = (weight_norms == 0) | (stepped_norms == 0)
    return torch.where(undefined, 1.0, weight_norms / stepped_norms)


def _single_tensor_ranger_lars(
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
) -> None:
    for param, grad, exp_avg, exp_avg_sq, slow, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, slow_params, steps
    ):
        work_dtype = exp_avg.dtype  # fp32 for bf16/fp16 params, else the param's dtype
        grad = grad.to(work_dtype)
        if use_gc:
            centralize_gradient(grad, gc_conv_only)
        fast = param if param.dtype == work_dtype else param.to(work_dtype)

        weight_norm = _l2_norm(fast).clamp_max_(MAX_WEIGHT_NORM)  # before weight decay
        if weight_decay != 0:
            fast.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

        multiplier, adaptive = rectification(step, beta1, beta2, _RECTIFY_THRESHOLD)
        update = exp_avg / exp_avg_sq.sqrt().add_(eps) if adaptive else exp_avg
        step_size = -lr * multiplier
        # The original's trust ratio: the weight norm over the norm of the weights after the
        # (untrusted) RAdam step.
        trust = trust_ratio(weight_norm, _l2_norm(fast.add(update, alpha=step_size)))
        fast.add_(update * (trust * step_size))

        lookahead_sync_([fast], [slow], [step], lookahead_k, lookahead_alpha, foreach=False)
        if fast is not param:
            param.copy_(fast)


class _Bucket(NamedTuple):
    """Params of one device, dtype and step count, with their gradients and state."""

    step: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    slow_params: list[torch.Tensor]


def _buckets(params, grads, exp_avgs, exp_avg_sqs, slow_params, steps) -> list[_Bucket]:
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params)
    return [
        _Bucket(kind[2], *(pick(values, positions) for values in lists))
        for kind, positions in bucket_indices(params, steps)
    ]


def _multi_tensor_ranger_lars(
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
) -> None:
    """`_single_tensor_ranger_lars` with ``torch._foreach_*``: every element goes through the
    same operations in the same order, so the two give the same bits."""
    for bucket in _buckets(params, grads, exp_avgs, exp_avg_sqs, slow_params, steps):
        work_dtype = bucket.exp_avgs[0].dtype
        fast, grads_ = bucket.params, bucket.grads
        if fast[0].dtype != work_dtype:  # bf16/fp16: work on fp32 copies
            fast = [p.to(work_dtype) for p in fast]
            grads_ = [g.to(work_dtype) for g in grads_]
        if use_gc:
            centralize_gradients(grads_, gc_conv_only)

        weight_norms = torch.stack(torch._foreach_norm(fast)).clamp_max_(MAX_WEIGHT_NORM)
        if weight_decay != 0:
            torch._foreach_mul_(fast, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(bucket.exp_avgs, grads_, 1.0 - beta1)
        torch._foreach_mul_(bucket.exp_avg_sqs, beta2)
        torch._foreach_addcmul_(bucket.exp_avg_sqs, grads_, grads_, 1.0 - beta2)

        multiplier, adaptive = rectification(bucket.step, beta1, beta2, _RECTIFY_THRESHOLD)
        updates = _updates(bucket.exp_avgs, bucket.exp_avg_sqs, eps, adaptive)
        step_size = -lr * multiplier
        _trusted_step_(fast, updates, weight_norms, step_size)

        steps_ = [bucket.step] * len(fast)
        lookahead_sync_(
            fast, bucket.slow_params, steps_, lookahead_k, lookahead_alpha, foreach=True
        )
        if fast is not bucket.params:
            copy_into(bucket.params, fast)


def _updates(
    exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], eps: float, adaptive: bool
) -> list[torch.Tensor]:
    """m / (sqrt(v) + eps) for a rectified step, else m itself (not to be written to)."""
    if not adaptive:
        return exp_avgs
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    return list(torch._foreach_div(exp_avgs, denominators))


def _trusted_step_(
    fast: list[torch.Tensor],
    updates: list[torch.Tensor],
    weight_norms: torch.Tensor,
    step_size: float,
) -> None:
    """theta += step_size * trust * update, the trust ratio taken against the weights after
    the untrusted step theta + step_size * update."""
    stepped_norms = torch.stack(
        torch._foreach_norm(torch._foreach_add(fast, updates, alpha=step_size))
    )
    scales = trust_ratio(weight_norms, stepped_norms) * step_size
    torch._foreach_add_(fast, torch._foreach_mul(updates, list(scales.unbind())))


def ranger_lars(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    *,
    foreach: bool | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional RangerLars: the multi-tensor path unless ``foreach=False`` (or, with
    ``foreach=None``, unless a param is not a plain tensor).

    ``steps`` are the parameters' step counts *after* this step's increment; the
    hyperparameters are those `step_hyperparameters` gives.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params, steps)
    if foreach is None:
        foreach = all(type(p) in PLAIN_TENSOR_TYPES for p in params)
    if foreach:
        _multi_tensor_ranger_lars(*lists, **hyperparameters)
    else:
        _single_tensor_ranger_lars(*lists, **hyperparameters)
