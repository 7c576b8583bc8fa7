"""Datasets (fashion-mnist, digits, imagefolder, csv), stratified splits and subsets, albumentations pipelines."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its pixels: the size it sees, its normalisation, its resize."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # nearest | bilinear | bicubic | area
    crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, then center-crop input_size
