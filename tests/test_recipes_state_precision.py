"""The main job's ``--state-precision full|16bit|8bit|all``: Ranger's low-memory state.

Checked without training (every test but the last replaces the training with a guard, or
builds the optimizers alone): the option's validation (one ``error:`` line, exit code 2,
nothing trained), the runs it picks, the optimizer each engine builds, and the table's
training-loss column. The last test, marked slow, trains ``--state-precision 8bit`` for one
epoch on 8-px digits.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

import ranger_plugins.recipes.__main__ as cli  # noqa: E402
from ranger_plugins import Ranger  # noqa: E402
from ranger_plugins.recipes import (  # noqa: E402
    BASELINE,
    RECIPE,
    RecipeConfig,
    RecipeInputError,
    RunResult,
    format_table,
    prepare_run,
    recipe_spec,
)
from ranger_plugins.recipes.__main__ import build_parser, config_from_args, main  # noqa: E402
from ranger_plugins.recipes._optimizers import build_optimizer, variant_kwargs  # noqa: E402
from ranger_plugins.recipes._report import final_train_loss, format_per_seed  # noqa: E402


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started: a check should have stopped the run first")

    monkeypatch.setattr(cli, "train_runs", refuse)


def _rejected(capsys, argv: list[str]) -> str:
    """``main(argv)`` exits with code 2 and exactly one ``error:`` line, which is returned."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors exit
        code = exit_info.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def _config(argv: list[str]) -> RecipeConfig:
    return config_from_args(build_parser().parse_args(argv))


# --- the option ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["4bit", "fp32", "8", "", "ALL"])
def test_an_unknown_precision_is_one_error_line(value, capsys, no_training):
    line = _rejected(capsys, ["--state-precision", value])
    assert "argument --state-precision: invalid choice" in line
    assert "16bit" in line and "8bit" in line


@pytest.mark.parametrize("optimizer", ["ranger_qh", "ranger21"])
def test_low_memory_state_is_for_ranger_only(optimizer, capsys, no_training, tmp_path):
    argv = ["--optimizer", optimizer, "--state-precision", "8bit"]
    line = _rejected(capsys, [*argv, "--output", str(tmp_path / "p.png")])
    assert "--state-precision 8bit applies to Ranger only" in line
    # Full state is every variant's own: accepted with any optimizer.
    config, _ = prepare_run(
        RecipeConfig(optimizer=optimizer, state_precision="full", output=tmp_path / "p.png")
    )
    assert config.state_precision == "full"


def test_bad_values_are_refused_programmatically(tmp_path):
    output = tmp_path / "p.png"
    with pytest.raises(RecipeInputError, match="--state-precision must be one of full, 16bit"):
        prepare_run(RecipeConfig(state_precision="delta", output=output))
    with pytest.raises(RecipeInputError, match="applies to Ranger only"):
        prepare_run(RecipeConfig(optimizer="ranger_va", state_precision="all", output=output))


def test_the_option_picks_the_runs():
    assert _config([]).runs == [RECIPE, BASELINE]  # full state by default, as before
    assert _config(["--state-precision", "full"]).runs == [RECIPE, BASELINE]
    assert _config(["--state-precision", "8bit"]).runs == [recipe_spec("ranger", "8bit"), BASELINE]
    every = _config(["--state-precision", "all", "--no-baseline"]).runs
    assert [spec.name for spec in every] == ["recipe", "recipe_16bit", "recipe_8bit"]
    assert [spec.state_precision for spec in every] == ["full", "16bit", "8bit"]
    assert {spec.optimizer for spec in every} == {"ranger"}
    # With every variant: Ranger in each precision, the others in full state.
    family = _config(["--optimizer", "all", "--state-precision", "16bit"]).runs
    assert [spec.name for spec in family][:3] == ["recipe_16bit", "ranger_qh", "ranger_va"]
    assert [spec.state_precision for spec in family] == ["16bit", *["full"] * 5]


def test_help_lists_the_choices():
    text = " ".join(build_parser().format_help().split())
    assert "--state-precision {full,16bit,8bit,all}" in text


# --- the optimizer each engine builds --------------------------------------------------


def test_variant_kwargs_pass_the_precision_on():
    assert "state_precision" not in variant_kwargs("ranger", RecipeConfig())  # as before
    assert variant_kwargs("ranger", RecipeConfig(), "8bit")["state_precision"] == "8bit"
    params = [{"params": [nn.Parameter(torch.zeros(4))]}]
    built = build_optimizer("ranger", params, 1e-3, RecipeConfig(), "16bit")
    assert [group["state_precision"] for group in built.param_groups] == ["16bit"]


