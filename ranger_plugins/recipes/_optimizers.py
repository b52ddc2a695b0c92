"""The optimizers the main job trains: every member of the Ranger family, and AdamW.

One place says which hyperparameters each variant gets in the recipe (`variant_kwargs`), so
both engines build the same optimizer, and the checks build it once on a dummy parameter
before any training (`check_optimizer`).

The recipe's leaderboard hyperparameters apply where a variant has the same knob: betas
(mom 0.95, sqr_mom 0.99), eps 1e-6, decoupled weight decay 1e-2 on weights (none on norm
layers and biases, by the param groups), the run's lr and flat-then-cosine schedule. Every
other hyperparameter is the variant's own default, with two exceptions:

* RangerQH's weight decay is made decoupled (``decouple_weight_decay=True``; its default is
  L2), so that "wd 1e-2" means the same true weight decay as in the other variants;
* Ranger21's own warmup and warmdown are turned off (``use_warmup=False``,
  ``warmdown_active=False``): the recipe's flat-then-cosine schedule sets the group's lr,
  and the step uses exactly that lr (see `ranger_plugins.ranger21.Ranger21Schedule`).

Ranger21's weight decay is its "stable" weight decay (divided by the root mean of the
second moments, about 1 with its normalized gradients), and it keeps its own GC, gradient
normalization, adaptive clipping, norm loss and positive-negative momentum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ranger_plugins.family import OPTIMIZERS, optimizer_class

from ._config import RANGER_HYPERS, RecipeConfig
from ._data import RecipeInputError

__all__ = [
    "ALL",
    "OPTIMIZER_CHOICES",
    "OPTIMIZER_NAMES",
    "build_optimizer",
    "check_optimizer",
    "variant_kwargs",
]

#: ``--optimizer all``: every variant of the family, then the AdamW baseline.
ALL = "all"
OPTIMIZER_CHOICES: tuple[str, ...] = (*OPTIMIZERS, ALL)
#: How the table names each optimizer: the class name, and AdamW for the baseline.
OPTIMIZER_NAMES: dict[str, str] = {
    **{name: cls.__name__ for name, cls in OPTIMIZERS.items()},
    "adamw": "AdamW",
}

# Hyperparameters each variant takes beyond the common ones (betas, eps, weight_decay).
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "ranger": {"k": RANGER_HYPERS["k"], "alpha": RANGER_HYPERS["alpha"]},
    "ranger_qh": {"decouple_weight_decay": True},
    "ranger_va": {},
    "ranger21": {"use_warmup": False, "warmdown_active": False},
    "ranger_lars": {},
}


def variant_kwargs(name: str, config: RecipeConfig) -> dict[str, Any]:
    """The keyword arguments (besides params and lr) that variant ``name`` gets in the
    recipe. ``--gc`` turns Gradient Centralization on; without it every variant keeps its
    own default, except Ranger, whose leaderboard runs had none."""
    kwargs: dict[str, Any] = {
        "betas": (RANGER_HYPERS["mom"], RANGER_HYPERS["sqr_mom"]),
        "eps": RANGER_HYPERS["eps"],
        "weight_decay": RANGER_HYPERS["wd"],
        **_EXTRA_KWARGS[name],
    }
    if config.gc or name == "ranger":
        kwargs["use_gc"] = config.gc
    return kwargs


def build_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, config: RecipeConfig
) -> torch.optim.Optimizer:
    """Variant ``name`` on ``groups`` (each group's own ``weight_decay`` wins), at ``lr``."""
    # Each class has its own signature; the base class's (params, defaults) is not it.
    cls: Callable[..., torch.optim.Optimizer] = optimizer_class(name)
    return cls(groups, lr=lr, **variant_kwargs(name, config))


def check_optimizer(config: RecipeConfig) -> None:
    """``config.optimizer`` names a variant (or ``all``), and each variant it trains accepts
    its hyperparameters: built once on a dummy parameter, so a bad value stops the run with
    one line before anything trains."""
    if config.optimizer not in OPTIMIZER_CHOICES:
        raise RecipeInputError(
            f"--optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {config.optimizer!r}"
        )
    names = list(OPTIMIZERS) if config.optimizer == ALL else [config.optimizer]
    for name in names:
        dummy = [torch.zeros(2, 2, requires_grad=True)]
        try:
            build_optimizer(name, [{"params": dummy}], config.lr, config)
        except (TypeError, ValueError) as error:
            raise RecipeInputError(f"--optimizer {name}: {error}") from error
