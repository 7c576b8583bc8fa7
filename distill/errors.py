"""The one user-facing failure: `DistillError` → a single `error:` line and exit status 2."""
from __future__ import annotations

import contextlib
import functools
import os
import sys

EXIT_BAD_INPUT = 2


class DistillError(Exception):
    """Bad input the user can fix: the message names the key or file and what to do."""

    kind, exit_code = "error", EXIT_BAD_INPUT
    stage: str | None = None  # the `distill run` stage it happened in, named in its error line


class Interrupted(DistillError):
    """Stopped by a signal after saving what is needed to resume; exits 128 + the signal number."""

    kind = "interrupted"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def exit_on_error(main):
    """Wrap an entry point so a `DistillError` prints one `error:` line and exits 2 (`Interrupted`: one
    `interrupted:` line, exit 128 + the signal).

    Anything else is a bug in distill and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:  # the reader went away (`distill --help | head`): nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
            sys.exit(1)
        except DistillError as e:
            message = str(e)
            if "Original Traceback" in message:  # raised in a DataLoader worker: its own message is the last line
                message = message.rstrip().splitlines()[-1].split("DistillError: ", 1)[-1]
            where = ""
            if e.stage:
                where = f" (stage {e.stage}" + ("" if e.stage == "teach" else "; the stages before it are kept") + ")"
            print(f"{e.kind}: {message}{where}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    return wrapper


@contextlib.contextmanager
def stage(name: str):
    """Name the stage under way on a failure in it, so that its error line says which stage failed."""
    try:
        yield
    except DistillError as e:
        if e.stage is None:  # the innermost stage names it
            e.stage = name
        raise
