"""Entry: a saved model as one ONNX graph that takes images, checked against PyTorch and timed (`distill deploy`).

    distill deploy <model dir> [--format onnx] [--out DIR] [--input uint8|float] [--images DIR] [--repeats 30]

The graph's input `images` is RGB, NCHW, at the model's input size (model.json `preprocess.input_size`), any
batch size: uint8 0..255 by default, float32 0..1 with `--input float`. Inside the graph: the cast to float, the
model's own mean/std, the model; its output `logits` is batch x classes. Nothing is resized inside: the caller
resizes and crops to the input size as the model's eval transform does (deploy.json keeps `preprocess` and
`eval_augment`). Written to <model dir>/deploy/ (or --out): model.onnx and deploy.json (the check and the
timings), through a temporary folder, so a deploy that fails leaves nothing behind.

The check: ONNX Runtime (CPUExecutionProvider) against PyTorch on up to 64 real images: the run's validation
split when the folder lies in a run (config.yaml up to three levels up), else --images. PyTorch sees each image
through the model's eval transform, the graph the same image before normalisation. Max |logit difference| must
be at most TOLERANCE x the logit scale (the largest |PyTorch logit|, at least 1) and top-1 must agree on every
image, a near-tie (the two classes' PyTorch logits within twice the tolerance) counting as agreement.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from torch import nn

from distill.errors import DistillError, exit_on_error

FORMATS = ("onnx",)
INPUTS = {"uint8": "uint8 0..255", "float": "float32 0..1"}
CHECK_IMAGES = 64
TOLERANCE = 1e-3  # of the logit scale: float32 reordering in ONNX Runtime stays far below it
THROUGHPUT_BATCH = 32
DEPLOY_DIR, DEPLOY_INFO, ONNX_FILE = "deploy", "deploy.json", "model.onnx"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill deploy", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory written by distill (runs/<name>/teacher, "
                                 "runs/<name>/students/<student>[/fixres])")
    p.add_argument("--format", default="onnx", help="what to write: onnx (the only one so far)")
    p.add_argument("--out", help=f"the folder to write (default: <model dir>/{DEPLOY_DIR})")
    p.add_argument("--input", default="uint8", help="the graph's input: uint8 (0..255, the default) or float "
                                                    "(float32 0..1)")
    p.add_argument("--images", help="check on these images (a folder, a CSV with a 'path' column, or one image) "
                                    "instead of the run's validation split")
    p.add_argument("--repeats", type=int, default=30, help="timed runs at batch 1 (batch 32: a sixth of them)")
    return p.parse_args(argv)


class ImagesIn(nn.Module):
    """Images as a deployment has them (uint8 0..255 or float 0..1, RGB, NCHW) → the model's logits: the
    model's normalisation inside the graph, so a caller cannot get it wrong."""

    def __init__(self, model: nn.Module, pre, input_kind: str):
        super().__init__()
        self.model = model
        scale = 255.0 if input_kind == "uint8" else 1.0
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * scale, persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * scale, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


# --- the check images -------------------------------------------------------------
def check_split(model_dir: Path, classes: list[str], images: str | None):
    """(up to CHECK_IMAGES images as a `distill.data.Split`, where they come from)."""
    from distill.data import UNLABELED, Split
    from distill.predict import find_images, find_recipe

    if images is not None:
        found = find_images(images, classes)
        split, where = Split(classes, [UNLABELED] * len(found.paths), paths=found.paths, name=images), images
    else:
        recipe = find_recipe(model_dir)
        if recipe is None:
            raise DistillError(f"{model_dir}: not inside a run (no config.yaml up to three levels up), so no "
                               "validation images to check the ONNX model on; give --images <folder>")
        from distill.data import load_splits

        split, where = load_splits(recipe.data)[1], f"the validation split of run {recipe.name}"
    n = min(CHECK_IMAGES, len(split))  # spread over the split: a sorted split's first images are one class
    return split.subset(np.linspace(0, len(split) - 1, n).round().astype(int)), where


def render(split, model_dir: Path, info: dict, pre, transform, input_kind: str, where: str):
    """(the normalised inputs PyTorch is checked on, the same images as the graph takes them): both through
    the model's eval transform, the second with mean 0 and std 1, so it stops at pixels / 255."""
    from distill.data import build_transform
    from distill.models import eval_augment

    augment, key = eval_augment(model_dir, info)
    to_pixels = build_transform(augment, "eval", dataclasses.replace(pre, mean=(0.0,) * 3, std=(1.0,) * 3), where=key)
    normalised, pixels = [], []
    for i in range(len(split)):
        image = split.load(i)
        normalised.append(transform(image))
        pixels.append(to_pixels(image))
    x, pixels = torch.stack(normalised), torch.stack(pixels)
    size = pre.input_size
    if tuple(x.shape[1:]) != (3, size, size):
        raise DistillError(f"{model_dir}: its eval transform gives {tuple(x.shape[1:])} images from {where}, not "
                           f"3 x {size} x {size}; the graph takes the model's input size, so its eval transform "
                           "must end with it (a CenterCrop to input_size)")
    if input_kind == "uint8":
        pixels = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    return x, pixels.contiguous()


