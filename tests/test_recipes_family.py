"""The main job with every member of the Ranger family: ``--optimizer NAME`` and ``all``.

Checked without training (every test but the last replaces the training with a guard, or
builds the optimizers alone): the option's validation, that each name builds its class with
the recipe's hyperparameters (and Ranger21 without its own warmup and warmdown) in both
engines, and the report's aggregation over seeds. The last test, marked slow, trains
``--optimizer all`` for one epoch on 8-px digits (about 15 s).
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

import ranger_plugins.recipes.__main__ as cli  # noqa: E402
from ranger_plugins.family import OPTIMIZERS  # noqa: E402
from ranger_plugins.ranger21 import Ranger21Schedule  # noqa: E402
from ranger_plugins.recipes import (  # noqa: E402
    BASELINE,
    RECIPE,
    RecipeConfig,
    RecipeInputError,
    RunResult,
    _optimizers,  # noqa: E402
    format_table,
    prepare_run,
    recipe_spec,
    summarize,
)
from ranger_plugins.recipes.__main__ import build_parser, config_from_args, main  # noqa: E402
from ranger_plugins.recipes._optimizers import build_optimizer, variant_kwargs  # noqa: E402

NAMES = list(OPTIMIZERS)
CLASS_NAMES = {
    "ranger": "Ranger",
    "ranger_qh": "RangerQH",
    "ranger_va": "RangerVA",
    "ranger21": "Ranger21",
    "ranger_lars": "RangerLars",
}


@pytest.fixture
def no_training(monkeypatch):
    """Reaching the training fails the test: every check must come first."""

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


class _Net(nn.Module):
    """A conv, a norm layer and a head: weights to decay, norm weights and biases not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


def _decayed_and_not(model: nn.Module) -> tuple[set[int], set[int]]:
    decayed = {id(model.conv.weight), id(model.head.weight)}
    return decayed, {id(p) for p in model.parameters()} - decayed


def _assert_recipe_groups(optimizer, name: str, model: nn.Module, config: RecipeConfig) -> None:
    """The class of ``name``, the recipe's hyperparameters in every group, weight decay 1e-2
    on the weights only, and Ranger21's own schedule off."""
    assert type(optimizer) is OPTIMIZERS[name]
    decayed, exempt = _decayed_and_not(model)
    seen = set()
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if not ids:  # the fastai adapter keeps an empty twin where a layer group needs none
            continue
        seen |= ids
        assert group["lr"] == config.lr
        assert group["betas"] == (0.95, 0.99)
        assert group["eps"] == 1e-6
        assert group["weight_decay"] == (1e-2 if ids <= decayed else 0.0)
        assert ids <= decayed or ids <= exempt
    assert seen == decayed | exempt
    if name == "ranger21":
        _assert_ranger21_schedule_off(optimizer)
    if name == "ranger_qh":
        assert all(group["decouple_weight_decay"] for group in optimizer.param_groups)


def _assert_ranger21_schedule_off(optimizer) -> None:
    """Ranger21's warmup and warmdown are off: each step uses exactly the group's lr (what
    the recipe's flat-then-cosine schedule sets)."""
    for group in optimizer.param_groups:
        assert group["use_warmup"] is False and group["warmdown_active"] is False
        schedule = Ranger21Schedule.from_group(group)
        for step in (1, 10, 1_000, 100_000):
            assert schedule.lr(3e-3, step, group["betas"][1]) == 3e-3


# --- the option ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["adam", "Ranger", "ranger-qh", "", "ALL"])
def test_an_unknown_optimizer_is_one_error_line(value, capsys, no_training):
    line = _rejected(capsys, ["--optimizer", value])
    assert "argument --optimizer: invalid choice" in line
    assert "ranger_qh" in line and "all" in line  # the choices are listed


def test_an_unknown_optimizer_is_refused_programmatically(tmp_path):
    with pytest.raises(RecipeInputError, match="--optimizer must be one of ranger, ranger_qh"):
        prepare_run(RecipeConfig(optimizer="adamw", output=tmp_path / "plot.png"))


