"""The Mish + Ranger recipe of the fastai Imagenette/Imagewoof leaderboard, runnable anywhere.

``python -m ranger_plugins.recipes`` (or the ``ranger-recipes`` console script) trains the
recipe and a baseline on scikit-learn's digits; ``--data PATH`` or ``--dataset imagenette``
trains the leaderboard recipe on real images. See ``python -m ranger_plugins.recipes --help``.

Needs the ``recipes`` extra (fastai, Lightning, scikit-learn, matplotlib). The programmatic
entry points::

    from ranger_plugins.recipes import RecipeConfig, run_recipe
    results = run_recipe(RecipeConfig(epochs=2))
"""

from __future__ import annotations

from ._config import BASELINE, RECIPE, RecipeConfig, RunResult, RunSpec
from ._data import (
    DatasetUnavailableError,
    DigitsSplit,
    EngineUnavailableError,
    RecipeError,
    RecipeInputError,
    check_image_folder,
    digits_split,
    fetch_dataset,
)
from ._models import build_xresnet
from ._report import format_table, plot_results
from ._runner import resolve_data_path, train_runs

__all__ = [
    "BASELINE",
    "RECIPE",
    "DatasetUnavailableError",
    "DigitsSplit",
    "EngineUnavailableError",
    "RecipeConfig",
    "RecipeError",
    "RecipeInputError",
    "RunResult",
    "RunSpec",
    "build_xresnet",
    "check_image_folder",
    "digits_split",
    "fetch_dataset",
    "format_table",
    "plot_results",
    "resolve_data_path",
    "run_recipe",
    "train_runs",
]


def run_recipe(config: RecipeConfig) -> list[RunResult]:
    """Train every run of ``config`` and write its PNG to ``config.output``."""
    path = resolve_data_path(config)
    results = train_runs(config, path)
    plot_results(results, config.output, f"{path.name if path else 'digits'}, {config.engine}")
    return results
