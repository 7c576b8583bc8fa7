"""log.trackers: accelerate's trackers beyond TensorBoard, on real local back ends (W&B offline, MLflow's SQLite
store under the run directory), read back with their own readers (`wandb leet inspect`, MlflowClient): the same
scalars, hparams and comparison table."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill import cli, trackers
from distill.errors import DistillError
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-timm.yaml"
# local-first defaults under test: no tracking server or W&B directory of the caller's
ENV = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR",
                                                            "DISTILL_STOP_AT")},
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_trackers_default_to_tensorboard_and_log_tensorboard_false_removes_it():
    assert trackers.selected(load_recipe(RECIPE)) == ["tensorboard"]
    assert trackers.selected(load_recipe(RECIPE, ["log.tensorboard=false"])) == []
    both = ["log.trackers=[tensorboard, mlflow]"]
    assert trackers.selected(load_recipe(RECIPE, both)) == ["tensorboard", "mlflow"]
    assert trackers.selected(load_recipe(RECIPE, [*both, "log.tensorboard=false"])) == ["mlflow"]


def test_an_unknown_tracker_is_one_error_naming_the_choices():
    with pytest.raises(DistillError) as e:
        load_recipe(RECIPE, ["log.trackers=[tensorboard, wandbb]"])
    message = str(e.value)
    assert message.startswith("log.trackers.1: unknown tracker 'wandbb'; expected one of ")
    assert all(name in message for name in ("mlflow", "tensorboard", "wandb", "trackio", "aim"))
    assert "\n" not in message


def test_a_missing_tracker_package_is_one_error_before_anything_is_written(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        cli.main(["teach", str(RECIPE), f"output_dir={tmp_path}", "log.trackers=[tensorboard, wandb]"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("error: log.trackers: wandb is not installed; pip install wandb (or pip install 'distill[track]'), "
                    "or leave it out of log.trackers")], err
    assert not any(tmp_path.iterdir())  # nothing written


def wandb_runs(run_dir: Path) -> dict:
    """{run name: {project, config, summary, history: {key: [values]}, exited, files}} of the offline W&B runs
    under run_dir/wandb, from each run's transaction log as wandb's own reader prints it (`wandb leet inspect`;
    nested keys come dotted: `comparison.path`)."""
    runs = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)], env=ENV,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        run = {"config": {}, "summary": {}, "history": {}, "exited": False, "files": folder / "files"}
        for record in map(json.loads, out.splitlines()):
            kind, body = record["type"], record.get(record["type"], {})
            if kind == "run":
                run.update(name=body["display_name"], project=body["project"])
            elif kind in ("config", "summary"):
                run[kind].update(body.get("update", {}))
            elif kind == "history":
                for key, value in body["item"].items():
                    run["history"].setdefault(key, []).append(value)
            elif kind == "exit":
                run["exited"] = True
        runs[run["name"]] = run
    return runs


def tensorboard_scalars(run: Path) -> dict:
    """{tag: [(step, value), ...]} of a TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_every_tracker_gets_the_scalars_hparams_and_comparison(tmp_path):
    """`distill run` of a one-epoch teacher and KD student on 300 images with tensorboard, wandb and mlflow; each
    back end read back: project = recipe, run = stage, TensorBoard's scalars, the hparams, the comparison."""
    import mlflow

    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"]["subset"] = 300
    raw["teacher"]["epochs"] = 1
    raw["targets"] = {"views": 1}
    raw["students"] = [{"name": "kd", "model": "timm:resnet10t", "resolution": 24, "epochs": 1, "batch_size": 64}]
    raw["log"] = {"trackers": ["tensorboard", "wandb", "mlflow"], "every_steps": 1, "progress": False}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path), f"output_dir={tmp_path / 'runs'}"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny-timm"
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlruns").exists()  # all under the run dir
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-timm")
    assert Path(experiment.artifact_location.removeprefix("file://")) == (run_dir / "mlruns").resolve()
    mlflow_runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(mlflow_runs) == {"teacher", "kd", "compare"}

    wandb = wandb_runs(run_dir)
    assert set(wandb) == {"teacher", "kd", "compare"}
    for stage, model_dir, model_key in (("teacher", "teacher", "teacher.model"), ("kd", "students/kd", "student.model")):
        top1 = json.loads((run_dir / model_dir / "metrics.json").read_text())["top1"]
        tb = tensorboard_scalars(run_dir / "tb" / stage)  # TensorBoard as before: what the others must match
        assert {"train/loss", "val/top1", "hparam/top1"} <= set(tb) and len(tb["train/loss"]) > 2

        # W&B: the offline run's transaction log, read by wandb itself
        wb = wandb[stage]
        assert wb["project"] == "tiny-timm" and wb["exited"]
        for tag in ("train/loss", "train/lr", "val/top1"):
            assert wb["history"][tag] == pytest.approx([v for _, v in tb[tag]], rel=1e-6), (stage, tag)
        assert wb["history"]["hparam/top1"] == [pytest.approx(top1)]
        assert wb["summary"]["hparam/top1"] == pytest.approx(top1)
        assert wb["config"]["name"] == "tiny-timm" and wb["config"]["seed"] == 0
        assert wb["config"][model_key] == "timm:resnet10t"

        # MLflow: the SQLite store under the run directory
        run = mlflow_runs[stage]
        for tag in ("train/loss", "train/lr", "val/top1"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
            assert [s for s, _ in history] == [s for s, _ in tb[tag]], (stage, tag)
            assert [v for _, v in history] == pytest.approx([v for _, v in tb[tag]], rel=1e-6), (stage, tag)
        assert run.data.metrics["hparam/top1"] == pytest.approx(top1)
        assert run.data.params["name"] == "tiny-timm"
        assert {k: v for k, v in run.data.params.items() if k.endswith(".model")} == {model_key: "timm:resnet10t"}

    # the comparison table: a wandb.Table with the plot, MLflow's table, text and plot
    rows = {r["role"]: r for r in csv.DictReader((run_dir / "comparison.csv").open())}
    wb = wandb["compare"]
    assert wb["summary"]["comparison._type"] == "table-file" and wb["summary"]["accuracy_vs_latency._type"] == "image-file"
    table = json.loads((wb["files"] / wb["summary"]["comparison.path"]).read_text())
    assert [dict(zip(table["columns"], row))["top1"] for row in table["data"]] == \
        pytest.approx([float(rows[role]["top1"]) for role in ("teacher", "kd")])
    run_id = mlflow_runs["compare"].info.run_id
    assert {"comparison.json", "comparison.md", "accuracy_vs_latency.png"} <= \
        {a.path for a in client.list_artifacts(run_id)}
    md = Path(client.download_artifacts(run_id, "comparison.md", str(tmp_path)))
    assert md.read_text() == (run_dir / "comparison.md").read_text()
