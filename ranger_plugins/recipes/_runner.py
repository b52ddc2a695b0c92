"""Check a run's inputs, resolve the data, train each run and seed with the chosen engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ._checks import check_extras, check_numbers, check_output
from ._config import RecipeConfig, RunResult
from ._data import RecipeInputError, fetch_dataset, scan_image_folder
from ._optimizers import check_optimizer

__all__ = ["prepare_run", "resolve_data_path", "train_runs"]

ENGINES = ("fastai", "lightning")
DATASETS = ("digits", "imagenette", "imagewoof")


def resolve_data_path(config: RecipeConfig) -> Path | None:
    """The image folder to train on, fetching Imagenette/Imagewoof if needed; None for digits.

    Raises `RecipeInputError` (a ``ValueError``) if the folder cannot be trained on (see
    `scan_image_folder`), and `DatasetUnavailableError` if a download fails.
    """
    if config.data is not None:
        path = Path(config.data)
    elif config.dataset == "digits":
        return None
    else:
        path = fetch_dataset(config.dataset, config.size)
    print(f"Checking the images in {path} ...", flush=True)
    summary = scan_image_folder(path)
    # fastai drops the last partial training batch: a batch larger than the set leaves none.
    if config.bs > summary.train_images:
        raise RecipeInputError(
            f"--bs {config.bs} is larger than the training set of {path} "
            f"({summary.train_images} images); pass a smaller --bs"
        )
    return path


def prepare_run(config: RecipeConfig) -> tuple[RecipeConfig, Path | None]:
    """Check everything a run needs before it trains, cheapest first: the options (each
    optimizer built once on a dummy parameter), the installed packages, the output file (``.png`` added if it has no suffix), then the data.

    Returns the config with the checked output path and the image folder (None for digits).
    Raises a `RecipeError` with a one-line message for the first problem found.
    """
    if config.engine not in ENGINES:
        raise RecipeInputError(f"engine must be one of {ENGINES}, got {config.engine!r}")
    if config.data is None and config.dataset not in DATASETS:
        raise RecipeInputError(f"dataset must be one of {DATASETS}, got {config.dataset!r}")
    check_numbers(config)
    check_optimizer(config)
    check_extras(config)
    config = dataclasses.replace(config, output=check_output(config.output))
    return config, resolve_data_path(config)


def train_runs(
    config: RecipeConfig, path: Path | None, results: list[RunResult] | None = None
) -> list[RunResult]:
    """Train every run of ``config`` (the recipe with each optimizer, then the baseline)
    with each seed, on ``path`` (None: digits), and return the results in that order (seed
    by seed).

    Each result is appended to ``results`` (if given) as soon as its run ends, so a caller
    keeps the finished runs when a later one fails or is interrupted.
    """
    if config.engine == "fastai":
        from ._fastai_engine import train_fastai as train
    elif config.engine == "lightning":
        from ._lightning_engine import train_lightning as train
    else:
        raise RecipeInputError(f"engine must be one of {ENGINES}, got {config.engine!r}")
    results = [] if results is None else results
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        for seed in config.seed_list:
            seeded = dataclasses.replace(config, seed=seed, seeds=1)
            for spec in config.runs:
                print(f"\n== {spec.name}, seed {seed}: {spec.activation}, {spec.optimizer} ==")
                results.append(train(seeded, spec, path))
    finally:
        torch.set_num_threads(previous_threads)
    return results
