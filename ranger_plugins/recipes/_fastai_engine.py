"""Train one run with fastai: ``Learner`` + ``fit_flat_cos`` (recipe) or ``fit_one_cycle``.

The recipe's optimizer, any member of the Ranger family, comes from the fastai adapter's
opt_func of that name (`ranger_plugins.fastai.opt_func_for`), with the hyperparameters of
`_optimizers.variant_kwargs` under fastai's names (Ranger's ``state_precision`` too).
"""

from __future__ import annotations

import inspect
import time
from functools import partial
from typing import Any

import torch

from ._config import LABEL_SMOOTHING, WEIGHT_DECAY, RecipeConfig, RunResult, RunSpec
from ._data import (
    IMAGE_EXTENSIONS,
    EngineUnavailableError,
    RecipeInputError,
    class_names,
    digits_split,
)
from ._models import build_xresnet, model_name
from ._optimizers import variant_kwargs

__all__ = ["fastai_kwargs", "train_fastai"]

# The core's keyword -> the fastai adapter's name for it (betas are split in two).
_FASTAI_NAMES = {"weight_decay": "wd", "use_gc": "gc", "decouple_weight_decay": "decouple_wd"}


def fastai_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a family class, under the names its fastai opt_func takes."""
    renamed = {_FASTAI_NAMES.get(key, key): value for key, value in kwargs.items()}
    if "betas" in renamed:
        renamed["mom"], renamed["sqr_mom"] = renamed.pop("betas")
    return renamed


def _takes(func: Any, name: str) -> bool:
    """Whether ``func`` takes a keyword argument ``name`` (by name, or by ``**kwargs``)."""
    parameters = inspect.signature(func).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _with_state_precision(opt_func: Any, params: Any, state_precision: str, **kwargs: Any):
    """``opt_func(params, **kwargs)`` with every core group's ``state_precision`` set: for an
    adapter whose opt_func does not take the keyword. Set before the first step, it is what
    the core reads when it creates the state."""
    wrapper = opt_func(params, **kwargs)
    for group in wrapper.opt.param_groups:
        group["state_precision"] = state_precision
    return wrapper


def _bind(opt_func: Any, kwargs: dict[str, Any]):
    """``opt_func`` with ``kwargs`` bound (`functools.partial`, as fastai binds options)."""
    precision = kwargs.get("state_precision")
    if precision is None or _takes(opt_func, "state_precision"):
        return partial(opt_func, **kwargs)
    others = {key: value for key, value in kwargs.items() if key != "state_precision"}
    return partial(_with_state_precision, opt_func, state_precision=precision, **others)


def _recipe_optimizer(config: RecipeConfig, spec: RunSpec):
    """The fastai adapter's opt_func for the run's optimizer with the recipe's
    hyperparameters, and its Lookahead evaluation callback (validation on the slow
    weights)."""
    try:
        from ranger_plugins.fastai import LookaheadCallback, opt_func_for
    except ImportError as error:
        raise EngineUnavailableError(
            f"the fastai engine needs ranger_plugins.fastai (opt_func_for, LookaheadCallback), "
            f"which could not be imported: {error}. Try --engine lightning."
        ) from error
    kwargs = fastai_kwargs(variant_kwargs(spec.optimizer, config, spec.state_precision))
    return _bind(opt_func_for(spec.optimizer), kwargs), [LookaheadCallback()]


def _dataloaders(config: RecipeConfig, path):
    from fastai.data.core import DataLoaders
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        FlipItem,
        GrandparentSplitter,
        ImageBlock,
        Normalize,
        RandomResizedCrop,
        get_files,
        imagenet_stats,
        parent_label,
    )

    if path is None:
        digits = digits_split(config.size)
        train = torch.utils.data.TensorDataset(digits.x_train, digits.y_train)
        valid = torch.utils.data.TensorDataset(digits.x_valid, digits.y_valid)
        dls = DataLoaders.from_dsets(train, valid, bs=config.bs, num_workers=0)
        return dls, len(digits.classes), 1
    classes = class_names(path)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        # The files the folder scan read, and the ones the Lightning engine's ImageFolder loads.
        get_items=partial(get_files, extensions=set(IMAGE_EXTENSIONS)),
        splitter=GrandparentSplitter(train_name="train", valid_name="val"),
        get_y=parent_label,
        # The leaderboard's augmentation: random resized crops down to 35% of the image and
        # horizontal flips; validation gets a centre crop.
        item_tfms=[RandomResizedCrop(config.size, min_scale=0.35), FlipItem(0.5)],
        batch_tfms=Normalize.from_stats(*imagenet_stats),
    )
    dls = block.dataloaders(path, bs=config.bs, num_workers=config.workers)
    if len(dls.train) == 0:  # fastai drops the last partial training batch
        raise RecipeInputError(
            f"--bs {config.bs} is larger than the training set of {path} "
            f"({len(dls.train_ds)} images); pass a smaller --bs"
        )
    return dls, len(classes), 3


def _batch_history():
    from fastai.callback.core import Callback

    class BatchHistory(Callback):
        """Raw training loss and learning rate of every iteration (fastai's Recorder keeps
        only a smoothed loss)."""

        def before_fit(self):
            self.losses, self.lrs = [], []

        def after_batch(self):
            if self.training:
                self.losses.append(self.learn.loss.item())
                self.lrs.append(self.opt.hypers[-1]["lr"])

    return BatchHistory()


def train_fastai(config: RecipeConfig, spec: RunSpec, path=None) -> RunResult:
    """Train ``spec`` with fastai and return its curves and final validation metrics.

    ``path`` is an ImageNet-style folder, or None for the digits.
    """
    import fastai.callback.progress  # noqa: F401  (the progress bar, a default callback once imported)
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_flat_cos / fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam
    from fastai.torch_core import set_seed

    # Same seed before data and model: both runs start from identical weights (activations
    # have none) and see the same batches.
    set_seed(config.seed, reproducible=True)
    dls, n_classes, channels = _dataloaders(config, path)
    model = build_xresnet(
        config.arch,
        n_classes,
        c_in=channels,
        activation=spec.activation,
        self_attention=config.self_attention,
    )
    if spec.optimizer != "adamw":
        opt_func, callbacks = _recipe_optimizer(config, spec)
    else:
        # fastai's Adam applies true (decoupled) weight decay: AdamW.
        opt_func, callbacks = partial(Adam, wd=WEIGHT_DECAY), []
    history = _batch_history()
    learn = Learner(
        dls,
        model,
        opt_func=opt_func,
        loss_func=CrossEntropyLossFlat(label_smoothing=LABEL_SMOOTHING),
        metrics=accuracy,
        cbs=[history, *callbacks],
        wd_bn_bias=False,  # no weight decay on norm and bias parameters
    )
    if torch.cuda.is_available():
        learn = learn.to_fp16()

    start = time.perf_counter()
    if spec.schedule == "flat_cos":
        learn.fit_flat_cos(config.epochs, lr=config.lr, pct_start=config.pct_start)
    else:
        learn.fit_one_cycle(config.epochs, lr_max=config.lr)
    seconds = time.perf_counter() - start

    # Recorder.values: one row per epoch, [train_loss, valid_loss, accuracy].
    values = [list(map(float, row)) for row in learn.recorder.values]
    per_epoch = len(history.losses) // max(config.epochs, 1)
    return RunResult(
        spec=spec,
        accuracy=values[-1][2],
        valid_loss=values[-1][1],
        seconds=seconds,
        train_losses=history.losses,
        lrs=history.lrs,
        valid_iters=[per_epoch * (epoch + 1) for epoch in range(len(values))],
        valid_losses=[row[1] for row in values],
        model_name=model_name(config.arch, spec.activation, config.self_attention),
        seed=config.seed,
        model=learn.model,
        # RangerOptimWrapper keeps the core optimizer in `.opt`; fastai's own Adam is itself.
        optimizer=getattr(learn.opt, "opt", learn.opt),
    )
