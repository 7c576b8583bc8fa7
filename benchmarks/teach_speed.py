"""Benchmark: fine-tune the teacher of each given recipe and print wall time, throughput and accuracy.

    python benchmarks/teach_speed.py recipes/tiny-vit.yaml recipes/tiny-timm.yaml \
        [--launcher "torchrun --nproc_per_node 2"] [--set teacher.epochs=2]
"""
import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--launcher", default=f"{sys.executable}", help="command that runs distill/teach.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, repeatable")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for recipe in args.recipes:
            start = time.perf_counter()
            cmd = [*shlex.split(args.launcher), str(ROOT / "distill/teach.py"), recipe, f"output_dir={out}", *args.set]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            m = json.loads((Path(out) / Path(recipe).stem / "teacher" / "metrics.json").read_text())
            rows.append((Path(recipe).stem, m["model"], m["params"] / 1e6, m["epochs"], seconds, m["wall_seconds"],
                         m["train_images_per_sec"], m["eval_images_per_sec"], m["top1"], m["macro_f1"]))
    print("| recipe | model | params (M) | epochs | command s | train loop s | train img/s | eval img/s | top1 | macro-F1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.0f} | "
              f"{r[8]:.4f} | {r[9]:.4f} |")


if __name__ == "__main__":
    main()
