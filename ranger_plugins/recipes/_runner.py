"""Resolve the data, train each run with the chosen engine, report."""

from __future__ import annotations

from pathlib import Path

import torch

from ._config import RecipeConfig, RunResult
from ._data import RecipeInputError, check_image_folder, fetch_dataset

__all__ = ["resolve_data_path", "train_runs"]

ENGINES = ("fastai", "lightning")
DATASETS = ("digits", "imagenette", "imagewoof")


def resolve_data_path(config: RecipeConfig) -> Path | None:
    """The image folder to train on, fetching Imagenette/Imagewoof if needed; None for digits.

    Raises `RecipeInputError` (a ``ValueError``) if the folder is not laid out as
    ``train/<class>``, ``val/<class>``, and `DatasetUnavailableError` if a download fails.
    """
    if config.data is not None:
        path = Path(config.data)
    elif config.dataset == "digits":
        return None
    else:
        path = fetch_dataset(config.dataset, config.size)
    check_image_folder(path)
    return path


def train_runs(config: RecipeConfig, path: Path | None) -> list[RunResult]:
    """Train every run of ``config`` (recipe, then baseline) on ``path`` (None: digits)."""
    if config.engine == "fastai":
        from ._fastai_engine import train_fastai as train
    elif config.engine == "lightning":
        from ._lightning_engine import train_lightning as train
    else:
        raise RecipeInputError(f"engine must be one of {ENGINES}, got {config.engine!r}")
    if config.threads is not None and config.threads < 1:
        raise RecipeInputError(f"threads must be >= 1 or None, got {config.threads}")
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        results = []
        for spec in config.runs:
            print(f"\n== {spec.name}: {spec.activation}, {spec.optimizer}, {spec.schedule} ==")
            results.append(train(config, spec, path))
    finally:
        torch.set_num_threads(previous_threads)
    return results
