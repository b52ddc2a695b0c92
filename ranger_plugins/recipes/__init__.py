"""The Mish + Ranger recipe of the fastai Imagenette/Imagewoof leaderboard, runnable anywhere.

``python -m ranger_plugins.recipes`` (or the ``ranger-recipes`` console script) trains the
recipe and a baseline on scikit-learn's digits (``--optimizer`` picks the recipe's member of
the Ranger family, ``--optimizer all`` trains each; ``--state-precision 16bit|8bit|all``
Ranger's low-memory state); ``--data PATH`` or ``--dataset imagenette``
trains the leaderboard recipe on real images. See ``python -m ranger_plugins.recipes --help``.

Needs the ``recipes`` extra (fastai, Lightning, scikit-learn, matplotlib). The programmatic
entry points::

    from ranger_plugins.recipes import RecipeConfig, run_recipe
    results = run_recipe(RecipeConfig(epochs=2))
"""

from __future__ import annotations

from ._checks import BOUNDS, RecipeExtraMissingError
from ._config import BASELINE, RECIPE, RecipeConfig, RunResult, RunSpec, recipe_spec
from ._data import (
    IMAGE_EXTENSIONS,
    DatasetUnavailableError,
    DigitsSplit,
    EngineUnavailableError,
    ImageFolderSummary,
    RecipeError,
    RecipeInputError,
    check_image_folder,
    digits_split,
    fetch_dataset,
    scan_image_folder,
)
from ._models import build_xresnet
from ._optimizers import OPTIMIZER_CHOICES, build_optimizer, variant_kwargs
from ._report import RunSummary, Spread, format_per_seed, format_table, plot_results, summarize
from ._runner import prepare_run, resolve_data_path, train_runs

__all__ = [
    "BASELINE",
    "BOUNDS",
    "IMAGE_EXTENSIONS",
    "OPTIMIZER_CHOICES",
    "RECIPE",
    "DatasetUnavailableError",
    "DigitsSplit",
    "EngineUnavailableError",
    "ImageFolderSummary",
    "RecipeConfig",
    "RecipeError",
    "RecipeExtraMissingError",
    "RecipeInputError",
    "RunResult",
    "RunSpec",
    "RunSummary",
    "Spread",
    "build_optimizer",
    "build_xresnet",
    "check_image_folder",
    "digits_split",
    "fetch_dataset",
    "format_per_seed",
    "format_table",
    "plot_results",
    "prepare_run",
    "recipe_spec",
    "resolve_data_path",
    "run_recipe",
    "scan_image_folder",
    "summarize",
    "train_runs",
    "variant_kwargs",
]


def run_recipe(config: RecipeConfig) -> list[RunResult]:
    """Check ``config`` (see `prepare_run`), train every run with each seed, and write the
    plot to ``config.output``. Raises a `RecipeError` before training for bad input."""
    config, path = prepare_run(config)
    results = train_runs(config, path)
    plot_results(results, config.output, f"{path.name if path else 'digits'}, {config.engine}")
    return results
