"""distill sweep: the `sweep:` ranges checked at load (no training), then Optuna trials over one tiny store: trial
directories, the resumable SQLite study, a killed trial continued, failures recorded, the store untouched,
compare's `sweep` column."""
import csv
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from distill.errors import DistillError, Interrupted
from distill.recipe import load_recipe, recipe_from_dict
from distill.recipe.sweep_space import sweep_space

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STUDENT = {"name": "kd", "model": "timm:resnet10t", "resolution": 32, "epochs": 1, "batch_size": 32,
           "optim": {"name": "sgd", "lr": 0.05}, "kd": {"loss": "kl", "temperature": 4.0, "weight": 0.5}}
PARAMS = {"kd.temperature": {"low": 1, "high": 8, "log": True}, "kd.weight": {"low": 0.1, "high": 0.9}}


def recipe_with(sweep: dict) -> dict:
    return {"name": "t", "teacher": {"model": "timm:resnet10t"}, "students": [STUDENT], "sweep": sweep}


def error_of(sweep: dict) -> str:
    with pytest.raises(DistillError) as e:
        recipe_from_dict(recipe_with(sweep))
    return str(e.value)


# --- the ranges, checked at load ---------------------------------------------------
def test_ranges_are_typed_by_the_students_fields(tmp_path):
    space = sweep_space({**PARAMS, "kd.loss": {"choices": ["kl", "dist", "dkd"]}, "epochs": {"low": 1, "high": 3},
                         "optim.lr": {"low": 0.01, "high": 0.3, "log": True}, "mix.cutmix_alpha": {"low": 0, "high": 1,
                                                                                                   "step": 0.25},
                         "kd.standardize": {"choices": [True, False]}})
    assert space["kd.temperature"] == {"low": 1.0, "high": 8.0, "log": True, "step": None, "int": False}
    assert space["epochs"]["int"] and space["epochs"]["low"] == 1
    assert space["kd.loss"] == {"choices": ["kl", "dist", "dkd"]} and space["mix.cutmix_alpha"]["step"] == 0.25
    # an override writes a nested path; it is merged into the file's dotted one
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_with({"params": PARAMS})))
    r = load_recipe(path, ["sweep.params.kd.weight.high=0.8"])
    assert sweep_space(r.sweep.params)["kd.weight"] == {"low": 0.1, "high": 0.8, "log": False, "step": None,
                                                        "int": False}
    assert recipe_from_dict(recipe_with({})).sweep.params == {}  # no sweep: section, nothing checked


@pytest.mark.parametrize("params, message", [
    ({"kd.weight": {"low": 0.9, "high": 0.1}}, "sweep.params.kd.weight: empty range, low 0.9 > high 0.1"),
    ({"kd.loss": {"low": 0, "high": 1}}, "sweep.params.kd.loss: kd.loss is not a number field"),
    ({"kd.loss": {"choices": ["kl", "nope"]}}, "sweep.params.kd.loss.choices.1: expected one of 'none', 'kl'"),
    ({"kd.targets": {"choices": ["cached", "x"]}}, "sweep.params.kd.targets.choices.1: expected one of 'cached'"),
    ({"kd.temprature": {"low": 1, "high": 2}}, "sweep.params.kd.temprature: unknown key 'kd.temprature'"),
    ({"kd.weight": {"low": 0, "high": 1.5}}, "sweep.params.kd.weight.high: expected a number in [0, 1], got 1.5"),
    ({"epochs": {"low": 1.5, "high": 3}}, "sweep.params.epochs.low: expected an integer"),
    ({"kd.standardize": {"low": 0, "high": 1}}, "sweep.params.kd.standardize: kd.standardize is not a number"),
    ({"optim.lr": {"low": 0.0, "high": 1, "log": True}}, "sweep.params.optim.lr.low: expected a positive number"),
    ({"kd.temperature": {"low": 1, "high": 8, "lg": True}}, "sweep.params.kd.temperature: unknown key 'lg'"),
    ({"kd.weight": {"low": 0.1}}, "sweep.params.kd.weight.high: missing"),
    ({"kd.weight": 0.5}, "sweep.params.kd.weight: expected {low, high"),
    ({"kd": {"choices": ["kl"]}}, "sweep.params.kd: kd is a section"),
    ({"fixres.epochs": {"low": 1, "high": 2}}, "sweep.params.fixres.epochs: fixres cannot be swept"),
    ({"name": {"choices": ["a", "b"]}}, "sweep.params.name: name cannot be swept"),
])
def test_bad_ranges_are_one_error_naming_the_key(params, message):
    assert error_of({"params": params}).startswith(message)


