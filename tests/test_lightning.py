"""Lightning adapter: `ranger_optimizers` and `LookaheadCallback`, with Ranger and each
variant of the family."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import warnings

import lightning.pytorch as lp
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning_helpers import CrashAt, SimulatedCrash
from torch import nn
from torch.utils.data import DataLoader

from ranger_plugins import OPTIMIZERS, Ranger, Ranger21
from ranger_plugins import ranger21 as ranger21_module
from ranger_plugins.lightning import (
    FAST_STATE_KEY,
    LookaheadCallback,
    no_decay_param_groups,
    ranger_optimizers,
)
from ranger_plugins.lookahead import slow_weights_key, slow_weights_of
from ranger_plugins.schedules import FlatCosineLR, OneCycleCosineLR

TRAIN = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
VALID = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
BATCH = 8  # 8 optimizer steps per epoch


def _fastai_combined_cos():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastai.callback.schedule import combined_cos
    return combined_cos


class _RecordsTheSlowWeights:
    """Records the slow weights after each training batch, for `_holds_the_slow_weights`."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.slow_after_batch = _slow_weights_of_model(self, self.trainer.optimizers[0])


def _make_model_class(base):
    class RangerModel(_RecordsTheSlowWeights, base):
        """BoringModel with two layers, fixed data, Ranger (or the variant named by
        ``optimizer``), and checks in validation."""

        def __init__(
            self,
            k: int = 6,
            schedule: str = "flat_cos",
            manual: bool = False,
            lr: float = 2e-2,
            total_steps: int | None = None,
            optimizer: str = "ranger",
            state_precision: str = "full",
            hidden: int = 8,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Sequential(
                nn.Linear(32, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 2)
            )
            self.automatic_optimization = not manual
            self.validated_on_slow_weights: list[bool] = []
            self.lrs: list[float] = []

        def configure_optimizers(self):
            hparams = self.hparams
            options = _state_precision_option(hparams.state_precision)
            return ranger_optimizers(
                self,
                lr=hparams.lr,
                schedule=hparams.schedule,
                k=hparams.k,
                total_steps=hparams.total_steps,
                optimizer=hparams.optimizer,
                **options,
            )

        def training_step(self, batch, batch_idx):
            if self.automatic_optimization:
                self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
                return super().training_step(batch, batch_idx)
            optimizer = self.optimizers()
            scheduler = self.lr_schedulers()
            self.lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            loss = self.step(batch)
            self.manual_backward(loss)
            optimizer.step()
            scheduler.step()
            return {"loss": loss}

        def validation_step(self, batch, batch_idx):
            if self.trainer.state.fn == "fit":
                self.validated_on_slow_weights.append(_holds_the_slow_weights(self))
            loss = self.step(batch)
            self.log("val_loss", loss)
            return {"x": loss}

        def train_dataloader(self):
            return DataLoader(TRAIN, batch_size=BATCH)

        def val_dataloader(self):
            return DataLoader(VALID, batch_size=BATCH)

        def test_dataloader(self):
            return DataLoader(VALID, batch_size=BATCH)

    return RangerModel


def _state_precision_option(state_precision):
    """Ranger's own option, given only when it is not the default (the variants do not take
    it)."""
    return {} if state_precision == "full" else {"state_precision": state_precision}


def _slow_weights_of_model(model, optimizer):
    """The slow weights of each param (None before its first step). In the `slow_delta`
    form (fast - slow) they are known only while the model holds the fast weights: after a
    batch, not in validation."""
    return [
        slow_weights_of(p, optimizer.state[p]).to(p.dtype).clone()
        if slow_weights_key(optimizer.state.get(p, {})) is not None
        else None
        for p in model.parameters()
    ]


def _holds_the_slow_weights(model):
    """Whether the model holds the slow weights of the last training batch (before any batch
    of this fit, a sanity check: those of the state, in the `slow_param` form; params that
    have not stepped have none)."""
    optimizer = model.trainer.optimizers[0]
    slow = getattr(model, "slow_after_batch", None)
    if slow is None:
        slow = [optimizer.state.get(p, {}).get("slow_param") for p in model.parameters()]
    return all(
        torch.equal(p, s.to(p.dtype)) for p, s in zip(model.parameters(), slow) if s is not None
    )


RangerModel = _make_model_class(BoringModel)


def _trainer(
    tmp_path=None,
    callbacks=(),
    checkpointing=False,
    lookahead=True,
    weights_after_fit="synced",
    **kwargs,
):
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("num_sanity_val_steps", 0)
    lookahead_callbacks = [LookaheadCallback(weights_after_fit)] if lookahead else []
    callbacks = list(callbacks) + lookahead_callbacks
    return lp.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _optimizer_state(optimizer):
    return copy.deepcopy(optimizer.state_dict()["state"])


def _assert_same_state(first, second):
    assert first.keys() == second.keys()
    for key in first:
        for name, value in first[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, second[key][name]), name
            else:
                assert value == second[key][name], name


# -- ranger_optimizers ----------------------------------------------------------------------


def test_no_decay_groups_hold_biases_and_norm_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4, 4, bias=False),
        nn.LayerNorm(4),
        nn.Linear(4, 2),
    )
    model.append(model[5])  # a shared module: its params must appear once
    decay, no_decay = no_decay_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([model[0].weight, model[3].weight, model[5].weight])
    assert ids(no_decay["params"]) == ids(
        [model[0].bias, model[1].weight, model[1].bias, model[4].weight, model[4].bias]
        + [model[5].bias]
    )
    (single,) = no_decay_param_groups(model, 0.1, exclude_bias_and_norm=False)
    assert len(single["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="weight_decay"):
        no_decay_param_groups(model, -1.0)


def test_ranger_optimizers_returns_lightning_dict_with_ranger_and_step_scheduler():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    config = ranger_optimizers(model, lr=1e-2, total_steps=10, weight_decay=0.05, k=5)
    optimizer = config["optimizer"]
    assert isinstance(optimizer, Ranger)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert all(g["lookahead_k"] == 5 and g["lr"] == 1e-2 for g in optimizer.param_groups)
    scheduler_config = config["lr_scheduler"]
    assert scheduler_config["interval"] == "step" and scheduler_config["frequency"] == 1
    scheduler = scheduler_config["scheduler"]
    assert isinstance(scheduler, FlatCosineLR) and scheduler.optimizer is optimizer
    assert scheduler.total_steps == 10 and scheduler.pct_start == 0.75
    one_cycle = ranger_optimizers(model, schedule="one_cycle", total_steps=10)["lr_scheduler"]
    assert isinstance(one_cycle["scheduler"], OneCycleCosineLR)
    assert one_cycle["scheduler"].pct_start == 0.25
    constant = ranger_optimizers(model, schedule="constant")  # needs no step count
    assert set(constant) == {"optimizer"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedule": "cosine", "total_steps": 3}, "schedule"),
        ({"total_steps": 0}, "total_steps"),
        ({}, "total_steps"),  # not attached to a Trainer and no total_steps
        ({"total_steps": 3, "weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_ranger_optimizers_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ranger_optimizers(RangerModel(), **kwargs)


def test_schedule_in_fit_follows_fastai_with_estimated_stepping_batches():
    combined_cos = _fastai_combined_cos()
    model = RangerModel(lr=1e-2)
    trainer = _trainer(max_epochs=3, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(model)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    total = trainer.estimated_stepping_batches
    assert scheduler.total_steps == total == 12  # 3 epochs x 8 batches / 2
    assert trainer.global_step == scheduler.last_epoch == 12
    # The lr seen in each training_step: per optimizer step (two batches each).
    per_step = model.lrs[::2]
    assert model.lrs[1::2] == per_step
    expected = [combined_cos(0.75, 1e-2, 1e-2, 1e-7)(i / total) for i in range(total)]
    assert per_step == pytest.approx(expected, rel=2e-6)


# -- LookaheadCallback: evaluation on slow weights, identical training --------------------

CONFIGS = {
    "automatic": {},
    "manual": {"model": {"manual": True}},
    "accumulate": {"trainer": {"accumulate_grad_batches": 3}},
    "clip": {"trainer": {"gradient_clip_val": 0.05}},
    "bf16-mixed": {"trainer": {"precision": "bf16-mixed"}},
    # Ranger's low-memory state: the slow weights are `slow_delta` (fast - slow).
    "16bit-state": {"model": {"state_precision": "16bit"}},
    "8bit-state": {"model": {"state_precision": "8bit", "hidden": 128}},
}


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_validation_runs_on_slow_weights_and_training_is_unchanged(config):
    model_kwargs = CONFIGS[config].get("model", {})
    trainer_kwargs = CONFIGS[config].get("trainer", {})
    torch.manual_seed(0)
    validated = RangerModel(k=5, **model_kwargs)
    trainer = _trainer(val_check_interval=3, **trainer_kwargs)
    trainer.fit(validated)
    # Validated after batches 3 and 6 of each epoch (2 val batches), on the slow weights;
    # with accumulation, also between the batches of an optimizer step.
    assert len(validated.validated_on_slow_weights) == 2 * 2 * 2
    assert all(validated.validated_on_slow_weights)
    validated_optimizer_state = _optimizer_state(trainer.optimizers[0])

    torch.manual_seed(0)
    plain = RangerModel(k=5, **model_kwargs)
    plain_trainer = _trainer(limit_val_batches=0, **trainer_kwargs)
    plain_trainer.fit(plain)
    assert plain.validated_on_slow_weights == []
    _assert_bitwise(_params(validated), _params(plain))
    _assert_same_state(validated_optimizer_state, _optimizer_state(plain_trainer.optimizers[0]))
    assert validated.lrs == plain.lrs


def test_training_matches_a_plain_torch_loop_and_ends_on_the_synced_slow_weights():
    torch.manual_seed(0)
    model = RangerModel(k=5)
    reference = copy.deepcopy(model)
    trainer = _trainer(max_epochs=2)
    trainer.fit(model)

    config = ranger_optimizers(reference, lr=2e-2, k=5, total_steps=16)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(2):
        for batch in DataLoader(TRAIN, batch_size=BATCH):
            optimizer.zero_grad()
            reference.step(batch).backward()
            optimizer.step()
            scheduler.step()
    # 16 steps, k = 5: the last sync was at step 15; the callback syncs once more at the end.
    fast = _params(reference)
    slow = [optimizer.state[p]["slow_param"].clone() for p in reference.parameters()]
    expected = [torch.lerp(s, f, 0.5) for s, f in zip(slow, fast)]
    assert not all(torch.equal(s, f) for s, f in zip(slow, fast))
    _assert_bitwise(_params(model), expected)
    model_optimizer = trainer.optimizers[0]
    _assert_bitwise([model_optimizer.state[p]["slow_param"] for p in model.parameters()], expected)


@pytest.mark.parametrize("weights_after_fit", ["slow", "fast"])
def test_weights_after_fit_slow_or_fast(weights_after_fit):
    recorded = {}

    class RecordBeforeTrainEnd(Callback):
        def on_train_end(self, trainer, pl_module):  # runs before LookaheadCallback's
            optimizer = trainer.optimizers[0]
            recorded["fast"] = _params(pl_module)
            recorded["slow"] = [
                optimizer.state[p]["slow_param"].clone() for p in pl_module.parameters()
            ]

    torch.manual_seed(0)
    model = RangerModel(k=5)
    trainer = _trainer(max_epochs=2, callbacks=[RecordBeforeTrainEnd()], lookahead=False)
    trainer.callbacks.append(LookaheadCallback(weights_after_fit=weights_after_fit))
    trainer.fit(model)
    assert not all(torch.equal(f, s) for f, s in zip(recorded["fast"], recorded["slow"]))
    _assert_bitwise(_params(model), recorded[weights_after_fit])
    optimizer = trainer.optimizers[0]
    _assert_bitwise(
        [optimizer.state[p]["slow_param"] for p in model.parameters()], recorded["slow"]
    )


def test_weights_after_fit_is_validated():
    with pytest.raises(ValueError, match="weights_after_fit"):
        LookaheadCallback(weights_after_fit="average")


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_holds_slow_weights_and_monitors_see_slow_metrics(tmp_path):
    torch.manual_seed(0)
    model = RangerModel(k=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    stopper = EarlyStopping(monitor="val_loss", patience=100)
    slow_at_save = {}

    class RecordSlowWeights(Callback):
        def on_validation_end(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            slow_at_save[trainer.current_epoch] = {
                name: optimizer.state[p]["slow_param"].clone()
                for name, p in pl_module.named_parameters()
            }

    trainer = _trainer(
        tmp_path, callbacks=[RecordSlowWeights(), checkpoint, stopper], checkpointing=True
    )
    trainer.fit(model)
    assert all(model.validated_on_slow_weights)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    best_epoch = saved["epoch"]
    # state_dict = the slow weights validation used; the fast weights beside them.
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, slow_at_save[best_epoch][name])
    assert saved[FAST_STATE_KEY].keys() == saved["state_dict"].keys()
    assert any(
        not torch.equal(saved[FAST_STATE_KEY][n], saved["state_dict"][n])
        for n in saved["state_dict"]
    )
    assert saved["callbacks"]["LookaheadCallback"]["weights_after_fit"] == "synced"
    # load_from_checkpoint gives the evaluated model: its val_loss is the monitored score.
    loaded = RangerModel.load_from_checkpoint(checkpoint.best_model_path)
    with torch.no_grad():
        val_loss = torch.stack([loaded.step(b) for b in DataLoader(VALID, batch_size=BATCH)])
    assert val_loss.mean().item() == pytest.approx(checkpoint.best_model_score.item(), rel=1e-6)
    assert stopper.best_score.item() == pytest.approx(checkpoint.best_model_score.item())
    # trainer.validate on the checkpoint evaluates exactly those weights.
    (metrics,) = _trainer().validate(RangerModel(), ckpt_path=checkpoint.best_model_path)
    assert metrics["val_loss"] == pytest.approx(checkpoint.best_model_score.item(), rel=1e-6)


def test_checkpoint_saved_from_inside_validation(tmp_path):
    saved_fast = {}

    class SaveDuringValidation(Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0 and "state" not in saved_fast:
                optimizer = trainer.optimizers[0]
                with torch.no_grad():  # the model holds the slow weights right now
                    assert all(
                        torch.equal(p, optimizer.state[p]["slow_param"])
                        for p in pl_module.parameters()
                    )
                trainer.save_checkpoint(tmp_path / "inside.ckpt")
                saved_fast["state"] = _optimizer_state(optimizer)

    class RecordFastAtValidationStart(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # runs before LookaheadCallback's swap
                saved_fast["fast"] = dict(
                    (n, p.detach().clone()) for n, p in pl_module.named_parameters()
                )
                saved_fast["slow"] = {
                    n: trainer.optimizers[0].state[p]["slow_param"].clone()
                    for n, p in pl_module.named_parameters()
                }

    torch.manual_seed(0)
    model = RangerModel(k=5)
    trainer = _trainer(callbacks=[RecordFastAtValidationStart(), SaveDuringValidation()])
    trainer.fit(model)
    assert all(model.validated_on_slow_weights)  # still slow after the save
    checkpoint = torch.load(tmp_path / "inside.ckpt", weights_only=True)
    for name in saved_fast["fast"]:
        assert torch.equal(checkpoint["state_dict"][name], saved_fast["slow"][name])
        assert torch.equal(checkpoint[FAST_STATE_KEY][name], saved_fast["fast"][name])
    # Training was not disturbed by the save: same as a run without it.
    torch.manual_seed(0)
    plain = RangerModel(k=5)
    _trainer().fit(plain)
    _assert_bitwise(_params(model), _params(plain))


def test_callback_drives_the_generic_lookahead_wrapper():
    from ranger_plugins import Lookahead

    class AdamWLookaheadModel(RangerModel):
        def configure_optimizers(self):
            return Lookahead(torch.optim.AdamW(self.parameters(), lr=1e-2), k=3)

    torch.manual_seed(0)
    model = AdamWLookaheadModel()
    trainer = _trainer(val_check_interval=4)
    trainer.fit(model)
    assert len(model.validated_on_slow_weights) == 2 * 2 * 2
    assert all(model.validated_on_slow_weights)
    optimizer = trainer.optimizers[0]
    assert all(torch.equal(p, optimizer.state[p]["slow_param"]) for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_resume_after_crash_matches_uninterrupted_run_bitwise(tmp_path, precision):
    k, epochs = 6, 3  # 24 steps; the crash after step 8 is between syncs (6 and 12)
    torch.manual_seed(0)
    uninterrupted = RangerModel(k=k)
    full_trainer = _trainer(max_epochs=epochs, precision=precision)
    full_trainer.fit(uninterrupted)

    torch.manual_seed(0)
    crashed = RangerModel(k=k)
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    crash_trainer = _trainer(
        tmp_path,
        callbacks=[last, CrashAt(step=10)],
        checkpointing=True,
        max_epochs=epochs,
        precision=precision,
    )
    with pytest.raises(SimulatedCrash):
        crash_trainer.fit(crashed)  # interrupted during epoch 1; last.ckpt is from step 8
    assert crash_trainer.global_step == 10
    assert torch.load(last.last_model_path, weights_only=True)["global_step"] == 8

    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    resumed = RangerModel(k=k)
    # With a sanity check: it runs after the optimizer state is restored, on the slow weights.
    resume_trainer = _trainer(max_epochs=epochs, precision=precision, num_sanity_val_steps=1)
    resume_trainer.fit(resumed, ckpt_path=last.last_model_path)
    assert len(resumed.validated_on_slow_weights) == 1 + 2 * 2
    assert resume_trainer.global_step == full_trainer.global_step == 24
    _assert_bitwise(_params(resumed), _params(uninterrupted))
    _assert_same_state(
        _optimizer_state(resume_trainer.optimizers[0]),
        _optimizer_state(full_trainer.optimizers[0]),
    )
    assert resumed.lrs == uninterrupted.lrs[8:]
    assert all(resumed.validated_on_slow_weights)


# Checkpoints written when fit has ended. The first run is shorter than the uninterrupted one;
# both follow the uninterrupted run's schedule (total_steps), so they can be compared.
LONG_EPOCHS = 3
LONG_STEPS = LONG_EPOCHS * len(TRAIN) // BATCH  # 24; k = 6: one epoch ends between syncs


class _RecordBeforeFinish(Callback):
    """The training state when training ends, before `LookaheadCallback.on_train_end` (listed
    after this callback) leaves the model holding ``weights_after_fit``."""

    def on_train_end(self, trainer, pl_module):
        self.fast = _params(pl_module)
        self.state = _optimizer_state(trainer.optimizers[0])


class StepIndexedModel(RangerModel):
    """Trains on the batch of its optimizer step count, not the one the DataLoader gives:
    Lightning resumes a plain DataLoader mid-epoch from its first batch, so the data of a
    resumed run would otherwise differ from the uninterrupted run's."""

    def training_step(self, batch, batch_idx):
        steps_per_epoch = len(TRAIN) // BATCH
        start = self.trainer.global_step % steps_per_epoch * BATCH
        return super().training_step(TRAIN[start : start + BATCH], batch_idx)


def _precision_options(state_precision):
    """The model options for a Ranger ``state_precision``: for "8bit", a hidden layer large
    enough for 8-bit moments (a weight of 4096 elements; smaller params keep 16-bit ones)."""
    return {"state_precision": state_precision, "hidden": 128 if state_precision == "8bit" else 8}


@functools.cache
def _uninterrupted_long_run(weights_after_fit, state_precision="full"):
    torch.manual_seed(0)
    model = StepIndexedModel(total_steps=LONG_STEPS, **_precision_options(state_precision))
    trainer = _trainer(max_epochs=LONG_EPOCHS, weights_after_fit=weights_after_fit)
    trainer.fit(model)
    return _params(model), _optimizer_state(trainer.optimizers[0]), model.lrs


def _assert_resumes_like_the_uninterrupted_run(
    path, weights_after_fit, from_step, state_precision="full"
):
    params, state, lrs = _uninterrupted_long_run(weights_after_fit, state_precision)
    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    resumed = StepIndexedModel(total_steps=LONG_STEPS, **_precision_options(state_precision))
    trainer = _trainer(max_epochs=LONG_EPOCHS, weights_after_fit=weights_after_fit)
    trainer.fit(resumed, ckpt_path=path)
    assert trainer.global_step == LONG_STEPS
    _assert_bitwise(_params(resumed), params)
    _assert_same_state(_optimizer_state(trainer.optimizers[0]), state)
    assert resumed.lrs == lrs[from_step:] and len(lrs) == LONG_STEPS


# Every way of writing it in full precision; each weights_after_fit in the low-memory ones,
# whose slow weights are `slow_delta` (fast - slow), which "synced" and "slow" zero.
AFTER_FIT_CASES = [
    *(
        (written_by, weights_after_fit, "full")
        for written_by in ("last.ckpt in on_train_end", "save_checkpoint after fit")
        for weights_after_fit in ("synced", "slow", "fast")
    ),
    *(
        (written_by, weights_after_fit, state_precision)
        for state_precision, written_by, choices in (
            ("16bit", "save_checkpoint after fit", ("synced", "slow", "fast")),
            ("8bit", "last.ckpt in on_train_end", ("synced", "slow")),
        )
        for weights_after_fit in choices
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("written_by", "weights_after_fit", "state_precision"), AFTER_FIT_CASES)
def test_checkpoint_written_after_fit_resumes_like_one_longer_run(
    tmp_path, written_by, weights_after_fit, state_precision
):
    before_finish = _RecordBeforeFinish()
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    save_last = written_by.startswith("last.ckpt")
    torch.manual_seed(0)
    model = StepIndexedModel(total_steps=LONG_STEPS, **_precision_options(state_precision))
    trainer = _trainer(
        tmp_path,
        callbacks=[before_finish, *([last] if save_last else [])],
        checkpointing=save_last,
        max_epochs=1,
        weights_after_fit=weights_after_fit,
    )
    trainer.fit(model)
    after_fit = _params(model)
    path = last.last_model_path if save_last else tmp_path / "after_fit.ckpt"
    if not save_last:
        trainer.save_checkpoint(path)
    _assert_bitwise(_params(model), after_fit)  # saving left the end-of-fit weights alone

    saved = torch.load(path, weights_only=True)
    names = [name for name, _ in model.named_parameters()]
    optimizer = trainer.optimizers[0]
    # state_dict: the evaluation weights (the slow weights, which "synced" and "slow" leave
    # in the model); beside them the training state from before the end of fit.
    evaluated = [saved["state_dict"][name] for name in names]
    slow = [slow_weights_of(p, optimizer.state[p]).to(p.dtype) for p in model.parameters()]
    _assert_bitwise(evaluated, slow)
    if weights_after_fit != "fast":
        _assert_bitwise(evaluated, after_fit)
        assert not all(torch.equal(a, b) for a, b in zip(after_fit, before_finish.fast))
    _assert_bitwise([saved[FAST_STATE_KEY][name] for name in names], before_finish.fast)
    _assert_same_state(saved["optimizer_states"][0]["state"], before_finish.state)

    _assert_resumes_like_the_uninterrupted_run(
        path, weights_after_fit, from_step=len(TRAIN) // BATCH, state_precision=state_precision
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("weights_after_fit", "state_precision"),
    [("synced", "full"), ("slow", "full"), ("fast", "full"), ("synced", "16bit"), ("slow", "8bit")],
)
def test_mid_epoch_checkpoint_resumes_like_one_longer_run(
    tmp_path, weights_after_fit, state_precision
):
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    torch.manual_seed(0)
    model = StepIndexedModel(total_steps=LONG_STEPS, **_precision_options(state_precision))
    trainer = _trainer(
        tmp_path,
        callbacks=[every, CrashAt(step=12)],
        checkpointing=True,
        max_epochs=LONG_EPOCHS,
        weights_after_fit=weights_after_fit,
    )
    with pytest.raises(SimulatedCrash):
        trainer.fit(model)
    path = tmp_path / "epoch=1-step=10.ckpt"  # mid-epoch, between the syncs at 6 and 12
    assert torch.load(path, weights_only=True)["global_step"] == 10
    _assert_resumes_like_the_uninterrupted_run(path, weights_after_fit, 10, state_precision)


def test_resume_without_the_callback_warns(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(RangerModel())
    path = tmp_path / "lookahead.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(UserWarning, match="LookaheadCallback"):
        _trainer(max_epochs=2, lookahead=False).fit(RangerModel(), ckpt_path=path)


def test_resume_from_a_checkpoint_without_fast_weights_warns(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, max_epochs=1, lookahead=False)
    trainer.fit(RangerModel())
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(UserWarning, match="no Lookahead fast weights"):
        _trainer(max_epochs=2).fit(RangerModel(), ckpt_path=path)


def test_callback_without_lookahead_optimizer_warns():
    class AdamModel(RangerModel):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.warns(UserWarning, match="no optimizer with Lookahead"):
        _trainer(max_epochs=1, limit_train_batches=2).fit(AdamModel())


# -- fp16 AMP with GradScaler on CPU ----------------------------------------------------------


def test_fp16_gradscaler_skip_leaves_optimizer_lookahead_and_schedule_untouched():
    skip_step = 7  # optimizer step index (0-based) whose gradients are made inf
    snapshots = {}

    class InjectInf(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == skip_step:
                optimizer = trainer.optimizers[0]
                scheduler = trainer.lr_scheduler_configs[0].scheduler
                snapshots["before"] = (
                    _optimizer_state(optimizer),
                    _params(pl_module),
                    [g["lr"] for g in optimizer.param_groups],
                    scheduler.last_epoch,
                )

        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == skip_step:
                pl_module.layer[0].weight.grad[0, 0] = float("inf")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == skip_step + 1:  # Lightning counted the skipped step
                optimizer = trainer.optimizers[0]
                scheduler = trainer.lr_scheduler_configs[0].scheduler
                snapshots["after"] = (
                    _optimizer_state(optimizer),
                    _params(pl_module),
                    [g["lr"] for g in optimizer.param_groups],
                    scheduler.last_epoch,
                )

    torch.manual_seed(0)
    model = RangerModel(k=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = _trainer(
        max_epochs=2,
        callbacks=[InjectInf()],
        plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)],
    )
    trainer.fit(model)
    assert isinstance(trainer.precision_plugin, MixedPrecision)
    assert trainer.precision_plugin.scaler is scaler
    state_before, params_before, lrs_before, position_before = snapshots["before"]
    state_after, params_after, lrs_after, position_after = snapshots["after"]
    _assert_same_state(state_before, state_after)  # moments, slow weights, step counts
    assert {s["step"] for s in state_after.values()} == {skip_step}  # Lookahead counter
    _assert_bitwise(params_before, params_after)
    assert lrs_before == lrs_after and position_before == position_after == skip_step
    # Lightning took 16 "steps"; the optimizer and the schedule saw 15.
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 16 and scheduler.last_epoch == scheduler.optimizer_steps == 15
    assert {s["step"] for s in trainer.optimizers[0].state.values()} == {15}
    assert all(model.validated_on_slow_weights)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- LightningCLI and the pytorch_lightning package ------------------------------------------


def _fit_with_cli(tmp_path, *optimizer_args):
    """LightningCLI with the optimizer of ``optimizer_args``, FlatCosineLR and
    LookaheadCallback from the command line; 4 steps."""
    from lightning.pytorch.cli import LightningCLI

    class CLIModel(RangerModel):
        configure_optimizers = BoringModel.configure_optimizers  # let the CLI choose

    cli = LightningCLI(
        CLIModel,
        args=[
            *optimizer_args,
            "--optimizer.lr=0.01",
            "--optimizer.k=3",
            "--lr_scheduler=ranger_plugins.schedules.FlatCosineLR",
            "--lr_scheduler.total_steps=4",
            "--lr_scheduler.pct_start=0.5",
            "--trainer.callbacks=ranger_plugins.lightning.LookaheadCallback",
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
        save_config_kwargs={"overwrite": True},
    )
    cli.trainer.fit(cli.model)
    (optimizer,) = cli.trainer.optimizers
    group = optimizer.param_groups[0]
    assert group["lookahead_k"] == 3
    assert {s["step"] for s in optimizer.state.values()} == {4}
    assert any(isinstance(cb, LookaheadCallback) for cb in cli.trainer.callbacks)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, FlatCosineLR) and scheduler.pct_start == 0.5
    assert cli.model.validated_on_slow_weights and all(cli.model.validated_on_slow_weights)
    return optimizer


def test_lightning_cli_with_ranger_optimizer_and_callback(tmp_path):
    optimizer = _fit_with_cli(
        tmp_path, "--optimizer=ranger_plugins.Ranger", "--optimizer.betas=[0.9, 0.99]"
    )
    assert isinstance(optimizer, Ranger)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["betas"] == (0.9, 0.99)


# Each variant by class path, with one of its own options.
CLI_VARIANTS = {
    "RangerQH": (["--optimizer.nus=[0.8, 1.0]"], {"nus": (0.8, 1.0)}),
    "RangerVA": (["--optimizer.amsgrad=false"], {"amsgrad": False}),
    # The CLI's scheduler sets the lr: Ranger21's own warmup and warmdown off.
    "Ranger21": (
        ["--optimizer.use_warmup=false", "--optimizer.warmdown_active=false"],
        {"use_warmup": False, "warmdown_active": False},
    ),
    "RangerLars": (["--optimizer.use_gc=true"], {"use_gc": True}),
}


@pytest.mark.parametrize("class_name", CLI_VARIANTS)
def test_lightning_cli_picks_each_variant_by_class_path(tmp_path, class_name):
    args, expected = CLI_VARIANTS[class_name]
    optimizer = _fit_with_cli(tmp_path, f"--optimizer=ranger_plugins.{class_name}", *args)
    assert type(optimizer).__name__ == class_name
    assert type(optimizer) in OPTIMIZERS.values()
    group = optimizer.param_groups[0]
    assert {key: group[key] for key in expected} == expected


def test_pytorch_lightning_package_accepts_the_callback():
    pl = importlib.import_module("pytorch_lightning")
    from pytorch_lightning.demos.boring_classes import BoringModel as PLBoringModel

    assert isinstance(LookaheadCallback(), pl.Callback)
    assert isinstance(LookaheadCallback(), lp.Callback)
    model = _make_model_class(PLBoringModel)(k=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[LookaheadCallback()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        val_check_interval=4,
    )
    trainer.fit(model)
    assert len(model.validated_on_slow_weights) == 2 * 2
    assert all(model.validated_on_slow_weights)
    optimizer = trainer.optimizers[0]
    assert all(torch.equal(p, optimizer.state[p]["slow_param"]) for p in model.parameters())


# -- the Ranger family: each variant by name ---------------------------------------------------

VARIANTS = ["ranger_qh", "ranger_va", "ranger21", "ranger_lars"]

# One of each variant's own options, passed through ranger_optimizers under the class's name.
VARIANT_KWARGS = {
    "ranger_qh": {"nus": (0.8, 0.9), "decouple_weight_decay": True},
    "ranger_va": {"amsgrad": False, "smooth": 20.0},
    "ranger21": {"norm_loss_factor": 1e-3, "use_agc": False},
    "ranger_lars": {"use_gc": True, "gc_conv_only": True},
}


def _norm_model():
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("name", VARIANTS)
def test_ranger_optimizers_builds_each_variant_by_name_with_its_options(name):
    cls = OPTIMIZERS[name]
    config = ranger_optimizers(
        _norm_model(), lr=1e-2, optimizer=name, total_steps=10, k=5, **VARIANT_KWARGS[name]
    )
    optimizer = config["optimizer"]
    assert type(optimizer) is cls
    decayed, exempt = optimizer.param_groups  # no decay on biases and norm layers
    default_wd = inspect.signature(cls).parameters["weight_decay"].default
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (default_wd, 0.0)
    assert len(decayed["params"]) == 1 and len(exempt["params"]) == 3
    for group in optimizer.param_groups:
        assert group["lookahead_k"] == 5 and group["lr"] == 1e-2
        assert all(group[key] == value for key, value in VARIANT_KWARGS[name].items())
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, FlatCosineLR) and scheduler.optimizer is optimizer
    # The class itself works as well as its name; weight_decay as given.
    by_class = ranger_optimizers(_norm_model(), optimizer=cls, weight_decay=0.05, total_steps=3)
    assert type(by_class["optimizer"]) is cls
    assert [g["weight_decay"] for g in by_class["optimizer"].param_groups] == [0.05, 0.0]


def test_ranger_optimizers_weight_decay_defaults_and_bad_names():
    decays = {
        name: ranger_optimizers(_norm_model(), optimizer=name, schedule="constant")[
            "optimizer"
        ].param_groups[0]["weight_decay"]
        for name in OPTIMIZERS
    }
    # Ranger: the recipe's 1e-2 (as before); the variants: their own defaults.
    assert decays == {
        "ranger": 1e-2,
        "ranger_qh": 0.0,
        "ranger_va": 0.0,
        "ranger21": 1e-4,
        "ranger_lars": 0.0,
    }
    with pytest.raises(ValueError, match="ranger_qh"):
        ranger_optimizers(_norm_model(), optimizer="rangerqh", total_steps=3)
    with pytest.raises(TypeError, match="nus"):
        ranger_optimizers(_norm_model(), optimizer="ranger_va", total_steps=3, nus=(0.7, 1.0))


def _ranger21_flags(**kwargs):
    optimizer = ranger_optimizers(_norm_model(), optimizer="ranger21", **kwargs)["optimizer"]
    assert isinstance(optimizer, Ranger21)
    flags = {(g["use_warmup"], g["warmdown_active"]) for g in optimizer.param_groups}
    assert len(flags) == 1
    return flags.pop()


def test_ranger21_schedule_is_off_under_an_attached_schedule_and_its_own_with_constant():
    # An attached schedule sets the lr: Ranger21's warmup and warmdown are off.
    for schedule in ("flat_cos", "one_cycle"):
        assert _ranger21_flags(schedule=schedule, total_steps=10) == (False, False)
        assert _ranger21_flags(schedule=schedule, total_steps=10, num_iterations=10) == (
            False,
            False,
        )
        for flag in ("use_warmup", "warmdown_active"):
            with pytest.raises(ValueError, match=f"{flag}=True with schedule"):
                ranger_optimizers(
                    _norm_model(), optimizer="ranger21", schedule=schedule, total_steps=10,
                    num_iterations=10, **{flag: True},
                )  # fmt: skip
    # "constant": Ranger21 schedules itself when it knows the run's length...
    assert _ranger21_flags(schedule="constant", num_iterations=100) == (True, True)
    assert _ranger21_flags(schedule="constant", num_iterations=100, use_warmup=False) == (
        False,
        True,
    )
    # ...and not without it, unless asked to (a warmup of a given length needs none).
    assert _ranger21_flags(schedule="constant") == (False, False)
    assert _ranger21_flags(schedule="constant", use_warmup=True, num_warmup_iterations=10) == (
        True,
        False,
    )
    with pytest.raises(ValueError, match="num_iterations"):
        _ranger21_flags(schedule="constant", warmdown_active=True)


def test_ranger21_in_fit_steps_with_exactly_the_schedulers_lr(monkeypatch):
    used = {}
    original = ranger21_module._step_scalars

    def spy(step, **kwargs):
        scalars = original(step, **kwargs)
        used.setdefault(step, set()).add((kwargs["lr"], scalars.lr))
        return scalars

    monkeypatch.setattr(ranger21_module, "_step_scalars", spy)
    torch.manual_seed(0)
    model = RangerModel(optimizer="ranger21", schedule="one_cycle")
    _trainer(max_epochs=2, limit_val_batches=0).fit(model)
    assert sorted(used) == list(range(1, 17))
    per_step = [used[step] for step in sorted(used)]
    assert all(len(pairs) == 1 for pairs in per_step)  # every group the same lr
    pairs = [pairs.pop() for pairs in per_step]
    assert all(given == taken for given, taken in pairs)  # Ranger21's own schedule is off
    assert [taken for _, taken in pairs] == model.lrs  # the lr the scheduler set
    assert max(model.lrs) > 10 * min(model.lrs)


@pytest.mark.parametrize("name", VARIANTS)
def test_callback_validates_each_variant_on_slow_weights_and_training_is_unchanged(name):
    torch.manual_seed(0)
    validated = RangerModel(k=5, optimizer=name)
    trainer = _trainer(val_check_interval=3)
    trainer.fit(validated)
    assert len(validated.validated_on_slow_weights) == 2 * 2 * 2
    assert all(validated.validated_on_slow_weights)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is OPTIMIZERS[name]
    # The fit ended on the synced slow weights (16 steps, k = 5: one sync after step 15).
    assert all(torch.equal(p, optimizer.state[p]["slow_param"]) for p in validated.parameters())

    torch.manual_seed(0)
    plain = RangerModel(k=5, optimizer=name)
    plain_trainer = _trainer(limit_val_batches=0, lookahead=False)
    plain_trainer.fit(plain)
    plain_trainer.optimizers[0].sync_lookahead()  # what the callback did, by hand
    _assert_bitwise(_params(validated), _params(plain))
    _assert_same_state(_optimizer_state(optimizer), _optimizer_state(plain_trainer.optimizers[0]))
    assert validated.lrs == plain.lrs


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_resumes_after_a_crash_like_the_uninterrupted_run(tmp_path, name):
    epochs = 3  # 24 steps, k = 6; the checkpoint after step 8 is between syncs (6 and 12)
    torch.manual_seed(0)
    uninterrupted = RangerModel(optimizer=name)
    full_trainer = _trainer(max_epochs=epochs)
    full_trainer.fit(uninterrupted)

    torch.manual_seed(0)
    crashed = RangerModel(optimizer=name)
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    crash_trainer = _trainer(
        tmp_path, callbacks=[last, CrashAt(step=10)], checkpointing=True, max_epochs=epochs
    )
    with pytest.raises(SimulatedCrash):
        crash_trainer.fit(crashed)
    saved = torch.load(last.last_model_path, weights_only=True)
    assert saved["global_step"] == 8 and FAST_STATE_KEY in saved

    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    resumed = RangerModel(optimizer=name)
    resume_trainer = _trainer(max_epochs=epochs)
    resume_trainer.fit(resumed, ckpt_path=last.last_model_path)
    assert type(resume_trainer.optimizers[0]) is OPTIMIZERS[name]
    assert resume_trainer.global_step == 24
    _assert_bitwise(_params(resumed), _params(uninterrupted))
    _assert_same_state(
        _optimizer_state(resume_trainer.optimizers[0]),
        _optimizer_state(full_trainer.optimizers[0]),
    )
    assert resumed.lrs == uninterrupted.lrs[8:]
    assert all(resumed.validated_on_slow_weights)


# -- Ranger's low-memory state (state_precision) ------------------------------------------


def test_ranger_optimizers_hands_state_precision_to_ranger():
    model = RangerModel(hidden=128)
    optimizer = ranger_optimizers(model, total_steps=4, state_precision="8bit")["optimizer"]
    assert isinstance(optimizer, Ranger)
    assert {group["state_precision"] for group in optimizer.param_groups} == {"8bit"}
    with pytest.raises(ValueError, match="state_precision") as raised:
        ranger_optimizers(model, total_steps=4, state_precision="4bit")
    assert "'4bit'" in str(raised.value)
    assert all(choice in str(raised.value) for choice in ("full", "delta", "16bit", "8bit"))
    # Ranger's own option: a variant refuses it rather than ignoring it.
    with pytest.raises(TypeError, match="state_precision"):
        ranger_optimizers(model, optimizer="ranger_qh", total_steps=4, state_precision="8bit")


def test_lightning_cli_sets_rangers_state_precision(tmp_path):
    optimizer = _fit_with_cli(
        tmp_path, "--optimizer=ranger_plugins.Ranger", "--optimizer.state_precision=16bit"
    )
    assert {group["state_precision"] for group in optimizer.param_groups} == {"16bit"}
    for state in optimizer.state.values():
        assert "slow_param" not in state and state["slow_delta"].dtype == torch.bfloat16


class _TrainingStateAtStart(Callback):
    """The fast weights and the slow weights (as values) when training starts."""

    def on_train_start(self, trainer, pl_module):
        self.fast = _params(pl_module)
        self.slow = _slow_weights_of_model(pl_module, trainer.optimizers[0])


@pytest.mark.slow
@pytest.mark.parametrize(("saved_in", "resumed_in"), [("full", "8bit"), ("8bit", "full")])
def test_a_checkpoint_saved_in_one_precision_resumes_in_another(tmp_path, saved_in, resumed_in):
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    torch.manual_seed(0)
    model = StepIndexedModel(total_steps=LONG_STEPS, state_precision=saved_in, hidden=128)
    trainer = _trainer(
        tmp_path, callbacks=[every, CrashAt(step=7)], checkpointing=True, max_epochs=LONG_EPOCHS
    )
    with pytest.raises(SimulatedCrash):
        trainer.fit(model)
    path = tmp_path / "epoch=0-step=5.ckpt"  # between the syncs at 0 and 6
    saved = torch.load(path, weights_only=True)
    names = [name for name, _ in model.named_parameters()]
    saved_fast = [saved[FAST_STATE_KEY][name] for name in names]
    saved_slow = [saved["state_dict"][name] for name in names]

    torch.manual_seed(1)
    resumed = StepIndexedModel(total_steps=LONG_STEPS, state_precision=resumed_in, hidden=128)
    at_start = _TrainingStateAtStart()
    resume_trainer = _trainer(callbacks=[at_start], max_epochs=LONG_EPOCHS)
    resume_trainer.fit(resumed, ckpt_path=path)
    # It went on from the saved fast weights exactly, and from the saved slow weights up to
    # the bf16 rounding of fast - slow (converted when the optimizer state was loaded).
    _assert_bitwise(at_start.fast, saved_fast)
    for slow, expected, fast in zip(at_start.slow, saved_slow, saved_fast):
        assert (slow - expected).abs().max() <= 2**-7 * (fast - expected).abs().max()
    assert not all(torch.equal(a, b) for a, b in zip(saved_slow, saved_fast))
    # ...in the new precision's layout, to the end of the run.
    optimizer = resume_trainer.optimizers[0]
    assert resume_trainer.global_step == LONG_STEPS
    assert {state["step"] for state in optimizer.state.values()} == {LONG_STEPS}
    big = resumed.layer[0].weight
    layout = {key: value.dtype for key, value in optimizer.state[big].items() if key != "step"}
    if resumed_in == "8bit":
        assert layout["exp_avg"] == torch.int8 and layout["exp_avg_sq"] == torch.uint8
        assert "slow_param" not in layout
    else:
        assert layout == dict.fromkeys(("exp_avg", "exp_avg_sq", "slow_param"), torch.float32)
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
    assert all(resumed.validated_on_slow_weights) and resumed.validated_on_slow_weights
