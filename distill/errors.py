"""The one user-facing failure: `DistillError` → a single `error:` line and exit status 2."""
from __future__ import annotations

import functools
import sys

EXIT_BAD_INPUT = 2


class DistillError(Exception):
    """Bad input the user can fix: the message names the key or file and what to do."""


def exit_on_error(main):
    """Wrap an entry point so a `DistillError` prints one `error:` line and exits 2.

    Anything else is a bug in distill and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DistillError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper
