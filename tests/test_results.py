"""A stage's folder is complete or visibly incomplete (distill/results.py): a retrain sets the old result aside
in previous/ and marks the folder INCOMPLETE until its metrics.json; compare, predict, explain and audit never
report a result whose weights are not on disk."""
import json
import shutil

import pytest
import torch

from distill import results
from distill.errors import DistillError
from distill.record import write_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

CLASSES = ["a", "b", "c"]
SCORES = {"top1": 0.5, "top5": 1.0, "macro_f1": 0.4, "nll": 1.0, "ece": 0.1, "eval_images_per_sec": 10.0}


def finished_stage(folder, seed=0, fingerprint="fp-old"):
    """A folder as a stage leaves it: a model (random resnet10t), its metrics.json, and a FixRes result."""
    from distill.models import build_model, save_model
    from distill.recipe import StudentConfig

    torch.manual_seed(seed)
    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=16), len(CLASSES),
                             where="students.0", classes=CLASSES)
    save_model(model, pre, folder, CLASSES)
    record = write_metrics(folder / "metrics.json", SCORES, params=1, train_images_per_sec=1.0, epochs=1, seed=seed,
                           wall_seconds=1.0, classes=CLASSES, fingerprint=fingerprint)
    return model, pre, record


def test_metrics_record_the_weights_they_describe(tmp_path):
    _, _, record = finished_stage(tmp_path / "s")
    info = json.loads((tmp_path / "s" / "model.json").read_text())
    assert record["weights_sha256"] == info["sha256"] and results.problem(tmp_path / "s") is None


def test_a_retrain_sets_the_old_result_aside_and_marks_the_folder(tmp_path):
    folder = tmp_path / "s"
    finished_stage(folder)
    finished_stage(folder / "fixres", fingerprint="fp-fixres")  # trained from the old weights: it goes too
    (folder / "config.yaml").write_text("name: x\n")
    old = (folder / "metrics.json").read_text()
    results.begin(folder, "fp-new")
    assert (folder / "previous" / "metrics.json").read_text() == old
    assert (folder / "previous" / "fixres" / "metrics.json").is_file()
    assert (folder / "previous" / "model.safetensors").is_file() and results.problem(folder / "previous") is None
    assert not (folder / "metrics.json").exists() and not (folder / "fixres").exists()
    assert (folder / "config.yaml").is_file()  # not a result: the new attempt rewrites it
    why = results.problem(folder)
    assert "incomplete" in why and "fp-new" not in why and str(folder / "previous") in why
    with pytest.raises(DistillError, match="incomplete"):
        results.check(folder)
    # the new attempt is interrupted and started over (no --resume): its leftovers go, previous/ stays
    finished_stage(folder, seed=1, fingerprint="fp-new")
    (folder / "metrics.json").unlink()
    (folder / results.MARKER).write_text("{}")
    results.begin(folder, "fp-newer")
    assert not (folder / "model.safetensors").exists()
    assert (folder / "previous" / "metrics.json").read_text() == old
    # it completes: the marker goes with its metrics.json
    finished_stage(folder, seed=2, fingerprint="fp-newer")
    assert not (folder / results.MARKER).exists() and results.problem(folder) is None


def test_a_resumed_stage_drops_the_metrics_of_another_recipe(tmp_path):
    folder = tmp_path / "s"
    finished_stage(folder, fingerprint="fp-old")
    results.resumed(folder, "fp-new")
    assert not (folder / "metrics.json").exists() and (folder / results.MARKER).is_file()
    finished_stage(tmp_path / "t", fingerprint="fp")
    results.resumed(tmp_path / "t", "fp")  # killed between its metrics.json and clearing its state: complete
    assert results.problem(tmp_path / "t") is None


def test_weights_that_are_not_the_ones_the_metrics_describe(tmp_path):
    folder = tmp_path / "s"
    finished_stage(folder, seed=0)
    metrics = (folder / "metrics.json").read_text()
    finished_stage(folder, seed=1)  # new weights...
    (folder / "metrics.json").write_text(metrics)  # ...under the old metrics (an older distill, a hand copy)
    assert "describes other weights" in results.problem(folder)


