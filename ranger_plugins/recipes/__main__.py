"""``python -m ranger_plugins.recipes`` (or ``ranger-recipes``): the Mish + Ranger recipe.

With no options: trains the recipe (XResNet + Mish, Ranger, flat-then-cosine, label
smoothing) and the baseline (the same XResNet with ReLU, AdamW, one-cycle) on scikit-learn's
digits, prints a table and writes a PNG of the loss curves, accuracies and LR schedules.
``--seeds N`` trains each run with N seeds and reports the mean and standard deviation.
``--optimizer NAME`` trains the recipe with another member of the Ranger family
(``ranger_qh``, ``ranger_va``, ``ranger21``, ``ranger_lars``); ``--optimizer all`` trains it
with each of them, beside the baseline. ``--state-precision 16bit|8bit`` stores Ranger's
state in 16 or 8 bits (``Ranger(..., state_precision=...)``); ``--state-precision all``
trains the Ranger recipe with full, 16-bit and 8-bit state, and the table then adds the last
epoch's training loss.

With ``--data PATH`` (ImageNet-style folder) or ``--dataset imagenette|imagewoof``: trains
the leaderboard recipe (XResNet50 + Mish, 128 px, bs 64, lr 4e-3, 5 epochs).

Every option, the installed packages, the output file and the data are checked before
training (one ``error:`` line, exit code 2); the results are printed before the plot is
written (a plot that cannot be written: exit code 1, results kept).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from ._checks import BOUNDS, describe_bounds, number_in_bounds
from ._config import DIGITS_DEFAULTS, FOLDER_DEFAULTS, RecipeConfig, RunResult
from ._data import RecipeError
from ._models import ARCHS
from ._optimizers import ALL, OPTIMIZER_CHOICES, STATE_PRECISION_CHOICES
from ._report import format_per_seed, format_table, group_runs, plot_results
from ._runner import DATASETS, ENGINES, prepare_run, train_runs

__all__ = ["build_parser", "config_from_args", "main"]


def _bounded(name: str, kind: type):
    """An argparse ``type`` that parses ``kind`` and checks `BOUNDS` (exit code 2 if not)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if (reason := number_in_bounds(name, value)) is not None:
            raise argparse.ArgumentTypeError(reason)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _default_note(digits, folders) -> str:
    return f"default: {digits} (digits), {folders} (folders)"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
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
        metavar="PATH",
        help="an ImageNet-style folder (PATH/train/<class>/*, PATH/val/<class>/*); "
        "overrides --dataset",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="the plot (default: ./ranger-recipe-<dataset>.png); .png is added to a name "
        "without a suffix; .pdf, .svg, .jpg and matplotlib's other formats work too",
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    d, f = DIGITS_DEFAULTS, FOLDER_DEFAULTS
    parser.add_argument(
        "--epochs", type=_bounded("epochs", int), metavar="N", help=f"default: {d.epochs}"
    )
    parser.add_argument(
        "--seed", type=_bounded("seed", int), default=42, metavar="N", help="default: 42"
    )
    parser.add_argument(
        "--seeds",
        type=_bounded("seeds", int),
        metavar="N",
        default=1,
        help="train every run with this many seeds (--seed, --seed + 1, ...) and report the "
        "mean and standard deviation (default: 1)",
    )
    parser.add_argument(
        "--size",
        type=_bounded("size", int),
        metavar="PX",
        help=f"image size; {_default_note(d.size, f.size)}",
    )
    parser.add_argument(
        "--bs",
        type=_bounded("bs", int),
        metavar="N",
        help=f"batch size; {_default_note(d.bs, f.bs)}",
    )
    parser.add_argument(
        "--lr",
        type=_bounded("lr", float),
        metavar="LR",
        help=f"peak learning rate; {_default_note(f'{d.lr:g}', f'{f.lr:g}')}",
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), help=_default_note(d.arch, f.arch))
    parser.add_argument(
        "--pct-start",
        type=_bounded("pct_start", float),
        metavar="F",
        default=0.72,
        help="fraction of iterations at flat lr before the cosine (default: 0.72, the record's)",
    )


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZER_CHOICES,
        default="ranger",
        help="the recipe's optimizer, a member of the Ranger family (default: ranger); "
        "'all' trains the recipe with each of them, and the baseline",
    )
    parser.add_argument(
        "--state-precision",
        choices=STATE_PRECISION_CHOICES,
        default="full",
        help="how Ranger stores its state: full (fp32, default), 16bit or 8bit "
        "(Ranger(state_precision=...)); 'all' trains the Ranger recipe with each. Ranger "
        "only: with --optimizer all the other variants keep full state",
    )
    parser.add_argument(
        "--sa", action="store_true", help="add fastai's simple self-attention to the XResNet"
    )
    parser.add_argument(
        "--gc",
        action="store_true",
        help="Gradient Centralization in the recipe's optimizer (off by default in Ranger, "
        "as in the leaderboard runs; the other variants keep their own default)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the ReLU + AdamW + one-cycle baseline (default: on for digits and "
        "with --optimizer all, off for folders)",
    )
    parser.add_argument(
        "--threads",
        type=_bounded("threads", int),
        metavar="N",
        help="CPU threads for torch (default: 1 for digits, whose tiny ops gain nothing from "
        "more; torch's default for folders)",
    )
    parser.add_argument(
        "--workers",
        type=_bounded("workers", int),
        metavar="N",
        help="data-loading processes for image folders (default: 4)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; every number is checked against `BOUNDS` as it is parsed."""
    invoked_as = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        # `ranger-recipes` (the console script) or `python -m ranger_plugins.recipes`.
        prog=invoked_as if invoked_as == "ranger-recipes" else "python -m ranger_plugins.recipes",
        description="Train the Mish + Ranger recipe (and a ReLU + AdamW + one-cycle baseline).",
        epilog="Every number is bounded: "
        + ", ".join(f"--{name.replace('_', '-')} {describe_bounds(name)}" for name in BOUNDS)
        + ". Options, packages, the output and the data are all checked before training.",
    )
    _add_data_options(parser)
    _add_training_options(parser)
    _add_recipe_options(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    """Fill the per-dataset defaults into the parsed options."""
    folder = args.data is not None or args.dataset != "digits"
    defaults = FOLDER_DEFAULTS if folder else DIGITS_DEFAULTS
    # resolve(): `--data .` names the plot after the folder, not "."
    name = args.data.resolve().name if args.data is not None else args.dataset
    baseline = defaults.baseline or args.optimizer == ALL
    return RecipeConfig(
        engine=args.engine,
        dataset=args.dataset,
        data=args.data,
        epochs=args.epochs or defaults.epochs,
        seed=args.seed,
        seeds=args.seeds,
        size=args.size or defaults.size,
        bs=args.bs or defaults.bs,
        lr=args.lr or defaults.lr,
        arch=args.arch or defaults.arch,
        self_attention=args.sa,
        gc=args.gc,
        optimizer=args.optimizer,
        state_precision=args.state_precision,
        pct_start=args.pct_start,
        baseline=baseline if args.baseline is None else args.baseline,
        workers=args.workers if args.workers is not None else (4 if folder else 0),
        threads=args.threads or defaults.threads,
        output=args.output or Path(f"ranger-recipe-{name}.png"),
    )


def _print_results(config: RecipeConfig, results: list[RunResult], title: str) -> None:
    print(f"\nResults ({title}):\n")
    print(format_table(results, config.epochs))
    if config.seeds > 1:
        print()
        print(format_per_seed(results, config.epochs))


def _title(config: RecipeConfig, path) -> str:
    seeds = config.seed_list
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    epochs = f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}"
    return f"{path.name if path else 'digits'}, {epochs}, {config.engine}, {seeds_text}"


