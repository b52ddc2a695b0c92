"""Train one run with Lightning: ``ranger_optimizers`` (the recipe, with any member of the
Ranger family) or AdamW + ``OneCycleLR``."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ._config import LABEL_SMOOTHING, WEIGHT_DECAY, RecipeConfig, RunResult, RunSpec
from ._data import EngineUnavailableError, class_names, digits_split
from ._models import build_xresnet, model_name
from ._optimizers import variant_kwargs

__all__ = ["train_lightning"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _adapter():
    try:
        import lightning.pytorch as pl
        from typing_extensions import override

        from ranger_plugins.lightning import (
            LookaheadCallback,
            no_decay_param_groups,
            ranger_optimizers,
        )
    except ImportError as error:
        raise EngineUnavailableError(
            f"the lightning engine needs Lightning and ranger_plugins.lightning "
            f"(ranger_optimizers, LookaheadCallback), which could not be imported: {error}. "
            f"Try --engine fastai."
        ) from error
    return pl, override, LookaheadCallback, no_decay_param_groups, ranger_optimizers


def _loaders(config: RecipeConfig, path) -> tuple[Any, Any, int, int]:
    from torch.utils.data import DataLoader, TensorDataset

    # Shuffling draws from this generator, seeded, so both runs see the same batches.
    generator = torch.Generator().manual_seed(config.seed)
    if path is None:
        digits = digits_split(config.size)
        train = TensorDataset(digits.x_train, digits.y_train)
        valid = TensorDataset(digits.x_valid, digits.y_valid)
        n_classes, channels, workers = len(digits.classes), 1, 0
    else:
        from torchvision import datasets, transforms

        classes = class_names(path)
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        # The leaderboard's augmentation (fastai's RandomResizedCrop(min_scale=0.35) and a
        # flip); validation gets a centre crop with fastai's 14% margin.
        train = datasets.ImageFolder(
            path / "train",
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(config.size, scale=(0.35, 1.0)),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
        )
        valid = datasets.ImageFolder(
            path / "val",
            transforms.Compose(
                [
                    transforms.Resize(round(config.size / 0.86)),
                    transforms.CenterCrop(config.size),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
        )
        n_classes, channels, workers = len(classes), 3, config.workers
    train_loader = DataLoader(
        train,
        batch_size=config.bs,
        shuffle=True,
        drop_last=len(train) > config.bs,
        num_workers=workers,
        generator=generator,
    )
    valid_loader = DataLoader(valid, batch_size=config.bs, num_workers=workers)
    return train_loader, valid_loader, n_classes, channels


def _optimizers(module, config: RecipeConfig, spec: RunSpec) -> dict[str, Any]:
    """What the run's ``configure_optimizers`` returns: the recipe's member of the Ranger
    family with flat-then-cosine (``ranger_optimizers``), or the baseline."""
    _, _, _, no_decay_param_groups, ranger_optimizers = _adapter()
    if spec.optimizer != "adamw":
        return ranger_optimizers(
            module,
            lr=config.lr,
            optimizer=spec.optimizer,
            schedule="flat_cos",
            pct_start=config.pct_start,
            **variant_kwargs(spec.optimizer, config, spec.state_precision),
        )
    # The baseline: AdamW with fastai's one-cycle (lr from lr/25 up to lr over the first 25%,
    # then cosine down to lr/1e5; beta1 cycled 0.95 -> 0.85 -> 0.95).
    optimizer = torch.optim.AdamW(
        no_decay_param_groups(module, WEIGHT_DECAY), lr=config.lr, betas=(0.95, 0.99), eps=1e-5
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=module.trainer.estimated_stepping_batches,
        pct_start=0.25,
        div_factor=25.0,
        final_div_factor=1e5 / 25.0,
        base_momentum=0.85,
        max_momentum=0.95,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _batch_history(pl, override):
    class BatchHistory(pl.Callback):
        """Raw training loss and learning rate of every optimizer step."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.lrs: list[float] = []

        @override
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            # Read before the step: the lr this batch is trained with.
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        @override
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    return BatchHistory()


def _module_and_history(config: RecipeConfig, spec: RunSpec, model: nn.Module):
    pl, override, _, _, _ = _adapter()
    # Lightning is imported at run time (it is optional): mypy takes the base as Any.
    lightning_module: Any = pl.LightningModule

    class RecipeModule(lightning_module):
        """A classifier trained with the run's optimizer and schedule, label smoothing 0.1."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.loss = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
            self.valid_iters: list[int] = []
            self.valid_losses: list[float] = []
            self.valid_accuracies: list[float] = []

        @override
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images)

        @override
        def training_step(self, batch, batch_idx):
            images, labels = batch
            loss = self.loss(self(images), labels)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        @override
        def on_validation_epoch_start(self) -> None:
            self._sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count

        @override
        def validation_step(self, batch, batch_idx):
            images, labels = batch
            logits = self(images)
            loss = self.loss(logits, labels)
            count = len(labels)
            correct = (logits.argmax(dim=1) == labels).sum()
            self._sums += torch.stack(
                [loss.detach().double().cpu() * count, correct.double().cpu(), torch.tensor(count)]
            )

        @override
        def on_validation_epoch_end(self) -> None:
            loss_sum, correct, count = self._sums.tolist()
            self.valid_iters.append(self.trainer.global_step)
            self.valid_losses.append(loss_sum / count)
            self.valid_accuracies.append(correct / count)
            self.log("val_loss", loss_sum / count, prog_bar=True)
            self.log("val_acc", correct / count, prog_bar=True)

        @override
        def configure_optimizers(self):
            return _optimizers(self, config, spec)

    return RecipeModule(), _batch_history(pl, override)


def train_lightning(config: RecipeConfig, spec: RunSpec, path=None) -> RunResult:
    """Train ``spec`` with a Lightning ``Trainer`` and return its curves and final metrics.

    ``path`` is an ImageNet-style folder, or None for the digits.
    """
    pl, _, LookaheadCallback, _, _ = _adapter()

    pl.seed_everything(config.seed, workers=True, verbose=False)
    train_loader, valid_loader, n_classes, channels = _loaders(config, path)
    model = build_xresnet(
        config.arch,
        n_classes,
        c_in=channels,
        activation=spec.activation,
        self_attention=config.self_attention,
    )
    module, history = _module_and_history(config, spec, model)
    callbacks = [history]
    if spec.optimizer != "adamw":
        callbacks.append(LookaheadCallback())  # validate on the Lookahead slow weights
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="auto",
        devices=1,
        # Mixed precision only where it pays: on a GPU.
        precision="16-mixed" if torch.cuda.is_available() else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, valid_loader)
    seconds = time.perf_counter() - start
    return RunResult(
        spec=spec,
        accuracy=module.valid_accuracies[-1],
        valid_loss=module.valid_losses[-1],
        seconds=seconds,
        train_losses=history.losses,
        lrs=history.lrs,
        valid_iters=module.valid_iters,
        valid_losses=module.valid_losses,
        model_name=model_name(config.arch, spec.activation, config.self_attention),
        seed=config.seed,
        model=module.model,
        optimizer=trainer.optimizers[0],
    )
