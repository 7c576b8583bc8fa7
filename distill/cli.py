"""The `distill` console command: run / teach / inspect (later: learn, compare) on one recipe or run."""
from __future__ import annotations

import argparse
import sys

from distill.errors import DistillError, exit_on_error

COMMANDS = {
    "run": "every stage of a recipe in order: distill run recipe.yaml [key.path=value ...]",
    "teach": "fine-tune the teacher and export its soft targets: distill teach recipe.yaml [overrides] "
             "[--export-only] [--rebuild-targets]",
    "learn": "train the students on the soft targets: distill learn recipe.yaml [overrides] [--student NAME]",
    "inspect": "summarise a soft-target store: distill inspect runs/<name>/targets",
}


@exit_on_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: distill {run,teach,learn,inspect} ...\n\n" + "\n".join(f"  {k:8} {v}" for k, v in COMMANDS.items())
        usage += "\n\nMulti-process or GPU: accelerate launch distill/teach.py recipe.yaml"
        if argv and argv[0] not in ("-h", "--help"):
            raise DistillError(f"unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} "
                               "(distill --help)")
        print(usage)
        return None
    command, rest = argv[0], argv[1:]
    if command == "inspect":
        from distill import targets
        parser = argparse.ArgumentParser(prog="distill inspect", description=COMMANDS["inspect"])
        parser.add_argument("store", help="a targets/ directory, or a run directory holding one")
        args = parser.parse_args(rest)
        from pathlib import Path
        path = Path(args.store)
        print(targets.summary(path / "targets" if (path / "targets" / "manifest.json").is_file() else path))
        return None

    from distill import learn, teach
    if command == "teach":
        return teach.main(rest)
    if command == "learn":
        return learn.main(rest)
    # run: check the whole recipe before any stage starts, then teach (+ export), then every student
    from distill.recipe import load_recipe
    stage_args = teach.parse_args(rest)
    recipe = load_recipe(stage_args.recipe, stage_args.overrides)
    from distill.models import check_model_name
    check_model_name(recipe.teacher.model, "teacher")
    for i, student in enumerate(recipe.students):
        check_model_name(student.model, f"students.{i}")
    teach.main(rest)
    if recipe.students:
        learn.main([stage_args.recipe, *stage_args.overrides])
    return None


if __name__ == "__main__":
    main()
