"""Benchmark: one student training step (forward, backward, AdamW) with and without channels-last and torch.compile.

    python benchmarks/student_step.py [--models resnet10t mobilenetv3_small_100] [--sizes 112 224] [--batch 32]
                                      [--steps 3] [--device cpu]

Random-init timm models on random data, batch 32, one step = forward + cross-entropy + backward + AdamW. Each
variant warms up first (eager: 1 step; compiled: the steps that compile, timed apart as "compile s"), then the
median of --steps steps. Prints one markdown table with the load average; the ratio column is against the eager
NCHW step of the same model and size. `students.N.channels_last` / `students.N.compile` take their defaults
from these numbers (distill/recipe/schema.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet10t", "mobilenetv3_small_100"])
    p.add_argument("--sizes", nargs="+", type=int, default=[112, 224])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (the median is shown)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (as mixed_precision: bf16)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(name: str, size: int, batch: int, steps: int, device: torch.device, channels_last: bool,
              compile_model: bool, bf16: bool = False) -> dict:
    """{"step s": median seconds of a step, "compile s": the warm-up's seconds} of one variant."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if compile_model:
        model.compile()  # in place: the module (and its state_dict keys) stay as they were
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    started = time.perf_counter()
    for _ in range(2 if compile_model else 1):  # a compiled model may recompile once (grad mode, optimizer state)
        step()
    warm = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"step s": statistics.median(times), "compile s": warm if compile_model else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, load average at "
          f"start {os.getloadavg()[0]:.2f}; batch {args.batch}, AdamW, {'bf16' if args.bf16 else 'float32'}, "
          f"{args.device}\n")
    print("| model | px | channels-last | compile | step s | img/s | speed-up vs eager NCHW | compile s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    variants = [(False, False), (True, False)] + ([] if args.no_compile else [(False, True), (True, True)])
    for name in args.models:
        for size in args.sizes:
            base = None
            for channels_last, compiled in variants:
                try:
                    r = step_time(name, size, args.batch, args.steps, device, channels_last, compiled, args.bf16)
                except Exception as e:  # noqa: BLE001 - a compile that fails here is a result too
                    print(f"| {name} | {size} | {channels_last} | {compiled} | failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]} | | | | {os.getloadavg()[0]:.2f} |", flush=True)
                    continue
                base = base or r["step s"]
                warm = "" if r["compile s"] is None else f"{r['compile s']:.1f}"
                print(f"| {name} | {size} | {channels_last} | {compiled} | {r['step s']:.3f} | "
                      f"{args.batch / r['step s']:.1f} | {base / r['step s']:.2f} | {warm} | "
                      f"{os.getloadavg()[0]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
