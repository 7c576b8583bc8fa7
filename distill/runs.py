"""The run directory: atomic writes, stage fingerprints, loaders, optimisers, checkpoint selection, TensorBoard."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from distill.errors import DistillError
from distill.recipe import to_plain

LOWER_IS_BETTER = {"nll", "ece"}
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename it, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; run outputs are meant to be shared
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def stage_fingerprint(*parts) -> str:
    """sha256 of what a stage's result depends on (recipe sections, an upstream fingerprint): a stage whose
    metrics.json carries the same fingerprint is complete and `distill run` skips it."""
    blob = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def finished(metrics_path: Path, fingerprint: str) -> bool | None:
    """True: complete for this fingerprint; False: complete for another one; None: not complete."""
    try:
        return json.loads(Path(metrics_path).read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return None


def better(metrics: dict, best: dict, select_by: str) -> bool:
    if select_by in LOWER_IS_BETTER:
        return metrics[select_by] < best[select_by]
    return metrics[select_by] > best[select_by]


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's sample order, drawn from (seed, epoch) alone (call `set_epoch`), unlike a RandomSampler's
    generator whose state carries over from epoch to epoch: a run resumed in epoch e sees the order it would
    have seen.

    `balance` (with each sample's class in `classes`): "oversample" draws n samples with replacement, every
    class equally likely; "undersample" takes, without replacement, the rarest class's count from every class.
    """

    def __init__(self, n: int, seed: int, classes: np.ndarray | None = None, balance: str = "none"):
        self.n, self.seed, self.epoch, self.balance = n, seed, 0, balance
        if balance != "none":
            self.classes = np.asarray(classes)
            present, counts = np.unique(self.classes, return_counts=True)
            self.groups = [np.flatnonzero(self.classes == c) for c in present]
            self.weights = 1.0 / counts[np.searchsorted(present, self.classes)]
            self.weights /= self.weights.sum()
            self.per_class = int(counts.min())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups) * self.per_class if self.balance == "undersample" else self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.balance == "oversample":
            order = rng.choice(self.n, size=self.n, p=self.weights)
        elif self.balance == "undersample":
            order = rng.permutation(np.concatenate([rng.choice(g, self.per_class, replace=False)
                                                    for g in self.groups]))
        else:
            order = rng.permutation(self.n)
        return iter(order.tolist())


def make_loader(dataset, batch_size: int, recipe, train: bool, world_size: int = 1, seed: int | None = None,
                classes: np.ndarray | None = None, balance: str = "none") -> DataLoader:
    """A loader; training draws its order by (seed, epoch) (`set_epoch` on the prepared loader), class-balanced
    with `balance` (`EpochSampler`), and drops the last partial batch when there is more than one, because
    BatchNorm cannot train on a batch of one."""
    seed = recipe.seed if seed is None else seed
    sampler = EpochSampler(len(dataset), seed, classes, balance) if train else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size * world_size,
        num_workers=recipe.data.num_workers,
        # not persistent: workers must see each epoch's set_epoch() (views and augmentations change per epoch)
        persistent_workers=False,
        # the workers' base seed is drawn from here, not from torch's global generator, whose state a resumed
        # run restores (accelerate's RNG state) and must not see consumed differently
        generator=torch.Generator().manual_seed(seed),
    )


def batch_rng(seed: int, process: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one batch's MixUp/CutMix draw: a function of where the batch is, not of what ran
    before it, so a resumed run mixes as the interrupted one would have."""
    return np.random.default_rng([seed, process, epoch, batch])


def hparams(recipe, section: str, config=None) -> dict:
    """The recipe's common keys and one section (`config`, default the recipe's attribute `section`)
    flattened to `key.path: scalar` (TensorBoard's hparams take scalars and strings only)."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    plain = to_plain(recipe)
    walk("", {"name": plain["name"], "seed": plain["seed"], "data": plain["data"],
              section: to_plain(config) if config is not None else plain[section]})
    return flat


def start_tracking(accelerator, run_name: str) -> None:
    """TensorBoard for one run (teacher or a student) under tb/<run_name>, closing any earlier one."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    accelerator.init_trackers(run_name)


def log_hparams(accelerator, params: dict, metrics: dict) -> None:
    """Hyper-parameters with final metrics, so TensorBoard's HParams dashboard lines runs up in one table."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    # run_name ".": into this run's own event file instead of a timestamped sub-folder
    writer.add_hparams(params, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name=".")
    writer.flush()


def make_optimizer(groups: list[dict], optim, global_batch: int) -> tuple[torch.optim.Optimizer, float]:
    """AdamW or Nesterov SGD over parameter groups (their `lr_scale` is applied by the scheduler); returns the
    optimizer and its peak lr, scaled by global batch / 256 when `optim.scale_lr`."""
    lr = optim.lr * global_batch / 256 if optim.scale_lr else optim.lr
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=optim.betas), lr
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=True), lr


def make_scheduler(optimizer, optim, lr: float, total_updates: int, updates_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up to the peak lr over `optim.warmup_epochs`, then a cosine to `optim.min_lr`, per update."""
    warmup = min(round(optim.warmup_epochs * updates_per_epoch), total_updates - 1)
    # warmup_prefix: the cosine spans the updates after the warm-up, so the warm-up really ends at the peak
    return CosineLRScheduler(optimizer, t_initial=total_updates - warmup, lr_min=optim.min_lr, warmup_t=warmup,
                             warmup_lr_init=min(optim.min_lr, lr), warmup_prefix=True, t_in_epochs=False)


def finite_or_skip(loss: torch.Tensor, accelerator, bad_steps: list[int], step: int, max_bad: int,
                   where: str, saved: str) -> bool:
    """Whether this step's loss is finite on every process. A non-finite one is skipped (no update, the same
    decision on every process) up to `max_bad` times; then the run stops with an error naming the step, and
    the checkpoint saved before (`saved`) is kept as it is."""
    finite = torch.isfinite(loss.detach()).all().float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)  # one flag per process (reduce knows only sum and mean)
    if bool(finite.min() == 1):
        return True
    bad_steps.append(step)
    if len(bad_steps) > max_bad:
        raise DistillError(f"{where}: the loss is not finite ({loss.item()}) at step {step}"
                           + (f" ({len(bad_steps)} bad steps: {bad_steps[:10]})" if max_bad else "")
                           + f"; {saved}. Lower {where}.optim.lr, set {where}.optim.clip_grad, or allow "
                           f"{where}.optim.max_bad_steps skipped steps")
    accelerator.print(f"warning: {where}: non-finite loss at step {step}: skipped "
                      f"({len(bad_steps)} of {max_bad} allowed)")
    return False


def kept(out_dir: Path, best: dict | None) -> str:
    """What a failed run leaves behind, for its error message."""
    if best is None:
        return "nothing was saved yet"
    return f"the checkpoint of epoch {best['epoch']} (val top1 {best['top1']:.4f}) in {out_dir} is kept"