def test_an_older_run_interrupted_beside_its_old_result(tmp_path):
    """Written before the marker existed: the old metrics.json beside a saved state of another training."""
    folder = tmp_path / "s"
    finished_stage(folder, fingerprint="fp-old")
    (folder / "resume" / "state").mkdir(parents=True)
    (folder / "resume" / "state" / "progress.json").write_text(json.dumps({"fingerprint": "fp-new"}))
    assert "earlier training" in results.problem(folder)


def test_compare_predict_and_explain_leave_out_an_incomplete_folder(tmp_path, capsys):
    from distill.compare import find_models
    from distill.predict import load_model_dir

    run = tmp_path / "run"
    for name in ("done", "retrained"):
        finished_stage(run / "students" / name)
    results.begin(run / "students" / "retrained", "fp-new")
    finished_stage(run / "students" / "retrained", seed=3)  # its best checkpoint so far, no metrics.json yet
    (run / "students" / "retrained" / "metrics.json").unlink()
    (run / "students" / "retrained" / results.MARKER).write_text(json.dumps(
        {"since": "2026-11-29T10:00:00+00:00", "pid": 1, "command": "distill learn r.yaml"}))
    assert find_models(run) == [("done", run / "students" / "done")]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: retrained left out:" in err and "since 2026-11-29T10:00:00" in err
    with pytest.raises(DistillError, match="incomplete.*previous"):
        load_model_dir(run / "students" / "retrained")
    load_model_dir(run / "students" / "retrained" / "previous")  # the last complete result stays usable
    from distill.explain import load_for_cam
    with pytest.raises(DistillError, match="incomplete"):
        load_for_cam("retrained", run / "students" / "retrained", CLASSES)


def test_a_folder_written_elsewhere_is_not_a_stage(tmp_path):
    finished_stage(tmp_path / "m")
    (tmp_path / "m" / "metrics.json").unlink()  # a model folder without metrics (pushed, downloaded)
    assert results.problem(tmp_path / "m") is None
    shutil.rmtree(tmp_path / "m")
    assert results.problem(tmp_path / "m") is None


def test_a_new_setting_at_its_default_keeps_complete_stages_complete():
    """A stage's fingerprint counts the recipe's values that differ from the defaults: a version of distill that
    adds a setting (at a default that keeps results as they were) does not turn complete runs stale."""
    import dataclasses

    from distill.recipe import DataConfig, recipe_from_dict
    from distill.runs import stage_fingerprint

    recipe = recipe_from_dict({"name": "x", "data": {"source": "digits", "subset": 100},
                               "teacher": {"model": "timm:resnet10t", "epochs": 2}})
    fp = stage_fingerprint(recipe.seed, recipe.data, recipe.teacher)
    # the same data section as a DataConfig of an older version, which lacked later fields: only set ones count
    assert stage_fingerprint(recipe.seed, DataConfig(source="digits", subset=100), recipe.teacher) == fp
    assert stage_fingerprint(recipe.seed, dataclasses.replace(recipe.data, num_workers=4), recipe.teacher) == fp
    for changed in (dataclasses.replace(recipe.data, subset=50), dataclasses.replace(recipe.data, split_seed=1)):
        assert stage_fingerprint(recipe.seed, changed, recipe.teacher) != fp
    nested = dataclasses.replace(recipe.teacher, optim=dataclasses.replace(recipe.teacher.optim, lr=0.5))
    assert stage_fingerprint(recipe.seed, recipe.data, nested) != fp
    assert stage_fingerprint(1, recipe.data, recipe.teacher) != fp


def test_where_the_students_decode_is_not_the_teachers_business():
    from distill.recipe import recipe_from_dict
    from distill.teach import teacher_fingerprint

    raw = {"name": "x", "data": {"source": "imagefolder", "root": "/photos"}, "teacher": {"model": "timm:resnet10t"}}
    device = recipe_from_dict({**raw, "data": {**raw["data"], "decode": "device"}})
    assert teacher_fingerprint(device) == teacher_fingerprint(recipe_from_dict(raw))
    cached = recipe_from_dict({**raw, "data": {**raw["data"], "cache": 256}})
    assert teacher_fingerprint(cached) != teacher_fingerprint(recipe_from_dict(raw))
