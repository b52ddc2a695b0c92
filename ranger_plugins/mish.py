"""Swap a model's activations for Mish (``torch.nn.Mish``), the activation of the Ranger recipe.

Torch only. Mish itself is torch's own ``nn.Mish``; this module only rewires models::

    from ranger_plugins.mish import swap_activation

    model, swapped = swap_activation(torchvision.models.resnet18(), torch.nn.ReLU)
    print(f"{swapped} ReLU modules now Mish")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from torch import nn

__all__ = ["SwapResult", "swap_activation", "to_mish"]

ModelT = TypeVar("ModelT", bound=nn.Module)


class SwapResult(NamedTuple):
    """What :func:`swap_activation` returns: the (possibly copied) model and how many
    activation modules it replaced."""

    model: nn.Module
    swapped: int


def swap_activation(
    model: ModelT,
    old: type[nn.Module] | tuple[type[nn.Module], ...] = nn.ReLU,
    new: Callable[[], nn.Module] = nn.Mish,
    *,
    copy_model: bool = False,
) -> SwapResult:
    """Replace every submodule that is an instance of ``old`` with a fresh ``new()``.

    Args:
        model: any ``nn.Module``. It is changed in place unless ``copy_model`` is true.
        old: the activation class (or a tuple of classes) to replace, e.g. ``nn.ReLU``.
            Subclasses match too (``isinstance``).
        new: a zero-argument factory for the replacement, ``nn.Mish`` by default. A module
            that already is what ``new()`` builds is left alone.
        copy_model: work on a deep copy and leave ``model`` untouched.

    Returns:
        ``SwapResult(model, swapped)``: the changed model (``model`` itself, or the copy) and
        the number of distinct activation modules replaced. A single activation registered
        under several names (shared) counts once and is replaced by one shared new module,
        so the model keeps its structure.

    Only registered submodules are seen: activations called functionally inside
    ``forward`` (``F.relu(x)``) cannot be swapped this way.
    """
    old_types = old if isinstance(old, tuple) else (old,)
    if not old_types or not all(
        isinstance(kind, type) and issubclass(kind, nn.Module) for kind in old_types
    ):
        raise ValueError(f"old must be an nn.Module subclass or a tuple of them, got {old!r}")
    if not callable(new):
        raise ValueError(f"new must be a callable returning an nn.Module, got {new!r}")
    probe = new()
    if not isinstance(probe, nn.Module):
        raise ValueError(f"new() must return an nn.Module, got {type(probe).__name__}")
    new_type = type(probe)

    target = copy.deepcopy(model) if copy_model else model
    replacements: dict[int, nn.Module] = {}
    # Every registration path, duplicates included (a shared module sits in several slots).
    # Collected first, then replaced: changing a module's children while walking them skips
    # entries.
    slots = [
        (path, module)
        for path, module in target.named_modules(remove_duplicate=False)
        if path and isinstance(module, old_types) and type(module) is not new_type
    ]
    for path, module in slots:
        parent_path, _, name = path.rpartition(".")
        if id(module) not in replacements:
            replacements[id(module)] = probe if not replacements else new()
        setattr(target.get_submodule(parent_path), name, replacements[id(module)])
    return SwapResult(target, len(replacements))


def to_mish(
    model: ModelT,
    old: type[nn.Module] | tuple[type[nn.Module], ...] = nn.ReLU,
    *,
    copy_model: bool = False,
) -> SwapResult:
    """Replace every ``old`` activation (``nn.ReLU`` by default) with ``torch.nn.Mish``.

    Shorthand for ``swap_activation(model, old, nn.Mish, copy_model=copy_model)``.
    """
    return swap_activation(model, old, nn.Mish, copy_model=copy_model)
