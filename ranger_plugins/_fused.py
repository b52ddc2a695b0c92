"""The opt-in fused Ranger step (``Ranger(..., fused=True)``): one C++ call per step.

On CPU the C++ kernel of `_cpu_kernel` steps the params' own tensors (p, grad, m, v and the
slow weights) in one pass over memory, GC's row means included. Nothing is moved, viewed or
cached between steps: every step reads the params, gradients and state that exist at that
moment, so nothing a user does between steps (loading a state, replacing params, changing a
group's options or dtype) can leave it stale, and every tensor stays an ordinary tensor of its
own. Params the kernel cannot step (accelerators, tensor subclasses such as DTensors,
mismatched dtypes or strides), and all params where the kernel cannot be built, take the
default multi-tensor path, which computes the same values.

Unlike the default path, the fused step does not write the centralized gradient back into
``p.grad`` (that write would add a quarter to its memory traffic).
"""

from __future__ import annotations

import torch

from . import _cpu_kernel
from ._math import rectification
from ._multi_tensor import _multi_tensor_ranger
from ._state import PLAIN_TENSOR_TYPES

_NO_GC = 1 << 30  # a `gc_min_dim` no tensor exceeds


def fused_ranger(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_params: list[torch.Tensor],
    steps: list[int],
    **hyperparameters,
) -> None:
    """The fused step; same arguments as `_single_tensor_ranger`."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, slow_params, steps)
    kernel = _cpu_kernel.step_kernel() if _kernel_may_apply(params) else None
    if kernel is None:
        _multi_tensor_ranger(*lists, **hyperparameters)
        return
    not_stepped: list[int] = []
    for indices in _indices_by_step(steps):
        not_stepped += _kernel_step(kernel, lists, indices, **hyperparameters)
    if not_stepped:
        rest = [[values[i] for i in not_stepped] for values in lists]
        _multi_tensor_ranger(*rest, **hyperparameters)  # type: ignore[arg-type]


def _kernel_may_apply(params: list[torch.Tensor]) -> bool:
    # The kernel checks each param's tensors itself; tensor subclasses (DTensor) have no
    # storage to point it at, and accelerator params would only be handed back.
    return (
        bool(params)
        and params[0].device.type == "cpu"
        and all(type(param) in PLAIN_TENSOR_TYPES for param in params)
    )


def _indices_by_step(steps: list[int]) -> list[list[int] | range]:
    """Positions grouped by step count: the step decides the step size and the sync."""
    if steps.count(steps[0]) == len(steps):
        return [range(len(steps))]
    groups: dict[int, list[int]] = {}
    for index, step in enumerate(steps):
        groups.setdefault(step, []).append(index)
    return list(groups.values())


def _kernel_step(
    kernel,
    lists: tuple[list, ...],
    indices: list[int] | range,
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
) -> list[int]:
    """One kernel call on the params at ``indices`` (one step count); returns the positions
    (in the full lists) of the params it could not step."""
    params, grads, exp_avgs, exp_avg_sqs, slow_params, steps = (
        values if isinstance(indices, range) else [values[i] for i in indices] for values in lists
    )
    step = steps[0]
    multiplier, adaptive = rectification(step, beta1, beta2, rectify_threshold)
    hyperparameters = [
        1.0 - lr * weight_decay,  # decay
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        -lr * multiplier,  # the step size, negated
        lookahead_alpha,
    ]
    gc_min_dim = (3 if gc_conv_only else 1) if use_gc else _NO_GC
    sync = step % lookahead_k == 0
    not_stepped = kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        slow_params,
        hyperparameters,
        gc_min_dim,
        adaptive,
        sync,
    )
    return [indices[i] for i in not_stepped]
