"""Entry: Optuna searches the distillation settings of one student over the run's existing store; the teacher
never runs again.

    distill sweep recipe.yaml [--trials N] [--student NAME] [key.path=value ...]

Each trial is a student of its own, students/<student>-trial-<n>/: the swept student with the trial's values of
`sweep.params` set as overrides of its keys (and checked as the recipe is), no FixRes stage, trained by
learn.train_student. Its value is the `sweep.metric` score of its best checkpoint (metrics.json). The study is
<run_dir>/sweep/<student>.db (Optuna's SQLite storage): a re-run continues it until N trials are COMPLETE, and
<run_dir>/sweep/<student>.json lists every trial and the best one.

A trial stopped by Ctrl-C, SIGTERM or a kill is never complete: Optuna records it FAIL (a kill leaves it RUNNING;
the next sweep fails it), and the next sweep first continues it in its own directory, from the state learn saved
(learn's --resume, so it ends as an uninterrupted trial would), as a new trial with the same values. A trial
whose training ends in an `error:` (a combination the recipe refuses, a non-finite loss) or runs out of GPU
memory is FAIL with the message, and the sweep goes on; it stops after MAX_FAILURES_IN_A_ROW of them in a row.
One sweep of a study runs at a time (a lock file beside the study).

Several processes (torchrun, accelerate launch): the main process alone talks to Optuna and broadcasts each
trial's values; every process trains the trial, as learn does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from distill import threads
from distill.errors import DistillError, Interrupted, exit_on_error
from distill.kd import check_kd, chosen_students, open_store, student_accelerator, student_fingerprint
from distill.learn import train_student
from distill.recipe import apply_override, load_recipe, recipe_from_dict, to_plain
from distill.recipe.sweep_space import sweep_space
from distill.runlock import one_writer
from distill.runs import stage_fingerprint, write_json
from distill.store.export import broadcast

MAX_FAILURES_IN_A_ROW = 5
MINIMISED = ("nll", "ece")  # the other scores are maximised


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill sweep", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file (its run directory holds the store)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sweep.params.kd.weight.high=0.8")
    p.add_argument("--trials", type=int, help="complete trials to reach, counting earlier runs (default: sweep.trials)")
    p.add_argument("--student", help="the student to sweep (default: sweep.student, else the first one with KD)")
    return p.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    threads.apply(recipe.threads)  # before any parallel work (distill/threads.py)
    with one_writer(recipe.run_dir):
        return sweep(recipe, args)


def sweep(recipe, args):
    base = swept_student(recipe, args.student)
    space = sweep_space(recipe.sweep.params)
    if not space:
        raise DistillError("sweep.params: nothing to sweep; give ranges, e.g. sweep.params: "
                           "{kd.temperature: {low: 1, high: 8, log: true}, kd.weight: {low: 0.1, high: 0.9}}")
    want = recipe.sweep.trials if args.trials is None else args.trials
    if want < 1:
        raise DistillError(f"--trials: expected an integer >= 1, got {want}")
    metric = recipe.sweep.metric or base.select_by
    index = recipe.students.index(base)
    accelerator = student_accelerator(recipe, [base])
    store, samples, val_split, classes = open_store(recipe, accelerator)  # checked before anything is written
    check_kd(recipe, [base], len(classes), store)
    sweep_dir = recipe.run_dir / "sweep"
    main_process = accelerator.is_main_process
    setup = stage_fingerprint(student_fingerprint(recipe, base, store.manifest["fingerprint"]), metric, space)

    with study_lock(sweep_dir / f"{base.name}.lock") if main_process else contextlib.nullcontext():
        study = open_study(recipe, base, metric, setup, sweep_dir) if main_process else None
        failures, last_error = 0, ""
        while True:
            trial, plan = None, None
            if main_process:
                trial, plan = next_trial(study, space, want, base.name, failures, last_error)
            plan = broadcast(plan, accelerator)
            if plan is None:
                break
            if "stop" in plan:
                raise DistillError(plan["stop"])
            where = recipe.run_dir / "students" / plan["dir"]
            accelerator.print(f"== sweep {base.name}: trial {plan['number']} -> {where}"
                              f"{' (continued from its saved state)' if plan['resume'] else ''}: "
                              + ", ".join(f"{k}={_fmt(v)}" for k, v in plan["params"].items()), flush=True)
            try:
                trial_cfg = trial_recipe(recipe, index, plan["dir"], plan["params"])
                cfg = trial_cfg.students[index]
                check_kd(trial_cfg, [cfg], len(classes), store)
                best = train_student(trial_cfg, cfg, index, store, samples, val_split, classes, accelerator,
                                     plan["resume"])
            except (Interrupted, KeyboardInterrupt) as e:
                if study is not None:
                    study.tell(trial, state=_states().FAIL)  # not an error: the next sweep continues it
                    write_json(sweep_dir / f"{base.name}.json", summary(study, base.name, metric, want, sweep_dir))
                if isinstance(e, Interrupted):
                    raise Interrupted(f"sweep {base.name}: trial {plan['number']}: "
                                      f"{str(e).split('; continue with')[0]}; `distill sweep` again continues it",
                                      e.exit_code) from None
                raise
            except (DistillError, torch.OutOfMemoryError) as e:
                failures, last_error = failures + 1, str(e).strip().splitlines()[-1]
                accelerator.print(f"warning: sweep {base.name}: trial {plan['number']} failed: {last_error}")
                accelerator.free_memory()
                if study is not None:
                    trial.set_user_attr("error", last_error)
                    study.tell(trial, state=_states().FAIL)
            except Exception as e:  # a bug: recorded (never continued), then its traceback
                if study is not None:
                    trial.set_user_attr("error", repr(e))
                    study.tell(trial, state=_states().FAIL)
                raise
            else:
                failures = 0
                if study is not None:
                    study.tell(trial, float(best[metric]))
            if study is not None:
                write_json(sweep_dir / f"{base.name}.json", summary(study, base.name, metric, want, sweep_dir))
        if study is not None:
            result = summary(study, base.name, metric, want, sweep_dir)
            write_json(sweep_dir / f"{base.name}.json", result)
            report(result, recipe.run_dir)
    accelerator.end_training()


def swept_student(recipe, name: str | None):
    """The student to sweep: --student, else sweep.student, else the first one that learns from the teacher."""
    name = name or recipe.sweep.student
    if name is None:
        kd = [s for s in recipe.students if s.kd.loss != "none"]
        if not kd:
            raise DistillError("sweep.student: the recipe has no student with a KD loss; name the one to sweep "
                               "(sweep.student or --student)")
        name = kd[0].name
    return chosen_students(recipe, [name])[0]  # checks the name and the model


def trial_recipe(recipe, index: int, name: str, params: dict):
    """The recipe with student `index` replaced by a trial: its name, the trial's values as overrides of the
    student's keys, no FixRes stage; checked as any recipe is (a refused combination is an `error:`)."""
    raw = to_plain(recipe)
    student = raw["students"][index]
    student.update(name=name, fixres=None)
    if raw.get("sweep", {}).get("student") is not None:
        raw["sweep"]["student"] = name  # the base student is gone from the trial's recipe
    for path, value in params.items():
        apply_override(student, f"{path}={json.dumps(value)}")  # JSON scalars are YAML too
    return recipe_from_dict(raw)