def test_a_value_a_variant_refuses_stops_the_run_before_training(
    capsys, monkeypatch, no_training, tmp_path
):
    # Each variant is built once on a dummy parameter before training: its own checks run.
    monkeypatch.setitem(_optimizers._EXTRA_KWARGS, "ranger_va", {"smooth": -1.0})
    line = _rejected(capsys, ["--optimizer", "all", "--output", str(tmp_path / "p.png")])
    assert "--optimizer ranger_va:" in line and "smooth" in line
    assert _rejected(capsys, ["--optimizer", "ranger_va", "--output", str(tmp_path / "p.png")])
    # Another variant alone is not affected.
    config, _ = prepare_run(RecipeConfig(optimizer="ranger_lars", output=tmp_path / "p.png"))
    assert config.optimizer == "ranger_lars"


def test_the_option_picks_the_runs():
    assert _config([]).runs == [RECIPE, BASELINE]  # the default is unchanged
    assert _config(["--optimizer", "ranger21"]).runs == [recipe_spec("ranger21"), BASELINE]
    every = _config(["--optimizer", "all"]).runs
    assert [spec.optimizer for spec in every] == [*NAMES, "adamw"]
    assert [spec.name for spec in every] == ["recipe", *NAMES[1:], "baseline"]
    assert all(spec.schedule == "flat_cos" and spec.activation == "mish" for spec in every[:-1])
    assert _config(["--optimizer", "all", "--no-baseline"]).runs == every[:-1]
    # On an image folder the baseline is off by default, but `all` compares with it.
    assert _config(["--data", "x", "--optimizer", "ranger_qh"]).runs == [recipe_spec("ranger_qh")]
    assert _config(["--data", "x", "--optimizer", "all"]).runs == every


def test_help_lists_the_choices():
    text = " ".join(build_parser().format_help().split())
    assert "--optimizer {ranger,ranger_qh,ranger_va,ranger21,ranger_lars,all}" in text


# --- each name builds its class --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("gc", [False, True])
def test_variant_kwargs(name, gc):
    kwargs = variant_kwargs(name, RecipeConfig(gc=gc))
    assert kwargs["betas"] == (0.95, 0.99) and kwargs["eps"] == 1e-6
    assert kwargs["weight_decay"] == 1e-2
    # --gc turns GC on everywhere; without it Ranger has none (the leaderboard runs) and
    # the others keep their own default (on in Ranger21 only).
    group = build_optimizer(
        name, [{"params": [nn.Parameter(torch.zeros(2, 2))]}], 1e-3, RecipeConfig(gc=gc)
    ).param_groups[0]
    assert group["use_gc"] is (gc or name == "ranger21")
    assert CLASS_NAMES[name] == _optimizers.OPTIMIZER_NAMES[name]


@pytest.mark.parametrize("name", NAMES)
def test_the_variants_keep_their_own_other_defaults(name):
    group = build_optimizer(
        name, [{"params": [nn.Parameter(torch.zeros(2))]}], 1e-3, RecipeConfig()
    ).param_groups[0]
    # Ranger21's defaults need the run's length (its warmdown); any length will do here.
    length = {"num_iterations": 100} if name == "ranger21" else {}
    reference = OPTIMIZERS[name]([nn.Parameter(torch.zeros(2))], **length).param_groups[0]
    changed = {
        "lr", "betas", "eps", "weight_decay", "use_gc", "decouple_weight_decay", "use_warmup",
        "warmdown_active", "num_iterations",
    }  # fmt: skip
    for key, value in reference.items():
        if key not in changed and key != "params":
            assert group[key] == value, key


def test_fastai_names():
    from ranger_plugins.recipes._fastai_engine import fastai_kwargs

    config = RecipeConfig(gc=True)
    assert fastai_kwargs(variant_kwargs("ranger", config)) == {
        "mom": 0.95, "sqr_mom": 0.99, "eps": 1e-6, "wd": 1e-2, "k": 6, "alpha": 0.5, "gc": True,
    }  # fmt: skip
    qh = fastai_kwargs(variant_kwargs("ranger_qh", config))
    assert qh["decouple_wd"] is True and "decouple_weight_decay" not in qh
    r21 = fastai_kwargs(variant_kwargs("ranger21", RecipeConfig()))
    assert (r21["use_warmup"], r21["warmdown_active"]) == (False, False) and "gc" not in r21


