"""Entry: Grad-CAM heat maps of a run's teacher and students on validation images, to PNG, JSON and TensorBoard.

    distill explain runs/<name> [--images 0,5,9 | --count 8] [--student NAME ...] [--fixres]
                                [--class predicted|label] [--out DIR]
    python -m distill.explain runs/<name> [...]

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization"): for a feature map A (C x h x w) and a class c, alpha_k = mean over (i, j) of d y_c / d A_k[i, j],
and the map is ReLU(sum_k alpha_k A_k), upsampled to the input. y_c is the logit (before the softmax), as in the
paper. The layer A is chosen from the architecture, see `find_target`.

Writes, per image, one row (the eval crop the teacher sees, then each model's overlay on its own eval crop) as
<out>/val<index>.png, all rows as <out>/grid.png, <out>/explain.json (per image: index, path, label, and per
model the predicted class and its confidence), and the same images under <run>/tb/explain.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError, exit_on_error
from distill.explain_report import image_rows, write_outputs

if TYPE_CHECKING:
    from distill.models.cam import Target

# tokens before the patch grid: a class token, a distillation token, a few register tokens; more means the
# tokens are not a patch grid at all
MAX_PREFIX_TOKENS = 8
BATCH = 8  # images per backward pass: a ViT-B graph at 224 px is a few hundred MB per image


# --- the target layer ----------------------------------------------------------------------
def find_target(model: nn.Module, input_size: int, what: str = "model") -> Target:
    """The layer whose Grad-CAM explains `model` at `input_size`; a DistillError naming `what` if there is none.

    The model's source chooses (`Source.cam_target` in distill.models):
    - transformers ViT / BEiT / DeiT (`HFClassifier`): the output of the last encoder layer's `layernorm_before`;
    - timm ViT-style models (forward_features gives tokens): the output of the last block's `norm1`;
    - timm CNNs (forward_features gives a map): the module whose output forward_features returns, i.e. the last
      map before the head's pooling. When that map is 1x1 at this input size it holds no location, so the
      deepest stage of timm's `feature_info` that is at least 2x2 is used instead.

    ViTs are read at the *input* of the last block, not at its output: a class-token head reads only the class
    token there, and the final norm works token by token, so the gradient with respect to every patch token of
    the last block's output is zero. Inside the last block the class token attends to the patch tokens, and
    the gradient reaches them (the choice pytorch-grad-cam documents for ViTs).
    """
    from distill.models import source_of
    from distill.models.cam import cannot

    # the probes below must not update BatchNorm statistics, and a 1x1 map of one image cannot even train
    was_training = model.training
    model.eval()
    try:
        source = source_of(model)
        if source is None:
            raise cannot(what, model, "it is neither a timm model (no forward_features) nor a transformers ViT")
        target = source.cam_target(model, input_size, what)
        return dataclasses.replace(target, map_size=_map_size(model, target, input_size, what))
    finally:
        model.train(was_training)


@torch.no_grad()
def _map_size(model: nn.Module, target: Target, input_size: int, what: str) -> tuple[int, int]:
    """(h, w) of the target's map at this input size; fails now, naming the model, if it is not a map."""
    from distill.models.cam import cannot

    seen = []
    handle = target.module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        model(torch.zeros(1, 3, input_size, input_size))
    finally:
        handle.remove()
    out = seen[-1] if seen else None
    if not torch.is_tensor(out):
        raise cannot(what, model, f"its layer {target.name} gives no tensor")
    if target.layout == "tokens":
        grid = _grid(target, (input_size, input_size))
        if out.ndim != 3 or not 0 <= out.shape[1] - grid[0] * grid[1] <= MAX_PREFIX_TOKENS:
            raise cannot(what, model, f"{target.name} gives {tuple(out.shape)}, not the "
                                      f"{grid[0]}x{grid[1]} patch grid of a {input_size} px input")
        return grid
    if out.ndim != 4:
        raise cannot(what, model, f"{target.name} gives {tuple(out.shape)}, not a feature map")
    return tuple(out.shape[1:3] if target.layout == "NHWC" else out.shape[2:])