@contextlib.contextmanager
def study_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process ends, however it ends
        except BlockingIOError:
            raise DistillError(f"sweep: another `distill sweep` is running this study ({path}); wait for it "
                               "to end") from None
        yield


def open_study(recipe, base, metric: str, setup: str, sweep_dir: Path):
    """The study of this sweep, created or continued: a trial left running by a killed sweep is failed, and each
    interrupted trial not yet continued is queued again with its values and directory."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    states = _states()
    db = sweep_dir / f"{base.name}.db"
    seed = recipe.seed if recipe.sweep.seed is None else recipe.sweep.seed
    new, url = not db.is_file(), f"sqlite:///{db.resolve()}"
    study = optuna.create_study(storage=url, study_name=base.name, load_if_exists=True,
                                direction="minimize" if metric in MINIMISED else "maximize")
    if not new and study.user_attrs.get("setup") != setup:
        raise DistillError(f"sweep: {db} is a study of another setup (the student {base.name!r}, the data, the "
                           "store, sweep.metric or sweep.params changed); remove it and its trials "
                           f"(students/{base.name}-trial-*) to start over, or restore the recipe")
    study.set_user_attr("setup", setup)
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)  # the lock says no sweep runs it: its process was killed
    trials = study.get_trials(deepcopy=False)
    continued = {t.user_attrs.get("continues") for t in trials}
    for t in trials:
        if t.state == states.FAIL and "error" not in t.user_attrs and t.number not in continued:
            attrs = {"continues": t.number, **({"dir": t.user_attrs["dir"]} if "dir" in t.user_attrs else {})}
            study.enqueue_trial(t.params, user_attrs=attrs)
    # seeded by the trials so far too: a continued sweep draws new values (the same seed would repeat the first)
    sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    return optuna.load_study(study_name=base.name, storage=url, sampler=sampler)


def next_trial(study, space: dict, want: int, student: str, failures: int, last_error: str):
    """(trial, plan) of the next trial to train (queued ones first), (None, None) once `want` trials are complete,
    or (None, {"stop": message}) after too many failures in a row."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    complete = len(study.get_trials(deepcopy=False, states=(_states().COMPLETE,)))
    if complete >= want:
        return None, None
    if failures >= MAX_FAILURES_IN_A_ROW:
        return None, {"stop": f"sweep {student}: {failures} trials failed in a row, the last with: {last_error}"}
    distributions = {
        path: CategoricalDistribution(r["choices"]) if "choices" in r else
        (IntDistribution if r["int"] else FloatDistribution)(r["low"], r["high"], log=r["log"], step=r["step"])
        for path, r in space.items()}
    trial = study.ask(distributions)
    directory = trial.user_attrs.get("dir") or f"{student}-trial-{trial.number}"
    trial.set_user_attr("dir", directory)
    return trial, {"number": trial.number, "params": trial.params, "dir": directory,
                   "resume": "continues" in trial.user_attrs}


