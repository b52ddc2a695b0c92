"""Data for the recipes: scikit-learn's digits (ships with the package, no download) and
ImageNet-style folders (``train/<class>/*``, ``val/<class>/*``) such as Imagenette."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DatasetUnavailableError",
    "EngineUnavailableError",
    "RecipeError",
    "RecipeInputError",
    "DigitsSplit",
    "IMAGE_EXTENSIONS",
    "ImageFolderSummary",
    "check_image_folder",
    "digits_split",
    "fetch_dataset",
    "scan_image_folder",
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


#: The image files both engines load: torchvision's ``ImageFolder`` extensions; the fastai
#: engine passes the same list to ``get_image_files`` so both train on the same files.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_LAYOUT = "PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg"
_SHOWN = 3  # how many offending files or folders an error message names


@dataclass(frozen=True)
class ImageFolderSummary:
    """What `scan_image_folder` found: the class names and the image count of each split."""

    classes: list[str]
    train_images: int
    val_images: int


def _image_files(folder: Path) -> list[Path]:
    # Recursive, as both ImageFolder and fastai's get_image_files are.
    return sorted(
        f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
    )


def _split_classes(path: Path, split: str) -> dict[str, list[Path]]:
    folder = path / split
    if not folder.is_dir():
        raise RecipeInputError(f"--data {path}: no '{split}' folder (expected {_LAYOUT})")
    classes = {d.name: _image_files(d) for d in sorted(folder.iterdir()) if d.is_dir()}
    if not classes:
        raise RecipeInputError(f"--data {path}: '{split}' has no class folders ({_LAYOUT})")
    return classes


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} and {len(items) - _SHOWN} more"


def _unreadable_image(file: Path) -> str | None:
    """Why PIL cannot decode ``file``, or None if it can."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            # JPEGs decode at a reduced scale: faster, and still read to their last byte.
            image.draft("RGB", (256, 256))
            image.load()
    # PIL reports broken files with OSError (UnidentifiedImageError, truncated data),
    # SyntaxError (broken PNG chunks) or ValueError, depending on the format, and refuses
    # images too large to be anything but a decompression bomb.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__
    return None


def _check_images(path: Path, files: list[Path]) -> None:
    bad = [(f, reason) for f in files if (reason := _unreadable_image(f)) is not None]
    if bad:
        named = [f"{f.relative_to(path)} ({reason})" for f, reason in bad]
        raise RecipeInputError(
            f"--data {path}: {len(bad)} of {len(files)} images cannot be read: "
            f"{_examples(named)}; fix or remove them"
        )


def scan_image_folder(path: Path, *, read_images: bool = True) -> ImageFolderSummary:
    """Check ``path`` is an ImageNet-style folder both engines can train on.

    Raises `RecipeInputError` (a ``ValueError``) with a one-line message for: a missing
    ``train/`` or ``val/``, no class folders, train and val with different classes, a class
    folder without images (``IMAGE_EXTENSIONS``), and, with ``read_images``, any image PIL
    cannot decode (every image is decoded once, at a reduced scale for JPEGs).
    """
    path = Path(path)
    if not path.is_dir():
        raise RecipeInputError(f"--data {path}: not a directory (expected {_LAYOUT})")
    splits = {split: _split_classes(path, split) for split in ("train", "val")}
    train, val = sorted(splits["train"]), sorted(splits["val"])
    if train != val:
        raise RecipeInputError(
            f"--data {path}: train and val have different classes: "
            f"only in train {sorted(set(train) - set(val))}, "
            f"only in val {sorted(set(val) - set(train))}"
        )
    empty = [
        f"{split}/{name}"
        for split, classes in splits.items()
        for name, files in classes.items()
        if not files
    ]
    if empty:
        raise RecipeInputError(
            f"--data {path}: class folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{_examples(empty)}"
        )
    files = [f for classes in splits.values() for group in classes.values() for f in group]
    if read_images:
        _check_images(path, files)
    counts = {split: sum(map(len, classes.values())) for split, classes in splits.items()}
    return ImageFolderSummary(train, counts["train"], counts["val"])


def class_names(path: Path) -> list[str]:
    """The class folders of ``path``'s ``train/`` (sorted), without checking anything."""
    return sorted(d.name for d in (Path(path) / "train").iterdir() if d.is_dir())


def check_image_folder(path: Path) -> list[str]:
    """Check ``path`` with `scan_image_folder` and return its class names (sorted)."""
    return scan_image_folder(path).classes


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
