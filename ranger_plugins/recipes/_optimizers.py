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

``--state-precision`` (`RecipeConfig.state_precision`) stores Ranger's state in 16 or 8
bits (``Ranger(..., state_precision=...)``, see `ranger_plugins._low_memory`); it applies to
Ranger alone, and every other hyperparameter stays the same.

Ranger21's weight decay is its "stable" weight decay (divided by the root mean of the
second moments, about 1 with its normalized gradients), and it keeps its own GC, gradient
normalization, adaptive clipping, norm loss and positive-negative momentum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ranger_plugins.family import OPTIMIZERS, optimizer_class

from ._config import RANGER_HYPERS, STATE_PRECISIONS, RecipeConfig, RunSpec
from ._data import RecipeInputError

__all__ = [
    "ALL",
    "OPTIMIZER_CHOICES",
    "OPTIMIZER_NAMES",
    "STATE_PRECISION_CHOICES",
    "build_optimizer",
    "check_optimizer",
    "check_state_precision",
    "optimizer_label",
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
#: ``--state-precision``: Ranger's state in fp32, 16 or 8 bits, or ``all`` of them in turn.
STATE_PRECISION_CHOICES: tuple[str, ...] = (*STATE_PRECISIONS, ALL)

# Hyperparameters each variant takes beyond the common ones (betas, eps, weight_decay).
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "ranger": {"k": RANGER_HYPERS["k"], "alpha": RANGER_HYPERS["alpha"]},
    "ranger_qh": {"decouple_weight_decay": True},
    "ranger_va": {},
    "ranger21": {"use_warmup": False, "warmdown_active": False},
    "ranger_lars": {},
}


def optimizer_label(spec: RunSpec) -> str:
    """How the table and the plot name a run's optimizer: the class name, with the state
    precision when it is not full (``Ranger, 8bit state``)."""
    name = OPTIMIZER_NAMES[spec.optimizer]
    return name if spec.state_precision == "full" else f"{name}, {spec.state_precision} state"


def variant_kwargs(
    name: str, config: RecipeConfig, state_precision: str = "full"
) -> dict[str, Any]:
    """The keyword arguments (besides params and lr) that variant ``name`` gets in the
    recipe. ``--gc`` turns Gradient Centralization on; without it every variant keeps its
    own default, except Ranger, whose leaderboard runs had none. A ``state_precision``
    other than ``"full"`` (Ranger only) is passed on; full state passes nothing, so those
    runs are exactly what they were before the option existed."""
    kwargs: dict[str, Any] = {
        "betas": (RANGER_HYPERS["mom"], RANGER_HYPERS["sqr_mom"]),
        "eps": RANGER_HYPERS["eps"],
        "weight_decay": RANGER_HYPERS["wd"],
        **_EXTRA_KWARGS[name],
    }
    if config.gc or name == "ranger":
        kwargs["use_gc"] = config.gc
    if state_precision != "full":
        kwargs["state_precision"] = state_precision
    return kwargs


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    config: RecipeConfig,
    state_precision: str = "full",
) -> torch.optim.Optimizer:
    """Variant ``name`` on ``groups`` (each group's own ``weight_decay`` wins), at ``lr``,
    with its state in ``state_precision`` (Ranger only)."""
    # Each class has its own signature; the base class's (params, defaults) is not it.
    cls: Callable[..., torch.optim.Optimizer] = optimizer_class(name)
    return cls(groups, lr=lr, **variant_kwargs(name, config, state_precision))


def check_state_precision(config: RecipeConfig) -> None:
    """``config.state_precision`` is one of `STATE_PRECISION_CHOICES`, and a low-memory
    state is asked of Ranger (``--optimizer ranger`` or ``all``) alone."""
    if config.state_precision not in STATE_PRECISION_CHOICES:
        raise RecipeInputError(
            f"--state-precision must be one of {', '.join(STATE_PRECISION_CHOICES)}, "
            f"got {config.state_precision!r}"
        )
    if config.state_precision != "full" and config.optimizer not in ("ranger", ALL):
        raise RecipeInputError(
            f"--state-precision {config.state_precision} applies to Ranger only; "
            f"--optimizer {config.optimizer} keeps full state (use --optimizer ranger or all)"
        )


def check_optimizer(config: RecipeConfig) -> None:
    """``config.optimizer`` names a variant (or ``all``), ``config.state_precision`` fits it,
    and each variant it trains accepts its hyperparameters (and Ranger each state precision
    asked for): built once on a dummy parameter, so a bad value stops the run with one line
    before anything trains."""
    if config.optimizer not in OPTIMIZER_CHOICES:
        raise RecipeInputError(
            f"--optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {config.optimizer!r}"
        )
    check_state_precision(config)
    for spec in config.runs:
        if spec.optimizer not in OPTIMIZERS:  # the baseline
            continue
        dummy = [torch.zeros(2, 2, requires_grad=True)]
        try:
            build_optimizer(
                spec.optimizer, [{"params": dummy}], config.lr, config, spec.state_precision
            )
        except (TypeError, ValueError) as error:
            raise RecipeInputError(f"--optimizer {spec.optimizer}: {error}") from error
