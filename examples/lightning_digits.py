"""Mish + Ranger with Lightning, on scikit-learn's digits (no download).

python examples/lightning_digits.py         # 5 epochs
EXAMPLE_QUICK=1 python examples/lightning_digits.py
"""

import os

import lightning.pytorch as pl
import torch
from fastai.vision.models.xresnet import ResBlock, XResNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ranger_plugins.lightning import LookaheadCallback, ranger_optimizers
from ranger_plugins.recipes import digits_split

# EXAMPLE_QUICK=1 (the tests): one epoch on the original 8-px images.
QUICK = os.environ.get("EXAMPLE_QUICK") == "1"
EPOCHS, SIZE = (1, 8) if QUICK else (5, 32)


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 8e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = XResNet(
            ResBlock, 1, [1, 1, 1, 1], c_in=1, n_out=10, widen=0.25, act_cls=nn.Mish
        )
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
digits = digits_split(size=SIZE)
train = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True)
valid = DataLoader(TensorDataset(digits.x_valid, digits.y_valid), batch_size=64)

trainer = pl.Trainer(
    max_epochs=EPOCHS,
    callbacks=[LookaheadCallback()],  # validate and checkpoint the slow weights
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(DigitsClassifier(), train, valid)
print(f"validation accuracy {trainer.callback_metrics['val_acc']:.4f}")
assert torch.isfinite(trainer.callback_metrics["val_loss"])