def test_bad_sweep_keys():
    assert error_of({"student": "nope"}).startswith("sweep.student: no student 'nope' in the recipe (its students: kd)")
    assert error_of({"trials": 0}).startswith("sweep.trials: expected an integer in [1, ")
    assert error_of({"metric": "accuracy"}).startswith("sweep.metric: expected one of 'top1'")


def test_a_bad_range_stops_distill_sweep_before_anything_runs(tmp_path):
    raw = {**recipe_with({"params": {"kd.weight": {"low": 0.9, "high": 0.1}}}), "output_dir": str(tmp_path / "runs")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run(["distill", "sweep", str(tmp_path / "r.yaml")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == \
        ["error: sweep.params.kd.weight: empty range, low 0.9 > high 0.1"]
    assert not (tmp_path / "runs").exists()


# --- trials over a tiny store ----------------------------------------------------------
def run(*args, env=None):
    return subprocess.run(["distill", *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=900, check=False)


def files_of(d: Path) -> dict:
    """sha256 and mtime of every file under d."""
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def trials_of(run_dir: Path, student="kd") -> list:
    import optuna
    study = optuna.load_study(study_name=student, storage=f"sqlite:///{run_dir / 'sweep' / f'{student}.db'}")
    return study.get_trials(deepcopy=False)


def states(run_dir: Path, student="kd") -> list[str]:
    return [t.state.name for t in trials_of(run_dir, student)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-timm on 200 images per split, teacher 1 epoch, 2 views, one student `kd` (1 epoch at 32 px), taught
    and learnt once; then the teacher's and the store's files."""
    out = tmp_path_factory.mktemp("sweep")
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    raw["name"] = "tiny"
    raw["data"]["subset"] = 200
    raw["teacher"]["epochs"] = 1
    raw["targets"] = {"views": 2}
    raw["log"] = {"progress": False}
    raw["students"] = [STUDENT]
    raw["sweep"] = {"params": PARAMS}
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    for stage in ("teach", "learn"):
        r = run(stage, str(path), f"output_dir={out}")
        assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "tiny"
    return path, run_dir, {part: files_of(run_dir / part) for part in ("teacher", "targets")}


@pytest.fixture(scope="module")
def swept(tiny):
    """`distill sweep --trials 3`, then again with --trials 4: the output of each."""
    path, run_dir, _ = tiny
    first = run("sweep", str(path), f"output_dir={path.parent}", "--trials", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((run_dir / "sweep" / "kd.json").read_text())
    second = run("sweep", str(path), f"output_dir={path.parent}", "--trials", "4")
    assert second.returncode == 0, second.stderr[-3000:]
    return result, second.stdout


@pytest.mark.slow
def test_three_trials_are_students_and_the_study_is_complete(tiny, swept):
    _, run_dir, _ = tiny
    first, _ = swept
    assert [t["state"] for t in first["trials"]] == ["COMPLETE"] * 3 and first["complete"] == 3
    values = {}
    for t in first["trials"]:
        assert t["dir"] == f"kd-trial-{t['number']}" and set(t["params"]) == set(PARAMS)
        m = json.loads((run_dir / "students" / t["dir"] / "metrics.json").read_text())
        assert m["top1"] == t["value"] and m["student"] == t["dir"]
        # the trial is the base student with the trial's values, and no other change
        assert m["temperature"] == pytest.approx(t["params"]["kd.temperature"])
        assert m["kd_weight"] == pytest.approx(t["params"]["kd.weight"])
        config = load_recipe(run_dir / "students" / t["dir"] / "config.yaml")
        assert config.students[0].name == t["dir"] and config.students[0].epochs == 1
        values[t["number"]] = t["value"]
    best = max(values, key=lambda n: (values[n], -n))
    assert first["best"]["number"] == best and first["metric"] == "top1" and first["direction"] == "maximize"
    assert len({tuple(t["params"].values()) for t in first["trials"]}) == 3  # three different draws


@pytest.mark.slow
def test_a_rerun_adds_exactly_the_missing_trials_and_leaves_the_store(tiny, swept):
    _, run_dir, before = tiny
    _, log = swept
    assert states(run_dir) == ["COMPLETE"] * 4
    assert log.count("== sweep kd: trial") == 1 and "trial 3 -> " in log
    result = json.loads((run_dir / "sweep" / "kd.json").read_text())
    assert result["complete"] == 4 and result["trials"][3]["dir"] == "kd-trial-3"
    assert "best of 4" in log
    # draws after a re-run are new ones (the sampler's seed counts the trials so far)
    assert len({tuple(t["params"].values()) for t in result["trials"]}) == 4
    for part in ("teacher", "targets"):
        assert files_of(run_dir / part) == before[part], part


@pytest.mark.slow
def test_compare_marks_the_best_trial(tiny, swept):
    _, run_dir, _ = tiny
    r = run("compare", str(run_dir), "--no-speed")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["role"]: row for row in csv.DictReader((run_dir / "comparison.csv").open())}
    result = json.loads((run_dir / "sweep" / "kd.json").read_text())
    best = result["best"]["dir"]
    assert rows[best]["sweep"] == f"best of {result['complete']}"
    for t in result["trials"]:
        if t["dir"] != best:
            assert rows[t["dir"]]["sweep"] == f"trial {t['number']}"
    assert rows["kd"]["sweep"] == "" and rows["teacher"]["sweep"] == ""


@pytest.mark.slow
def test_a_killed_trial_is_never_complete_and_the_next_sweep_continues_it(tiny, swept):
    path, run_dir, _ = tiny
    common = [str(path), f"output_dir={path.parent}", "checkpoint.every_steps=1"]
    killed = run("sweep", *common, "--trials", "5", env={"DISTILL_STOP_AT": "students.0:3:SIGKILL"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert states(run_dir) == ["COMPLETE"] * 4 + ["RUNNING"]
    assert not (run_dir / "students" / "kd-trial-4" / "metrics.json").exists()
    assert (run_dir / "students" / "kd-trial-4" / "resume" / "state" / "progress.json").is_file()
    interrupted = trials_of(run_dir)[4].params

    again = run("sweep", *common, "--trials", "5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 5 -> " in again.stdout and "kd-trial-4 (continued from its saved state)" in again.stdout
    assert "resumed from" in again.stdout + again.stderr  # learn's own --resume
    trials = trials_of(run_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL", "COMPLETE"]
    assert trials[5].params == interrupted and trials[5].user_attrs["continues"] == 4
    result = json.loads((run_dir / "sweep" / "kd.json").read_text())
    assert result["trials"][4]["dir"] is None and result["trials"][4]["error"] == "interrupted"
    assert result["trials"][5]["dir"] == "kd-trial-4" and result["complete"] == 5
    m = json.loads((run_dir / "students" / "kd-trial-4" / "metrics.json").read_text())
    assert m["top1"] == result["trials"][5]["value"]
    assert not (run_dir / "students" / "kd-trial-5").exists()


# --- the loop's bookkeeping, with a stand-in for training (the tiny store, no training) -------------------------
class Fake:
    """sweep.main on the tiny run as student `name` (its own study), training replaced: a trial's top1 is its
    kd.weight, or `error(cfg)` is raised when that gives one; the calls are recorded."""

    def __init__(self, tiny, name, monkeypatch):
        from distill import sweep

        self.path, self.name, self.calls, self.error = tiny[0], name, [], lambda cfg: None
        self.sweep_dir = tiny[1] / "sweep"
        monkeypatch.setattr(sweep, "train_student", self.train)
        self.sweep = sweep

    def train(self, recipe, cfg, index, store, samples, val_split, classes, accelerator, resume=False):
        self.calls.append((cfg.name, cfg.kd.weight, resume))
        if self.error(cfg) is not None:
            raise self.error(cfg)
        return {"top1": cfg.kd.weight}

    def __call__(self, *args):
        return self.sweep.main([str(self.path), f"output_dir={self.path.parent}", f"students.kd.name={self.name}",
                                *args])

    def result(self):
        return json.loads((self.sweep_dir / f"{self.name}.json").read_text())


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tiny, monkeypatch):
    fake = Fake(tiny, "failing", monkeypatch)
    fake.error = lambda cfg: DistillError("students.0.kd: a refused combination") if len(fake.calls) == 2 else None
    fake("--trials", "3")
    result = fake.result()
    assert [t["state"] for t in result["trials"]] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert result["complete"] == 3 and len(fake.calls) == 4
    failed = result["trials"][1]
    assert failed["error"] == "students.0.kd: a refused combination" and failed["dir"] is None
    assert result["best"]["value"] == max(t["value"] for t in result["trials"] if t["value"] is not None)

    fake.error = lambda cfg: DistillError("students.0: always")
    with pytest.raises(DistillError, match="5 trials failed in a row, the last with: students.0: always"):
        fake("--trials", "4")
    # a changed setup is refused: its trials would not be comparable with the study's
    with pytest.raises(DistillError, match="is a study of another setup"):
        fake("--trials", "4", "sweep.params.kd.weight.high=0.8")


@pytest.mark.slow
def test_an_interrupted_trial_is_continued_with_its_values_in_its_directory(tiny, monkeypatch):
    fake = Fake(tiny, "stopped", monkeypatch)
    fake.error = lambda cfg: Interrupted("students.0: SIGTERM at step 2 (epoch 1): the state is saved in x; "
                                         "continue with --resume", 143)
    with pytest.raises(Interrupted, match=r"sweep stopped: trial 0: students.0: SIGTERM at step 2 \(epoch 1\): "
                                          r"the state is saved in x; `distill sweep` again continues it") as e:
        fake("--trials", "2")
    assert e.value.exit_code == 143
    fake.error = lambda cfg: None
    fake("--trials", "2")
    first, continued, new = fake.calls
    assert continued == (first[0], first[1], True) and first == ("stopped-trial-0", first[1], False)
    assert new[0] == "stopped-trial-2" and new[2] is False
    assert states(tiny[1], "stopped") == ["FAIL", "COMPLETE", "COMPLETE"]
    assert fake.result()["trials"][1]["dir"] == "stopped-trial-0"


def test_sweep_needs_ranges_and_a_kd_student(tmp_path):
    from distill import sweep
    raw = recipe_with({})
    raw["students"] = [{**STUDENT, "kd": "none"}]
    with pytest.raises(DistillError, match="sweep.student: the recipe has no student with a KD loss"):
        sweep.swept_student(recipe_from_dict(raw), None)
    assert sweep.swept_student(recipe_from_dict(raw), "kd").name == "kd"
    with pytest.raises(DistillError, match="--student: no student 'x'"):
        sweep.swept_student(recipe_from_dict(raw), "x")


def test_a_trial_recipe_of_a_named_sweep_student_is_valid():
    """With `sweep.student` named in the recipe (the quickstart's), the trial's recipe replaces that student and
    still loads: its sweep section names the trial."""
    from distill.sweep import trial_recipe
    recipe = recipe_from_dict(recipe_with({"student": "kd", "params": PARAMS}))
    trial = trial_recipe(recipe, 0, "kd-trial-0", {"kd.temperature": 2.0, "kd.weight": 0.3})
    assert [s.name for s in trial.students] == ["kd-trial-0"] and trial.students[0].kd.temperature == 2.0
    assert trial.students[0].fixres is None and trial.sweep.student == "kd-trial-0"
    # the quickstart's own sweep section, as `distill sweep recipes/quickstart.yaml` reads it
    qs = load_recipe("recipes/quickstart.yaml")
    index = [s.name for s in qs.students].index(qs.sweep.student)
    assert trial_recipe(qs, index, "kd-trial-0", {"kd.loss": "dist"}).students[index].kd.loss == "dist"
