"""Benchmark: the soft-target store at scale. Stores of 10k, 100k and 1M views (synthetic 1000-class logits, kept
as top-20 + log-sum-exp, as an ImageNet teacher's would be) are written with the exporter's own shard writer,
then read at random, one (sample, view) row per item as a student's DataLoader does (and, for reference,
in whole batches of 128). Prints write and random-read throughput and the reader's memory per size; exits 1
if they do not stay flat as the store grows.

    python benchmarks/store_scale.py [--sizes 10000,100000,1000000] [--out DIR]

Memory: each size is read in a fresh process; "reader anon MiB" is the growth of the process's anonymous
resident memory (RssAnon: its own allocations) over the reads, which must not grow with the store. The
memory-mapped shards are file-backed pages the kernel can drop at any time (RssFile, shown too).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill import store
from distill.recipe import TargetsConfig

CLASSES, K, VIEWS, SHARD = 1000, 20, 4, 4096  # rows per sample = VIEWS + 1
BATCH, READS = 128, 300


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_store(out: Path, views: int) -> dict:
    """A complete store of `views` rows (synthetic logits), written with the exporter's shard writer."""
    samples = math.ceil(views / (VIEWS + 1))
    logit_spec = store.logits_spec(TargetsConfig(logits="topk", topk=K), CLASSES)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    # one block of random logits, rolled per shard: the timing is the writer's (top-k, float16, file, sha256),
    # not the random generator's
    block = torch.randn(SHARD * (VIEWS + 1), CLASSES, generator=gen) * 3
    shards, start = [], time.perf_counter()
    for s in range(math.ceil(samples / SHARD)):
        first, last = s * SHARD, min(samples, (s + 1) * SHARD)
        rows = (last - first) * (VIEWS + 1)
        logits = block[:rows].roll(s, dims=1)
        params = torch.rand(rows, 5, generator=gen)
        labels = torch.randint(0, CLASSES, (last - first,), generator=gen)
        store.write_shard(out, s, first, last, "synthetic", {}, logit_spec, logits, params, labels)
        info = json.loads((out / f"shard-{s:05d}.json").read_text())
        shards.append({"file": f"shard-{s:05d}.safetensors", "first_sample": first, "num_samples": last - first,
                       "rows": rows, "sha256": info["sha256"]})
    seconds = time.perf_counter() - start
    manifest = {"format": "distill-targets", "version": store.FORMAT_VERSION, "complete": True,
                "fingerprint": "synthetic", "num_samples": samples, "num_labeled": samples, "num_unlabeled": 0,
                "views": VIEWS, "rows_per_sample": VIEWS + 1, "center_view": VIEWS, "shard_size": SHARD,
                "num_classes": CLASSES, "classes": [str(c) for c in range(CLASSES)], "logits": logit_spec,
                "shards": shards}
    (out / store.MANIFEST).write_text(json.dumps(manifest))
    size = sum((out / sh["file"]).stat().st_size for sh in shards)
    return {"views": samples * (VIEWS + 1), "write_views_per_sec": samples * (VIEWS + 1) / seconds,
            "bytes_per_view": size / (samples * (VIEWS + 1)), "mib": size / 2**20}


def read_store(path: Path) -> dict:
    """Random batches of (sample, view) rows, in this process: throughput and memory growth."""
    anon0, file0 = status_kib("RssAnon"), status_kib("RssFile")
    reader = store.TargetStore(path)
    rng = np.random.default_rng(0)
    # as ReplayDataset reads: one (sample, view) row per item, in a random order
    samples = rng.integers(0, reader.num_samples, READS * BATCH)
    views = rng.integers(0, reader.rows_per_sample, READS * BATCH)
    start = time.perf_counter()
    for i, v in zip(samples, views):
        row = reader.row(int(i), int(v))
    assert row["logits"].shape == (CLASSES,)
    row_seconds = time.perf_counter() - start
    # whole random batches in one call (rows()): its cost grows with the shards a batch touches
    start = time.perf_counter()
    for b in range(READS):
        batch = reader.rows(samples[b * BATCH:(b + 1) * BATCH], views[b * BATCH:(b + 1) * BATCH])
        assert batch["logits"].shape == (BATCH, CLASSES)
    batch_seconds = time.perf_counter() - start
    return {"read_views_per_sec": READS * BATCH / row_seconds, "batch_views_per_sec": READS * BATCH / batch_seconds,
            "anon_mib": (status_kib("RssAnon") - anon0) / 1024, "file_mib": (status_kib("RssFile") - file0) / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="store sizes in views")
    p.add_argument("--out", type=Path, help="keep the stores here (default: a temporary directory)")
    p.add_argument("--read", type=Path, help=argparse.SUPPRESS)  # the child process: read one store
    args = p.parse_args()
    if args.read:
        print(json.dumps(read_store(args.read)))
        return 0
    base = args.out or Path(tempfile.mkdtemp(prefix="distill-scale-"))
    results = []
    for views in (int(v) for v in args.sizes.split(",")):
        out = base / f"store-{views}"
        w = write_store(out, views)
        r = subprocess.run([sys.executable, __file__, "--read", str(out)], capture_output=True, text=True, check=True)
        results.append({**w, **json.loads(r.stdout.strip().splitlines()[-1])})
    print(f"# store scale: {CLASSES} classes as top-{K} + log-sum-exp, {VIEWS} + 1 views per sample, "
          f"random batches of {BATCH}, {os.cpu_count()} cores\n")
    print("| views | store MiB | bytes/view | write views/s | random row reads/s | random batch reads, views/s "
          "| reader anon MiB | reader file MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['views']:,} | {r['mib']:.0f} | {r['bytes_per_view']:.1f} | {r['write_views_per_sec']:,.0f} | "
              f"{r['read_views_per_sec']:,.0f} | {r['batch_views_per_sec']:,.0f} | {r['anon_mib']:.1f} | "
              f"{r['file_mib']:.1f} |")
    small, large = results[0], results[-1]
    checks = {
        "write throughput flat (largest ≥ 0.5 × smallest)":
            large["write_views_per_sec"] >= 0.5 * small["write_views_per_sec"],
        "random row-read throughput flat (largest ≥ 0.5 × smallest)":
            large["read_views_per_sec"] >= 0.5 * small["read_views_per_sec"],
        "reader anon memory flat (largest ≤ smallest + 16 MiB)": large["anon_mib"] <= small["anon_mib"] + 16,
    }
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
