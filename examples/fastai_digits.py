"""Mish + Ranger with fastai, on scikit-learn's digits (no download).

Install: pip install '.[fastai]'
(fastai brings scikit-learn, whose digits these are)

    python examples/fastai_digits.py            # 5 epochs
    EXAMPLE_QUICK=1 python examples/fastai_digits.py
"""

import os
from functools import partial

import torch
from torch import nn
from torch.utils.data import TensorDataset

try:
    import sklearn  # noqa: F401  (digits_split below reads scikit-learn's digits)
    from fastai.vision.all import (  # also adds fit_flat_cos and the progress bar
        CrossEntropyLossFlat,
        DataLoaders,
        Learner,
        ResBlock,
        XResNet,
        accuracy,
        set_seed,
    )

    from ranger_plugins.fastai import LookaheadCallback, ranger
except ImportError as error:  # an install without the extra: say which one
    raise SystemExit(
        f"error: this example needs fastai ({error}): pip install '.[fastai]'"
    ) from None

from ranger_plugins.recipes import digits_split

# EXAMPLE_QUICK=1 (the tests): one epoch on the original 8-px images.
QUICK = os.environ.get("EXAMPLE_QUICK") == "1"
EPOCHS, SIZE = (1, 8) if QUICK else (5, 32)

set_seed(42, reproducible=True)
digits = digits_split(size=SIZE)  # 8x8 digits upsampled to SIZE x SIZE, normalised
dls = DataLoaders.from_dsets(
    TensorDataset(digits.x_train, digits.y_train),
    TensorDataset(digits.x_valid, digits.y_valid),
    bs=64,
)
# A small XResNet with Mish everywhere (fastai builds it with any activation class).
model = XResNet(ResBlock, 1, [1, 1, 1, 1], c_in=1, n_out=10, widen=0.25, act_cls=nn.Mish)

learn = Learner(
    dls,
    model,
    # The leaderboard's Ranger: mom 0.95, sqr_mom 0.99, eps 1e-6, true wd 1e-2.
    opt_func=partial(ranger, mom=0.95, sqr_mom=0.99, eps=1e-6, wd=1e-2),
    loss_func=CrossEntropyLossFlat(label_smoothing=0.1),
    metrics=accuracy,
    cbs=LookaheadCallback(),  # validate on Lookahead's slow weights
)  # wd_bn_bias=False (the default): no weight decay on norm layers and biases
learn.fit_flat_cos(EPOCHS, lr=8e-3, pct_start=0.72)

loss, acc = learn.validate()
print(f"validation accuracy {acc:.4f}, loss {loss:.4f}")
assert torch.isfinite(torch.tensor(loss))
