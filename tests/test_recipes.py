"""The recipes: the real digits and image-folder paths, end to end, with both engines."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastai")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from ranger_plugins import Ranger  # noqa: E402
from ranger_plugins.recipes import (  # noqa: E402
    RecipeConfig,
    build_xresnet,
    run_recipe,
)
from ranger_plugins.recipes.__main__ import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An ImageNet-style folder: 2 classes, 4 train and 2 val 32-px PNGs each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, tint in (("cats", (200, 40, 40)), ("dogs", (40, 40, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 56, (32, 32, 3), generator=generator)
                pixels = (noise + torch.tensor(tint)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{label}{i}.png")
    return root


def _flat_cos_reference(lr: float, pct_start: float, total: int, div_final: float = 1e5):
    """fastai's fit_flat_cos lr at each iteration: flat, then cosine to lr/div_final."""
    end = lr / div_final
    rates = []
    for i in range(total):
        position = i / total
        if position < pct_start:
            rates.append(lr)
        else:
            phase = (position - pct_start) / (1 - pct_start)
            rates.append(end + (lr - end) * (1 + math.cos(math.pi * phase)) / 2)
    return rates


def _assert_leaderboard_ranger(optimizer, model: nn.Module) -> None:
    """Ranger with mom 0.95, sqr_mom 0.99, eps 1e-6, wd 1e-2, and no wd on norm/bias."""
    assert isinstance(optimizer, Ranger)
    no_decay = set()
    for group in optimizer.param_groups:
        assert group["betas"] == pytest.approx((0.95, 0.99))
        assert group["eps"] == pytest.approx(1e-6)
        assert group["lookahead_k"] == 6 and group["lookahead_alpha"] == 0.5
        assert group["weight_decay"] in (pytest.approx(1e-2), 0.0)
        if group["weight_decay"] == 0.0:
            no_decay.update(id(p) for p in group["params"])
    norm_or_bias = [
        param
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if isinstance(module, NORM_LAYERS) or name == "bias"
    ]
    assert norm_or_bias
    assert all(id(param) in no_decay for param in norm_or_bias)
    conv_weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not any(id(w) in no_decay for w in conv_weights)


