"""Tiny fastai Learners for tests/test_fastai.py (module-level, so `export()` can pickle them)."""

from __future__ import annotations

import fastai.callback.all  # noqa: F401  (patches fit_one_cycle, no_bar, to_fp16, ... onto Learner)
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastcore.basics import noop
from torch import nn

N_CLASSES = 3


def tiny_model(batchnorm: bool = True, hidden: int = 8) -> nn.Sequential:
    """Two layer groups: a conv body with BatchNorm, and a linear head (``hidden=1024``
    gives it a weight of 4096 elements, large enough for 8-bit optimizer state)."""
    body = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    head = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES))
    return nn.Sequential(body, head)


def body_head_splitter(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """Layer groups for discriminative lrs and freezing: [body params, head params]."""
    return [list(model[0].parameters()), list(model[1].parameters())]


class TensorPairs:
    """A map-style dataset of (x, y) pairs; `new_empty` lets `learn.export()` pickle it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def new_empty(self) -> TensorPairs:
        return TensorPairs(self.x[:0], self.y[:0])


def tiny_dls(
    n_train: int = 48, n_valid: int = 16, bs: int = 8, seed: int = 0, dtype=torch.float32
) -> DataLoaders:
    """Random 2x6x6 images with a learnable label, in a fixed (unshuffled) order."""
    generator = torch.Generator().manual_seed(seed)
    n = n_train + n_valid
    x = torch.randn(n, 2, 6, 6, generator=generator)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1].mean(dim=(1, 2)) > 0.2).long()
    x = x.to(dtype)
    return DataLoaders(
        DataLoader(TensorPairs(x[:n_train], y[:n_train]), bs=bs, shuffle=False),
        DataLoader(TensorPairs(x[n_train:], y[n_train:]), bs=bs, shuffle=False),
    )


def tiny_learner(
    opt_func,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bs: int = 8,
    batchnorm: bool = True,
    hidden: int = 8,
    **kwargs,
) -> Learner:
    """A quiet Learner on `tiny_model`: the same initial weights and batches for the same
    seed, 6 training batches of 8 per epoch (bs=8), 2 validation batches."""
    torch.manual_seed(seed)
    model = tiny_model(batchnorm, hidden).to(dtype)
    dls = tiny_dls(bs=bs, dtype=dtype)
    kwargs.setdefault("splitter", body_head_splitter)
    kwargs.setdefault("metrics", accuracy)
    learn = Learner(dls, model, loss_func=Float32CrossEntropy(), opt_func=opt_func, **kwargs)
    return quiet(learn)


def quiet(learn: Learner) -> Learner:
    """No progress bars and no printed metrics."""
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn


class Float32CrossEntropy(nn.Module):
    """Cross entropy returned in fp32 (fastai's smoothed-loss recorder needs fp32), so
    fp64 models can be trained; the cast does not change the gradients."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(pred, target).float()


def weights(learn: Learner) -> list[torch.Tensor]:
    """Copies of the model's parameters."""
    return [p.detach().clone() for p in learn.model.parameters()]
