"""The main job checks every input before it trains, and never loses a finished run.

Each bad input must give one ``error:`` line and exit code 2 without training anything:
every test here replaces the training with a guard that fails if it is reached, so these
tests take milliseconds. The runs that do finish are printed before the plot is written.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")

import ranger_plugins.recipes.__main__ as cli  # noqa: E402
from ranger_plugins.recipes import (  # noqa: E402
    BASELINE,
    BOUNDS,
    RECIPE,
    RecipeConfig,
    RecipeInputError,
    RunResult,
    _checks,  # noqa: E402
    format_per_seed,
    format_table,
    plot_results,
    prepare_run,
    scan_image_folder,
)
from ranger_plugins.recipes.__main__ import build_parser, main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Any test that reaches training fails: every check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started: a check should have stopped the run first")

    monkeypatch.setattr(cli, "train_runs", refuse)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def _rejected(capsys, argv: list[str]) -> str:
    """Run the main job on ``argv``; it must exit with code 2 and one ``error:`` line."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors exit
        code = exit_info.code
    assert code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    return line


def _write_image(path: Path, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (120, 30, 200)).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A valid ImageNet-style folder: 2 classes, 3 train and 1 val image each."""
    root = tmp_path / "images"
    for label in ("cats", "dogs"):
        for i in range(3):
            _write_image(root / "train" / label / f"{i}.png")
        _write_image(root / "val" / label / "0.jpg")
    return root


# --- numbers ---------------------------------------------------------------------------

OUT_OF_BOUNDS = [
    ("--epochs", "0"),
    ("--epochs", "1001"),
    ("--epochs", "two"),
    ("--seed", "-1"),
    ("--seed", str(2**32)),
    ("--seeds", "0"),
    ("--seeds", "101"),
    ("--size", "7"),
    ("--size", "1025"),
    ("--bs", "1"),
    ("--bs", "4097"),
    ("--lr", "0"),
    ("--lr", "-0.001"),
    ("--lr", "1.5"),
    ("--lr", "nan"),
    ("--pct-start", "-0.1"),
    ("--pct-start", "1.01"),
    ("--threads", "0"),
    ("--workers", "-1"),
]


@pytest.mark.parametrize(("option", "value"), OUT_OF_BOUNDS)
def test_every_number_out_of_bounds_is_one_error_line(option, value, capsys):
    line = _rejected(capsys, [option, value])
    assert f"argument {option}:" in line
    assert value in line  # the message repeats what was given


def test_every_bounded_option_is_checked_on_the_command_line():
    # A new entry in BOUNDS without a test above would go unchecked.
    tested = {option.removeprefix("--").replace("-", "_") for option, _ in OUT_OF_BOUNDS}
    assert tested == set(BOUNDS)


def test_numbers_at_their_bounds_are_accepted():
    args = build_parser().parse_args(
        ["--epochs", "1000", "--seed", "0", "--seeds", "100", "--size", "8", "--bs", "2"]
        + ["--lr", "1", "--pct-start", "0", "--threads", "1", "--workers", "0"]
    )
    assert (args.epochs, args.seeds, args.size, args.bs, args.lr) == (1000, 100, 8, 2, 1.0)
    assert (
        build_parser().parse_args(["--pct-start", "1", "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("seeds", 0), ("size", 4), ("bs", 1), ("lr", 0.0), ("pct_start", 2.0),
     ("threads", 0), ("workers", -2), ("seed", -5)],
)  # fmt: skip
def test_programmatic_config_is_checked_too(field, value, tmp_path):
    config = RecipeConfig(output=tmp_path / "plot.png", **{field: value})
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
        prepare_run(config)


def test_seed_range_and_digits_batch_are_checked(capsys):
    assert "2**32 - 1" in _rejected(capsys, ["--seed", str(2**32 - 1), "--seeds", "2"])
    line = _rejected(capsys, ["--bs", "1438"])
    assert "--bs 1438 is larger than the digits training split (1437 images)" in line


def test_help_is_not_cut():
    text = " ".join(build_parser().format_help().split())  # undo argparse's line wrapping
    assert "image size; default: 32 (digits), 128 (folders)" in text
    assert "peak learning rate; default: 0.008 (digits), 0.004 (folders)" in text
    assert "batch size; default: 64 (digits), 64 (folders)" in text
    assert "--seeds 1-100" in text and "--lr > 0 and <= 1" in text


# --- extras ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "missing", "named"),
    [
        ([], {"fastai"}, "fastai"),
        ([], {"sklearn"}, "scikit-learn"),
        ([], {"matplotlib"}, "matplotlib"),
        (["--engine", "lightning"], {"lightning"}, "lightning"),
        (["--data", "somewhere"], {"torchvision"}, "torchvision"),
    ],
)
def test_a_missing_package_names_the_recipes_extra(argv, missing, named, monkeypatch, capsys):
    real = _checks._installed
    monkeypatch.setattr(
        _checks, "_installed", lambda module: module not in missing and real(module)
    )
    line = _rejected(capsys, argv)
    assert f"the recipes need {named}, not installed here" in line
    assert "pip install '.[recipes]'" in line


# --- output ----------------------------------------------------------------------------


def test_output_suffix(tmp_path, capsys):
    config, _ = prepare_run(RecipeConfig(output=tmp_path / "sub" / "plot"))
    assert config.output == tmp_path / "sub" / "plot.png"  # .png added to a bare name
    assert not (tmp_path / "sub").exists()  # nothing is created before training
    config, _ = prepare_run(RecipeConfig(output=tmp_path / "plot.PDF"))
    assert config.output.suffix == ".PDF"  # any format matplotlib writes
    line = _rejected(capsys, ["--output", str(tmp_path / "plot.txt")])
    assert "matplotlib cannot write '.txt' files; use one of" in line and ".png" in line


def test_output_must_be_a_writable_file(tmp_path, capsys, monkeypatch):
    assert "is a directory" in _rejected(capsys, ["--output", str(tmp_path)])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    line = _rejected(capsys, ["--output", str(a_file / "plot.png")])
    assert f"{a_file} is not a directory" in line
    # Tests may run as root, who can write anywhere: the permission check is simulated.
    monkeypatch.setattr(_checks.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert f"{tmp_path} is not writable" in _rejected(capsys, ["--output", str(tmp_path / "a.png")])


# --- image folders ---------------------------------------------------------------------


def test_a_valid_folder_is_summarised(folder):
    summary = scan_image_folder(folder)
    assert summary.classes == ["cats", "dogs"]
    assert (summary.train_images, summary.val_images) == (6, 2)


def _folder_error(capsys, folder: Path, *extra: str) -> str:
    return _rejected(capsys, ["--data", str(folder), *extra])


def test_an_empty_class_folder(folder, capsys):
    (folder / "val" / "dogs" / "0.jpg").unlink()
    (folder / "val" / "dogs" / "notes.txt").write_text("not an image")  # not counted
    line = _folder_error(capsys, folder)
    assert "class folders without images" in line and "val/dogs" in line


@pytest.mark.parametrize(
    "content",
    [b"this is text, not a PNG", PNG_MAGIC + b"\x00\x00\x00\rIHDR broken"],
    ids=["not-an-image", "broken-png"],
)
def test_unreadable_images(folder, capsys, content):
    (folder / "train" / "cats" / "bad.png").write_bytes(content)
    line = _folder_error(capsys, folder)
    assert "1 of 9 images cannot be read" in line and "train/cats/bad.png (" in line


def test_a_truncated_image(folder, capsys):
    good = folder / "train" / "dogs" / "0.png"
    _write_image(good, size=64)
    good.write_bytes(good.read_bytes()[:-40])  # cut inside the image data
    assert "train/dogs/0.png" in _folder_error(capsys, folder)


def test_train_and_val_classes_differ(folder, capsys):
    (folder / "val" / "dogs").rename(folder / "val" / "birds")
    line = _folder_error(capsys, folder)
    assert "train and val have different classes" in line
    assert "only in train ['dogs']" in line and "only in val ['birds']" in line


def test_folder_layout_errors(tmp_path, folder, capsys):
    assert "not a directory" in _folder_error(capsys, tmp_path / "missing")
    assert "no 'train' folder" in _folder_error(capsys, folder / "train")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir()
    assert "'train' has no class folders" in _folder_error(capsys, tmp_path / "flat")


def test_batch_larger_than_the_folder(folder, capsys):
    line = _folder_error(capsys, folder, "--bs", "7")
    assert "--bs 7 is larger than the training set" in line and "(6 images)" in line


# --- the results come first ------------------------------------------------------------


def _result(spec, seed: int, accuracy: float, loss: float, seconds: float) -> RunResult:
    return RunResult(
        spec=spec,
        accuracy=accuracy,
        valid_loss=loss,
        seconds=seconds,
        train_losses=[2.0, 1.5, 1.2, 1.0 + seed % 3 / 10],
        lrs=[1e-3, 2e-3, 1e-3, 1e-4],
        valid_iters=[2, 4],
        valid_losses=[1.4, loss],
        model_name="xresnet_tiny + " + ("Mish" if spec is RECIPE else "ReLU"),
        seed=seed,
    )


def _fake_training(results_by_seed):
    """A stand-in for train_runs that returns ready results, in the real call's way."""

    def train_runs(config, path, results=None):
        results = [] if results is None else results
        results.extend(results_by_seed)
        return results

    return train_runs


