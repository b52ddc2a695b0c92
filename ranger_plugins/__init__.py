"""Ranger (RAdam + Lookahead + Gradient Centralization) for PyTorch, fastai and Lightning.

The core needs torch alone. The adapters are imported explicitly and are never imported
here: ``ranger_plugins.fastai`` (needs fastai) and ``ranger_plugins.lightning`` (needs
Lightning).
"""

from ._base import LookaheadOptimizer
from ._math import check_gc_supported
from .family import OPTIMIZERS, optimizer_class
from .lookahead import Lookahead
from .param_groups import no_decay_param_groups
from .ranger import Ranger, centralize_gradient, rectification
from .ranger21 import Ranger21
from .ranger_lars import RangerLars
from .ranger_qh import RangerQH
from .ranger_va import RangerVA

__all__ = [
    "OPTIMIZERS",
    "Lookahead",
    "LookaheadOptimizer",
    "Ranger",
    "Ranger21",
    "RangerLars",
    "RangerQH",
    "RangerVA",
    "optimizer_class",
    "centralize_gradient",
    "check_gc_supported",
    "no_decay_param_groups",
    "rectification",
]
__version__ = "0.1.0"
