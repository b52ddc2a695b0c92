"""LightningCLI with ``ranger_plugins.Ranger`` chosen in YAML or on the command line, on
synthetic digits made with torch (no download).

Install: pip install '.[lightning]'
(the digits come from synthetic_digits.py beside this file)

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --trainer.max_epochs 1
    python examples/lightning_cli.py fit --optimizer ranger_plugins.Ranger --optimizer.lr 0.008

The optimizer is injected (``OptimizerCallable``): the YAML's ``model.optimizer`` or a
command-line ``--optimizer`` picks the class and its hyperparameters, and the module still
builds the param groups (no weight decay on norm layers and biases) and the flat-then-cosine
schedule. LightningCLI would otherwise replace ``configure_optimizers`` with a single group
and no schedule when given ``--optimizer``; `RangerCLI` hands it to the module instead.
Schedules come from the module (``--model.pct_start``); ``--lr_scheduler`` is refused.

The config LightningCLI saves goes to a folder in the system's temporary directory (printed
at the end), overwritten on every run: nothing is written where the command runs.
"""

import tempfile
from pathlib import Path

import torch
from synthetic_digits import digits_split  # beside this file: 8x8 digits made with torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI, OptimizerCallable

    from ranger_plugins import no_decay_param_groups
except ImportError as error:  # an install without the extra: say which one
    raise SystemExit(
        f"error: this example needs Lightning ({error}): pip install '.[lightning]'"
    ) from None

from ranger_plugins.schedules import FlatCosineLR

#: Where the run's saved config goes (LightningCLI writes it to the trainer's root dir).
RUN_DIR = Path(tempfile.gettempdir()) / "ranger_plugins_lightning_cli"


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, size: int = 8, batch_size: int = 64) -> None:
        super().__init__()
        self.size, self.batch_size = size, batch_size

    def setup(self, stage: str) -> None:
        self.train, self.valid = digits_split(self.size)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.valid), batch_size=256)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.Mish()
    )


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
        self.model = nn.Sequential(
            conv_block(1, 32), conv_block(32, 32), nn.MaxPool2d(2),
            conv_block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
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
        # The chosen optimizer (ranger_plugins.Ranger) over two groups: no wd on norm/bias.
        optimizer = self.optimizer(no_decay_param_groups(self, self.weight_decay))
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = FlatCosineLR(optimizer, total_steps=total, pct_start=self.pct_start)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class RangerCLI(LightningCLI):
    """A top-level ``--optimizer`` becomes the module's ``optimizer`` argument."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("lr_scheduler") is not None:
            self.parser.error(
                "--lr_scheduler: this example schedules flat-then-cosine in "
                "configure_optimizers; set its length with --model.pct_start"
            )
        if config.get("optimizer") is not None:
            # Built by the module over its param groups, with its schedule (see above).
            config["model.optimizer"] = config["optimizer"]
            config["optimizer"] = None


def main(args=None, run: bool = True) -> RangerCLI:
    cli = RangerCLI(
        DigitsClassifier,
        DigitsDataModule,
        args=args,
        run=run,
        trainer_defaults={"default_root_dir": str(RUN_DIR)},
        # Every run rewrites the saved config instead of refusing to start.
        save_config_kwargs={"overwrite": True},
    )
    if run:
        print(f"config saved in {RUN_DIR}")
    return cli


if __name__ == "__main__":
    main()
