"""The XResNets of the recipes, built with fastai's ``XResNet`` and any activation."""

from __future__ import annotations

from torch import nn

__all__ = ["ARCHS", "build_xresnet"]

ACTIVATIONS = {"mish": nn.Mish, "relu": nn.ReLU}
ACTIVATION_NAMES = {"mish": "Mish", "relu": "ReLU"}


def _xresnet_tiny(**kwargs) -> nn.Module:
    # One ResBlock per stage at a quarter of the width (16-32-64-128 channels): seconds per
    # epoch on a CPU, yet the same stem, blocks and pooling as the full-size XResNets.
    from fastai.vision.models.xresnet import ResBlock, XResNet

    return XResNet(ResBlock, 1, [1, 1, 1, 1], widen=0.25, **kwargs)


def _fastai_arch(name: str):
    def build(**kwargs) -> nn.Module:
        from fastai.vision.models import xresnet

        return getattr(xresnet, name)(**kwargs)

    return build


ARCHS = {
    "xresnet_tiny": _xresnet_tiny,
    "xresnet18": _fastai_arch("xresnet18"),
    "xresnet34": _fastai_arch("xresnet34"),
    "xresnet50": _fastai_arch("xresnet50"),
    # The 2020 leaderboard baseline's network (squeeze-excitation ResNeXt).
    "xse_resnext50": _fastai_arch("xse_resnext50"),
}


def build_xresnet(
    arch: str, n_out: int, *, c_in: int = 3, activation: str = "mish", self_attention: bool = False
) -> nn.Module:
    """Build fastai's XResNet ``arch`` with ``activation`` ("mish" or "relu") everywhere.

    ``self_attention`` adds fastai's simple self-attention layer (``sa=True``), as some
    leaderboard entries did.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ARCHS[arch](n_out=n_out, c_in=c_in, act_cls=ACTIVATIONS[activation], sa=self_attention)


def model_name(arch: str, activation: str, self_attention: bool = False) -> str:
    """How the table names a model, e.g. ``xresnet50 + Mish + self-attention``."""
    name = f"{arch} + {ACTIVATION_NAMES[activation]}"
    return f"{name} + self-attention" if self_attention else name