def test_build_xresnet_activations():
    torch.manual_seed(1)
    recipe = build_xresnet("xresnet_tiny", 10, c_in=1, activation="mish")
    torch.manual_seed(1)
    baseline = build_xresnet("xresnet_tiny", 10, c_in=1, activation="relu")
    # Activations hold no weights: under one seed both runs start from the same network.
    for (name, a), (_, b) in zip(recipe.state_dict().items(), baseline.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(isinstance(m, nn.ReLU) for m in recipe.modules())
    mish = sum(isinstance(m, nn.Mish) for m in recipe.modules())
    assert mish > 0
    assert sum(isinstance(m, nn.ReLU) for m in baseline.modules()) == mish
    assert recipe(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    se_resnext = build_xresnet("xse_resnext50", 3, activation="mish", self_attention=True)
    assert not any(isinstance(m, nn.ReLU) for m in se_resnext.modules())
    assert se_resnext[-1].out_features == 3
    with pytest.raises(ValueError, match="arch"):
        build_xresnet("resnet9000", 10)
    with pytest.raises(ValueError, match="activation"):
        build_xresnet("xresnet_tiny", 10, activation="swish")


@pytest.mark.slow
def test_digits_main_job_with_fastai(tmp_path, capsys, monkeypatch):
    """The main job's path, one short epoch: both runs with fastai's schedules and the
    leaderboard optimizer settings, then the table and the PNG."""
    import ranger_plugins.recipes.__main__ as cli

    trained = []

    def train_runs_spy(config, path, results):
        trained.append((config, cli_train_runs(config, path, results)))
        return trained[-1][1]

    cli_train_runs = cli.train_runs
    monkeypatch.setattr(cli, "train_runs", train_runs_spy)
    output = tmp_path / "digits.png"
    # 8 px: the original digits, the cheapest size XResNet still runs on.
    assert main(["--epochs", "1", "--size", "8", "--output", str(output)]) == 0

    printed = capsys.readouterr().out
    assert output.read_bytes().startswith(PNG_MAGIC)
    assert str(output.resolve()) in printed
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run |")
    assert table[1].startswith("| recipe | xresnet_tiny + Mish | Ranger | flat + cosine | 1 | 42 |")
    assert table[2].startswith("| baseline | xresnet_tiny + ReLU | AdamW | one-cycle | 1 | 42 |")
    assert "Total " in printed and "s training (the table's train times)" in printed

    ((config, (recipe, baseline)),) = trained
    assert config.lr == 8e-3 and config.pct_start == 0.72 and config.seed == 42
    iterations = 1437 // config.bs  # the training split, drop_last
    assert len(recipe.train_losses) == len(recipe.lrs) == iterations
    reference = _flat_cos_reference(config.lr, config.pct_start, iterations)
    assert recipe.lrs == pytest.approx(reference, rel=1e-6)
    _assert_leaderboard_ranger(recipe.optimizer, recipe.model)
    assert 0.0 <= recipe.accuracy <= 1.0 and math.isfinite(recipe.valid_loss)
    assert f"{recipe.accuracy:.2%}" in table[1]
    assert recipe.valid_iters == [iterations]
    assert not any(isinstance(m, nn.ReLU) for m in recipe.model.modules())

    # One-cycle: warm up from lr/25 to lr over the first 25%, then anneal to about lr/1e5.
    assert baseline.lrs[0] == pytest.approx(config.lr / 25, rel=1e-6)
    assert max(baseline.lrs) == pytest.approx(config.lr, rel=1e-2)
    assert baseline.lrs[-1] < config.lr / 100
    assert not isinstance(baseline.optimizer, Ranger)
    assert sum(isinstance(m, nn.ReLU) for m in baseline.model.modules()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fastai", "lightning"])
def test_image_folder_path_trains_with_both_engines(engine, image_folder, tmp_path):
    if engine == "lightning":
        pytest.importorskip("lightning")
    config = RecipeConfig(
        engine=engine,
        data=image_folder,
        epochs=1,
        size=32,
        bs=4,
        lr=4e-3,
        arch="xresnet_tiny",
        baseline=engine == "lightning",  # the Lightning AdamW + OneCycleLR path too
        output=tmp_path / "folder.png",
    )
    threads_before = torch.get_num_threads()
    results = run_recipe(config)
    recipe = results[0]
    assert torch.get_num_threads() == threads_before  # one thread while training, then restored

    assert recipe.spec.name == "recipe"
    assert len(recipe.train_losses) == 2  # 8 training images, batches of 4
    assert all(math.isfinite(loss) for loss in recipe.train_losses)
    assert len(recipe.valid_losses) == 1 and math.isfinite(recipe.valid_loss)
    assert recipe.accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 validation images
    _assert_leaderboard_ranger(recipe.optimizer, recipe.model)
    # Three input channels and a 2-class head: the folder, not digits, was loaded.
    assert recipe.model[0][0].in_channels == 3
    assert recipe.model[-1].out_features == 2
    assert config.output.read_bytes().startswith(PNG_MAGIC)
    if engine == "lightning":
        baseline = results[1]
        assert isinstance(baseline.optimizer, torch.optim.AdamW)
        decays = sorted(group["weight_decay"] for group in baseline.optimizer.param_groups)
        assert decays == [0.0, pytest.approx(1e-2)]


def test_no_network_error_suggests_data(monkeypatch, capsys):
    """untar_data failing the way a download without network fails: a clear message."""
    import fastai.data.external

    requested = []

    def offline_untar_data(url, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(fastai.data.external, "untar_data", offline_untar_data)
    assert main(["--dataset", "imagewoof"]) == 2
    error = capsys.readouterr().err
    assert requested == [fastai.data.external.URLs.IMAGEWOOF_160]  # 128 px by default
    assert "could not download imagewoof" in error
    assert "no network" in error
    assert "--data PATH" in error
