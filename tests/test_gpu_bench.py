"""benchmarks/gpu.py on the CPU with --tiny: every row of its table, exit 0; a failed stage exits non-zero."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TEACHERS = ("ViT-B/16", "BEiT-B/16", "DeiT-B/16")
STUDENTS = ("resnet50", "mobilenetv3_large_100", "efficientnet_b0")


def bench(*extra):
    return subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--tiny", *extra], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600, check=False)


def rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    table = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")][1:]
    return {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells[2:]] for cells in table}


@pytest.mark.slow
def test_the_tiny_benchmark_prints_every_row_and_exits_0():
    r = bench()
    assert r.returncode == 0, r.stderr[-3000:]
    table = rows(r.stdout)
    expected = [(kind, t) for t in TEACHERS for kind in ("fine-tune", "export")]
    expected += [(kind, s) for s in STUDENTS for kind in ("labels-only", "cached-KD", "online-KD")]
    assert sorted(table) == sorted(expected)
    for key, (rate, note, memory) in table.items():
        assert float(rate) > 0, key
        assert memory == "n/a (CPU)"
    assert all("of a bare forward" in table[("export", t)][1] for t in TEACHERS)


@pytest.mark.slow
def test_a_failed_stage_exits_non_zero_and_says_so():
    r = bench("--teachers", "DeiT-B/16", "--students", "efficientnet_b0", "--fail-stage", "export")
    assert r.returncode == 1
    table = rows(r.stdout)
    assert table[("export", "DeiT-B/16")][:2] == ["FAILED", "RuntimeError: --fail-stage export"]
    assert float(table[("fine-tune", "DeiT-B/16")][0]) > 0
    assert "failed: " in r.stderr
