"""Recipes: YAML → frozen typed dataclasses, strict validation, dotted overrides, teacher cards, resolved dump."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distill.errors import DistillError

CARDS_DIR = Path(__file__).parent / "teachers"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# --- field constraints -------------------------------------------------------
# A constraint is (description, predicate); the description completes "expected ...".
def _positive():
    return {"check": ("a positive number", lambda v: v > 0)}


def _non_negative():
    return {"check": ("a number >= 0", lambda v: v >= 0)}


def _at_least(n, most=None):
    if most is None:
        return {"check": (f"an integer >= {n}", lambda v: v >= n)}
    # an upper bound where a larger value is a typo that would only fail later (out of memory, hours of work)
    return {"check": (f"an integer in [{n}, {most}]", lambda v: n <= v <= most)}


def _unit(open_right=False):
    if open_right:
        return {"check": ("a number in [0, 1)", lambda v: 0 <= v < 1)}
    return {"check": ("a number in [0, 1]", lambda v: 0 <= v <= 1)}


def _open_unit():
    return {"check": ("a number in (0, 1)", lambda v: 0 < v < 1)}


def _half_open_unit():
    return {"check": ("a number in (0, 1]", lambda v: 0 < v <= 1)}


# --- the schema --------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    source: Literal["fashion-mnist", "digits", "imagefolder", "csv"] = "fashion-mnist"
    # builtin: folder of idx files; imagefolder: root/<class>/*; csv: the csv file
    root: str | None = None
    # a given validation set (imagefolder folder or csv file); fashion-mnist's is its test split
    val_root: str | None = None
    # null: use the given validation split; a number: stratified split of train by this fraction
    val_fraction: float | None = field(default=None, metadata=_open_unit())
    split_seed: int = 0
    # keep N images per split, stratified (quick runs)
    subset: int | None = field(default=None, metadata=_at_least(1))
    # extra images without labels for the soft-target store: an image folder, or "rest" = the built-in
    # train images that data.subset left out (their labels dropped)
    unlabeled: str | None = None
    unlabeled_subset: int | None = field(default=None, metadata=_at_least(1))
    path_column: str = "path"
    label_column: str = "label"
    # csv: a column naming each image's group (a person, a scan, a video); k-fold teachers keep a group's
    # images in one fold, so no group is in both a fold's training and its held-out images
    group_column: str | None = None
    num_workers: int = field(default=0, metadata=_at_least(0, 256))
    # a file PIL cannot read: error (named in the error line, when it is read) or skip (every image is
    # decoded once up front; the skipped ones are listed in the run directory's skipped_images.txt)
    on_bad_image: Literal["error", "skip"] = "error"
    # make the training split long-tailed (experiments on balanced data): class c keeps
    # n_max · ratio^(-c / (C - 1)) of its images, class 0 the most (Cui et al. 2019); validation stays as it is
    long_tail: float | None = field(default=None, metadata={"check": ("a ratio >= 1", lambda v: v >= 1)})


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = field(default=1e-3, metadata=_positive())
    weight_decay: float = field(default=0.05, metadata=_non_negative())
    momentum: float = field(default=0.9, metadata=_unit(open_right=True))
    betas: tuple[float, float] = (0.9, 0.999)
    # layer-wise lr decay for ViT-style models: layer l of L gets lr * layer_decay**(L + 1 - l)
    layer_decay: float | None = field(default=None, metadata=_half_open_unit())
    # linear scaling rule: lr * (global batch size) / 256
    scale_lr: bool = False
    warmup_epochs: float = field(default=0.0, metadata=_non_negative())
    min_lr: float = field(default=1e-6, metadata=_non_negative())
    clip_grad: float | None = field(default=None, metadata=_positive())
    grad_accum: int = field(default=1, metadata=_at_least(1, 4096))
    # steps with a non-finite loss to skip (no update) before the run stops with an error; 0: stop at the first
    max_bad_steps: int = field(default=0, metadata=_at_least(0))


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = field(default=0.0, metadata=_non_negative())
    cutmix_alpha: float = field(default=0.0, metadata=_non_negative())
    # probability that a batch is mixed at all, and that a mixed batch uses CutMix when both are on
    prob: float = field(default=1.0, metadata=_unit())
    switch_prob: float = field(default=0.5, metadata=_unit())


@dataclass(frozen=True)
class AugmentConfig:
    # each a list of {name: <albumentations class>, <params>}; null = the stage's default
    train: list[dict[str, Any]] | None = None
    eval: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class ImbalanceConfig:
    """Tools for skewed class frequencies: class weights and focal loss change the label (cross-entropy) term
    only; the sampler decides which images the batches hold, for every term."""

    # per-class weights of the cross-entropy: balanced ∝ 1/n_c, effective ∝ (1 - β)/(1 - β^n_c) (Cui et al. 2019)
    class_weights: Literal["none", "balanced", "effective"] = "none"
    effective_beta: float = field(default=0.999, metadata=_open_unit())
    # focal loss (Lin et al. 2017): the cross-entropy scaled by (1 - p)^γ; 0 is plain cross-entropy
    focal_gamma: float = field(default=0.0, metadata={"check": ("a number in [0, 10]", lambda v: 0 <= v <= 10)})
    # class-balanced batches: oversample draws every class equally often (with replacement, epochs keep their
    # length); undersample keeps the rarest class's count of every class per epoch
    sampler: Literal["none", "oversample", "undersample"] = "none"


@dataclass(frozen=True)
class TeacherConfig:
    card: str | None = None
    model: str = ""  # "hf:<hub id or local dir>" | "timm:<name>"
    pretrained: bool | str = True  # true | false | path to local weights
    hf_config: dict[str, Any] = field(default_factory=dict)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # preprocessing; null = from the model's own config
    input_size: int | None = field(default=None, metadata=_at_least(8, 4096))
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic", "area"] | None = None
    crop_pct: float | None = field(default=None, metadata=_half_open_unit())
    # label smoothing used when the weights were pre-trained (from the card); null = unknown
    pretrain_label_smoothing: float | None = field(default=None, metadata=_unit(open_right=True))
    # training
    epochs: int = field(default=10, metadata=_at_least(1, 100_000))
    batch_size: int = field(default=64, metadata=_at_least(1, 65_536))
    eval_batch_size: int | None = field(default=None, metadata=_at_least(1, 65_536))
    label_smoothing: float = field(default=0.0, metadata=_unit(open_right=True))
    # null: accelerate's config / ACCELERATE_MIXED_PRECISION decides
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    eval_every: int = field(default=1, metadata=_at_least(1))
    select_by: Literal["top1", "macro_f1", "nll"] = "top1"
    # early stopping: stop after this many evaluations without a better `select_by`; null: never
    patience: int | None = field(default=None, metadata=_at_least(1))
    imbalance: ImbalanceConfig = ImbalanceConfig()
    # k-fold: train k teachers, each on k - 1 stratified folds of the training split (selected on its held-out
    # fold), write their out-of-fold predictions, and make their ensemble the teacher; null: one teacher
    folds: int | None = field(default=None, metadata=_at_least(2, 50))
    # more members for the teacher ensemble: model directories trained elsewhere on the same classes
    # (e.g. runs/other/teacher); their own preprocessing is applied inside the ensemble
    ensemble_with: list[str] = field(default_factory=list)
    # how members are combined: probs = mean of softmax probabilities (the output is its log), logits = mean logit
    ensemble_combine: Literal["probs", "logits"] = "probs"
    optim: OptimConfig = OptimConfig()
    mix: MixConfig = MixConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class TargetsConfig:
    """The soft-target store teach.py exports: V augmented views + 1 center view per training image."""

    export: bool = True  # export after fine-tuning (teach.py --export-only exports a saved teacher)
    views: int = field(default=4, metadata=_at_least(1, 1024))
    # the student's random-resized-crop and flip, drawn once per (sample, view) and stored
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = field(default=0.5, metadata=_unit())
    # the center view: this fraction of the shorter side, centred (the student's test crop)
    center_crop_pct: float = field(default=1.0, metadata=_half_open_unit())
    # auto: full float16 logits up to full_max_classes classes, else top-k logits + log-sum-exp
    logits: Literal["auto", "full", "topk"] = "auto"
    topk: int = field(default=20, metadata=_at_least(1))
    full_max_classes: int = field(default=100, metadata=_at_least(2))
    shard_size: int = field(default=4096, metadata=_at_least(1))  # samples per shard
    batch_size: int = field(default=64, metadata=_at_least(1, 65_536))  # samples per teacher batch (x (views + 1))
    seed: int | None = None  # null: the recipe's seed
    # with teacher.folds: a labeled image's targets come from the fold teacher that held it out (never from a
    # model trained on its label); unlabeled images get the fold ensemble's
    oof: bool = False


@dataclass(frozen=True)
class KDConfig:
    """How a student learns from the teacher: loss = (1 - weight) · CE(labels) + weight · KD."""

    loss: Literal["none", "kl", "hard", "dkd", "dist"] = "kl"  # none: the labels-only baseline
    temperature: float = field(default=4.0, metadata=_positive())
    weight: float = field(default=0.5, metadata=_unit())  # 1 = pure function matching
    standardize: bool = False  # logit standardisation (Sun et al. 2024) before softmax(·/T)
    targets: Literal["cached", "online"] = "cached"  # online: the teacher runs on the student's mixed batch
    # what to do with a teacher trained with label smoothing when T > 1 (see README)
    ls_policy: Literal["auto", "warn", "off"] = "auto"
    dkd_alpha: float = field(default=1.0, metadata=_non_negative())
    dkd_beta: float = field(default=8.0, metadata=_non_negative())
    dist_beta: float = field(default=1.0, metadata=_non_negative())
    dist_gamma: float = field(default=1.0, metadata=_non_negative())
    use_unlabeled: bool = True  # train on the store's unlabeled images too (KD term only)


@dataclass(frozen=True)
class FixResConfig:
    """FixRes (Touvron et al. 2019): after training, fine-tune at the test resolution with the test transform."""

    resolution: int = field(metadata=_at_least(8, 4096))  # the test resolution: the student is evaluated and saved at it
    epochs: int = field(default=2, metadata=_at_least(1, 100_000))
    lr: float = field(default=1e-3, metadata=_positive())  # SGD with momentum, cosine to 0 over the epochs
    weight_decay: float = field(default=0.0, metadata=_non_negative())
    batch_size: int | None = field(default=None, metadata=_at_least(1, 65_536))  # null: the student's
    crop_pct: float | None = field(default=None, metadata=_half_open_unit())  # null: the student's test crop
    # false: only the classifier and the last block's normalisation (statistics re-estimated) train
    train_last_block: bool = False


@dataclass(frozen=True)
class StudentConfig:
    name: str
    model: str  # "timm:<name>"
    pretrained: bool | str = False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = field(default=None, metadata=_at_least(8, 4096))  # training input size
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic", "area"] | None = None
    crop_pct: float | None = field(default=None, metadata=_half_open_unit())
    seed: int | None = None  # null: the recipe's seed
    epochs: int = field(default=10, metadata=_at_least(1, 100_000))
    batch_size: int = field(default=128, metadata=_at_least(1, 65_536))
    eval_batch_size: int | None = field(default=None, metadata=_at_least(1, 65_536))
    label_smoothing: float = field(default=0.0, metadata=_unit(open_right=True))  # the CE term only
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    eval_every: int = field(default=1, metadata=_at_least(1))
    select_by: Literal["top1", "macro_f1", "nll"] = "top1"
    patience: int | None = field(default=None, metadata=_at_least(1))  # early stopping, as teacher.patience
    imbalance: ImbalanceConfig = ImbalanceConfig()
    ema: float | None = field(default=None, metadata=_open_unit())  # EMA decay of the weights (timm ModelEmaV3)
    zero_init_last_bn: bool | None = None  # timm's zero_init_last: residual blocks start as identity
    optim: OptimConfig = OptimConfig(lr=0.05, name="sgd", weight_decay=5e-5)
    mix: MixConfig = MixConfig()
    kd: KDConfig = KDConfig()
    fixres: FixResConfig | None = None  # null: no FixRes stage


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True
    every_steps: int = field(default=10, metadata=_at_least(1))
    progress: bool = True


@dataclass(frozen=True)
class TTAConfig:
    # test-time augmentation: with `enabled`, `distill compare` adds a `<model>+tta` row per model (accuracy and
    # cost under TTA); `distill predict --tta` uses it. The views: the eval image at each scale (zoomed in or
    # out, same input size), each also mirrored with `hflip`; their softmax probabilities are averaged.
    enabled: bool = False
    hflip: bool = True
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass(frozen=True)
class CheckpointConfig:
    # save the resumable state (teach, learn) every N optimizer steps and at every epoch's end; 0: epoch ends only
    every_steps: int = field(default=500, metadata=_non_negative())


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    targets: TargetsConfig = TargetsConfig()
    students: list[StudentConfig] = field(default_factory=list)
    log: LogConfig = LogConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tta: TTAConfig = TTAConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# Card keys that describe the weights rather than configure them; kept out of TeacherConfig.
CARD_INFO_KEYS = ("description", "source_url", "licence", "notes", "paper")
CARD_MODEL_KEYS = ("model", "pretrained", "hf_config", "timm_kwargs", "input_size", "mean", "std",
                   "interpolation", "crop_pct", "pretrain_label_smoothing")


# --- loading -----------------------------------------------------------------
def load_recipe(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides and teacher card, validate strictly."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: recipe file not found")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: a recipe is a YAML mapping of sections (name, data, teacher, ...)")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict) -> Recipe:
    raw = dict(raw)
    if isinstance(raw.get("students"), list):
        # `kd: none` (the baseline) or `kd: dkd` is shorthand for `kd: {loss: ...}`
        raw["students"] = [{**s, "kd": {"loss": s["kd"]}} if isinstance(s, dict) and isinstance(s.get("kd"), str)
                           else s for s in raw["students"]]
    if isinstance(raw.get("teacher"), dict) and raw["teacher"].get("card"):
        if not isinstance(raw["teacher"]["card"], str):
            raise DistillError(f"teacher.card: expected a card name or a path to a card .yaml, "
                               f"got {raw['teacher']['card']!r}")
        raw["teacher"] = merge_card(raw["teacher"])
    recipe = _build(Recipe, raw, "")
    _check_recipe(recipe)
    return recipe


def load_card(name: str) -> dict:
    """A teacher card by name (teachers/<name>.yaml) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CARDS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))
        raise DistillError(f"teacher.card: no card {name!r}; known cards: {', '.join(known)} "
                           "(or give the path to a card .yaml)")
    card = _read_yaml(path)
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


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a raw recipe dict; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    if "=" not in item:
        raise DistillError(f"override {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
        if node is None:
            raise DistillError(f"override {key}: {where} is null; set it as a mapping first")
        if not isinstance(node, (dict, list)):
            raise DistillError(f"override {key}: {where} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    """A list element by position (`students.0`) or by its `name` (`students.resnet18`)."""
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise DistillError(f"override {where}: no element {part!r} (use an index or a name)")


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; loading it again gives the same recipe."""
    return yaml.safe_dump(to_plain(recipe), sort_keys=False)


def to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DistillError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None


def _check_recipe(recipe: Recipe) -> None:
    if not recipe.name or "/" in recipe.name or recipe.name.startswith("."):
        raise DistillError(f"name: expected a plain run name (no '/'), got {recipe.name!r}")
    if not recipe.teacher.model.startswith(("hf:", "timm:")):
        raise DistillError(f"teacher.model: expected 'hf:<hub id or dir>' or 'timm:<name>' "
                           f"(or a teacher.card), got {recipe.teacher.model!r}")
    names = [s.name for s in recipe.students]
    for i, s in enumerate(recipe.students):
        if s.name in names[:i]:
            raise DistillError(f"students.{i}.name: {s.name!r} is used twice; names must be unique")
        if not s.model.startswith(("hf:", "timm:")):
            raise DistillError(f"students.{i}.model: expected 'timm:<name>', got {s.model!r}")
    if recipe.targets.oof and not recipe.teacher.folds:
        raise DistillError("targets.oof: out-of-fold targets need fold teachers; set teacher.folds (e.g. 5)")
    if recipe.data.group_column is not None and recipe.data.source != "csv":
        raise DistillError(f"data.group_column: only a csv source has columns; data.source is {recipe.data.source!r}")
    for i, scale in enumerate(recipe.tta.scales):
        if not 0.5 <= scale <= 2:
            raise DistillError(f"tta.scales.{i}: expected a scale in [0.5, 2], got {scale!r}")
    if not recipe.tta.scales:
        raise DistillError("tta.scales: expected at least one scale, e.g. [1.0]")
    t = recipe.targets
    for key in ("scale", "ratio"):
        lo, hi = getattr(t, key)
        if not 0 < lo <= hi or (key == "scale" and hi > 1):
            raise DistillError(f"targets.{key}: expected [low, high] with 0 < low <= high"
                               f"{' <= 1' if key == 'scale' else ''}, got {[lo, hi]}")
    for section in ("train", "eval"):
        for j, t in enumerate(getattr(recipe.teacher.augment, section) or []):
            if not isinstance(t.get("name"), str):
                raise DistillError(f"teacher.augment.{section}.{j}: expected a mapping with "
                                   f"'name: <albumentations class>', got {t!r}")


# --- the strict dict → dataclass builder --------------------------------------
def _build(cls, raw, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DistillError(f"{path or 'recipe'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(fields)}"
            raise DistillError(f"{_join(path, key)}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DistillError(f"{where}: missing (required)")
            continue
        check = f.metadata.get("check")
        try:
            value = _convert(hints[name], raw[name], where)
        except DistillError:
            if not check:
                raise
            # a wrong type: name the whole expectation, not just the type
            raise DistillError(f"{where}: expected {check[0]}, got {raw[name]!r}") from None
        if check and value is not None and not check[1](value):
            raise DistillError(f"{where}: expected {check[0]}, got {raw[name]!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _convert(hint, value, where):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a section: its own error names the key inside
            return _build(sections[0], value, where)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except DistillError as e:
                errors.append(str(e).split(": expected ", 1)[-1].split(", got")[0])
        expected = " or ".join(errors) + (" or null" if type(None) in args else "")
        raise DistillError(f"{where}: expected {expected}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise DistillError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise DistillError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise DistillError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise DistillError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise DistillError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DistillError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads `2e-3` (no dot) as a string; the user meant a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DistillError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise DistillError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema: unsupported type {hint} at {where}")


def _join(path, key):
    return f"{path}.{key}" if path else str(key)
