"""Teacher cards: the YAML files in teachers/ (installed as distill.teachers), read, checked and merged."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml

from distill.errors import DistillError


def _cards_dir():
    """The cards are data at the repository's top level; setup.cfg installs them as the package distill.teachers
    (an editable install maps it onto teachers/), so both install modes find them as a resource. A source tree
    on sys.path without an install (or an editable install made before the cards moved) has no such package:
    then the folder beside the package is the one."""
    try:
        return files("distill.teachers")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "teachers"


CARDS_DIR = _cards_dir()

# Card keys that describe the weights rather than configure them; kept out of TeacherConfig.
CARD_INFO_KEYS = ("description", "source_url", "licence", "notes", "paper")
CARD_MODEL_KEYS = ("model", "pretrained", "hf_config", "timm_kwargs", "input_size", "mean", "std",
                   "interpolation", "crop_pct", "pretrain_label_smoothing")


def card_names() -> list[str]:
    """The names of the shipped cards (their file names without .yaml), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in CARDS_DIR.iterdir() if p.name.endswith(".yaml"))


def load_card(name: str) -> dict:
    """A teacher card by name (teachers/<name>.yaml) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CARDS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise DistillError(f"teacher.card: no card {name!r}; known cards: {', '.join(card_names())} "
                           "(or give the path to a card .yaml)")
    card = read_yaml(path)
    if not isinstance(card, dict):
        raise DistillError(f"{path}: a teacher card is a YAML mapping")
    unknown = set(card) - set(CARD_INFO_KEYS) - set(CARD_MODEL_KEYS)
    if unknown:
        raise DistillError(f"{path}: unknown card key {min(unknown)!r}; "
                           f"expected one of {', '.join(CARD_MODEL_KEYS + CARD_INFO_KEYS)}")
    return card


def merge_card(teacher: dict) -> dict:
    """The card's model fields are defaults; the recipe's teacher section overrides them."""
    card = load_card(teacher["card"])
    merged = {k: v for k, v in card.items() if k in CARD_MODEL_KEYS}
    for key, value in teacher.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def read_yaml(path):
    """A YAML file's content; a syntax error is one line naming the file and the line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DistillError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
