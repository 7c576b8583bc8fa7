"""compare.py's pure parts: the seed summary and the Pareto front."""
from distill.compare import pareto, seed_summary


def row(role, top1, run="r", temperature=4.0, latency=1.0):
    return {"run": run, "role": role, "top1": top1, "macro_f1": top1 - 0.01, "nll": 1 - top1,
            "temperature": temperature, "latency_ms_b1": latency}


def test_seed_summary_groups_students_by_name():
    rows = [row("teacher", 0.9, temperature=None), row("kd-s0", 0.80), row("kd-s1", 0.82), row("kd-s2", 0.84),
            row("kd-s0+fixres", 0.81), row("kd-s1+fixres", 0.83), row("alone-s0", 0.5), row("baseline", 0.7)]
    lines = seed_summary(rows)
    table = "\n".join(lines)
    assert "| r | kd | 3 | 0.8200 ± 0.0200 |" in table  # sample std (n - 1) of 0.80, 0.82, 0.84
    assert "| r | kd+fixres | 2 | 0.8200 ± 0.0141 |" in table
    assert "alone" not in table and "baseline" not in table and "teacher" not in table
    assert seed_summary([row("kd", 0.8)]) == []


def test_pareto_front():
    rows = [row("fast", 0.80, latency=1.0), row("slow-good", 0.90, latency=5.0), row("dominated", 0.79, latency=2.0)]
    assert pareto(rows) == [True, True, False]
    assert pareto(rows + [row("tie", 0.80, latency=1.0)]) == [True, True, False, True]  # equal is not dominated
