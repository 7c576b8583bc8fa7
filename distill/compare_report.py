"""The comparison's renderings: the markdown table (seed groups, policy decisions), the Pareto front, the
accuracy-vs-latency plot, per-model confusion figures, and TensorBoard's tb/compare (distill/compare.py builds
the rows)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

COLUMNS = ("run", "model", "role", "resolution", "top1", "macro_f1", "nll", "ece", "params_m", "latency_ms_b1",
           "images_per_sec_b64", "ort_latency_ms_b1", "ort_images_per_sec_b32", "tta_views", "train_minutes", "kd", "temperature", "kd_weight", "label_smoothing", "mix",
           "ls_decision", "sweep")


def markdown(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += seed_summary(rows)
    reasons = [f"- {r['run']}/{r['role']}: {r['_reason']}" for r in rows if r.get("_reason")]
    if reasons:
        lines += ["", "Label-smoothing / KD policy decisions:", *reasons]
    for r in rows:
        if r.get("_folds"):
            f = r["_folds"]
            lines += ["", (f"{r['run']}: {f['k']}-fold teacher, held-out folds: top1 {f['top1_mean']:.4f} ± "
                          f"{f['top1_std']:.4f}, macro_f1 {f['macro_f1_mean']:.4f} ± {f['macro_f1_std']:.4f} "
                          "(the `teacher` row is their ensemble; `teacher:fold-<f>` rows are on the validation split)")]
    fixres = [r for r in rows if r.get("_fixres")]
    if fixres:
        lines += ["", "FixRes: val top-1 before -> after the fine-tune, at each resolution:"]
        for r in fixres:
            f = r["_fixres"]
            sizes = sorted({int(k.rsplit("_", 1)[1][:-2]) for k in f if k.startswith(("before_", "after_"))})
            lines.append(f"- {r['run']}/{r['role']}: " + ", ".join(
                f"{px}px {f[f'before_{px}px']['top1']:.4f} -> {f[f'after_{px}px']['top1']:.4f}" for px in sizes))
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[dict]) -> list[str]:
    """Mean ± std (n - 1) over seeds of the students named <group>-s<seed>, for groups of two or more."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        match = re.fullmatch(r"(.+)-s\d+(\+fixres)?", r["role"])
        if match and r["role"] != "teacher":
            groups.setdefault((r["run"], match[1] + (match[2] or "")), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    lines = ["", "Over seeds (students named <group>-s<seed>): mean ± std", "",
             "| run | group | seeds | top1 | macro_f1 | nll | temperature |", "|---|---|---|---|---|---|---|"]
    for (run, group), members in groups.items():
        stats = []
        for key in ("top1", "macro_f1", "nll"):
            v = np.array([m[key] for m in members], dtype=float)
            stats.append(f"{v.mean():.4f} ± {v.std(ddof=1):.4f}")
        temps = sorted({m["temperature"] for m in members if m["temperature"] is not None})
        lines.append(f"| {run} | {group} | {len(members)} | {' | '.join(stats)} | "
                     f"{', '.join(f'{t:g}' for t in temps) or '-'} |")
    return lines


def pareto(rows: list[dict]) -> list[bool]:
    """Is each row on the accuracy/latency Pareto front (no other model both faster and more accurate)?"""
    front = []
    for r in rows:
        dominated = any(o is not r and o["latency_ms_b1"] <= r["latency_ms_b1"] and o["top1"] >= r["top1"]
                        and (o["latency_ms_b1"] < r["latency_ms_b1"] or o["top1"] > r["top1"]) for o in rows)
        front.append(not dominated)
    return front


def plot(rows: list[dict]):
    """Top-1 against latency at batch 1, one point per model, the Pareto front joined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    on_front = pareto(rows)
    for r, front in zip(rows, on_front):
        ax.scatter(r["latency_ms_b1"], r["top1"], c="tab:red" if front else "tab:blue", zorder=3)
        ax.annotate(f"{r['run']}/{r['role']}", (r["latency_ms_b1"], r["top1"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r, f in zip(rows, on_front) if f), key=lambda r: r["latency_ms_b1"])
    ax.plot([r["latency_ms_b1"] for r in front], [r["top1"] for r in front], "--", c="tab:red", label="Pareto front")
    ax.set_xlabel("latency at batch 1 (ms, this machine)")
    ax.set_ylabel("val top-1")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def confusion_figure(row: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(row["_confusion"], dtype=float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(cm))
    labels = row["_classes"] or [str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    ax.set_yticks(ticks, labels, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{row['run']}/{row['role']} (recall per row)", fontsize=8)
    fig.tight_layout()
    return fig


def to_tensorboard(rows: list[dict], table: str, out_dir: Path, figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir))
    writer.add_text("comparison", table)
    for r in rows:
        measured = ("top1", "macro_f1", "nll", "ece", "latency_ms_b1", "images_per_sec_b64", "ort_latency_ms_b1",
                    "ort_images_per_sec_b32")
        params = {c: ("-" if r[c] is None else r[c]) for c in COLUMNS if c not in measured}
        metrics = {f"compare/{k}": float(r[k]) for k in measured if r[k] is not None}
        writer.add_hparams(params, metrics, run_name=f"{r['run']}-{r['role']}")
        if r["_confusion"]:
            writer.add_figure(f"confusion/{r['run']}/{r['role']}", confusion_figure(r))
    if figure is not None:
        writer.add_figure("accuracy_vs_latency", figure)
    writer.close()
