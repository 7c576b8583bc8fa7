"""The `distill` console command: run / teach (later: learn, compare) on one recipe."""
from __future__ import annotations

import argparse
import sys

from distill.errors import exit_on_error

STAGES = ("teach",)


@exit_on_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Teacher→student knowledge distillation for image classification.",
        epilog="Multi-process or GPU runs: accelerate launch distill/teach.py recipe.yaml",
    )
    parser.add_argument("command", choices=("run",) + STAGES, help="run = every stage in order")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="recipe.yaml [key.path=value ...]")
    args = parser.parse_args(argv[:1])
    rest = argv[1:]

    if args.command == "teach":
        from distill import teach
        return teach.main(rest)
    # run: check the whole recipe before any stage starts, then each stage in order
    from distill import teach
    from distill.recipe import load_recipe
    stage_args = teach.parse_args(rest)
    load_recipe(stage_args.recipe, stage_args.overrides)
    teach.main(rest)


if __name__ == "__main__":
    main()
