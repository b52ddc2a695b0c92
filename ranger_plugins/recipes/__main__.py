"""``python -m ranger_plugins.recipes`` (or ``ranger-recipes``): the Mish + Ranger recipe.

With no options: trains the recipe (XResNet + Mish, Ranger, flat-then-cosine, label
smoothing) and the baseline (the same XResNet with ReLU, AdamW, one-cycle) on scikit-learn's
digits, prints a table and writes a PNG of the loss curves and LR schedules.

With ``--data PATH`` (ImageNet-style folder) or ``--dataset imagenette|imagewoof``: trains
the leaderboard recipe (XResNet50 + Mish, 128 px, bs 64, lr 4e-3, 5 epochs).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from ._config import DIGITS_DEFAULTS, FOLDER_DEFAULTS, RecipeConfig
from ._data import RecipeError
from ._models import ARCHS
from ._report import format_table, plot_results
from ._runner import DATASETS, ENGINES, resolve_data_path, train_runs

__all__ = ["build_parser", "config_from_args", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    d, f = DIGITS_DEFAULTS, FOLDER_DEFAULTS
    invoked_as = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        # `ranger-recipes` (the console script) or `python -m ranger_plugins.recipes`.
        prog=invoked_as if invoked_as == "ranger-recipes" else "python -m ranger_plugins.recipes",
        description="Train the Mish + Ranger recipe (and a ReLU + AdamW + one-cycle baseline).",
    )
    parser.add_argument("--engine", choices=ENGINES, default="fastai", help="default: fastai")
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (default, ships with scikit-learn) or imagenette/imagewoof (downloaded "
        "with fastai's untar_data)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="an ImageNet-style folder (PATH/train/<class>/*, PATH/val/<class>/*); "
        "overrides --dataset",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, help=f"default: {d.epochs} (digits and folders)"
    )
    parser.add_argument("--seed", type=int, default=42, help="default: 42")
    parser.add_argument(
        "--size", type=_positive_int, help=f"image size; default: {d.size} (digits), {f.size}"
    )
    parser.add_argument("--bs", type=_positive_int, help=f"batch size; default: {d.bs}")
    parser.add_argument(
        "--lr",
        type=_positive_float,
        help=f"peak learning rate; default: {d.lr:g} (digits), {f.lr:g}",
    )
    parser.add_argument(
        "--arch", choices=sorted(ARCHS), help=f"default: {d.arch} (digits), {f.arch} (folders)"
    )
    parser.add_argument(
        "--sa", action="store_true", help="add fastai's simple self-attention to the XResNet"
    )
    parser.add_argument(
        "--gc",
        action="store_true",
        help="Gradient Centralization in Ranger (off by default, as in the leaderboard runs)",
    )
    parser.add_argument(
        "--pct-start",
        type=_fraction,
        default=0.72,
        help="fraction of iterations at flat lr before the cosine (default: 0.72, the record's)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the ReLU + AdamW + one-cycle baseline (default: on for digits, off "
        "for folders)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: 1 for digits, whose tiny ops gain nothing from "
        "more; torch's default for folders)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="data-loading workers for image folders"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="PNG to write (default: ./ranger-recipe-<dataset>.png)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    """Fill the per-dataset defaults into the parsed options."""
    folder = args.data is not None or args.dataset != "digits"
    defaults = FOLDER_DEFAULTS if folder else DIGITS_DEFAULTS
    name = args.data.name if args.data is not None else args.dataset
    return RecipeConfig(
        engine=args.engine,
        dataset=args.dataset,
        data=args.data,
        epochs=args.epochs or defaults.epochs,
        seed=args.seed,
        size=args.size or defaults.size,
        bs=args.bs or defaults.bs,
        lr=args.lr or defaults.lr,
        arch=args.arch or defaults.arch,
        self_attention=args.sa,
        gc=args.gc,
        pct_start=args.pct_start,
        baseline=defaults.baseline if args.baseline is None else args.baseline,
        workers=args.workers if args.workers is not None else (4 if folder else 0),
        threads=args.threads or defaults.threads,
        output=args.output or Path(f"ranger-recipe-{name}.png"),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; returns the process exit code."""
    parser = build_parser()
    config = config_from_args(parser.parse_args(argv))
    # fastai builds a few activations with torch.jit.script, which torch now deprecates;
    # the warning is fastai's to fix and says nothing about this run.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    if config.data is None and config.dataset == "digits" and config.size < 8:
        parser.error(f"--size must be >= 8 for digits (8x8 images), got {config.size}")
    try:
        path = resolve_data_path(config)
        start = time.perf_counter()
        results = train_runs(config, path)
    except RecipeError as error:
        # Bad input or a missing dataset/engine: a one-line explanation, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    title = f"{path.name if path else 'digits'}, {config.epochs} epochs, {config.engine}"
    png = plot_results(results, config.output, title)
    print(f"\nResults ({title}, seed {config.seed}):\n")
    print(format_table(results, config.epochs))
    print(f"\nTotal training time: {total:.1f} s")
    print(f"Loss curves and learning-rate schedules written to {png.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
