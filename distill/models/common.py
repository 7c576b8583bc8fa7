"""What every part of distill.models shares: file names, the model.json format version, ImageNet defaults."""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MODEL_FILE, INFO_FILE = "model.safetensors", "model.json"
FORMAT_VERSION = 1


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
