"""Digits made with torch alone, so that the plain-torch and Lightning examples need nothing
that their install does not bring (scikit-learn's digits come with the fastai extra only).

Each image is one of ten 5x7 glyphs (0-9) drawn at a random place in an 8x8 image, with a
random stroke strength, a tenth of its strokes dropped and Gaussian noise: a small, seeded
stand-in for scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["digits_split", "synthetic_digits"]

GLYPHS = (
    (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
)
HEIGHT, WIDTH, SIDE = 7, 5, 8


def _placed_glyphs() -> torch.Tensor:
    """Every glyph at every place it fits in an 8x8 image: (10, 2, 4, 8, 8)."""
    glyphs = torch.tensor([[[c == "#" for c in row] for row in g] for g in GLYPHS]).float()
    placed = torch.zeros(len(GLYPHS), SIDE - HEIGHT + 1, SIDE - WIDTH + 1, SIDE, SIDE)
    for dy in range(SIDE - HEIGHT + 1):
        for dx in range(SIDE - WIDTH + 1):
            placed[:, dy, dx, dy : dy + HEIGHT, dx : dx + WIDTH] = glyphs
    return placed


def synthetic_digits(count: int, *, size: int = 8, seed: int = 0):
    """``count`` images (N, 1, size, size) and their labels (N,), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    placed = _placed_glyphs()
    labels = torch.randint(0, len(GLYPHS), (count,), generator=generator)
    dy = torch.randint(0, placed.shape[1], (count,), generator=generator)
    dx = torch.randint(0, placed.shape[2], (count,), generator=generator)
    images = placed[labels, dy, dx].unsqueeze(1)
    strength = 0.5 + 0.5 * torch.rand(count, 1, 1, 1, generator=generator)
    kept = torch.rand(images.shape, generator=generator) > 0.1
    images = images * strength * kept + 0.25 * torch.randn(images.shape, generator=generator)
    if size != SIDE:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, labels


def digits_split(size: int = 8, n_train: int = 1437, n_valid: int = 360, seed: int = 0):
    """``(x_train, y_train), (x_valid, y_valid)``, normalised with the training mean and std
    (the same sizes as scikit-learn's digits split in ``ranger_plugins.recipes``)."""
    images, labels = synthetic_digits(n_train + n_valid, size=size, seed=seed)
    mean, std = images[:n_train].mean(), images[:n_train].std()
    images = (images - mean) / std
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