@pytest.mark.parametrize("name", NAMES)
def test_fastai_engine_builds_each_variant(name):
    """Through a Learner (as the run builds it, without fitting): the adapter's opt_func
    with the recipe's hyperparameters, no weight decay on norm/bias (``wd_bn_bias=False``)."""
    pytest.importorskip("fastai")
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from ranger_plugins.fastai import RangerOptimWrapper
    from ranger_plugins.recipes._fastai_engine import _recipe_optimizer

    config, model = RecipeConfig(lr=5e-3), _Net()
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 3, 3), torch.tensor([0, 1, 0, 1]))
    dls = DataLoaders.from_dsets(data, data, bs=2)
    opt_func, callbacks = _recipe_optimizer(config, recipe_spec(name))
    learn = Learner(
        dls, model, nn.CrossEntropyLoss(), opt_func=opt_func, lr=config.lr, cbs=callbacks
    )  # wd_bn_bias=False by default, as in the run
    learn.create_opt()  # what fit does first
    assert isinstance(learn.opt, RangerOptimWrapper)
    learn.opt.state_dict()  # places the params by the Learner's do_wd flags, as a step does
    _assert_recipe_groups(learn.opt.opt, name, model, config)
    assert [type(cb).__name__ for cb in callbacks] == ["LookaheadCallback"]
    learn.opt.set_hyper("lr", 2e-3)  # fastai's schedulers reach every group
    assert {group["lr"] for group in learn.opt.opt.param_groups} == {2e-3}