class _Net(nn.Module):
    """A weight large enough for the 8-bit layout (4096 elements), and a small one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 1, bias=False)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def _assert_precision(optimizer, model: _Net, precision: str) -> None:
    assert isinstance(optimizer, Ranger)
    assert {group["state_precision"] for group in optimizer.param_groups} == {precision}
    large = optimizer.state[model.conv.weight]["exp_avg"].dtype
    small = optimizer.state[model.head.weight]["exp_avg"].dtype
    expected = {"16bit": torch.bfloat16, "8bit": torch.int8}[precision]
    assert large == expected and small == torch.bfloat16  # small tensors keep 16 bits


def _step(optimizer, model: _Net) -> None:
    model(torch.randn(2, 64, 3, 3)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_fastai_engine_builds_low_memory_ranger(precision):
    pytest.importorskip("fastai")
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from ranger_plugins.recipes._fastai_engine import _recipe_optimizer

    model = _Net()
    data = torch.utils.data.TensorDataset(torch.randn(4, 64, 3, 3), torch.tensor([0, 1, 0, 1]))
    opt_func, callbacks = _recipe_optimizer(RecipeConfig(), recipe_spec("ranger", precision))
    learn = Learner(
        DataLoaders.from_dsets(data, data, bs=2), model, nn.CrossEntropyLoss(), opt_func=opt_func
    )
    learn.create_opt()
    _step(learn.opt, model)
    _assert_precision(learn.opt.opt, model, precision)


@pytest.mark.parametrize("precision", ["16bit", "8bit"])
def test_lightning_engine_builds_low_memory_ranger(precision):
    pytest.importorskip("lightning")
    from ranger_plugins.recipes._lightning_engine import _optimizers as configure

    module = _Net()
    module.trainer = SimpleNamespace(estimated_stepping_batches=100)
    optimizer = configure(module, RecipeConfig(), recipe_spec("ranger", precision))["optimizer"]
    _step(optimizer, module)
    _assert_precision(optimizer, module, precision)


# --- the report ------------------------------------------------------------------------


def _result(spec, seed: int, accuracy: float, train_losses: list[float]) -> RunResult:
    return RunResult(
        spec=spec,
        accuracy=accuracy,
        valid_loss=0.6,
        seconds=10.0,
        train_losses=train_losses,
        lrs=[1e-3] * len(train_losses),
        valid_iters=[2, 4],
        valid_losses=[0.8, 0.6],
        model_name="xresnet_tiny + Mish",
        seed=seed,
    )


def test_final_train_loss_is_the_last_epochs_mean():
    result = _result(RECIPE, 42, 0.9, [3.0, 2.0, 1.0, 0.5])
    assert final_train_loss(result, epochs=2) == pytest.approx(0.75)
    assert final_train_loss(result, epochs=4) == pytest.approx(0.5)
    assert math.isnan(final_train_loss(_result(RECIPE, 42, 0.9, []), epochs=2))


def test_the_table_adds_the_train_loss_with_low_memory_state():
    specs = [recipe_spec("ranger", p) for p in ("full", "16bit", "8bit")]
    results = [
        _result(spec, 42 + seed, 0.9 + 0.01 * seed, [2.0, 1.0, 0.5 + 0.1 * seed, 0.7])
        for seed in range(2)
        for spec in specs
    ]
    header, rule, *rows = format_table(results, epochs=2).splitlines()
    assert "| valid loss | train loss | time per epoch |" in header
    assert len(rule.split("|")) == len(header.split("|"))
    assert rows[0].startswith("| recipe | xresnet_tiny + Mish | Ranger | flat + cosine |")
    assert rows[2].startswith("| recipe_8bit | xresnet_tiny + Mish | Ranger, 8bit state |")
    # The last epoch's mean: (0.5 + 0.7) / 2 and (0.6 + 0.7) / 2.
    assert "| 0.6000 ± 0.0000 | 0.6250 ± 0.0354 | 5.00 ± 0.00 s |" in rows[1]
    per_seed = format_per_seed(results, epochs=2).splitlines()
    assert per_seed[1] == (
        "recipe_16bit (seed: accuracy / loss / train loss): 42: 90.00% / 0.6000 / 0.6000, "
        "43: 91.00% / 0.6000 / 0.6500"
    )
    # Full state alone: the table it always printed.
    assert "train loss" not in format_table(results[:1], epochs=2)


# --- one short run ---------------------------------------------------------------------


@pytest.mark.slow
def test_an_8bit_run_trains_one_epoch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastai")
    pytest.importorskip("sklearn")
    trained = []
    real_train_runs = cli.train_runs

    def spy(config, path, results):
        trained.extend(real_train_runs(config, path, results))
        return results

    monkeypatch.setattr(cli, "train_runs", spy)
    output = tmp_path / "8bit.png"
    argv = ["--state-precision", "8bit", "--epochs", "1", "--size", "8", "--no-baseline"]
    assert main([*argv, "--output", str(output)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "| train loss |" in rows[0]
    assert rows[1].startswith("| recipe_8bit | xresnet_tiny + Mish | Ranger, 8bit state |")
    assert output.exists()
    (result,) = trained
    optimizer = result.optimizer
    assert isinstance(optimizer, Ranger)
    assert {group["state_precision"] for group in optimizer.param_groups} == {"8bit"}
    dtypes = {state["exp_avg"].dtype for state in optimizer.state.values()}
    assert dtypes == {torch.int8, torch.bfloat16}  # large tensors in 8 bits, small in 16
    assert math.isfinite(result.valid_loss) and result.accuracy > 0.3
