"""The `distill` console command: run / teach / learn / compare / inspect on one recipe or run."""
from __future__ import annotations

import argparse
import sys

from distill.errors import DistillError, exit_on_error, stage

COMMANDS = {
    "run": "every stage of a recipe in order, skipping complete ones and resuming interrupted ones: "
           "distill run recipe.yaml [overrides] [--from teach|learn]",
    "teach": "fine-tune the teacher and export its soft targets: distill teach recipe.yaml [overrides] "
             "[--resume] [--export-only] [--rebuild-targets]",
    "learn": "train the students on the soft targets (then their FixRes stages): distill learn recipe.yaml "
             "[overrides] [--student NAME] [--resume]",
    "fixres": "only the FixRes stages of trained students: distill fixres recipe.yaml [overrides] [--student NAME] "
              "[--resume]",
    "sweep": "Optuna searches one student's distillation settings over the existing store (sweep: in the recipe): "
             "distill sweep recipe.yaml [--trials N] [--student NAME] [overrides]",
    "compare": "one table of the teacher and every student: distill compare runs/<name> [more run dirs]",
    "inspect": "summarise a soft-target store: distill inspect runs/<name>/targets",
    "predict": "predictions of a saved model for images, as CSV: distill predict <model dir> <images> --out preds.csv "
               "[--tta]",
    "diff": "where two prediction CSVs disagree, and how often: distill diff a.csv b.csv",
    "audit": "training images whose label the teacher confidently contradicts: distill audit runs/<name>",
    "explain": "Grad-CAM of the teacher and a student on validation images, to TensorBoard: distill explain "
               "runs/<name>",
    "push": "upload a saved model folder to the Hugging Face Hub: distill push <model dir> <repo id> [--private]",
    "deploy": "a saved model as an ONNX graph taking images, checked against PyTorch and timed on CPU: distill "
              "deploy <model dir> [--format onnx] [--out DIR] [--input uint8|float] [--images DIR]",
}
# commands without a recipe that compute (torch threads); the recipe ones apply the recipe's `threads`
THREADED_COMMANDS = ("compare", "inspect", "predict", "audit", "explain", "deploy")
# commands whose whole work is one module's main(argv)
MODULE_COMMANDS = {"teach": "distill.teach", "learn": "distill.learn", "fixres": "distill.fixres",
                   "compare": "distill.compare", "predict": "distill.predict", "diff": "distill.diff:diff_main",
                   "audit": "distill.audit", "explain": "distill.explain", "sweep": "distill.sweep",
                   "push": "distill.push", "deploy": "distill.deploy"}


@exit_on_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = f"usage: distill {{{','.join(COMMANDS)}}} ...\n\n" + "\n".join(f"  {k:8} {v}" for k, v in COMMANDS.items())
        usage += ("\n\nEvery command takes --threads N: CPU threads per process (default: the recipe's `threads`, "
                  "auto)\nMulti-process or GPU: accelerate launch distill/teach.py recipe.yaml")
        if argv and argv[0] not in ("-h", "--help"):
            raise DistillError(f"unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} "
                               "(distill --help)")
        print(usage)
        return None
    command, rest = argv[0], threads_option(argv[0], argv[1:])
    if command == "inspect":
        from distill import store
        parser = argparse.ArgumentParser(prog="distill inspect", description=COMMANDS["inspect"])
        parser.add_argument("store", help="a targets/ directory, or a run directory holding one")
        args = parser.parse_args(rest)
        from pathlib import Path
        path = Path(args.store)
        print(store.summary(path / "targets" if (path / "targets" / "manifest.json").is_file() else path))
        return None

    if command in MODULE_COMMANDS:
        import importlib
        module, _, function = MODULE_COMMANDS[command].partition(":")
        return getattr(importlib.import_module(module), function or "main")(rest)
    return run(rest)


