"""Ranger (RAdam + Lookahead + Gradient Centralization) for PyTorch, fastai and Lightning.

The core needs torch alone. The adapters are imported explicitly and are never imported
here: ``ranger_plugins.fastai`` (needs fastai) and ``ranger_plugins.lightning`` (needs
Lightning).
"""

from ._math import check_gc_supported
from .lookahead import Lookahead
from .param_groups import no_decay_param_groups
from .ranger import Ranger, centralize_gradient, rectification

__all__ = [
    "Lookahead",
    "Ranger",
    "centralize_gradient",
    "check_gc_supported",
    "no_decay_param_groups",
    "rectification",
]
__version__ = "0.1.0"
