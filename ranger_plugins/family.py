"""The Ranger family by name: one registry that the fastai and Lightning adapters and the
main job use to pick an optimizer (``optimizer="ranger_qh"``).

Every member subclasses `ranger_plugins._base.LookaheadOptimizer`, so each has the same
contract: closure, all state in ``state[p]``, checked loading, the Lookahead controls.
"""

from __future__ import annotations

from ._base import LookaheadOptimizer
from .ranger import Ranger
from .ranger21 import Ranger21
from .ranger_lars import RangerLars
from .ranger_qh import RangerQH
from .ranger_va import RangerVA

__all__ = ["OPTIMIZERS", "optimizer_class"]

#: Name -> optimizer class, in the order tables list them.
OPTIMIZERS: dict[str, type[LookaheadOptimizer]] = {
    "ranger": Ranger,
    "ranger_qh": RangerQH,
    "ranger_va": RangerVA,
    "ranger21": Ranger21,
    "ranger_lars": RangerLars,
}


def optimizer_class(name: str | type[LookaheadOptimizer]) -> type[LookaheadOptimizer]:
    """The class registered as ``name`` (a class of the family is returned as it is)."""
    if isinstance(name, type) and issubclass(name, LookaheadOptimizer):
        return name
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (must be one of {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name]