def _grid(target: Target, size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // target.patch[0], size[1] // target.patch[1]


def _as_map(t: torch.Tensor, target: Target, size: tuple[int, int]) -> torch.Tensor:
    """The target's output (or its gradient) as B x C x h x w; ViT tokens lose their prefix tokens."""
    if target.layout == "NCHW":
        return t
    if target.layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    h, w = _grid(target, size)
    patches = t[:, t.shape[1] - h * w:]
    return patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


# --- Grad-CAM ----------------------------------------------------------------------------------
def grad_cam(model: nn.Module, x: torch.Tensor, target: Target,
             classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a batch of normalised images x (B x 3 x H x W) → (maps B x H x W in [0, 1], logits B x K).

    `classes` (B,) are the classes explained, default each image's predicted class. The model must be in eval
    mode (BatchNorm statistics, no dropout), so that images do not interact and the map is deterministic.
    Each map is min-max normalised on its own; a map without any evidence (constant) is all zeros.
    """
    # the input requires grad, so a graph exists even for a model whose weights are frozen
    x = x.detach().clone().requires_grad_(True)
    seen = []
    handle = target.module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            chosen = logits.argmax(1) if classes is None else torch.as_tensor(classes, dtype=torch.long)
            # images are independent in eval mode, so one backward of the summed scores gives every image's own
            score = logits.gather(1, chosen[:, None]).sum()
            (grad,) = torch.autograd.grad(score, seen[-1])
    finally:
        handle.remove()
    size = tuple(x.shape[-2:])
    activation, grad = _as_map(seen[-1].detach(), target, size), _as_map(grad, target, size)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    cam = torch.where(span > 1e-12, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.float(), logits.detach().float()


def explain_model(model: nn.Module, pre, target: Target, images: list[np.ndarray],
                  classes: list[int] | None = None, transform=None) -> dict[str, np.ndarray]:
    """One model on a list of H x W x 3 uint8 images, each through the model's own eval transform (`transform`,
    as `distill.models.load_for_eval` gives it; None: the default eval transform for `pre`).

    Returns `view` (N x S x S x 3 uint8: the eval crop the model sees), `cam` (N x S x S in [0, 1]) and
    `probs` (N x K softmax probabilities).
    """
    if transform is None:
        from distill.data import build_transform

        transform = build_transform(None, "eval", pre)
    x = torch.stack([transform(image) for image in images])
    cams, logits = [], []
    for start in range(0, len(x), BATCH):
        chosen = None if classes is None else torch.tensor(classes[start:start + BATCH])
        cam, logit = grad_cam(model, x[start:start + BATCH], target, chosen)
        cams.append(cam)
        logits.append(logit)
    return {"view": unnormalise(x, pre), "cam": torch.cat(cams).numpy(),
            "probs": torch.cat(logits).softmax(1).numpy()}


def unnormalise(x: torch.Tensor, pre) -> np.ndarray:
    """Normalised B x 3 x H x W → B x H x W x 3 uint8, the pixels as the model sees them."""
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    pixels = (x * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --- choosing models and images ----------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill explain", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory (runs/<name>) with a trained teacher")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--images", help="validation image indices, comma-separated (e.g. 0,5,9)")
    which.add_argument("--count", type=int, default=8,
                       help="else this many validation images, one per class first (default 8)")
    p.add_argument("--student", action="append", default=None, metavar="NAME",
                   help="a student to explain (repeatable; default every student)")
    p.add_argument("--fixres", action="store_true", help="also each chosen student's FixRes model, if any")
    p.add_argument("--class", dest="cam_class", choices=("predicted", "label"), default="predicted",
                   help="the class each map explains: the model's prediction (default) or the true label")
    p.add_argument("--out", help="where the PNGs and explain.json go (default <run>/explain)")
    return p.parse_args(argv)


def chosen_models(run_dir: Path, students: list[str] | None, fixres: bool) -> list[tuple[str, Path]]:
    """(role, model dir): the teacher, then the chosen students (every one with a saved model by default)."""
    if not (run_dir / "config.yaml").is_file():
        raise DistillError(f"{run_dir}: not a run directory (no config.yaml); give runs/<name> as written by "
                           "distill run / teach")
    if not (run_dir / "teacher" / "model.json").is_file():
        raise DistillError(f"{run_dir / 'teacher'}: no trained teacher (no model.json); run distill teach on "
                           "the recipe first")
    folder = run_dir / "students"
    saved = sorted(d.name for d in folder.glob("*/") if (d / "model.json").is_file()) if folder.is_dir() else []
    for name in students or []:
        if name not in saved:
            raise DistillError(f"--student {name}: no saved student of that name in {folder}; students: "
                               f"{', '.join(saved) or 'none yet (run distill learn)'}")
    models = [("teacher", run_dir / "teacher")]
    for name in dict.fromkeys(students or saved):  # keeps the given order, drops repeats
        models.append((name, folder / name))
        if fixres and (folder / name / "fixres" / "model.json").is_file():
            models.append((f"{name}+fixres", folder / name / "fixres"))
    return models


def parse_indices(text: str, n: int) -> list[int]:
    """`--images 0,5,9` → [0, 5, 9], each checked against the n validation images."""
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistillError(f"--images: expected comma-separated image indices like 0,5,9, got {text!r}") from None
    if not indices:
        raise DistillError(f"--images: no index given in {text!r}; e.g. --images 0,5,9")
    for i in indices:
        if not 0 <= i < n:
            raise DistillError(f"--images: index {i} is out of range; the validation split has {n} images "
                               f"(0 to {n - 1})")
    return list(dict.fromkeys(indices))


def spread_over_classes(labels: np.ndarray, count: int) -> list[int]:
    """The first `count` images taking classes in turn: the first image of every class, then the second, ..."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picked = []
    for rank in range(max((len(rows) for rows in by_class), default=0)):
        for rows in by_class:
            if rank < len(rows) and len(picked) < count:
                picked.append(int(rows[rank]))
    return picked


def load_for_cam(role: str, model_dir: Path, classes: list[str]):
    """(model in eval mode, preprocess, model.json, target layer, eval transform) of one saved model."""
    from distill import results
    from distill.models import load_for_eval

    results.check(model_dir)  # a stage under way or interrupted: not the model its metrics describe
    model, pre, info, transform = load_for_eval(model_dir)
    if list(info["classes"]) != list(classes):
        raise DistillError(f"{model_dir}: the model's {len(info['classes'])} classes are not the {len(classes)} "
                           "classes of the run's validation data; is config.yaml from another run?")
    what = f"{role} ({model_dir})"
    return model, pre, info, find_target(model, pre.input_size, what), transform


@exit_on_error
def main(argv=None):
    from distill.data import load_splits
    from distill.recipe import load_recipe

    args = parse_args(argv)
    if args.count < 1:
        raise DistillError(f"--count: expected at least 1 image, got {args.count}")
    run_dir = Path(args.run)
    roles = chosen_models(run_dir, args.student, args.fixres)
    recipe = load_recipe(run_dir / "config.yaml")
    _, val = load_splits(recipe.data)
    indices = parse_indices(args.images, len(val)) if args.images else spread_over_classes(val.labels, args.count)
    # every model is loaded and its layer found before anything is computed or written
    loaded = {role: load_for_cam(role, d, val.classes) for role, d in roles}
    images = [val.load(i) for i in indices]
    labels = [int(val.labels[i]) for i in indices]
    results, models = {}, {}
    for (role, model_dir), (model, pre, info, target, transform) in zip(roles, loaded.values()):
        results[role] = explain_model(model, pre, target, images, labels if args.cam_class == "label" else None,
                                      transform)
        cam_size = target.map_size
        models[role] = {"dir": str(model_dir), "model": info.get("model"), "input_size": pre.input_size,
                        "layer": target.name, "map": list(cam_size)}
        print(f"{role}: Grad-CAM at {target.name} ({cam_size[0]}x{cam_size[1]} map at {pre.input_size} px)",
              flush=True)
        if min(cam_size) < 2:
            print(f"warning: {role}: its feature map is 1x1 at {pre.input_size} px, so its maps show no location "
                  "(a larger input size gives a larger map)", file=sys.stderr, flush=True)

    records, rows = image_rows(indices, val, results, {role: info for role, (_, _, info, _, _) in loaded.items()},
                               args.cam_class)
    out = Path(args.out) if args.out else run_dir / "explain"
    tb_dir = run_dir / "tb" / "explain"
    summary = {"run": str(run_dir), "cam_class": args.cam_class, "models": models, "images": records}
    write_outputs(out, tb_dir, rows, summary, list(loaded))
    print(f"written: {out / 'explain.json'}, {len(rows)} rows as {out}/val<index>.png and {out / 'grid.png'}; "
          f"TensorBoard: {tb_dir}")


if __name__ == "__main__":
    main()