def summary(study, student: str, metric: str, want: int, sweep_dir: Path) -> dict:
    """sweep/<student>.json: every trial (the directory of complete ones only) and the best complete one."""
    states = _states()
    trials = []
    for t in study.get_trials(deepcopy=False):
        done = t.state == states.COMPLETE
        entry = {"number": t.number, "params": t.params, "value": t.value if done else None, "state": t.state.name,
                 "dir": t.user_attrs.get("dir") if done else None}
        if "continues" in t.user_attrs:
            entry["continues"] = t.user_attrs["continues"]
        if t.state == states.FAIL:
            entry["error"] = t.user_attrs.get("error", "interrupted")
        trials.append(entry)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    sign = -1 if metric in MINIMISED else 1
    best = max(done, key=lambda t: (sign * t["value"], -t["number"])) if done else None  # ties: the first
    return {"student": student, "metric": metric, "direction": "minimize" if sign < 0 else "maximize",
            "trials_requested": want, "complete": len(done), "study": str(sweep_dir / f"{student}.db"),
            "best": best, "trials": trials}


def report(result: dict, run_dir: Path) -> None:
    lines = [f"sweep {result['student']}: {result['complete']} complete trials, {result['metric']} "
             + f"({result['direction']}d)"]
    for t in result["trials"]:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items())
        note = f"  ({t['error']})" if t["state"] == "FAIL" else ""
        lines.append(f"  {t['number']:>4} {t['state']:<8} {value:>8}  {params}{note}")
    best = result["best"]
    if best is not None:
        lines.append(f"best of {result['complete']}: trial {best['number']}, {result['metric']} {best['value']:.4f}: "
                     f"{run_dir / 'students' / best['dir']} (its recipe: config.yaml there)")
    print("\n".join(lines))
    print(f"written: {run_dir / 'sweep' / (result['student'] + '.json')}")


def _states():
    from optuna.trial import TrialState

    return TrialState


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    exit_on_error(main)()  # `distill sweep` wraps it in cli.main
