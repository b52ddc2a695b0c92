"""Ranger's scalar maths and Gradient Centralization, shared by every implementation."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


#: ``gc_min_dim`` where GC is off: a number of dimensions no tensor exceeds.
NO_GC = 1 << 30


@dataclass(frozen=True)
class StepValues:
    """The scalars of one Ranger step at one step count, computed on the host (no device
    sync): what the torch low-memory step and the C++ kernels take."""

    decay: float  # 1 - lr * weight_decay
    beta1_weight: float  # 1 - beta1
    beta2: float
    beta2_weight: float  # 1 - beta2
    eps: float
    step_size: float  # -lr * the rectification multiplier
    adaptive: bool
    alpha: float  # Lookahead's
    keep: float  # 1 - alpha: what a sync keeps of slow_delta
    sync: bool
    gc_min_dim: int  # GC applies to tensors of more dimensions than this
    step: int

    @classmethod
    def at_step(
        cls,
        step: int,
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
    ) -> StepValues:
        """The scalars for ``step`` from the step functions' keyword arguments."""
        multiplier, adaptive = rectification(step, beta1, beta2, rectify_threshold)
        return cls(
            decay=1.0 - lr * weight_decay,
            beta1_weight=1.0 - beta1,
            beta2=beta2,
            beta2_weight=1.0 - beta2,
            eps=eps,
            step_size=-lr * multiplier,
            adaptive=adaptive,
            alpha=lookahead_alpha,
            keep=1.0 - lookahead_alpha,
            sync=step % lookahead_k == 0,
            gc_min_dim=(3 if gc_conv_only else 1) if use_gc else NO_GC,
            step=step,
        )

    def kernel_hyperparameters(self, last: float) -> list[float]:
        """The C++ kernels' seven hyperparameters; ``last`` is alpha (full state) or keep
        (the low-memory state's slow_delta)."""
        return [
            self.decay,
            self.beta1_weight,
            self.beta2,
            self.beta2_weight,
            self.eps,
            self.step_size,
            last,
        ]


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
