"""metrics.json: the one record every model leaves (teacher, ensemble, student, FixRes), built by one function."""
from __future__ import annotations

from pathlib import Path

from distill import results
from distill.runs import write_json

SCORES = ("top1", "top5", "macro_f1", "nll", "ece")
# macro_f1's convention (distill.evaluate), recorded in every metrics.json
MACRO_F1_OVER = "classes present in the validation labels"


def write_metrics(path: Path, scores: dict, *, params: int, train_images_per_sec: float | None, epochs: int,
                  seed: int, wall_seconds: float, classes: list[str], fingerprint: str, **fields) -> dict:
    """Write `path` (metrics.json) and return it: the selected checkpoint's validation `scores` (evaluate()'s
    dict: SCORES, eval_images_per_sec, per-class recall, confusion matrix, num_images), the keys every model
    has (README, "metrics.json"), then the stage's own `fields`, the class names and the stage fingerprint that
    `distill run` compares to skip a complete stage.

    `train_images_per_sec` is None only for a model that was not trained here (an ensemble of members trained
    elsewhere). The folder's model card (README.md, distill.models.card) is rewritten with the record.
    """
    missing = [k for k in (*SCORES, "eval_images_per_sec") if k not in scores]
    if missing:  # a bug, not bad input: every stage evaluates with evaluate()
        raise ValueError(f"metrics for {path} lack {missing}")
    record = {**scores, "macro_f1_over": MACRO_F1_OVER, "params": params,
              "train_images_per_sec": train_images_per_sec, "epochs": epochs,
              "seed": seed, "wall_seconds": wall_seconds, **fields, "classes": classes, "fingerprint": fingerprint,
              "weights_sha256": results.weights_digest(path.parent)}  # the weights it describes (results.problem)
    write_json(path, record)
    from distill.models.card import write_card  # here, not at the top: distill.models imports torch and timm

    write_card(path.parent, metrics=record)  # the folder's README.md, never older than its metrics.json
    results.finish(path.parent)  # complete: the INCOMPLETE mark goes
    return record
