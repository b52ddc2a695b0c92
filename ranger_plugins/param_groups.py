"""Param groups for Ranger (torch only): weight decay on weights, none on biases and norms.

The rule every adapter and example uses: the leaderboard recipe puts no weight decay on
biases and on the parameters of normalisation layers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._state import check_real

__all__ = ["NORM_LAYERS", "no_decay_param_groups"]

#: Normalisation layers whose parameters get no weight decay (with every bias).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm, Lazy*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def no_decay_param_groups(
    module: nn.Module, weight_decay: float, *, exclude_bias_and_norm: bool = True
) -> list[dict[str, Any]]:
    """Split ``module``'s parameters into a decayed group and a group without weight decay.

    Biases and every parameter of a normalisation layer (`NORM_LAYERS`) go to the group
    with ``weight_decay=0`` when ``exclude_bias_and_norm`` is set; everything else gets
    ``weight_decay``. Empty groups are left out. Shared parameters appear once.
    """
    check_real("weight_decay", weight_decay, low=0.0)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for submodule in module.modules():
        is_norm = isinstance(submodule, NORM_LAYERS)
        for name, param in submodule.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            excluded = exclude_bias_and_norm and (is_norm or name == "bias")
            (no_decay if excluded else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
