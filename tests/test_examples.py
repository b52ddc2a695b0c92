"""Every script in examples/ runs as written on the install its header names.

Each runs as a subprocess with EXAMPLE_QUICK=1 (one short epoch) and sees only what its
``Install:`` line brings (the simulation of tests/test_install.py), so an example that
imports more than its install fails here. The README's table of examples names the same
installs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_install import ROOT, run_python

EXAMPLES = ROOT / "examples"
SCRIPTS = ["fastai_digits.py", "lightning_digits.py", "lightning_cli.py", "plain_torch.py"]
#: What each script's run must print: proof it trained and validated.
EXPECTED_OUTPUT = {
    "fastai_digits.py": ("validation accuracy", "train_loss"),  # fastai's progress table
    "lightning_digits.py": ("validation accuracy",),
    "lightning_cli.py": ("max_epochs=1",),  # Lightning's "fit stopped" note
    "plain_torch.py": ("epoch 1: train loss", "valid accuracy"),
}
QUICK_CLI = ("fit", "--config", str(EXAMPLES / "lightning_cli.yaml"), "--trainer.max_epochs", "1")


def install_of(script: str) -> str | None:
    """The extra the script's ``Install:`` line names; None for the core ``pip install .``."""
    header = (EXAMPLES / script).read_text().split('"""')[1]
    match = re.search(r"^Install: pip install (\.|'\.\[(\w+)\]')$", header, re.MULTILINE)
    assert match, f"{script}: no 'Install: pip install ...' line in its docstring"
    return match.group(2)


def _run(tmp_path: Path, script: str, *args: str, env=None):
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    result = run_python(
        tmp_path,
        str(EXAMPLES / script),
        *args,
        extra=install_of(script),
        env={"EXAMPLE_QUICK": "1", "TMPDIR": str(tmp_path), **(env or {})},
        cwd=workdir,
    )
    assert result.returncode == 0, (
        f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_each_example_names_its_install_and_the_readme_agrees():
    readme = (ROOT / "README.md").read_text()
    assert sorted(SCRIPTS) == sorted(
        p.name for p in EXAMPLES.glob("*.py") if p.stem != "synthetic_digits"
    )
    for script in SCRIPTS:
        row = next(
            line for line in readme.splitlines() if line.startswith(f"| `examples/{script}`")
        )
        extra = install_of(script)
        assert (f"`pip install '.[{extra}]'`" if extra else "`pip install .`") in row, row


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_on_its_install(script, tmp_path):
    args = QUICK_CLI if script == "lightning_cli.py" else ()
    output = _run(tmp_path, script, *args)
    for expected in EXPECTED_OUTPUT[script]:
        assert expected in output.stdout + output.stderr


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.slow
def test_lightning_cli_runs_twice_and_leaves_nothing_behind(tmp_path):
    examples_before = _files(EXAMPLES)
    for _ in range(2):  # the second run used to stop on the first run's config.yaml
        _run(tmp_path, "lightning_cli.py", *QUICK_CLI, "--data.size", "8")
    assert _files(tmp_path / "work") == set()  # nothing where the command ran
    assert _files(EXAMPLES) == examples_before
    saved = tmp_path / "ranger_plugins_lightning_cli" / "config.yaml"  # in TMPDIR
    assert "ranger_plugins.Ranger" in saved.read_text()


@pytest.fixture
def cli_example(monkeypatch):
    """examples/lightning_cli.py imported in-process (its folder on sys.path, as when run)."""
    pytest.importorskip("lightning")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(
        "lightning_cli_example", EXAMPLES / "lightning_cli.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _configured(cli, total_steps: int = 100):
    """What the module's configure_optimizers returns (as under a Trainer)."""
    cli.model._trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    return cli.model.configure_optimizers()


def test_lightning_cli_yaml_builds_ranger_with_groups_and_schedule(cli_example):
    from ranger_plugins import Ranger
    from ranger_plugins.schedules import FlatCosineLR

    cli = cli_example.main(["--config", str(EXAMPLES / "lightning_cli.yaml")], run=False)
    configured = _configured(cli)
    optimizer = configured["optimizer"]
    assert isinstance(optimizer, Ranger)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.008 and group["betas"] == (0.95, 0.99) and group["eps"] == 1e-6
    assert group["use_gc"] is False
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, FlatCosineLR) and scheduler.pct_start == 0.72
    assert any(type(cb).__name__ == "LookaheadCallback" for cb in cli.trainer.callbacks)


def test_lightning_cli_optimizer_flag_keeps_groups_and_schedule(cli_example):
    """``--optimizer`` (LightningCLI's own flag) picks the class; the module still builds
    the no-decay groups and the flat-then-cosine schedule."""
    from ranger_plugins import Ranger
    from ranger_plugins.schedules import FlatCosineLR

    argv = [
        "--optimizer",
        "ranger_plugins.Ranger",
        "--optimizer.lr",
        "0.005",
        "--model.pct_start",
        "0.5",
    ]
    cli = cli_example.main(argv, run=False)
    configured = _configured(cli)
    optimizer = configured["optimizer"]
    assert isinstance(optimizer, Ranger) and optimizer.param_groups[0]["lr"] == 0.005
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, FlatCosineLR) and scheduler.pct_start == 0.5
    # The command line beats the YAML's model.optimizer too.
    argv = ["--config", str(EXAMPLES / "lightning_cli.yaml"), "--optimizer", "torch.optim.SGD"]
    argv += ["--optimizer.lr", "0.1"]
    optimizer = _configured(cli_example.main(argv, run=False))["optimizer"]
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 2


def test_lightning_cli_refuses_a_scheduler_flag(cli_example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_example.main(
            ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "3"],
            run=False,
        )
    assert exit_info.value.code == 2
    assert "--lr_scheduler: this example schedules flat-then-cosine" in capsys.readouterr().err


def test_synthetic_digits_are_seeded_and_balanced(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("synthetic_digits", None)
    from synthetic_digits import digits_split, synthetic_digits

    (x_train, y_train), (x_valid, y_valid) = digits_split()
    assert x_train.shape == (1437, 1, 8, 8) and x_valid.shape == (360, 1, 8, 8)
    assert x_train.mean().abs() < 1e-5 and (x_train.std() - 1).abs() < 1e-5
    assert torch.bincount(y_train, minlength=10).min() > 100  # every digit, about equally
    images, labels = synthetic_digits(50, size=16, seed=3)
    again, labels_again = synthetic_digits(50, size=16, seed=3)
    assert images.shape == (50, 1, 16, 16)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(synthetic_digits(50, seed=4)[0], synthetic_digits(50, seed=3)[0])
