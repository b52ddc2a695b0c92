"""Ranger's scalar maths and Gradient Centralization, shared by every implementation."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._state import step_arguments


def _gc_applies(grad: torch.Tensor, gc_conv_only: bool) -> bool:
    return grad.dim() > (3 if gc_conv_only else 1)


def centralize_gradient(grad: torch.Tensor, gc_conv_only: bool = False) -> torch.Tensor:
    """Gradient Centralization in place: subtract the mean over all dims but 0.

    Gradients with one dimension or none (or, with ``gc_conv_only``, fewer than four) are
    returned unchanged.
    """
    if _gc_applies(grad, gc_conv_only):
        grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))
    return grad


def centralize_gradients(grads: list[torch.Tensor], gc_conv_only: bool = False) -> None:
    """`centralize_gradient` on each of ``grads``, in place (the variants' foreach steps use
    it, so their single-tensor and foreach forms centralize alike)."""
    for grad in grads:
        centralize_gradient(grad, gc_conv_only)


def check_gc_supported(param: torch.Tensor) -> None:
    """Raise a `RuntimeError` where GC cannot run on ``param``: it needs whole rows (dims
    1..n) on each device, so shardings that split them are refused (FSDP1's flattened
    params, DTensors sharded on a dim other than 0)."""
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
                f"(placements {tuple(param.placements)}; only Shard(0) keeps rows whole). "  # type: ignore[attr-defined]
                "Shard on dim 0, or pass use_gc=False."
            )


def rectification(
    step: int, beta1: float, beta2: float, rectify_threshold: float = 5.0
) -> tuple[float, bool]:
    """The step-size multiplier of lr at step ``step``, and whether the step is adaptive.

    Adaptive (rho_t > threshold): r_t * sqrt(1 - beta2^t) / (1 - beta1^t), applied to
    m / (sqrt(v) + eps). Otherwise 1 / (1 - beta1^t), applied to m (momentum SGD).
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2**step / bias_correction2
    if rho_t > rectify_threshold:
        r_t = math.sqrt(
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        )
        return r_t * math.sqrt(bias_correction2) / bias_correction1, True
    return 1.0 / bias_correction1, False


def step_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A Ranger param group's hyperparameters as the step functions take them."""
    return step_arguments(group, RANGER_STEP_KEYS)


#: The group keys Ranger's step functions take (one place to add a new one).
RANGER_STEP_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "lookahead_k",
    "lookahead_alpha",
    "use_gc",
    "gc_conv_only",
    "rectify_threshold",
)
