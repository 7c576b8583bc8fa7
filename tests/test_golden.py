"""Golden regression test: a tiny end-to-end `distill run` (teacher, soft-target export, two students, FixRes)
reproduces numbers pinned from a known-good version of the code: the first logged training losses of every
stage (TensorBoard) and the final validation metrics of every model (metrics.json).

A refactor must not move any of them. When a change is *meant* to move a result (a new default, a fixed bug),
regenerate the values deliberately and say so in the commit:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python tests/test_golden.py

prints a new `GOLDEN = {...}` literal to paste below, in place of the old one. Run it twice first: the two
printouts must be identical (the run is deterministic on CPU), or the values are not worth pinning. The values
below come from commit 2f52e44 (before the reorganisation into packages; the reorganised code reproduced them
exactly), regenerated once on purpose for issue 13: DKD computed stably in log space (the `dkd` student) and
FixRes tested on the crop it trains on (`kd/fixres`); the teacher's and `kd`'s values did not move. On CPU with
one thread (OMP_NUM_THREADS=1; the test sets it for the run it
starts), torch 2.14.1 / timm as installed by `pip install -e '.[test]'`; another torch or another CPU kernel
may round differently, hence the tolerance.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_metrics_contract

ROOT = Path(__file__).resolve().parent.parent
# one thread: the numbers must not depend on how the caller's machine splits the work
ENV = {**{k: v for k, v in os.environ.items() if k != "DISTILL_STOP_AT"}, "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}
METRICS = ("top1", "top5", "macro_f1", "nll", "ece")
MODELS = ("teacher", "students/kd", "students/dkd", "students/kd/fixres")  # every model folder with metrics.json
FIRST_STEPS = 3  # pinned logged steps per loss scalar, from the first

pytestmark = pytest.mark.slow  # about 25 s on 2 busy CPU cores


def golden_recipe() -> dict:
    """recipes/tiny-timm.yaml shrunk to seconds, with MixUp for the teacher, a 2-view store, a cached-KD student
    with MixUp/CutMix, EMA and FixRes, and a DKD student at another resolution; every step logged."""
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    raw["data"]["subset"] = 300
    raw["teacher"]["epochs"] = 2
    raw["teacher"]["mix"] = {"mixup_alpha": 0.2}
    raw["targets"] = {"views": 2}
    raw["log"] = {"progress": False, "every_steps": 1}
    raw["students"] = [
        {"name": "kd", "model": "timm:resnet10t", "resolution": 28, "epochs": 2, "batch_size": 32,
         "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, "ema": 0.9, "kd": {"loss": "kl", "temperature": 4.0},
         "fixres": {"resolution": 32, "epochs": 1}},
        {"name": "dkd", "model": "timm:resnet10t", "resolution": 24, "epochs": 1, "batch_size": 32,
         "kd": {"loss": "dkd"}},
    ]
    return raw


def run_golden(tmp: Path) -> Path:
    """`distill run` of the golden recipe (the code on sys.path, by way of `python -m`) into `tmp`."""
    path = tmp / "golden.yaml"
    path.write_text(yaml.safe_dump(golden_recipe()))
    r = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path), f"output_dir={tmp / 'runs'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "runs" / "tiny-timm"


def first_losses(run_dir: Path) -> dict:
    """{tb run: {tag: [[step, value], ...]}} for the first FIRST_STEPS logged steps of every loss scalar
    (train/loss* of the teacher and the students, fixres/loss* of a FixRes stage)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for tb in sorted(p for p in (run_dir / "tb").iterdir() if p.is_dir() and p.name != "compare"):
        for events in sorted(tb.glob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                if tag.split("/")[0] in ("train", "fixres") and tag.split("/")[1].startswith("loss"):
                    found.setdefault(tb.name, {}).setdefault(tag, []).extend(
                        [e.step, e.value] for e in acc.Scalars(tag))
    return {tb: {tag: sorted(points)[:FIRST_STEPS] for tag, points in sorted(tags.items())}
            for tb, tags in found.items()}


def final_metrics(run_dir: Path) -> dict:
    return {part: {k: json.loads((run_dir / part / "metrics.json").read_text())[k] for k in METRICS}
            for part in MODELS}


def observed(run_dir: Path) -> dict:
    return {"losses": first_losses(run_dir), "metrics": final_metrics(run_dir)}


# pinned from the original code (module docstring: how to regenerate)
GOLDEN = {'losses': {'dkd': {'train/loss': [[1, 2.009428024291992], [2, 3.925961971282959], [3, 11.857327461242676]],
                    'train/loss_ce': [[1, 2.4258363246917725], [2, 2.829160690307617], [3, 3.4883673191070557]],
                    'train/loss_kd': [[1, 1.5930194854736328], [2, 5.022763252258301], [3, 20.226287841796875]]},
            'kd': {'train/loss': [[1, 1.3224539756774902], [2, 1.1822798252105713], [3, 1.2006453275680542]],
                   'train/loss_ce': [[1, 2.472414016723633], [2, 2.225844621658325], [3, 2.2307798862457275]],
                   'train/loss_kd': [[1, 0.17249399423599243], [2, 0.13871490955352783], [3, 0.17051085829734802]]},
            'kd-fixres': {'fixres/loss': [[1, 0.9940033555030823], [2, 1.009785532951355], [3, 1.0083359479904175]],
                          'fixres/loss_ce': [[1, 1.9031811952590942],
                                             [2, 1.8960986137390137],
                                             [3, 1.9245105981826782]],
                          'fixres/loss_kd': [[1, 0.0848255306482315],
                                             [2, 0.12347240746021271],
                                             [3, 0.09216136485338211]]},
            'teacher': {'train/loss': [[1, 2.442467451095581], [2, 2.365316867828369], [3, 2.202627658843994]],
                        'train/loss_ce': [[1, 2.442467451095581], [2, 2.365316867828369], [3, 2.202627658843994]]}},
 'metrics': {'students/dkd': {'ece': 0.060441444168488186,
                              'macro_f1': 0.07971000570889583,
                              'nll': 2.192603826522827,
                              'top1': 0.15,
                              'top5': 0.66},
             'students/kd': {'ece': 0.11968579274912675,
                             'macro_f1': 0.21464498460220013,
                             'nll': 2.0988800525665283,
                             'top1': 0.27666666666666667,
                             'top5': 0.8},
             'students/kd/fixres': {'ece': 0.09499709258476893,
                                    'macro_f1': 0.27472209255275615,
                                    'nll': 1.8849594593048096,
                                    'top1': 0.32666666666666666,
                                    'top5': 0.87},
             'teacher': {'ece': 0.13619658932089806,
                         'macro_f1': 0.26100752328724747,
                         'nll': 2.012810707092285,
                         'top1': 0.3233333333333333,
                         'top5': 0.7733333333333333}}}


def test_a_tiny_run_reproduces_the_pinned_losses_and_metrics(tmp_path):
    run_dir = run_golden(tmp_path)
    for part in MODELS:  # one function writes every metrics.json: the README's keys are all there
        assert_metrics_contract(run_dir / part, student=part.startswith("students/"))
    got = observed(run_dir)
    # the same stages logged the same loss scalars at the same steps
    assert {tb: {tag: [s for s, _ in pts] for tag, pts in tags.items()} for tb, tags in got["losses"].items()} == \
           {tb: {tag: [s for s, _ in pts] for tag, pts in tags.items()} for tb, tags in GOLDEN["losses"].items()}
    for tb, tags in GOLDEN["losses"].items():
        for tag, points in tags.items():
            values = [v for _, v in got["losses"][tb][tag]]
            assert values == pytest.approx([v for _, v in points], rel=1e-4, abs=1e-5), f"{tb} {tag}"
    assert got["metrics"].keys() == GOLDEN["metrics"].keys()
    for part, metrics in GOLDEN["metrics"].items():
        for k, v in metrics.items():
            assert got["metrics"][part][k] == pytest.approx(v, rel=1e-4, abs=1e-5), f"{part} {k}"


if __name__ == "__main__":  # regenerate: prints the GOLDEN literal to paste above
    import pprint
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print("GOLDEN = " + pprint.pformat(observed(run_golden(Path(tmp))), width=116, sort_dicts=True))
