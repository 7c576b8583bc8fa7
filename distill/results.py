"""A stage's folder is complete or visibly incomplete: set the old result aside when a stage starts over, mark
the folder INCOMPLETE until its metrics.json is written, and tell readers when a folder is not a finished result.

A stage (teacher, fold teacher, student, FixRes) writes its best model while it trains and its metrics.json last.
Retraining a complete stage used to leave the old metrics.json (and a student's old fixres/) beside the new,
partial weights, so `compare` reported a result whose weights were gone. Now, when a stage starts from scratch:

- a complete old result (its metrics.json, model files, model card, `last/`, a student's `fixres/`) moves to
  `<folder>/previous/` (replacing an older one there), so a finished run is never lost and stays usable
  (`distill predict <folder>/previous ...`);
- leftovers of an interrupted attempt that was not resumed are removed;
- the folder gets an INCOMPLETE file (what runs, since when), removed by `record.write_metrics` once the new
  metrics.json is in place.

metrics.json records `weights_sha256`, the sha256 of the weights it describes (model.json's), so a reader also
notices weights replaced by hand or by an older version of distill. Readers (compare, predict, deploy, explain,
audit) call `check` / `problem`.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from distill.errors import DistillError

MARKER = "INCOMPLETE"
PREVIOUS = "previous"
# what a finished stage leaves in its folder (besides config.yaml and the tracker logs, which a new attempt
# rewrites): the metrics, the model folder's files (distill.models.folder), the teacher's `last/` checkpoint,
# an ensemble teacher's out-of-fold logits, and a student's FixRes stage, which was trained from the old weights
RESULT = ("metrics.json", "model.safetensors", "model.json", "config.json", "preprocessor_config.json",
          "README.md", "last", "oof.safetensors", "fixres")


def begin(folder: Path, fingerprint: str) -> Path | None:
    """A stage starts from scratch in `folder` (main process only): set a complete old result aside, remove an
    interrupted attempt's leftovers, and mark the folder INCOMPLETE. Returns where the old result went, if any."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    present = [folder / n for n in RESULT if (folder / n).exists()]
    previous = None
    if (folder / "metrics.json").is_file() and not (folder / MARKER).exists():
        previous = folder / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        staging = folder / f".{PREVIOUS}.tmp"  # moved in full, then renamed: a kill never leaves half of it
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for path in present:
            os.replace(path, staging / path.name)
        os.replace(staging, previous)
    else:
        for path in present:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    mark(folder, fingerprint)
    return previous


def mark(folder: Path, fingerprint: str) -> None:
    """Mark `folder` INCOMPLETE (a resumed stage whose folder predates the marker gets it too)."""
    from distill.runs import write_json

    write_json(Path(folder) / MARKER, {
        "fingerprint": fingerprint, "pid": os.getpid(),
        "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})


def resumed(folder: Path, fingerprint: str) -> None:
    """A stage continues from its saved state in `folder`: a metrics.json of another recipe there describes
    weights that this attempt has already replaced, so it goes, and the folder is marked INCOMPLETE."""
    folder = Path(folder)
    metrics = folder / "metrics.json"
    try:
        stale = json.loads(metrics.read_text()).get("fingerprint") != fingerprint
    except (OSError, ValueError):
        stale = metrics.exists()
    if stale:
        metrics.unlink()
    if not (folder / "metrics.json").exists():
        mark(folder, fingerprint)


def tidy(folder: Path) -> None:
    """A complete stage skipped by `distill run`: remove the saved state a kill left between its metrics.json
    and clearing the state (main process only)."""
    if int(os.environ.get("RANK", "0")) == 0 and (Path(folder) / "resume").is_dir():
        shutil.rmtree(Path(folder) / "resume", ignore_errors=True)


def finish(folder: Path) -> None:
    """The stage's metrics.json is written: the folder is complete."""
    try:
        (Path(folder) / MARKER).unlink()
    except FileNotFoundError:
        pass


def weights_digest(folder: Path) -> str | None:
    """The sha256 of the weights in `folder`, as its model.json records it (None: no model.json)."""
    try:
        return json.loads((Path(folder) / "model.json").read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def problem(folder: Path) -> str | None:
    """Why `folder` is not a finished result (one line, naming it), or None when it is one: its metrics.json
    describes the weights on disk. A folder with neither metrics.json nor a marker (a model folder written
    elsewhere, a hub download) is not a stage's folder and has no problem here."""
    folder = Path(folder)
    previous = folder / PREVIOUS / "metrics.json"
    keep = f"; the last complete result is in {folder / PREVIOUS}" if previous.is_file() else ""
    marker = folder / MARKER
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
            since = f" since {info['since']} (pid {info['pid']}: {info['command']})"
        except (OSError, ValueError, KeyError):
            since = ""
        return (f"{folder}: incomplete: a training started{since} has not finished (it is under way, or was "
                f"interrupted: `distill run` or --resume continues it){keep}")
    metrics = folder / "metrics.json"
    state = _resume_fingerprint(folder)
    if metrics.is_file() and state is not None and state != _fingerprint(metrics):
        # written by a version without the marker: a retrain was interrupted beside the old result
        return f"{folder}: incomplete: its metrics.json is of an earlier training, and a new one was interrupted"
    if not metrics.is_file():
        if (folder / "resume").is_dir():
            return f"{folder}: incomplete: no metrics.json yet (interrupted or under way){keep}"
        return None
    try:
        recorded = json.loads(metrics.read_text()).get("weights_sha256")
    except (OSError, ValueError):
        return f"{metrics}: unreadable; re-run the stage that wrote it"
    on_disk = weights_digest(folder)
    if recorded is not None and on_disk is not None and recorded != on_disk:
        return (f"{folder}: metrics.json describes other weights than those on disk (sha256 {recorded[:12]} vs "
                f"{on_disk[:12]}); re-run the stage that wrote it")
    return None


def _fingerprint(metrics: Path) -> str | None:
    try:
        return json.loads(metrics.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def _resume_fingerprint(folder: Path) -> str | None:
    for name in ("state", "state.old"):
        fp = _fingerprint(folder / "resume" / name / "progress.json")
        if fp is not None:
            return fp
    return None


def check(folder: Path) -> None:
    """Raise one `error:` line when `folder` is not a finished result (`problem`)."""
    why = problem(folder)
    if why is not None:
        raise DistillError(why)
