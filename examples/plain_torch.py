"""Ranger in a plain PyTorch loop, on synthetic digits made with torch (no download).

Install: pip install .
(the core install: torch alone; the digits come from synthetic_digits.py beside this file)

Evaluation runs under ``opt.slow_weights()``: Lookahead's slow weights are put into the
model, and the fast weights are restored exactly when the block ends.

    python examples/plain_torch.py              # 5 epochs
    EXAMPLE_QUICK=1 python examples/plain_torch.py
"""

import os

import torch
from synthetic_digits import digits_split  # beside this file: 8x8 digits made with torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ranger_plugins import Ranger, no_decay_param_groups
from ranger_plugins.schedules import FlatCosineLR

# EXAMPLE_QUICK=1 (the tests): one epoch.
EPOCHS = 1 if os.environ.get("EXAMPLE_QUICK") == "1" else 5
torch.manual_seed(42)

(x_train, y_train), (x_valid, y_valid) = digits_split()  # 8x8 images, 1437 train / 360 valid
train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
valid = DataLoader(TensorDataset(x_valid, y_valid), batch_size=256)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.Mish()
    )


model = nn.Sequential(
    conv_block(1, 32), conv_block(32, 32), nn.MaxPool2d(2),
    conv_block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
)  # fmt: skip

# Weight decay on weights, none on norm layers and biases, as in the leaderboard recipe.
opt = Ranger(
    no_decay_param_groups(model, weight_decay=1e-2),
    lr=8e-3, betas=(0.95, 0.99), eps=1e-6,
)  # fmt: skip
scheduler = FlatCosineLR(opt, total_steps=EPOCHS * len(train), pct_start=0.72)
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

for epoch in range(EPOCHS):
    model.train()
    for images, labels in train:
        loss = loss_fn(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()

    model.eval()
    with opt.slow_weights(), torch.no_grad():  # evaluate Lookahead's slow weights
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in valid)
    print(
        f"epoch {epoch + 1}: train loss {loss.item():.4f}, valid accuracy {correct / len(y_valid):.4f}"
    )

opt.sync_lookahead()  # end on the synced slow weights: model.state_dict() is what to save
