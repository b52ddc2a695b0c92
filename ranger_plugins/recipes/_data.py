"""Data for the recipes: scikit-learn's digits (ships with the package, no download) and
ImageNet-style folders (``train/<class>/*``, ``val/<class>/*``) such as Imagenette."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DatasetUnavailableError",
    "EngineUnavailableError",
    "RecipeError",
    "RecipeInputError",
    "DigitsSplit",
    "check_image_folder",
    "digits_split",
    "fetch_dataset",
]

DIGITS_CLASSES = 10
# Fixed, seed-independent split so that --seed changes only the training randomness.
DIGITS_SPLIT_SEED = 0
DIGITS_VALID_FRACTION = 0.2


class RecipeError(RuntimeError):
    """A recipe cannot run as asked; the message says why and what to do instead."""


class RecipeInputError(RecipeError, ValueError):
    """An option or a dataset the recipe cannot use (a ``ValueError``), e.g. a folder not
    laid out as ``train/<class>``, ``val/<class>``."""


class DatasetUnavailableError(RecipeError):
    """The named dataset could not be fetched (usually: no network)."""


class EngineUnavailableError(RecipeError):
    """The chosen engine's adapter (``ranger_plugins.fastai`` / ``.lightning``) is missing."""


class DigitsSplit:
    """scikit-learn's 8x8 digits as normalised image tensors, upsampled to ``size`` pixels.

    Attributes ``x_train``, ``y_train``, ``x_valid``, ``y_valid``: float images of shape
    (N, 1, size, size), normalised with the training mean and std, and int64 labels.
    """

    def __init__(self, size: int) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        train_idx, valid_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=DIGITS_VALID_FRACTION,
            random_state=DIGITS_SPLIT_SEED,
            stratify=labels.numpy(),
        )
        # XResNet halves the resolution five times; 8x8 would vanish, so upsample once here.
        if size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        train = images[train_idx]
        mean, std = train.mean(), train.std()
        self.x_train = (train - mean) / std
        self.y_train = labels[train_idx]
        self.x_valid = (images[valid_idx] - mean) / std
        self.y_valid = labels[valid_idx]
        self.classes = list(range(DIGITS_CLASSES))


def digits_split(size: int) -> DigitsSplit:
    """Load the digits split at ``size`` pixels (see :class:`DigitsSplit`)."""
    if size < 8:
        raise RecipeInputError(f"size must be >= 8 for digits (the images are 8x8), got {size}")
    return DigitsSplit(size)


def check_image_folder(path: Path) -> list[str]:
    """Check ``path`` is an ImageNet-style folder and return its class names (sorted).

    Raises `RecipeInputError` (a ``ValueError``) naming what is missing: ``train/`` and
    ``val/`` with the same class subfolders.
    """
    path = Path(path)
    layout = "PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg"
    if not path.is_dir():
        raise RecipeInputError(f"--data {path}: not a directory (expected {layout})")
    splits = {}
    for split in ("train", "val"):
        folder = path / split
        if not folder.is_dir():
            raise RecipeInputError(f"--data {path}: no '{split}' folder (expected {layout})")
        splits[split] = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not splits[split]:
            raise RecipeInputError(f"--data {path}: '{split}' has no class folders ({layout})")
    if splits["train"] != splits["val"]:
        raise RecipeInputError(
            f"--data {path}: train and val have different classes: "
            f"train {splits['train']}, val {splits['val']}"
        )
    return splits["train"]


def dataset_url(name: str, size: int) -> str:
    """fastai's URL for Imagenette/Imagewoof, picking the smallest copy that fits ``size``."""
    from fastai.data.external import URLs

    prefix = {"imagenette": "IMAGENETTE", "imagewoof": "IMAGEWOOF"}[name]
    suffix = "_160" if size <= 128 else "_320" if size <= 256 else ""
    return getattr(URLs, prefix + suffix)


def fetch_dataset(name: str, size: int) -> Path:
    """Download (once) and unpack Imagenette or Imagewoof with fastai's ``untar_data``.

    Raises :class:`DatasetUnavailableError`, with the way out (``--data``), when the
    download fails.
    """
    from fastai.data.external import untar_data

    url = dataset_url(name, size)
    try:
        return Path(untar_data(url))
    except OSError as error:  # URLError, HTTPError, timeouts and DNS failures are OSErrors
        raise DatasetUnavailableError(
            f"could not download {name} from {url} ({error}). This machine seems to have no "
            f"network access to it. Download and unpack it elsewhere, then pass its folder "
            f"with --data PATH (PATH/train/<class>/* and PATH/val/<class>/*)."
        ) from error