def test_the_table_is_printed_before_the_plot_fails(tmp_path, capsys, monkeypatch):
    results = [_result(RECIPE, 42, 0.9889, 0.5785, 13.6), _result(BASELINE, 42, 1.0, 0.55, 12.3)]
    monkeypatch.setattr(cli, "train_runs", _fake_training(results))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "plot_results", full_disk)
    assert main(["--output", str(tmp_path / "plot.png")]) == 1
    captured = capsys.readouterr()
    assert (
        "| recipe | xresnet_tiny + Mish | Ranger | flat + cosine | 5 | 42 | 98.89% " in captured.out
    )
    (line,) = _error_lines(captured.err)
    assert "could not write" in line and "No space left on device" in line


def test_finished_runs_are_printed_when_a_later_run_fails(tmp_path, capsys, monkeypatch):
    def train_runs(config, path, results):
        results.append(_result(RECIPE, 42, 0.95, 0.6, 10.0))
        raise KeyboardInterrupt  # Ctrl-C during the baseline

    monkeypatch.setattr(cli, "train_runs", train_runs)
    with pytest.raises(KeyboardInterrupt):
        main(["--output", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out
    assert "the runs that finished" in out and "| recipe |" in out and "95.00%" in out


def test_total_time_adds_up_with_the_table(tmp_path, capsys, monkeypatch):
    results = [_result(RECIPE, 42, 0.9, 0.6, 13.64), _result(BASELINE, 42, 0.9, 0.6, 12.33)]
    monkeypatch.setattr(cli, "train_runs", _fake_training(results))
    # The wall clock: 30.04 s from the start of the checks to the end of the last run.
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=iter([100.0, 130.04]).__next__))
    assert main(["--output", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    # The last two columns: time per epoch (5 epochs) and train time.
    times = [
        tuple(map(float, t)) for t in re.findall(r"\| ([\d.]+) s \| ([\d.]+) s \|$", out, re.M)
    ]
    assert times == [(2.73, 13.6), (2.47, 12.3)]
    total, training, rest = map(
        float,
        re.search(
            r"Total ([\d.]+) s \(from the checks to the last run\) = ([\d.]+) s training.*\+ ([\d.]+) s",
            out,
        ).groups(),
    )
    assert (total, training, rest) == pytest.approx((30.0, 25.9, 4.1))
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_MAGIC)


# --- several seeds ---------------------------------------------------------------------


def _seeded_results() -> list[RunResult]:
    accuracies = {RECIPE: [0.9889, 0.9889, 0.9944, 0.9944], BASELINE: [1.0, 0.9833, 1.0, 0.9972]}
    losses = {RECIPE: [0.58, 0.57, 0.56, 0.59], BASELINE: [0.55, 0.56, 0.54, 0.55]}
    return [
        _result(spec, 42 + i, accuracies[spec][i], losses[spec][i], 10.0)
        for i in range(4)
        for spec in (RECIPE, BASELINE)
    ]


def test_table_reports_mean_and_std_over_seeds():
    results = _seeded_results()
    recipe_row, baseline_row = format_table(results, epochs=5).splitlines()[2:]
    accuracies = [98.89, 98.89, 99.44, 99.44]
    expected = f"{statistics.fmean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}%"
    assert f"| 5 | 42-45 | {expected} |" in recipe_row
    assert "| 0.5750 ± 0.0129 |" in recipe_row  # stdev of 0.58, 0.57, 0.56, 0.59
    assert "40.0 s |" in baseline_row  # 4 seeds x 10 s
    per_seed = format_per_seed(results).splitlines()
    assert per_seed[1] == (
        "baseline (seed: accuracy / loss): 42: 100.00% / 0.5500, 43: 98.33% / 0.5600, "
        "44: 100.00% / 0.5400, 45: 99.72% / 0.5500"
    )


def test_main_with_seeds_prints_each_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "train_runs", _fake_training(_seeded_results()))
    assert main(["--seeds", "4", "--output", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    assert "digits, 5 epochs, fastai, seeds 42-45" in out
    assert "recipe (seed: accuracy / loss): 42: 98.89% / 0.5800," in out


def test_plot_shows_every_seed(tmp_path, monkeypatch):
    import matplotlib.axes

    scattered = []
    real_scatter = matplotlib.axes.Axes.scatter

    def scatter(self, x, y, *args, **kwargs):
        scattered.append(list(y))
        return real_scatter(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)
    path = plot_results(_seeded_results(), tmp_path / "seeds.png", "digits")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert scattered == [
        pytest.approx([98.89, 98.89, 99.44, 99.44]),
        pytest.approx([100.0, 98.33, 100.0, 99.72]),
    ]


def test_train_runs_trains_each_seed_in_turn(monkeypatch):
    from ranger_plugins.recipes import _fastai_engine, _runner

    calls = []

    def train_fastai(config, spec, path):
        calls.append((config.seed, config.seeds, spec.name))
        return _result(spec, config.seed, 0.5, 1.0, 1.0)

    monkeypatch.setattr(_fastai_engine, "train_fastai", train_fastai)
    results = _runner.train_runs(RecipeConfig(seeds=2, seed=7), None)
    assert calls == [(7, 1, "recipe"), (7, 1, "baseline"), (8, 1, "recipe"), (8, 1, "baseline")]
    assert [r.seed for r in results] == [7, 7, 8, 8]


def test_bad_input_raises_value_errors_programmatically(tmp_path):
    with pytest.raises(RecipeInputError, match="matplotlib cannot write"):
        prepare_run(RecipeConfig(output=tmp_path / "x.doc"))
    with pytest.raises(ValueError, match="engine must be one of"):
        prepare_run(RecipeConfig(engine="keras"))
