"""Benchmark: a teacher training step on an idle and on a busy machine, with each thread setting.

    python benchmarks/busy.py [--quick] [--batch 64] [--size 64]

The step is the quickstart teacher's (EfficientNet-Lite0 at 64 px, 64 images, AdamW; random weights, nothing
from a hub). Each setting runs in a fresh process, so its threads and OpenMP environment are set before torch
starts. "busy" runs beside a competing CPU-bound job: a process spinning a torch matmul loop on torch's default
threads, as another training job would. Prints seconds per step (median) and the ratio to one thread on the
idle machine, with the 1-minute load average measured during each setting.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIN = "import torch\na = torch.randn(768, 768)\nwhile True:\n    a @ a"


def step_times(threads: str, batch: int, size: int, steps: int, budget: float) -> dict:
    """In a child process: median seconds per training step after one warm-up step; at least 2 steps, then up to
    `steps` while within `budget` seconds."""
    import timm
    import torch

    sys.path.insert(0, str(ROOT))
    from distill import threads as distill_threads

    n = distill_threads.apply(threads) if threads == "auto" else distill_threads.apply(int(threads))
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    t0 = time.perf_counter()
    step()  # warm-up: allocations, oneDNN kernels
    warm_up = time.perf_counter() - t0
    if warm_up > budget:  # a step slower than the whole budget: the warm-up is the measurement (an upper bound)
        return {"threads": n, "seconds": warm_up, "steps": "warm-up", "load": os.getloadavg()[0]}
    times, start = [], time.perf_counter()
    while len(times) < steps and (len(times) < 2 or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"threads": n, "seconds": statistics.median(times), "steps": len(times), "load": os.getloadavg()[0]}


def measure(threads: str, args, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DISTILL_THREADS")}
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--child", threads, "--batch", str(args.batch), "--size", str(args.size),
           "--steps", str(args.steps), "--budget", str(args.budget)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (under a minute)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="measured steps per setting (default 8, quick 3)")
    p.add_argument("--budget", type=float, default=None, help="seconds per setting after 2 steps (default 12, quick 3)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(step_times(args.child, args.batch, args.size, args.steps, args.budget)))
        return
    args.steps = args.steps or (3 if args.quick else 8)
    args.budget = args.budget or (3.0 if args.quick else 12.0)
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}; teacher step: efficientnet_lite0, "
          f"{args.batch} images at {args.size} px", flush=True)
    settings = [("idle", "1", {}), ("idle", "2", {}), ("idle", "2", {"OMP_WAIT_POLICY": "PASSIVE"})]
    busy = [("busy", "2", {}), ("busy", "1", {}), ("busy", "auto", {}),
            ("busy", "2", {"OMP_WAIT_POLICY": "PASSIVE"}), ("busy", "1", {"OMP_WAIT_POLICY": "PASSIVE"})]
    if args.quick:  # without OMP_NUM_THREADS and a quota, auto is torch's default: the "busy, 2" row again
        settings, busy = settings[:2], busy[:2] + busy[3:4]
    rows = [(machine, threads, extra, measure(threads, args, extra)) for machine, threads, extra in settings]
    spin_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    competitor = subprocess.Popen([sys.executable, "-c", SPIN], env=spin_env)
    try:
        time.sleep(2)  # the competitor's torch is up and spinning
        rows += [(machine, threads, extra, measure(threads, args, extra)) for machine, threads, extra in busy]
    finally:
        competitor.terminate()
        competitor.wait()
    base = rows[0][3]["seconds"]
    print("| machine | threads | OpenMP env | s / step | vs idle, 1 thread | steps | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for machine, threads, extra, r in rows:
        label = threads if threads != "auto" else f"auto ({r['threads']})"
        env = " ".join(f"{k}={v}" for k, v in extra.items()) or "-"
        print(f"| {machine} | {label} | {env} | {r['seconds']:.3f} | {r['seconds'] / base:.2f}x | {r['steps']} | "
              f"{r['load']:.2f} |")


if __name__ == "__main__":
    main()
