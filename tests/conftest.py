"""Shared test helpers: a one-thread torch for tiny in-process models, and "two runs ended the same"."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# what a second run may change: how long things took, and nothing else
TIMING = {"wall_seconds", "train_images_per_sec", "eval_images_per_sec", "fixres_seconds", "export"}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: the models are tiny, and with other jobs on the machine's 2 CPUs,
    OpenMP threads waiting on each other turn a 10 ms forward pass into a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_run(a: Path, b: Path, parts, weights_only=()) -> None:
    """Run directories `a` and `b` ended the same: the weights of every part in `parts` and `weights_only` bit
    for bit, the metrics.json of every part in `parts` apart from timings, and the store's shards (by sha256)."""
    for part in (*parts, *weights_only):
        wa, wb = load_file(a / part / "model.safetensors"), load_file(b / part / "model.safetensors")
        assert wa.keys() == wb.keys(), part
        for k in wa:
            assert np.array_equal(wa[k].numpy(), wb[k].numpy()), f"{part}: {k} differs"
        if part in parts:
            ma, mb = (json.loads((d / part / "metrics.json").read_text()) for d in (a, b))
            assert {k: v for k, v in ma.items() if k not in TIMING} == \
                   {k: v for k, v in mb.items() if k not in TIMING}, part
    sa, sb = (json.loads((d / "targets" / "manifest.json").read_text()) for d in (a, b))
    assert [s["sha256"] for s in sa["shards"]] == [s["sha256"] for s in sb["shards"]]


# README's metrics.json contract: every model (teacher, ensemble, student, FixRes) has at least these
CONTRACT = ("top1", "top5", "macro_f1", "macro_f1_over", "nll", "ece", "params", "eval_images_per_sec", "train_images_per_sec",
            "epochs", "seed", "wall_seconds", "classes", "fingerprint")
STUDENT_CONTRACT = ("kd_loss", "temperature", "kd_weight", "label_smoothing", "mix", "ls_decision", "ls_reason")


def assert_metrics_contract(model_dir: Path, student: bool = False) -> dict:
    """model_dir/metrics.json holds the contract's keys (a student's also its distillation settings)."""
    m = json.loads((Path(model_dir) / "metrics.json").read_text())
    missing = [k for k in (*CONTRACT, *(STUDENT_CONTRACT if student else ())) if k not in m]
    assert not missing, f"{model_dir}/metrics.json lacks {missing}"
    return m
