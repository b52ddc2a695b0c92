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

The low-memory state layouts (``state_precision="16bit"`` or ``"8bit"``, see `_low_memory`)
have their own kernel entry point: `fused_low_memory_ranger` steps the params it fits in one
C++ call per step count and the rest (the ``delta`` layout, fp64 params, accelerators,
mismatched strides) with `_low_memory.low_memory_ranger`, which computes the same bits.
"""

from __future__ import annotations

import torch

from . import _cpu_kernel
from ._low_memory import low_memory_ranger
from ._math import StepValues
from ._multi_tensor import _multi_tensor_ranger
from ._state import PLAIN_TENSOR_TYPES


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
    **hyperparameters,
) -> list[int]:
    """One kernel call on the params at ``indices`` (one step count); returns the positions
    (in the full lists) of the params it could not step."""
    params, grads, exp_avgs, exp_avg_sqs, slow_params, steps = (
        values if isinstance(indices, range) else [values[i] for i in indices] for values in lists
    )
    values = StepValues.at_step(steps[0], **hyperparameters)
    not_stepped = kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        slow_params,
        values.kernel_hyperparameters(values.alpha),
        values.gc_min_dim,
        values.adaptive,
        values.sync,
    )
    return [indices[i] for i in not_stepped]


# ----------------------------------------------------------------------------- low memory


def fused_low_memory_ranger(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    steps: list[int],
    **hyperparameters,
) -> None:
    """The fused step on low-memory states; same arguments as `low_memory_ranger`."""
    not_stepped = fused_low_memory_step(params, grads, states, steps, **hyperparameters)
    if not_stepped:
        rest = [[values[i] for i in not_stepped] for values in (params, grads, states, steps)]
        low_memory_ranger(*rest, **hyperparameters)  # type: ignore[arg-type]


def fused_low_memory_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    steps: list[int],
    **hyperparameters,
) -> list[int]:
    """The C++ kernel's step on the params whose state is in the ``16bit`` or ``8bit``
    layout; returns the positions of the params it did not step, for the torch path (all of
    them where the kernel cannot be built)."""
    kernel = _cpu_kernel.low_memory_step_kernel() if _kernel_may_apply(params) else None
    if kernel is None:
        return list(range(len(params)))
    # The kernel tells the two layouts apart by exp_avg's dtype (and refuses "delta", fp32);
    # "full" has no slow_delta at all.
    candidates = [index for index, state in enumerate(states) if "slow_delta" in state]
    not_stepped = [index for index, state in enumerate(states) if "slow_delta" not in state]
    for indices in _indices_by_step([steps[i] for i in candidates]):
        chosen = [candidates[i] for i in indices]
        not_stepped += _low_memory_kernel_step(
            kernel, params, grads, states, steps, chosen, **hyperparameters
        )
    return sorted(not_stepped)


def _low_memory_kernel_step(
    kernel,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    steps: list[int],
    indices: list[int],
    **hyperparameters,
) -> list[int]:
    """One kernel call on the params at ``indices`` (one step count); returns the positions
    (in the full lists) of the params it could not step."""
    values = StepValues.at_step(steps[indices[0]], **hyperparameters)
    chosen = [states[i] for i in indices]
    no_scale = torch.empty(0)  # 16bit params have no block scales
    not_stepped = kernel(
        [params[i] for i in indices],
        [grads[i] for i in indices],
        [state["exp_avg"] for state in chosen],
        [state["exp_avg_sq"] for state in chosen],
        [state.get("exp_avg_scale", no_scale) for state in chosen],
        [state.get("exp_avg_sq_scale", no_scale) for state in chosen],
        [state["slow_delta"] for state in chosen],
        values.kernel_hyperparameters(values.keep),  # a sync: fast - (1 - alpha) * d
        values.gc_min_dim,
        values.adaptive,
        values.sync,
        values.step,
    )
    return [indices[i] for i in not_stepped]
