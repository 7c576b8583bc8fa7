"""metrics.json is built by one function: the contract's keys always, a missing score is a bug."""
import json

import pytest
from conftest import CONTRACT

from distill.record import write_metrics

SCORES = {"top1": 0.5, "top5": 0.9, "macro_f1": 0.4, "nll": 1.2, "ece": 0.05, "eval_images_per_sec": 100.0,
          "num_images": 10}


def test_write_metrics_writes_the_contract_and_the_stage_fields(tmp_path):
    path = tmp_path / "m" / "metrics.json"
    record = write_metrics(path, SCORES, params=10, train_images_per_sec=50.0, epochs=2, seed=0, wall_seconds=1.5,
                           classes=["a", "b"], fingerprint="fp", kd_loss="kl")
    on_disk = json.loads(path.read_text())
    assert on_disk == record
    assert all(k in on_disk for k in CONTRACT) and on_disk["kd_loss"] == "kl" and on_disk["top1"] == 0.5


def test_a_score_missing_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match="lack"):
        write_metrics(path, {k: v for k, v in SCORES.items() if k != "ece"}, params=1, train_images_per_sec=None,
                      epochs=1, seed=0, wall_seconds=0.0, classes=["a"], fingerprint="fp")
    assert not path.exists()
