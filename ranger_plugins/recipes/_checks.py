"""Everything the main job checks before it trains: numbers, installed extras, the output file.

Training takes minutes to hours; a typo found after it would lose the run. Each check
raises `RecipeInputError` (or `RecipeExtraMissingError`) with a one-line message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ._config import RecipeConfig
from ._data import RecipeError, RecipeInputError

__all__ = [
    "BOUNDS",
    "DIGITS_TRAIN_IMAGES",
    "RecipeExtraMissingError",
    "check_extras",
    "check_numbers",
    "check_output",
    "describe_bounds",
    "number_in_bounds",
    "plot_formats",
]

#: Inclusive bounds of every number the main job takes (``lr`` must also be > 0).
BOUNDS: dict[str, tuple[float, float]] = {
    "epochs": (1, 1000),
    "seed": (0, 2**32 - 1),  # numpy's seed range: fastai seeds numpy as well as torch
    "seeds": (1, 100),
    "size": (8, 1024),  # 8: the digits' own size, the smallest XResNet's five halvings run on
    "bs": (2, 4096),  # BatchNorm needs two images in a training batch
    "lr": (0.0, 1.0),
    "pct_start": (0.0, 1.0),
    "threads": (1, 1024),
    "workers": (0, 256),
}
#: scikit-learn's 1,797 digits less the fixed stratified 20% validation split (360).
DIGITS_TRAIN_IMAGES = 1437
#: The modules each part of the main job imports, and the package that brings each.
_PACKAGES = {
    "fastai": "fastai",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "torchvision": "torchvision",
    "PIL": "pillow",
    "lightning": "lightning",
}


class RecipeExtraMissingError(RecipeError):
    """A package the recipes need is not installed; the message names the extra."""


def _show(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_bounds(name: str) -> str:
    """Option ``name``'s bounds in words, e.g. ``1-1000``."""
    low, high = BOUNDS[name]
    return f"> 0 and <= {_show(high)}" if name == "lr" else f"{_show(low)}-{_show(high)}"


def number_in_bounds(name: str, value: float) -> str | None:
    """Why ``value`` is out of bounds for option ``name`` (see `BOUNDS`), or None."""
    low, high = BOUNDS[name]
    if name == "lr" and not 0 < value <= high:
        return f"must be > 0 and <= {_show(high)}, got {_show(value)}"
    if not low <= value <= high:
        return f"must be between {_show(low)} and {_show(high)}, got {_show(value)}"
    return None


def check_numbers(config: RecipeConfig) -> None:
    """Every numeric field of ``config`` within `BOUNDS`, and the batch no larger than the
    digits' training split."""
    for name in BOUNDS:
        value = getattr(config, name)
        if value is None and name == "threads":  # torch's default
            continue
        if (reason := number_in_bounds(name, value)) is not None:
            raise RecipeInputError(f"--{name.replace('_', '-')}: {reason}")
    last_seed = config.seed + config.seeds - 1
    if last_seed > BOUNDS["seed"][1]:
        raise RecipeInputError(f"--seed + --seeds - 1 must be <= 2**32 - 1, got {last_seed}")
    if not config.uses_folder and config.bs > DIGITS_TRAIN_IMAGES:
        raise RecipeInputError(
            f"--bs {config.bs} is larger than the digits training split "
            f"({DIGITS_TRAIN_IMAGES} images); pass a smaller --bs"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        return False


def check_extras(config: RecipeConfig) -> None:
    """Raise `RecipeExtraMissingError`, naming ``pip install '.[recipes]'``, when a package
    this run imports is not installed (a core-only or a ``[lightning]``-only install)."""
    needed = ["fastai", "matplotlib"]  # the XResNets are fastai's; the plot is matplotlib's
    needed += ["torchvision", "PIL"] if config.uses_folder else ["sklearn"]
    if config.engine == "lightning":
        needed.append("lightning")
    missing = [_PACKAGES[module] for module in needed if not _installed(module)]
    if missing:
        raise RecipeExtraMissingError(
            f"the recipes need {', '.join(missing)}, not installed here; install the recipes "
            f"extra: pip install '.[recipes]' (in a clone of ranger_plugins)"
        )


def plot_formats() -> list[str]:
    """The file suffixes matplotlib can write (``.png``, ``.pdf``, ``.svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(f".{name}" for name in FigureCanvasBase.get_supported_filetypes())


def check_output(path: Path) -> Path:
    """The plot's path, checked before training: ``.png`` added when it has no suffix, the
    suffix one matplotlib writes, and its folder (or the nearest existing parent) writable."""
    path = Path(path)
    if path.is_dir():
        raise RecipeInputError(f"--output {path}: is a directory; give a file name")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = plot_formats()
    if path.suffix.lower() not in formats:
        raise RecipeInputError(
            f"--output {path}: matplotlib cannot write {path.suffix!r} files; "
            f"use one of {', '.join(formats)}"
        )
    if path.is_dir():  # `plot.png/` made by hand, say
        raise RecipeInputError(f"--output {path}: is a directory; give a file name")
    folder = next(
        p for p in (path.parent.absolute(), *path.parent.absolute().parents) if p.exists()
    )
    if not folder.is_dir():
        raise RecipeInputError(f"--output {path}: {folder} is not a directory")
    writable = path if path.exists() else folder
    if not os.access(writable, os.W_OK):
        raise RecipeInputError(f"--output {path}: {writable} is not writable")
    return path
