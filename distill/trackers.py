"""Experiment trackers: accelerate's (TensorBoard, Weights & Biases, MLflow, Trackio, Aim, ...), named by
`log.trackers`, kept local unless the user says otherwise.

Every stage (the teacher, a fold teacher, a student, a FixRes stage) is one run of each tracker: the project is the
recipe's name, the run the stage's name. Each gets the same content: the per-step scalars (`accelerator.log` fans
out), the hyper-parameters with the final metrics (`log_hparams`), and `distill compare`'s table
(`log_comparison`). Local-first: W&B runs offline (unless WANDB_MODE is set) with its files in <run dir>/wandb;
MLflow keeps its store in <run dir>/mlflow.db and its artifacts in <run dir>/mlruns (unless MLFLOW_TRACKING_URI is
set). MLflow's plain-file store (file:./mlruns) refuses to open since MLflow 3.x unless MLFLOW_ALLOW_FILE_STORE is
set, hence the SQLite file, its recommended local store.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from distill.errors import DistillError

# the module each tracker imports, where it is not the tracker's own name
MODULES = {"tensorboard": ("tensorboard", "tensorboardX")}


def known() -> list[str]:
    """The tracker names accelerate knows (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    return sorted(LOGGER_TYPE_TO_CLASS)


def check_names(names, where: str = "log.trackers") -> None:
    """Every name is one of accelerate's trackers (checked when the recipe loads)."""
    choices = known()
    for i, name in enumerate(names):
        if name not in choices:
            raise DistillError(f"{where}.{i}: unknown tracker {name!r}; expected one of {', '.join(choices)}")


def selected(recipe) -> list[str]:
    """`log.trackers`, less tensorboard when an older recipe says `log.tensorboard: false` (it only removes)."""
    return [t for t in dict.fromkeys(recipe.log.trackers) if t != "tensorboard" or recipe.log.tensorboard]


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in MODULES.get(name, (name,)))


def log_with(recipe) -> list[str]:
    """`Accelerator(log_with=...)` for the recipe; a tracker whose package is missing is an error here, before
    anything is written (accelerate would drop it silently)."""
    names = selected(recipe)
    for name in names:
        if not installed(name):
            extra = " (or pip install 'distill[track]')" if name in ("wandb", "mlflow") else ""
            raise DistillError(f"log.trackers: {name} is not installed; pip install {MODULES.get(name, (name,))[0]}"
                               f"{extra}, or leave it out of log.trackers")
    return names


def open_tracker(name: str, run_dir: Path, run_name: str):
    """Accelerate's tracker `name` (not started) for run `run_name` of the project `run_dir.name` (the recipe's
    name), its files under `run_dir`."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls, run_dir = LOGGER_TYPE_TO_CLASS[name], Path(run_dir)
    if name == "tensorboard":  # tb/<run name>, as `tensorboard --logdir runs` has always shown it
        return cls(run_name, str(run_dir / "tb"))
    if name == "wandb":
        local = {} if "WANDB_DIR" in os.environ else {"dir": str(run_dir)}  # it writes <dir>/wandb/
        if "WANDB_MODE" not in os.environ:
            local["mode"] = "offline"  # `wandb sync <run dir>/wandb/offline-run-*` uploads it later
        return cls(run_dir.name, name=run_name, **local)
    if name == "mlflow":
        artifacts = None
        if "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            artifacts = str((run_dir / "mlruns").resolve())  # where a new experiment keeps its artifacts
        return cls(run_dir.name, logging_dir=artifacts, run_name=run_name)
    # the others as accelerate's init_trackers makes them: the project, or the run and a directory for its files
    return cls(run_name, str(run_dir / name)) if cls.requires_logging_directory else cls(run_dir.name)


def start_tracking(accelerator, run_name: str, config: dict | None = None) -> None:
    """Every tracker of the accelerator's `log_with` for one run (teacher or a student), closing any earlier one.

    The run directory is the parent of the accelerator's logging directory (<run dir>/tb: kd.student_accelerator,
    teach.main). `config` (hyper-parameters, optional) goes to every tracker but TensorBoard, whose hparams
    come with the final metrics (`log_hparams`).
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    if not accelerator.is_main_process:  # as accelerate's init_trackers: trackers live on the main process
        return
    run_dir = Path(accelerator.logging_dir).parent
    for name in map(str, accelerator.log_with):
        tracker = open_tracker(name, run_dir, run_name)
        tracker.start()
        accelerator.trackers.append(tracker)
        if config and name != "tensorboard":
            tracker.store_init_configuration(config)


def log_hparams(accelerator, params: dict, metrics: dict) -> None:
    """Hyper-parameters with final metrics: TensorBoard's HParams dashboard lines runs up in one table; the
    other trackers get them as the run's config (W&B) or params (MLflow) and `hparam/<metric>` scalars."""
    if not accelerator.is_main_process:
        return
    final = {f"hparam/{k}": float(v) for k, v in metrics.items()}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            # run_name ".": into this run's own event file instead of a timestamped sub-folder
            tracker.tracker.add_hparams(params, final, run_name=".")
            tracker.tracker.flush()
        else:
            tracker.store_init_configuration(params)  # again if start_tracking had them: the same values
            tracker.log(final)


def log_comparison(run_dir: Path, names, columns, rows: list[dict], table: str, figure=None) -> list[str]:
    """`distill compare`'s table (and its accuracy-vs-latency figure) to each tracker in `names` but TensorBoard
    (compare writes tb/compare itself), as one run named `compare` of the project `run_dir.name`: a wandb.Table,
    MLflow's log_table (comparison.json) and log_text (comparison.md). A tracker with neither is skipped with a
    note. Returns the trackers written to."""
    from accelerate import PartialState

    PartialState()  # accelerate's trackers log through its logging, which wants the process state set up
    written = []
    for name in names:
        if name == "tensorboard":
            continue
        if name not in ("wandb", "mlflow"):
            print(f"note: log.trackers: {name}: no table support here; the comparison is in comparison.md",
                  file=sys.stderr)
            continue
        if not installed(name):
            print(f"warning: log.trackers: {name} is not installed (pip install {name}); the comparison is not "
                  "sent to it", file=sys.stderr)
            continue
        tracker = open_tracker(name, run_dir, "compare")
        tracker.start()
        data = [[r[c] for c in columns] for r in rows]
        if name == "wandb":
            import wandb
            tracker.log({"comparison": wandb.Table(columns=list(columns), data=data, allow_mixed_types=True),
                         **({"accuracy_vs_latency": wandb.Image(figure)} if figure is not None else {})})
        else:
            import mlflow
            mlflow.log_table({c: [r[c] for r in rows] for c in columns}, artifact_file="comparison.json")
            mlflow.log_text(table, "comparison.md")
            if figure is not None:
                tracker.log_figure(figure, "accuracy_vs_latency.png")
        tracker.finish()
        written.append(name)
    return written
