"""LightningCLI with ``ranger_plugins.Ranger`` chosen in YAML, on scikit-learn's digits.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --trainer.max_epochs 1

The optimizer is injected (``OptimizerCallable``), so the YAML picks the class and its
hyperparameters, and the module still decides the param groups and the per-step schedule.
"""

import lightning.pytorch as pl
import torch
from fastai.vision.models.xresnet import ResBlock, XResNet
from lightning.pytorch.cli import LightningCLI, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ranger_plugins.lightning import no_decay_param_groups
from ranger_plugins.recipes import digits_split
from ranger_plugins.schedules import FlatCosineLR


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, size: int = 32, batch_size: int = 64) -> None:
        super().__init__()
        self.size, self.batch_size = size, batch_size

    def setup(self, stage: str) -> None:
        self.digits = digits_split(self.size)

    def train_dataloader(self):
        data = TensorDataset(self.digits.x_train, self.digits.y_train)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.digits.x_valid, self.digits.y_valid), batch_size=256)


class DigitsClassifier(pl.LightningModule):
    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        weight_decay: float = 1e-2,
        pct_start: float = 0.72,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.optimizer, self.weight_decay, self.pct_start = optimizer, weight_decay, pct_start
        self.model = XResNet(
            ResBlock, 1, [1, 1, 1, 1], c_in=1, n_out=10, widen=0.25, act_cls=nn.Mish
        )
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

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
        # The YAML's optimizer (ranger_plugins.Ranger) over two groups: no wd on norm/bias.
        optimizer = self.optimizer(no_decay_param_groups(self, self.weight_decay))
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = FlatCosineLR(optimizer, total_steps=total, pct_start=self.pct_start)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


if __name__ == "__main__":
    LightningCLI(DigitsClassifier, DigitsDataModule)
