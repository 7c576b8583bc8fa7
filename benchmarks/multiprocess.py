"""Benchmark: a student trained by 2 processes (torchrun, gloo on CPU) against the same student trained by 1.

    python benchmarks/multiprocess.py [--seeds 3] [--subset 2000] [--epochs 3]

One tiny-timm teacher and store; then, per seed, a BatchNorm student (resnet10t) and a LayerNorm student (a 2-block
ViT) each trained at a global batch of 64: 1 process x 64 and 2 processes x 32. Both see the same samples, views and
augmentation at every step; MixUp/CutMix is off, because its draw is per process. Prints the validation top-1 of
each pair, its difference, and the largest weight difference. Exits 0.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STUDENTS = {
    "resnet10t (BatchNorm)": {"model": "timm:resnet10t", "optim": {"name": "sgd", "lr": 0.05}},
    "vit 2 blocks (LayerNorm)": {
        "model": "timm:vit_tiny_patch16_224", "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "timm_kwargs": {"img_size": 28, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}},
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--subset", type=int, default=2000, help="images per split (data.subset)")
    p.add_argument("--epochs", type=int, default=3, help="student epochs")
    return p.parse_args()


def run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def main():
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-multiprocess-"))
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    raw["data"]["subset"] = args.subset
    raw["targets"] = {"views": 2}
    raw["log"] = {"progress": False, "tensorboard": False}
    raw["students"] = []
    for i, (label, spec) in enumerate(STUDENTS.items()):
        for seed in range(args.seeds):
            for procs, batch in ((1, 64), (2, 32)):
                raw["students"].append({"name": f"m{i}-s{seed}-p{procs}", "seed": seed, "batch_size": batch,
                                        "resolution": 28, "epochs": args.epochs,
                                        "kd": {"loss": "kl", "temperature": 4.0}, **spec})
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    common = [str(path), f"output_dir={work}"]
    run([sys.executable, "-m", "distill.cli", "teach", *common])
    for student in raw["students"]:
        launcher = ([sys.executable, "-m", "distill.cli", "learn"] if student["name"].endswith("p1")
                    else ["torchrun", "--nproc_per_node", "2", "distill/learn.py"])
        run([*launcher, *common, "--student", student["name"]])

    students = work / "tiny-timm" / "students"
    print(f"# 2 processes x 32 vs 1 process x 64 ({args.subset} train / {args.subset} val images, "
          f"{args.epochs} epochs, KD T=4, no mixing)\n")
    print("| student | seed | top1, 1 process | top1, 2 processes | difference | max weight difference |")
    print("|---|---|---|---|---|---|")
    for i, label in enumerate(STUDENTS):
        diffs = []
        for seed in range(args.seeds):
            one, two = (students / f"m{i}-s{seed}-p{p}" for p in (1, 2))
            t1, t2 = (json.loads((d / "metrics.json").read_text())["top1"] for d in (one, two))
            w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
            worst = max(float(np.abs(w1[k].float().numpy() - w2[k].float().numpy()).max()) for k in w1)
            diffs.append(t2 - t1)
            print(f"| {label} | {seed} | {t1:.4f} | {t2:.4f} | {t2 - t1:+.4f} | {worst:.1e} |")
        print(f"| {label} | mean | | | {np.mean(diffs):+.4f} (mean abs {np.mean(np.abs(diffs)):.4f}) | |")


if __name__ == "__main__":
    main()