def threads_option(command: str, argv: list[str]) -> list[str]:
    """`argv` without `--threads N`, which any command takes: N goes to DISTILL_THREADS, so it beats a recipe's
    `threads` and reaches child processes (accelerate, torchrun); a command that computes without a recipe
    applies it (or `auto`) here, before its work starts (the recipe commands apply theirs after loading it)."""
    import os

    from distill import threads

    rest, value, args = [], None, iter(argv)
    for arg in args:
        if arg == "--threads" or arg.startswith("--threads="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
        else:
            rest.append(arg)
    if value is not None:
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise DistillError(f"--threads: expected an integer >= 1 or auto, got {value!r}")
        os.environ[threads.ENV] = value
    threads.passive_when_busy()  # before torch is imported, or never
    if command in THREADED_COMMANDS:
        threads.apply()
    return rest


def run(argv) -> None:
    """teach (+ export) → every student; a stage complete for this recipe is skipped, so a re-run resumes."""

    from distill.models import check_model_name
    from distill.recipe import load_recipe
    from distill.runlock import one_writer

    parser = argparse.ArgumentParser(prog="distill run", description=COMMANDS["run"])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--from", dest="start", choices=("teach", "learn"),
                        help="run this stage and the ones after it again, even if complete")
    args = parser.parse_args(argv)
    # check the whole recipe, every model name included, before any stage starts
    recipe = load_recipe(args.recipe, args.overrides)
    check_model_name(recipe.teacher.model, "teacher")
    for i, student in enumerate(recipe.students):
        check_model_name(student.model, f"students.{i}")
    with one_writer(recipe.run_dir):  # before any stage: a second `distill run` of this recipe stops here
        run_stages(recipe, args)


def run_stages(recipe, args) -> None:
    from distill import results, teach
    from distill.runs import finished

    base, run_dir = [args.recipe, *args.overrides], recipe.run_dir

    print(f"== teach: {run_dir / 'teacher'}", flush=True)
    done = finished(run_dir / "teacher" / "metrics.json", teach.teacher_fingerprint(recipe))
    if done is False and args.start != "teach":
        raise DistillError(f"teacher: {run_dir / 'teacher'} holds a teacher trained from another recipe (its data, "
                           "teacher or seed differ); give this recipe another name, or pass --from teach to "
                           "retrain it (its soft targets are rebuilt too)")
    if done and args.start != "teach":
        print("teacher complete for this recipe: skipped", flush=True)
        results.tidy(run_dir / "teacher")
        if recipe.targets.export:
            with stage("export"):
                teach.main([*base, "--export-only"])  # finishes an interrupted export, else a no-op
    else:
        with stage("teach"):  # a teacher trained now makes any store in targets/ stale: rebuild it
            # an interrupted fine-tune of this recipe continues from its saved state (not with --from teach)
            teach.main([*base, "--rebuild-targets", *(() if args.start == "teach" else ("--resume",))])
    if recipe.students:
        learn_students(recipe, base, args.start)
    print(f"== compare: {run_dir}", flush=True)
    from distill import compare
    with stage("compare"):
        compare.main.__wrapped__([str(run_dir)])  # unwrapped: its error line comes from here, naming the stage


def learn_students(recipe, base: list[str], start: str | None) -> None:
    """Every student not yet complete for this recipe and store (all of them with --from), then every FixRes
    stage not yet complete (a changed `fixres:` redoes only that stage)."""
    import json
    from pathlib import Path

    from distill import fixres, learn, results
    from distill.kd import fixres_fingerprint, student_fingerprint
    from distill.runs import finished

    run_dir = recipe.run_dir
    print(f"== learn: {run_dir / 'students'}", flush=True)
    manifest = Path(run_dir / "targets" / "manifest.json")
    store_fp = json.loads(manifest.read_text()).get("fingerprint") if manifest.is_file() else None
    train, fixres_only = [], []
    for student in recipe.students:
        student_dir = run_dir / "students" / student.name
        if start is not None or not finished(student_dir / "metrics.json",
                                             student_fingerprint(recipe, student, store_fp)):
            train += ["--student", student.name]  # its FixRes stage, if any, follows it
            continue
        results.tidy(student_dir)  # complete: a state left by a kill after its metrics.json goes
        if student.fixres is not None and not finished(student_dir / "fixres" / "metrics.json",
                                                       fixres_fingerprint(recipe, student, store_fp)):
            print(f"student {student.name} complete for this recipe: skipped; its FixRes stage runs", flush=True)
            fixres_only += ["--student", student.name]
        else:
            results.tidy(student_dir / "fixres")
            print(f"student {student.name}{' (+ FixRes)' if student.fixres else ''} complete for this recipe: "
                  "skipped", flush=True)
    with stage("learn"):
        if train:  # an interrupted student (or FixRes stage) continues from its saved state (not with --from)
            learn.main([*base, *train, *(() if start else ("--resume",))])
    with stage("fixres"):
        if fixres_only:
            fixres.main([*base, *fixres_only, *(() if start else ("--resume",))])


if __name__ == "__main__":
    main()
