"""The recipe schema: frozen typed dataclasses (the `data:` section in data_config.py; the field constraints and
registries in fields.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distill.recipe.data_config import DataConfig
from distill.recipe.fields import (
    _at_least,
    _half_open_unit,
    _kd_losses,
    _non_negative,
    _one_of,
    _open_unit,
    _positive,
    _unit,
)


# --- the schema --------------------------------------------------------------
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
    # after the warm-up: cosine to min_lr; step: lr × step_gamma at each of step_epochs (or every step_every
    # epochs); plateau: lr × plateau_gamma after plateau_patience evaluations without a better `select_by`
    # (step and plateau stop at min_lr)
    schedule: Literal["cosine", "step", "plateau"] = "cosine"
    step_epochs: list[float] = field(default_factory=list)
    step_every: float | None = field(default=None, metadata=_positive())
    step_gamma: float = field(default=0.1, metadata=_open_unit())
    plateau_patience: int = field(default=2, metadata=_at_least(1))
    plateau_gamma: float = field(default=0.1, metadata=_open_unit())
    clip_grad: float | None = field(default=None, metadata=_positive())
    grad_accum: int = field(default=1, metadata=_at_least(1, 4096))
    # steps with a non-finite loss to skip (no update) before the run stops with an error; 0: stop at the first
    max_bad_steps: int = field(default=0, metadata=_at_least(0))


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = field(default=0.0, metadata=_non_negative())
    cutmix_alpha: float = field(default=0.0, metadata=_non_negative())
    # FMix (Harris et al. 2020): the partner's pixels where a random low-frequency mask is off, λ ~ Beta(α, α)
    # the share kept; decay power δ: the mask's spectrum falls as 1/f^δ (larger: fewer, smoother blobs)
    fmix_alpha: float = field(default=0.0, metadata=_non_negative())
    fmix_decay_power: float = field(default=3.0, metadata=_positive())
    # probability that a batch is mixed at all, and that a mixed batch leaves MixUp for a region mode (CutMix or
    # FMix) when MixUp and one of them are on; CutMix and FMix, both on, get an equal chance (mix.mix_mode)
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
    # how members are combined: probs = mean of softmax probabilities (the output is its log), logits = mean logit,
    # vote = hard majority vote (ties: the larger mean probability; models/ensemble.py), evaluation only: a store
    # of its targets is refused
    ensemble_combine: Literal["probs", "logits", "vote"] = "probs"
    # repeated augmentation (Hoffer et al. 2020; DeiT): each image of an epoch comes in this many differently
    # augmented copies, spread over the processes; epochs keep their length (1 / repeated_aug of the images each)
    repeated_aug: int = field(default=1, metadata=_at_least(1, 64))
    optim: OptimConfig = OptimConfig()
    mix: MixConfig = MixConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class TargetsConfig:
    """The soft-target store teach.py exports: V augmented views + 1 center view per training image."""

    export: bool = True  # export after fine-tuning (teach.py --export-only exports a saved teacher)
    # patient distillation wants many views per image (a student's epochs cycle through them); the export prints
    # the store's size first and refuses one the disk cannot hold
    views: int = field(default=16, metadata=_at_least(1, 1024))
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
    # replayable augmentation of the random views, after crop/resize/flip, in list order: specs written like
    # teacher.augment.train entries, drawn per view from a stored seed in units that hold at every resolution
    # (distill.store.augment.REPLAYABLE names the transforms); [] = crop box and flip only
    augment: list[dict[str, Any]] = field(default_factory=list)
    # exact MixUp/CutMix (written like students.N.mix): each random view is mixed with a partner view drawn from
    # its seed, and the teacher labels the mixed image, so students get its output on their very mixed input
    # (store/mixing.py); students of such a store leave their own `mix` off
    mix: MixConfig = MixConfig()


@dataclass(frozen=True)
class KDConfig:
    """How a student learns from the teacher: loss = (1 - weight) · CE(labels) + weight · KD."""

    # distill.losses.KD_LOSSES, or none: the labels-only baseline
    loss: str = field(default="kl", metadata=_one_of(_kd_losses))
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
    # null: targets.center_crop_pct, the crop of the store's center view FixRes trains on (another one is refused)
    crop_pct: float | None = field(default=None, metadata=_half_open_unit())
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
    # repeated augmentation, as teacher.repeated_aug: each copy replays a stored view drawn for it (loaders.py)
    repeated_aug: int = field(default=1, metadata=_at_least(1, 64))
    imbalance: ImbalanceConfig = ImbalanceConfig()
    ema: float | None = field(default=None, metadata=_open_unit())  # EMA decay of the weights (timm ModelEmaV3)
    zero_init_last_bn: bool | None = None  # timm's zero_init_last: residual blocks start as identity
    # speed only (benchmarks/student_step.py): the weights and inputs in channels-last memory format, and
    # torch.compile of the model in place (its first steps compile). On 2 CPU cores (batch 32, AdamW, load ~2.5)
    # channels-last made resnet10t / mobilenetv3_small_100 steps 1.2-1.6x faster; compile gave 0.8-2.2x after a
    # 15-150 s warm-up per model. channels-last won in every case measured, so it is the default (it changes
    # only the order of float sums; runs completed before keep their results); compile stays off: its gain is
    # mixed and its warm-up long on a CPU (turn it on per student for long GPU runs)
    channels_last: bool = True
    compile: bool = False
    optim: OptimConfig = OptimConfig(lr=0.05, name="sgd", weight_decay=5e-5)
    mix: MixConfig = MixConfig()
    kd: KDConfig = KDConfig()
    fixres: FixResConfig | None = None  # null: no FixRes stage


@dataclass(frozen=True)
class LogConfig:
    # accelerate's trackers (distill/trackers.py): tensorboard, wandb, mlflow, trackio, aim, comet_ml, ...
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # older recipes: false removes tensorboard from `trackers` (true adds nothing)
    every_steps: int = field(default=10, metadata=_at_least(1))
    progress: bool = True
    # where stderr is no terminal (nohup, a pipe, CI), tqdm hides the bar: a plain line every N seconds instead
    progress_seconds: float = field(default=30.0, metadata=_non_negative())


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
class SweepConfig:
    """`distill sweep`: Optuna searches one student's settings over the run's store (the teacher never runs again);
    each trial is a student of its own, students/<student>-trial-<n>/."""

    student: str | None = None  # null: the first student with kd.loss other than none
    trials: int = field(default=20, metadata=_at_least(1, 100_000))  # COMPLETE trials to reach (--trials)
    # the score of a trial's best checkpoint to optimise; null: the student's select_by (nll and ece: minimised)
    metric: Literal["top1", "top5", "macro_f1", "nll", "ece"] | None = None
    seed: int | None = None  # the TPE sampler's seed; null: the recipe's seed
    # a dotted path inside a student config -> {low, high[, log][, step]} (a number field) or {choices: [...]}
    # (checked against the student's own field: distill.recipe.sweep_space.sweep_space)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int = 0
    output_dir: str = "runs"
    # CPU threads per process (torch, OpenMP, OpenCV; distill/threads.py); auto: OMP_NUM_THREADS if set, else the
    # CPUs this process may use (affinity, cgroup quota) / the local processes; `--threads N` beats it
    threads: int | Literal["auto"] = field(default="auto", metadata={
        "check": ("an integer in [1, 4096] or 'auto'", lambda v: v == "auto" or 1 <= v <= 4096)})
    data: DataConfig = DataConfig()  # noqa: RUF009 (a frozen dataclass, like the other sections)
    teacher: TeacherConfig = TeacherConfig()
    targets: TargetsConfig = TargetsConfig()
    students: list[StudentConfig] = field(default_factory=list)
    log: LogConfig = LogConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tta: TTAConfig = TTAConfig()
    sweep: SweepConfig = SweepConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
