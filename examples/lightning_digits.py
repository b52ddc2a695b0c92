"""Mish + Ranger with Lightning, on synthetic digits made with torch (no download).

Install: pip install '.[lightning]'
(the digits come from synthetic_digits.py beside this file)

    python examples/lightning_digits.py         # 5 epochs
    EXAMPLE_QUICK=1 python examples/lightning_digits.py
"""

import os

import torch
from synthetic_digits import digits_split  # beside this file: 8x8 digits made with torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl

    from ranger_plugins.lightning import LookaheadCallback, ranger_optimizers
except ImportError as error:  # an install without the extra: say which one
    raise SystemExit(
        f"error: this example needs Lightning ({error}): pip install '.[lightning]'"
    ) from None

# EXAMPLE_QUICK=1 (the tests): one epoch.
EPOCHS = 1 if os.environ.get("EXAMPLE_QUICK") == "1" else 5


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.Mish()
    )


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 8e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = nn.Sequential(
            conv_block(1, 32), conv_block(32, 32), nn.MaxPool2d(2),
            conv_block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss(self.model(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)
        self.log("val_loss", self.loss(logits, labels), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        # Ranger (no weight decay on norm/bias) + fastai's flat-then-cosine, stepped per batch.
        return ranger_optimizers(
            self, lr=self.lr, schedule="flat_cos", pct_start=0.72,
            betas=(0.95, 0.99), eps=1e-6, weight_decay=1e-2,
        )  # fmt: skip


pl.seed_everything(42)
(x_train, y_train), (x_valid, y_valid) = digits_split()  # 8x8 images, 1437 train / 360 valid
train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
valid = DataLoader(TensorDataset(x_valid, y_valid), batch_size=256)

trainer = pl.Trainer(
    max_epochs=EPOCHS,
    callbacks=[LookaheadCallback()],  # validate and checkpoint the slow weights
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(DigitsClassifier(), train, valid)
print(f"validation accuracy {trainer.callback_metrics['val_acc']:.4f}")
assert torch.isfinite(trainer.callback_metrics["val_loss"])
