"""benchmarks/ab_revisions.py's summary: medians per side, the ratio, and the cross-revision check."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "ab_revisions", Path(__file__).resolve().parents[2] / "benchmarks" / "ab_revisions.py")
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)


def cell(mode, seconds, logp=-6.977, oom=False):
    return {"mode": mode, "frames": 512, "response_tokens": 32, "oom": oom, "seconds_per_step": seconds,
            "first_step_loss": 1e-7, "first_step_logp": logp}


def test_summary_takes_each_sides_median_and_their_ratio():
    runs = [{"side": "base", "results": [cell("mrsp-shared", s)]} for s in (2.1, 2.6, 2.3)]
    runs += [{"side": "head", "results": [cell("mrsp-shared", s), cell("mrsp-shared-2pass", s + 0.3)]}
             for s in (1.7, 1.6, 1.75)]
    runs.append({"side": "head", "results": [cell("mrsp-shared", 0.1, oom=True)]})  # an OOM cell is no time
    rows, table = ab.summarize(runs, "37dab98", "aa5caf5")
    shared = next(r for r in rows if r["mode"] == "mrsp-shared")
    assert shared["median_s"] == {"base": 2.3, "head": 1.7}
    assert abs(shared["base_over_head"] - 2.3 / 1.7) < 1e-12
    assert shared["runs_s"]["head"] == [1.7, 1.6, 1.75]
    assert shared["first_step_max_diff"] == 0
    two_pass = next(r for r in rows if r["mode"] == "mrsp-shared-2pass")
    assert two_pass["base_over_head"] is None and two_pass["median_s"] == {"head": 2.0}
    assert "| mrsp-shared-2pass | 512 | 32 | - | 2.00 |  | -, 2.00 / 1.90 / 2.05 | 0 |" in table
    assert "| mrsp-shared | 512 | 32 | 2.30 | 1.70 | 1.35x |" in table


def test_summary_reports_revisions_that_compute_something_else():
    runs = [{"side": "base", "results": [cell("mrsp", 3.0, logp=-6.977)]},
            {"side": "head", "results": [cell("mrsp", 2.0, logp=-6.970)]}]
    rows, _ = ab.summarize(runs, "a", "b")
    assert abs(rows[0]["first_step_max_diff"] - 0.007) < 1e-9
