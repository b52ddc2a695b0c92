"""Every script in examples/ runs as written (EXAMPLE_QUICK=1: one epoch on small images), as a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytest.importorskip("sklearn")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "EXAMPLE_QUICK": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        # One torch thread: the examples' ops are tiny, and on a shared CI machine threads
        # waiting for each other at every op make them many times slower.
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,  # nothing the examples write lands in the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow
def test_fastai_example(tmp_path):
    pytest.importorskip("fastai")
    out = _run(tmp_path, str(EXAMPLES / "fastai_digits.py")).stdout
    assert "validation accuracy" in out
    assert "train_loss" in out  # fastai's progress table was shown


@pytest.mark.slow
def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    out = _run(tmp_path, str(EXAMPLES / "lightning_digits.py")).stdout
    assert "validation accuracy" in out


@pytest.mark.slow
def test_plain_torch_example(tmp_path):
    out = _run(tmp_path, str(EXAMPLES / "plain_torch.py")).stdout
    assert "epoch 1: train loss" in out and "valid accuracy" in out


@pytest.mark.slow
def test_lightning_cli_example_trains_from_the_yaml(tmp_path):
    pytest.importorskip("lightning")
    config = EXAMPLES / "lightning_cli.yaml"
    result = _run(
        tmp_path,
        str(EXAMPLES / "lightning_cli.py"),
        "fit",
        "--config",
        str(config),
        "--trainer.max_epochs",
        "1",
        "--data.size",
        "8",
    )
    assert "max_epochs=1" in result.stdout + result.stderr  # Lightning's "fit stopped" note


def test_lightning_cli_yaml_builds_ranger(monkeypatch):
    """The YAML's optimizer really is ranger_plugins.Ranger with the recipe's settings, and
    the module groups parameters with no weight decay on norm/bias (parsed in-process)."""
    pytest.importorskip("lightning")
    pytest.importorskip("fastai")
    from ranger_plugins import Ranger

    spec = importlib.util.spec_from_file_location(
        "lightning_cli_example", EXAMPLES / "lightning_cli.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(EXAMPLES)
    cli = example.LightningCLI(
        example.DigitsClassifier,
        example.DigitsDataModule,
        args=["--config", "lightning_cli.yaml"],
        run=False,
    )
    model = cli.model
    from ranger_plugins.lightning import no_decay_param_groups

    optimizer = model.optimizer(no_decay_param_groups(model, model.weight_decay))
    assert isinstance(optimizer, Ranger)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.008 and group["betas"] == (0.95, 0.99) and group["eps"] == 1e-6
    assert group["use_gc"] is False
    assert any(type(cb).__name__ == "LookaheadCallback" for cb in cli.trainer.callbacks)
