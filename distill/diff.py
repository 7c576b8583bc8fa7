"""Entry: where two prediction CSVs (`distill predict`) disagree, and how often (`distill diff`).

    distill diff a.csv b.csv [--out diff.csv] [--top 20]
    python -m distill.diff a.csv b.csv [...]

The prediction CSV (distill.predict): `path,[label,]prediction,confidence,prob_<class>...`, one row per image.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from distill.errors import DistillError, exit_on_error

# `distill diff` only reads CSVs: none of torch, timm and albumentations (seconds to import) is needed here


def parse_diff_args(argv=None):
    p = argparse.ArgumentParser(prog="distill diff", description="where two prediction CSVs (distill predict) "
                                                                 "disagree, and how often")
    p.add_argument("a", help="a prediction CSV")
    p.add_argument("b", help="another prediction CSV of (some of) the same images")
    p.add_argument("--out", help="write the disagreeing images to this CSV")
    p.add_argument("--top", type=int, default=20, help="how many prediction pairs and images to list")
    return p.parse_args(argv)


def read_predictions(path: Path) -> dict[str, dict]:
    """path → {prediction, confidence, label (or None)} of a prediction CSV, in file order."""
    if not path.is_file():
        raise DistillError(f"{path}: prediction CSV not found; write one with distill predict")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path", "prediction", "confidence") if c not in (reader.fieldnames or [])]
        if missing:
            raise DistillError(f"{path}: no column {missing[0]!r}; is it a CSV written by distill predict?")
        rows = {}
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            if row["path"] in rows:
                raise DistillError(f"{where}: {row['path']!r} appears twice; a prediction CSV has one row per image")
            try:
                confidence = float(row["confidence"])
            except (TypeError, ValueError):
                raise DistillError(f"{where}: confidence {row['confidence']!r} is not a number") from None
            rows[row["path"]] = {"prediction": row["prediction"], "confidence": confidence,
                                 "label": row.get("label")}
    if not rows:
        raise DistillError(f"{path}: no predictions; write one with distill predict")
    return rows


def disagreements(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(paths in both, the ones whose predictions differ): the latter most confident first (the mean of the two
    confidences: two confident models that disagree point at a hard or mislabelled image)."""
    common = [p for p in a if p in b]
    differ = [p for p in common if a[p]["prediction"] != b[p]["prediction"]]
    differ.sort(key=lambda p: (-(a[p]["confidence"] + b[p]["confidence"]), p))
    return common, differ


def diff_report(a_path: str, b_path: str, a: dict, b: dict, top: int = 20) -> tuple[str, list[dict], list[str]]:
    """The printed report, the disagreeing rows and their columns (for --out)."""
    common, differ = disagreements(a, b)
    if not common:
        raise DistillError(f"{b_path}: no image path in common with {a_path}; were both predicted on the same "
                           "images (the same folder or CSV)?")
    lines = [f"{len(common)} images in both"
             + (f" ({len(a) - len(common)} only in {a_path}, {len(b) - len(common)} only in {b_path})"
                if len(common) < max(len(a), len(b)) else ""),
             f"{len(differ)} of {len(common)} predictions differ ({100 * len(differ) / len(common):.1f}%)"]
    labelled = [p for p in common if a[p]["label"] not in (None, "")]
    if labelled:
        right_a = sum(a[p]["prediction"] == a[p]["label"] for p in labelled)
        right_b = sum(b[p]["prediction"] == a[p]["label"] for p in labelled)
        has_label = set(labelled)
        on_diff = [p for p in differ if p in has_label]
        lines.append(f"top1 on the {len(labelled)} labelled images: {a_path} {right_a / len(labelled):.4f}, "
                     f"{b_path} {right_b / len(labelled):.4f}" + (
                         f"; where they differ, {a_path} is right on "
                         f"{sum(a[p]['prediction'] == a[p]['label'] for p in on_diff)}, {b_path} on "
                         f"{sum(b[p]['prediction'] == a[p]['label'] for p in on_diff)}" if on_diff else ""))
    rows = [{"path": p, "prediction_a": a[p]["prediction"], "confidence_a": a[p]["confidence"],
             "prediction_b": b[p]["prediction"], "confidence_b": b[p]["confidence"],
             **({"label": a[p]["label"]} if labelled else {})} for p in differ]
    if differ:
        pairs = Counter((r["prediction_a"], r["prediction_b"]) for r in rows)
        ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        lines += ["", f"prediction pairs ({a_path} -> {b_path}), most frequent first:"]
        lines += [f"  {pa} -> {pb}: {n}" for (pa, pb), n in ranked[:top]]
        if len(ranked) > top:
            lines.append(f"  ({len(ranked) - top} more pairs)")
        lines += ["", f"most confident disagreements (a = {a_path}, b = {b_path}):"]
        width = max(len(r["path"]) for r in rows[:top])
        lines += [f"  {r['path']:<{width}}  a: {r['prediction_a']} ({r['confidence_a']:.3f})  "
                  f"b: {r['prediction_b']} ({r['confidence_b']:.3f})" for r in rows[:top]]
        if len(rows) > top:
            lines.append(f"  ({len(rows) - top} more; --out writes them all)")
    columns = ["path", *(["label"] if labelled else []), "prediction_a", "confidence_a", "prediction_b",
               "confidence_b"]
    return "\n".join(lines), rows, columns


@exit_on_error
def diff_main(argv=None):
    args = parse_diff_args(argv)
    if args.top < 1:
        raise DistillError(f"--top: expected at least 1, got {args.top}")
    a, b = read_predictions(Path(args.a)), read_predictions(Path(args.b))
    report, rows, columns = diff_report(args.a, args.b, a, b, args.top)
    print(report)
    if args.out:
        from distill.runs import write_text

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(Path(args.out), buf.getvalue())
        print(f"written: {args.out} ({len(rows)} disagreements)")


if __name__ == "__main__":
    diff_main()
