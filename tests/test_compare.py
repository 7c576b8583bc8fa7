"""compare.py and compare_report.py: the seed summary, the Pareto front, and the `+tta` rows (on a tiny run dir made
without training)."""
import csv
import json

import pytest
import torch

from distill.compare import main, row_for, tta_row
from distill.compare_report import pareto, seed_summary
from distill.recipe import TTAConfig


def row(role, top1, run="r", temperature=4.0, latency=1.0):
    return {"run": run, "role": role, "top1": top1, "macro_f1": top1 - 0.01, "nll": 1 - top1,
            "temperature": temperature, "latency_ms_b1": latency}


def test_seed_summary_groups_students_by_name():
    rows = [row("teacher", 0.9, temperature=None), row("kd-s0", 0.80), row("kd-s1", 0.82), row("kd-s2", 0.84),
            row("kd-s0+fixres", 0.81), row("kd-s1+fixres", 0.83), row("alone-s0", 0.5), row("baseline", 0.7)]
    lines = seed_summary(rows)
    table = "\n".join(lines)
    assert "| r | kd | 3 | 0.8200 ± 0.0200 |" in table  # sample std (n - 1) of 0.80, 0.82, 0.84
    assert "| r | kd+fixres | 2 | 0.8200 ± 0.0141 |" in table
    assert "alone" not in table and "baseline" not in table and "teacher" not in table
    assert seed_summary([row("kd", 0.8)]) == []


def test_pareto_front():
    rows = [row("fast", 0.80, latency=1.0), row("slow-good", 0.90, latency=5.0), row("dominated", 0.79, latency=2.0)]
    assert pareto(rows) == [True, True, False]
    assert pareto(rows + [row("tie", 0.80, latency=1.0)]) == [True, True, False, True]  # equal is not dominated


# --- TTA rows ---------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir made without training: config.yaml (digits, 30 val images, tta enabled) and one random-weight
    student whose metrics.json holds its plain metrics on that validation set, measured as learn.py does."""
    from distill.data import load_splits
    from distill.evaluate import classification_metrics
    from distill.models import build_model, count_params, save_model
    from distill.predict import predict_split
    from distill.recipe import StudentConfig, dump_recipe, recipe_from_dict

    run = tmp_path_factory.mktemp("runs") / "tiny"
    recipe = recipe_from_dict({"name": "tiny", "teacher": {"model": "timm:resnet10t"},
                               "data": {"source": "digits", "subset": 30},
                               "tta": {"enabled": True, "scales": [1.0, 1.15]}})
    run.mkdir()
    (run / "config.yaml").write_text(dump_recipe(recipe))
    val = load_splits(recipe.data)[1]
    torch.manual_seed(0)
    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=32), len(val.classes),
                             where="students.0", classes=val.classes)
    save_model(model, pre, run / "students" / "s", val.classes)
    m = classification_metrics(*predict_split(model, pre, val), len(val.classes))
    (run / "students" / "s" / "metrics.json").write_text(json.dumps(
        {**m, "model": "timm:resnet10t", "resolution": 32, "params": count_params(model), "wall_seconds": 60.0,
         "kd_loss": "kl", "temperature": 4.0, "kd_weight": 0.5, "label_smoothing": 0.0, "mix": {}}))
    return run, val


def test_tta_row_measures_the_model_on_its_validation_set(tiny_run):
    run, val = tiny_run
    model_dir = run / "students" / "s"
    row = row_for(run, "s", model_dir, speed=False)
    assert row["tta_views"] == 1
    # one view only: the TTA row must reproduce the plain metrics, i.e. it evaluates the same images the same way
    same = tta_row(row, model_dir, val, TTAConfig(enabled=True, hflip=False), speed=False)
    for key in ("top1", "macro_f1", "nll", "ece"):
        assert same[key] == pytest.approx(row[key], abs=1e-6), key
    tta = tta_row(row, model_dir, val, TTAConfig(enabled=True, scales=[1.0, 1.15]), speed=True)
    assert tta["role"] == "s+tta" and tta["tta_views"] == 4 and tta["nll"] != pytest.approx(row["nll"], abs=1e-6)
    assert sum(map(sum, tta["_confusion"])) == len(val) == 30
    assert tta["latency_ms_b1"] > 0 and tta["images_per_sec_b64"] > 0
    for key in ("model", "resolution", "params_m", "train_minutes", "kd", "temperature", "mix"):
        assert tta[key] == row[key], key


def test_compare_adds_a_tta_row_per_model(tiny_run, capsys):
    run, _ = tiny_run
    main([str(run), "--no-speed"])
    with open(run / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["role"], r["tta_views"]) for r in rows] == [("s", "1"), ("s+tta", "4")]
    assert "| s+tta |" in (run / "comparison.md").read_text()
    assert "tta: tiny/s: 30 val images x 4 views" in capsys.readouterr().out
    main([str(run), "--no-speed", "--no-tta"])
    assert (run / "comparison.csv").read_text().count("\n") == 2


def test_a_table_of_several_runs_never_replaces_a_runs_own(tiny_run, tmp_path, capsys):
    import shutil

    run, _ = tiny_run
    main([str(run), "--no-speed", "--no-tta"])  # one run: its own table, as `distill run` writes it
    own = (run / "comparison.md").read_text(), (run / "comparison.csv").read_text()
    other = tmp_path / "other"
    shutil.copytree(run, other)
    capsys.readouterr()
    main([str(run), str(other), "--no-speed", "--no-tta"])
    out = capsys.readouterr().out
    assert "| other |" in out and "not written" in out and "--out" in out
    assert ((run / "comparison.md").read_text(), (run / "comparison.csv").read_text()) == own
    main([str(run), str(other), "--no-speed", "--no-tta", "--out", str(tmp_path / "both")])
    with open(tmp_path / "both" / "comparison.csv", newline="") as f:
        assert [(r["run"], r["role"]) for r in csv.DictReader(f)] == [("tiny", "s"), ("other", "s")]
    assert (tmp_path / "both" / "tb" / "compare").is_dir()
    assert ((run / "comparison.md").read_text(), (run / "comparison.csv").read_text()) == own
