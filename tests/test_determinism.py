"""The same recipe and seed on CPU give the same results: metrics.json identical apart from timings, the same
store, the same weights."""
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_run

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # end-to-end training runs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_the_same_recipe_twice_gives_identical_results(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    recipe["data"]["subset"] = 400
    recipe["teacher"]["epochs"] = 2
    recipe["targets"] = {"views": 2}
    recipe["students"] = [{"name": "kd", "model": "timm:resnet10t", "resolution": 28, "epochs": 2, "batch_size": 32,
                           "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, "ema": 0.9,
                           "kd": {"loss": "kl", "temperature": 4.0},
                           "fixres": {"resolution": 32, "epochs": 1}}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = []
    for name in ("a", "b"):
        r = subprocess.run(["distill", "run", str(path), f"output_dir={tmp_path / name}"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=900, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(tmp_path / name / "tiny-timm")
    a, b = runs
    assert_same_run(a, b, ("teacher", "students/kd", "students/kd/fixres"))
