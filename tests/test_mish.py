"""swap_activation / to_mish on real architectures: fastai's xresnet and torchvision's resnet."""

import pytest
import torch
from torch import nn

from ranger_plugins.mish import SwapResult, swap_activation, to_mish


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def _xresnet18() -> nn.Module:
    xresnet = pytest.importorskip("fastai.vision.models.xresnet")
    return xresnet.xresnet18(n_out=10)


def _resnet18() -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    return models.resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize("build", [_xresnet18, _resnet18], ids=["xresnet18", "resnet18"])
def test_in_place_swap_replaces_every_relu_and_keeps_output_shape(build):
    model = build().eval()
    relus = _count(model, nn.ReLU)
    assert relus > 0
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images)

    result = to_mish(model)

    assert isinstance(result, SwapResult)
    assert result.model is model
    assert result.swapped == relus
    assert _count(model, nn.ReLU) == 0
    assert _count(model, nn.Mish) == relus
    with torch.no_grad():
        after = model(images)
    assert after.shape == before.shape
    # Same weights, different activation: the function really changed.
    assert not torch.allclose(after, before)


def test_mish_model_matches_one_built_with_mish():
    """fastai builds xresnet with any activation class: swapping ReLU for Mish afterwards must
    give exactly the network fastai builds with act_cls=nn.Mish (same weights)."""
    xresnet = pytest.importorskip("fastai.vision.models.xresnet")
    swapped = xresnet.xresnet18(n_out=10).eval()
    to_mish(swapped)
    built = xresnet.xresnet18(n_out=10, act_cls=nn.Mish).eval()
    built.load_state_dict(swapped.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(swapped(images), built(images))


@pytest.mark.parametrize("build", [_xresnet18, _resnet18], ids=["xresnet18", "resnet18"])
def test_copy_mode_leaves_the_original_untouched(build):
    model = build()
    relus = _count(model, nn.ReLU)
    weights = {name: value.clone() for name, value in model.state_dict().items()}

    copied, swapped = to_mish(model, copy_model=True)

    assert copied is not model
    assert swapped == relus
    assert _count(model, nn.ReLU) == relus and _count(model, nn.Mish) == 0
    assert _count(copied, nn.ReLU) == 0 and _count(copied, nn.Mish) == relus
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    # The copy owns its parameters: training it cannot move the original.
    first = next(copied.parameters())
    assert first.data_ptr() != next(model.parameters()).data_ptr()


def test_shared_activation_is_swapped_once_and_stays_shared():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act, nn.Tanh())
    _, swapped = swap_activation(model, nn.ReLU, nn.Mish)
    assert swapped == 1
    assert isinstance(model[1], nn.Mish) and model[1] is model[3]
    assert isinstance(model[4], nn.Tanh)


def test_other_types_and_tuples_of_types():
    model = nn.Sequential(nn.Linear(2, 2), nn.SiLU(), nn.GELU(), nn.ReLU())
    _, swapped = swap_activation(model, (nn.SiLU, nn.GELU))
    assert swapped == 2
    assert [type(m) for m in model] == [nn.Linear, nn.Mish, nn.Mish, nn.ReLU]
    # Nothing left to swap: a second pass reports zero.
    assert swap_activation(model, (nn.SiLU, nn.GELU)).swapped == 0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"old": "relu"}, "old"),
        ({"old": int}, "old"),
        ({"old": ()}, "old"),
        ({"new": 3}, "new"),
        ({"new": lambda: 3}, "new"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(kwargs, argument):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=argument):
        swap_activation(model, **kwargs)
    assert isinstance(model[1], nn.ReLU)