# --- export, check, timing -----------------------------------------------------------
def export_onnx(graph: ImagesIn, example: torch.Tensor, path: Path, metadata: dict, what: str) -> int:
    """Write `graph` to `path` with a dynamic batch size; returns the ONNX opset."""
    # dynamo=True (torch 2.14's default; the TorchScript exporter is deprecated): torch.export traces timm
    # CNNs, transformers' ViTs (their Python shape checks included) and an ensemble's averaging alike, and
    # dynamic_shapes keeps the batch symbolic through every reshape (dynamic_axes is the TorchScript exporter's
    # way, only renaming dims after tracing). The example batch is 2: torch.export specialises a dim it sees as 1.
    # transformers' SDPA attention does not survive torch.export's decomposition in BEiT (a view of a transposed
    # tensor); its eager attention is the same arithmetic, and ONNX at this opset has no fused attention anyway
    configs = {id(m.config): m.config for m in graph.modules() if hasattr(getattr(m, "config", None),
                                                                            "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        program = torch.onnx.export(graph, (example,), input_names=["images"], output_names=["logits"], dynamo=True,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
    except Exception as e:  # noqa: BLE001 -- torch.export and onnxscript raise many kinds: name the model
        from distill.models.common import first_line

        cause = e.__cause__ or e  # torch's ConversionError leads with advice; its cause says what failed
        why = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {first_line(cause)}")  # no terminal colours
        raise DistillError(f"{what}: torch.onnx.export cannot export it ({why}); nothing written") from None
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]
    program.model.metadata_props.update(metadata)
    program.save(str(path))  # weights over 2 GB go to <path>.data beside it
    return int(program.model.opset_imports.get("", 0))


def compare_logits(reference: np.ndarray, got: np.ndarray) -> dict:
    """Max |logit difference|, the tolerance it is held to, and top-1 agreement (near-ties agree)."""
    reference, got = reference.astype(np.float64), got.astype(np.float64)
    scale = max(1.0, float(np.abs(reference).max()))
    tolerance = TOLERANCE * scale
    mine, theirs = reference.argmax(1), got.argmax(1)
    rows = np.arange(len(reference))
    ties = (mine != theirs) & (reference[rows, mine] - reference[rows, theirs] <= 2 * tolerance)
    return {"images": len(reference), "max_abs_diff": float(np.abs(reference - got).max()),
            "tolerance": tolerance, "logit_scale": scale, "top1_agreement": float(((mine == theirs) | ties).mean()),
            "near_ties": int(ties.sum())}


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after `warmup` (kernels are picked on the first calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(session, graph: ImagesIn, pixels: torch.Tensor, repeats: int) -> dict:
    """ONNX Runtime's batch-1 latency and batch-32 throughput, and PyTorch's batch-1 latency, same threads."""
    one = pixels[:1].numpy()
    batch = pixels[torch.arange(THROUGHPUT_BATCH) % len(pixels)].numpy()
    ort_b1 = median_ms(lambda: session.run(["logits"], {"images": one}), repeats)
    ort_b32 = median_ms(lambda: session.run(["logits"], {"images": batch}), max(3, repeats // 6), warmup=1)
    with torch.inference_mode():
        torch_b1 = median_ms(lambda: graph(pixels[:1]), repeats)
    return {"provider": "CPUExecutionProvider", "threads": torch.get_num_threads(), "repeats": repeats,
            "ort_latency_ms_b1": ort_b1, f"ort_images_per_sec_b{THROUGHPUT_BATCH}": THROUGHPUT_BATCH * 1000 / ort_b32,
            "torch_latency_ms_b1": torch_b1}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch's timing gets
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def install(tmp: Path, out: Path) -> None:
    """Move the files written in `tmp` into `out`, deploy.json last, so a folder with a deploy.json is whole."""
    out.mkdir(parents=True, exist_ok=True)
    (out / DEPLOY_INFO).unlink(missing_ok=True)  # the earlier deploy's record, no longer true from here on
    (out / f"{ONNX_FILE}.data").unlink(missing_ok=True)  # external weights of an earlier, larger export
    for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == DEPLOY_INFO):
        os.replace(tmp / name, out / name)


def deployed_speed(model_dir: Path) -> tuple[float | None, float | None]:
    """(ONNX Runtime latency ms at batch 1, images/s at batch 32) from <model dir>/deploy/deploy.json, for
    `distill compare`; (None, None) without one, or when it was deployed from other weights than the folder's."""
    try:
        deployed = json.loads((Path(model_dir) / DEPLOY_DIR / DEPLOY_INFO).read_text())
        sha256 = json.loads((Path(model_dir) / "model.json").read_text())["sha256"]
        if deployed["sha256"] != sha256:
            return None, None
        speed = deployed["speed"]
        return speed["ort_latency_ms_b1"], speed[f"ort_images_per_sec_b{THROUGHPUT_BATCH}"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    if args.format not in FORMATS:
        raise DistillError(f"--format: {args.format!r} is not supported; expected one of {', '.join(FORMATS)}")
    if args.input not in INPUTS:
        raise DistillError(f"--input: expected uint8 (0..255) or float (float32 0..1), got {args.input!r}")
    if args.repeats < 1:
        raise DistillError(f"--repeats: expected at least 1, got {args.repeats}")
    import onnxruntime

    from distill.predict import load_model_dir

    model_dir = Path(args.model)
    model, pre, info, transform = load_model_dir(model_dir)
    out = Path(args.out) if args.out else model_dir / DEPLOY_DIR
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out: {out} is a file; give a folder to write model.onnx and deploy.json into")
    what = f"{model_dir} ({info.get('model') or info['source']})"
    split, where = check_split(model_dir, list(info["classes"]), args.images)
    x, pixels = render(split, model_dir, info, pre, transform, args.input, where)
    graph = ImagesIn(model, pre, args.input).eval()
    size = pre.input_size
    shape = ["batch", 3, size, size]
    input_text = f"images {INPUTS[args.input]} RGB NCHW {shape}"
    metadata = {"distill.classes": json.dumps(info["classes"]), "distill.input": input_text,
                "distill.preprocess": json.dumps(dataclasses.asdict(pre))}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        start = time.perf_counter()
        opset = export_onnx(graph, pixels[torch.arange(2) % len(pixels)], tmp / ONNX_FILE, metadata, what)
        export_seconds = time.perf_counter() - start
        session = ort_session(tmp / ONNX_FILE)
        with torch.inference_mode():
            reference = torch.cat([model(b).float() for b in x.split(THROUGHPUT_BATCH)]).numpy()
        got = np.concatenate([session.run(["logits"], {"images": b.numpy()})[0]
                              for b in pixels.split(THROUGHPUT_BATCH)])
        check = {**compare_logits(reference, got), "source": where}
        print(f"check: {check['images']} images from {where}, ONNX Runtime vs PyTorch: max |logit diff| "
              f"{check['max_abs_diff']:.3g} (tolerance {TOLERANCE:g} x logit scale {check['logit_scale']:.3g} = "
              f"{check['tolerance']:.3g}), top-1 agreement {check['top1_agreement']:.2%}"
              + (f" ({check['near_ties']} near-ties)" if check["near_ties"] else ""), flush=True)
        if check["max_abs_diff"] > check["tolerance"] or check["top1_agreement"] < 1:
            raise DistillError(f"{what}: the ONNX graph's logits differ from PyTorch's (max |diff| "
                               f"{check['max_abs_diff']:.3g} > {check['tolerance']:.3g}, or top-1 agreement "
                               f"{check['top1_agreement']:.2%} < 100%); nothing written")
        speed = measure(session, graph, pixels, args.repeats)
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        record = {"format": "onnx", "file": ONNX_FILE, "model_dir": str(model_dir), "model": info.get("model"),
                  "source": info["source"], "sha256": info["sha256"], "classes": list(info["classes"]),
                  "input": {"name": "images", "dtype": "uint8" if args.input == "uint8" else "float32",
                            "range": "0..255" if args.input == "uint8" else "0..1", "channels": "RGB",
                            "layout": "NCHW", "shape": shape},
                  "output": {"name": "logits", "shape": ["batch", len(info["classes"])]},
                  "preprocess": dataclasses.asdict(pre), "eval_augment": info.get("eval_augment"),
                  "opset": opset, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                  "export_seconds": export_seconds, "bytes": files, "check": check, "speed": speed}
        (tmp / DEPLOY_INFO).write_text(json.dumps(record, indent=2) + "\n")
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"speed ({speed['threads']} CPU thread{'s' * (speed['threads'] > 1)}): ONNX Runtime "
          f"{speed['ort_latency_ms_b1']:.3g} ms at batch 1 (median of {args.repeats}), "
          f"{speed[f'ort_images_per_sec_b{THROUGHPUT_BATCH}']:.0f} images/s at batch {THROUGHPUT_BATCH}; "
          f"PyTorch {speed['torch_latency_ms_b1']:.3g} ms at batch 1")
    print(f"written: {out / ONNX_FILE} (input {input_text}, output logits [batch, {len(info['classes'])}], "
          f"opset {opset}), {out / DEPLOY_INFO}")


if __name__ == "__main__":
    main()