@pytest.mark.parametrize("name", NAMES)
def test_lightning_engine_builds_each_variant(name):
    pytest.importorskip("lightning")
    from ranger_plugins.recipes._lightning_engine import _optimizers as configure
    from ranger_plugins.schedules import FlatCosineLR

    config, module = RecipeConfig(lr=5e-3, pct_start=0.6), _Net()
    module.trainer = SimpleNamespace(estimated_stepping_batches=100)
    returned = configure(module, config, recipe_spec(name))
    _assert_recipe_groups(returned["optimizer"], name, module, config)
    scheduler = returned["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, FlatCosineLR) and returned["lr_scheduler"]["interval"] == "step"
    assert (scheduler.total_steps, scheduler.pct_start) == (100, 0.6)


# --- the report ------------------------------------------------------------------------


def _result(spec, seed: int, accuracy: float, loss: float, seconds: float) -> RunResult:
    return RunResult(
        spec=spec,
        accuracy=accuracy,
        valid_loss=loss,
        seconds=seconds,
        train_losses=[2.0, 1.0],
        lrs=[1e-3, 1e-4],
        valid_iters=[2],
        valid_losses=[loss],
        model_name="xresnet_tiny + Mish",
        seed=seed,
    )


FAKE = {  # per run: (accuracy, loss, seconds) for seeds 42, 43, 44
    "ranger": [(0.99, 0.58, 20.0), (0.98, 0.60, 22.0), (1.00, 0.57, 21.0)],
    "ranger_qh": [(0.97, 0.61, 30.0), (0.99, 0.59, 36.0), (0.98, 0.62, 33.0)],
    "adamw": [(1.00, 0.55, 10.0), (1.00, 0.56, 10.0), (0.99, 0.54, 13.0)],
}


def _fake_results() -> list[RunResult]:
    specs = {"ranger": RECIPE, "ranger_qh": recipe_spec("ranger_qh"), "adamw": BASELINE}
    return [
        _result(specs[name], 42 + i, *FAKE[name][i])  # seed by seed, as train_runs orders them
        for i in range(3)
        for name in FAKE
    ]


def test_summarize_mean_and_std_per_optimizer():
    summaries = summarize(_fake_results(), epochs=5)
    assert [s.spec.optimizer for s in summaries] == list(FAKE)
    for summary, runs in zip(summaries, FAKE.values()):
        accuracies, losses, seconds = ([run[i] for run in runs] for i in range(3))
        assert summary.seeds == [42, 43, 44]
        assert summary.accuracy.mean == pytest.approx(100 * statistics.fmean(accuracies))
        assert summary.accuracy.std == pytest.approx(100 * statistics.stdev(accuracies))
        assert summary.valid_loss.mean == pytest.approx(statistics.fmean(losses))
        assert summary.valid_loss.std == pytest.approx(statistics.stdev(losses))
        per_epoch = [s / 5 for s in seconds]
        assert summary.epoch_seconds.mean == pytest.approx(statistics.fmean(per_epoch))
        assert summary.epoch_seconds.std == pytest.approx(statistics.stdev(per_epoch))
        assert summary.train_seconds == pytest.approx(sum(seconds))
    # The sample standard deviation (n - 1), by hand for RangerQH's seconds per epoch:
    # 6.0, 7.2, 6.6 -> mean 6.6, squared deviations 0.36 + 0.36 + 0 over 2.
    assert summaries[1].epoch_seconds.std == pytest.approx(math.sqrt(0.36))


def test_table_rows_per_optimizer():
    header, rule, *rows = format_table(_fake_results(), epochs=5).splitlines()
    assert header.split("|")[-3:-1] == [" time per epoch ", " train time "]
    assert len(rule.split("|")) == len(header.split("|"))
    assert rows[0] == (
        "| recipe | xresnet_tiny + Mish | Ranger | flat + cosine | 5 | 42-44 "
        "| 99.00 ± 1.00% | 0.5833 ± 0.0153 | 4.20 ± 0.20 s | 63.0 s |"
    )
    assert rows[1].startswith("| ranger_qh | xresnet_tiny + Mish | RangerQH | flat + cosine |")
    assert "| 6.60 ± 0.60 s | 99.0 s |" in rows[1]
    assert rows[2].startswith("| baseline | xresnet_tiny + Mish | AdamW | one-cycle |")


def test_one_seed_has_no_spread():
    (summary,) = summarize([_result(recipe_spec("ranger21"), 7, 0.5, 1.25, 9.0)], epochs=3)
    assert summary.accuracy.std is None and summary.accuracy.format("{:.2f}") == "50.00"
    (row,) = format_table([_result(recipe_spec("ranger21"), 7, 0.5, 1.25, 9.0)], 3).splitlines()[2:]
    assert row.endswith("| Ranger21 | flat + cosine | 3 | 7 | 50.00% | 1.2500 | 3.00 s | 9.0 s |")


def test_main_prints_every_optimizer(capsys, monkeypatch, tmp_path):
    def train_runs(config, path, results):
        assert [spec.optimizer for spec in config.runs] == [*NAMES, "adamw"]
        results.extend(
            _result(spec, seed, 0.9, 0.6, 5.0) for seed in config.seed_list for spec in config.runs
        )
        return results

    monkeypatch.setattr(cli, "train_runs", train_runs)
    argv = ["--optimizer", "all", "--seeds", "2", "--output", str(tmp_path / "all.png")]
    assert main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    names = [row.split("|")[3].strip() for row in rows]
    assert names == [*CLASS_NAMES.values(), "AdamW"]
    assert all(
        "| 42-43 | 90.00 ± 0.00% | 0.6000 ± 0.0000 | 1.00 ± 0.00 s | 10.0 s |" in r for r in rows
    )
    assert (tmp_path / "all.png").exists()


# --- one short run of every optimizer --------------------------------------------------


@pytest.mark.slow
def test_all_optimizers_train_one_epoch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastai")
    pytest.importorskip("sklearn")
    trained = []
    real_train_runs = cli.train_runs

    def spy(config, path, results):
        trained.extend(real_train_runs(config, path, results))
        return results

    monkeypatch.setattr(cli, "train_runs", spy)
    output = tmp_path / "all.png"
    argv = ["--optimizer", "all", "--epochs", "1", "--seeds", "1", "--size", "8"]
    assert main([*argv, "--output", str(output)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[3].strip() for row in rows] == [*CLASS_NAMES.values(), "AdamW"]
    assert output.exists()
    for result in trained[:-1]:
        assert type(result.optimizer) is OPTIMIZERS[result.spec.optimizer]
        assert math.isfinite(result.valid_loss) and 0.0 <= result.accuracy <= 1.0
        assert result.lrs[0] == pytest.approx(8e-3) and result.lrs[-1] < 8e-3 / 10  # flat-cos
    (ranger21,) = [r for r in trained if r.spec.optimizer == "ranger21"]
    _assert_ranger21_schedule_off(ranger21.optimizer)
    assert trained[-1].spec == BASELINE and type(trained[-1].optimizer) not in OPTIMIZERS.values()