def _timing_line(results: list[RunResult], total: float) -> str:
    """Where the wall time went, in figures that add up as printed: the table's train times
    (fits only) and the rest (imports, data, checks, models)."""
    training = sum(round(sum(r.seconds for r in runs), 1) for runs in group_runs(results).values())
    total = round(total, 1)
    return (
        f"\nTotal {total:.1f} s (from the checks to the last run) = {training:.1f} s training "
        f"(the table's train times) + {max(total - training, 0.0):.1f} s importing libraries, "
        "loading data and building models"
    )


def _train(config: RecipeConfig, path, title: str) -> list[RunResult]:
    """Train every run; if one fails or is interrupted, print the runs that finished first."""
    results: list[RunResult] = []
    try:
        train_runs(config, path, results)
    except BaseException:
        if results:
            _print_results(config, results, f"{title}, the runs that finished")
        raise
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; returns the process exit code (2: bad input, nothing trained)."""
    parser = build_parser()
    config = config_from_args(parser.parse_args(argv))
    # fastai builds a few activations with torch.jit.script, which torch now deprecates;
    # the warning is fastai's to fix and says nothing about this run.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    start = time.perf_counter()
    try:
        config, path = prepare_run(config)  # every check before the first step of training
        title = _title(config, path)
        results = _train(config, path, title)
    except RecipeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    # The results first: nothing that can fail afterwards (the plot) can lose them.
    _print_results(config, results, title)
    print(_timing_line(results, time.perf_counter() - start))
    try:
        png = plot_results(results, config.output, title)
    except Exception as error:  # matplotlib, the disk: the run itself is done and printed
        print(f"{parser.prog}: error: could not write {config.output}: {error}", file=sys.stderr)
        return 1
    print(f"Loss curves, accuracies and learning-rate schedules written to {png.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
