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
        except RuntimeError as e:
            if not peer_lost(e):
                raise
            # another process of this torchrun / accelerate job died (killed, out of memory): this one's
            # collective failed. Its traceback says nothing useful; the launcher's report names the dead process.
            print(f"error: rank {os.environ.get('RANK')}: another process of this job stopped ({first_line(e)}); "
                  "the last saved state is kept: run the same command again (with --resume; `distill run` "
                  "resumes on its own)", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


# what a collective says when a peer process has gone (gloo on CPU, NCCL on GPUs)
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of a multi-process job died."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(s in str(e) for s in PEER_LOST)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split("] ", 1)[-1].split(". ", 1)[0][:200]  # without gloo's source location and advice


@contextlib.contextmanager
def stage(name: str):
    """Name the stage under way on a failure in it, so that its error line says which stage failed."""
    try:
        yield
    except DistillError as e:
        if e.stage is None:  # the innermost stage names it
            e.stage = name
        raise
