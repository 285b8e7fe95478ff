"""`lvr compare`: McNemar's exact test and the paired bootstrap against hand-computed values, and
the comparison of constructed eval runs (same items, different items, not runs at all)."""

import json
import math

import numpy as np
import pytest

from stages import compare
from stages.evalkit import stats


# -- the tests behind it -------------------------------------------------------------------------------
# McNemar exact, two-sided: p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)).
# b=1, c=9: 2 * (1 + 10) / 1024 = 22/1024.  b=2, c=8: 2 * (1 + 10 + 45) / 1024 = 112/1024.
# b=0, c=6: 2 * 1 / 64.  b=3, c=4: 2 * (1 + 7 + 21 + 35) / 128 = 1 (capped).  b=c=0: 1.
@pytest.mark.parametrize("b, c, p", [(1, 9, 22 / 1024), (9, 1, 22 / 1024), (2, 8, 112 / 1024), (0, 6, 2 / 64),
                                     (3, 4, 1.0), (5, 5, 1.0), (0, 0, 1.0)])
def test_mcnemar_exact_p_by_hand(b, c, p):
    assert stats.mcnemar_exact(b, c) == p


def _paired_vectors(both=90, only_a=30, only_b=10, neither=70):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return a, b


def test_paired_bootstrap_is_seeded_and_covers_the_true_difference():
    a, b = _paired_vectors()  # 200 items: 120 vs 100 right, difference 0.1
    diff, ci = stats.paired_bootstrap(a, b, resamples=10_000, seed=0)
    assert diff == pytest.approx(0.1)
    assert ci[0] < 0.1 < ci[1]
    assert stats.paired_bootstrap(a, b, resamples=10_000, seed=0) == (diff, ci)  # deterministic
    # the seed is what fixes it: a few resamples land differently under different seeds
    assert len({stats.paired_bootstrap(a, b, resamples=20, seed=s)[1] for s in range(5)}) > 1
    # per-item differences d: +1 x30, -1 x10, 0 x160 -> var(d) = 40/200 - 0.1^2 = 0.19, se = sqrt(0.19/200);
    # the percentile interval is close to the normal one, 0.1 +- 1.96 se = [0.0396, 0.1604]
    se = math.sqrt(0.19 / 200)
    assert ci == pytest.approx((0.1 - 1.96 * se, 0.1 + 1.96 * se), abs=0.006)
    assert stats.paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, (0.0, 0.0))
    assert stats.paired_bootstrap([], []) == (0.0, None)
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_bootstrap([1, 0], [1])
    p = stats.paired(a, b)
    assert (p["n"], p["only_a"], p["only_b"], p["difference"]) == (200, 30, 10, pytest.approx(0.1))
    # 30 vs 10 discordant: p = 2 * sum_{k<=10} C(40, k) / 2^40
    assert p["mcnemar_p"] == pytest.approx(2 * sum(math.comb(40, k) for k in range(11)) / 2 ** 40)
    assert p["ci95"] == list(ci)
    assert np.isclose(p["mcnemar_p"], 0.002221, atol=1e-6)


# -- runs -------------------------------------------------------------------------------------------------------
def _write_run(path, right, strict=None, frames=16, keys=None, blind=None, model="m"):
    """An eval run folder whose item i (category by i % 2) is right when right[i]; strict defaults to right."""
    path.mkdir(parents=True)
    strict = right if strict is None else strict
    keys = keys or [f"q{i}" for i in range(len(right))]
    rows = []
    for k, ok, st, i in zip(keys, right, strict, range(len(right))):
        rows.append({"key": k, "frames": frames, "prediction": f"<answer>{'B' if st else 'B.'}</answer>" if ok else "",
                     "extracted": "B" if ok else None, "answer": "B", "correct": bool(ok),
                     "correct_strict": bool(st), "category": "temporal" if i % 2 == 0 else "goal"})
    for k, ok in zip(keys, blind or []):
        rows.append({"key": k, "frames": 0, "blind": True, "prediction": "", "extracted": "B" if ok else None,
                     "answer": "B", "correct": bool(ok), "correct_strict": bool(ok), "category": "temporal"})
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prov = {"model": {"name": model, "revision": None}, "git_commit": "abc1234def", "date": "2026-12-01"}
    (path / "results.json").write_text(json.dumps({"provenance": prov}))
    return path


def test_compare_two_runs_on_the_same_items(tmp_path):
    # 40 items: A right on 0-19 and 20-24, B right on 0-19 and 25-34 -> 5 only A, 10 only B
    a = [1] * 25 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 5
    run_a = _write_run(tmp_path / "base", a, blind=[1] * 10 + [0] * 30)
    run_b = _write_run(tmp_path / "tuned", b, strict=[1] * 20 + [0] * 20)
    out = compare.compare_runs([run_a, run_b], tmp_path / "cmp")
    assert [r["name"] for r in out["runs"]] == ["base", "tuned"] and out["frames"] == [16]
    sa, sb = out["runs"][0]["by_frames"]["16"], out["runs"][1]["by_frames"]["16"]
    assert (sa["correct"], sb["correct"], sb["correct_strict"], sb["total"]) == (25, 30, 20, 40)
    assert sa["ci95"] == pytest.approx(list(stats.wilson(25, 40)))
    assert out["runs"][0]["blind"]["correct"] == 10 and "blind" not in out["runs"][1]
    p = out["paired"][0]["by_frames"]["16"]["lenient"]
    assert (p["only_a"], p["only_b"], p["n"]) == (10, 5, 40)  # a = tuned, b = base
    assert p["difference"] == pytest.approx(5 / 40)
    assert p["mcnemar_p"] == pytest.approx(2 * sum(math.comb(15, k) for k in range(6)) / 2 ** 15)  # 0.3018
    assert p["ci95"][0] < 5 / 40 < p["ci95"][1]
    again = compare.compare_runs([run_a, run_b], tmp_path / "cmp2")
    assert again["paired"] == out["paired"]  # the seeded bootstrap: same runs, same interval
    strict = out["paired"][0]["by_frames"]["16"]["strict"]  # tuned strict-right on 0-19 only
    assert (strict["only_a"], strict["only_b"]) == (0, 5) and strict["mcnemar_p"] == 2 / 32
    goal = out["paired"][0]["groups"]["category"]["goal"]  # odd items: only-tuned 25..33 odd (5), only-base 21, 23
    assert (goal["n"], goal["only_a"], goal["only_b"]) == (20, 5, 2)

    md = (tmp_path / "cmp" / "compare.md").read_text()
    lo, hi = stats.wilson(25, 40)
    assert f"| 16 | 40 | 62.5 [{100 * lo:.1f}, {100 * hi:.1f}] | 75.0 [" in md
    assert "| blind (no video) | - | 25.0 [" in md and "| base | m | - | abc1234def | 2026-12-01 |" in md
    assert f"| 16 | lenient | overall | 40 | +12.5 | [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] | 10 | 5 | 0.3018 |" in md
    assert "## By category (lenient, 16 frames)" in md and "| temporal | 20 |" in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"] == json.loads(json.dumps(out["paired"]))


def test_compare_refuses_runs_on_different_items_naming_them(tmp_path):
    run_a = _write_run(tmp_path / "a", [1, 0, 1])
    run_b = _write_run(tmp_path / "b", [1, 0, 1], keys=["q0", "q1", "q9"])
    with pytest.raises(compare.CompareError) as e:
        compare.compare_runs([run_a, run_b], tmp_path / "cmp")
    assert str(e.value) == ("runs a and b were not evaluated on the same items: 1 (key, frames) only in a, 1 only "
                            "in b (e.g. 'q2' at 16 frames)")
    run_c = _write_run(tmp_path / "c", [1, 0, 1], frames=32)  # same keys, another frame count
    with pytest.raises(compare.CompareError, match="runs a and c were not evaluated on the same items: 3"):
        compare.compare_runs([run_a, run_c], tmp_path / "cmp")
    with pytest.raises(compare.CompareError, match=f"{tmp_path / 'x'}: not a finished eval run"):
        compare.compare_runs([run_a, tmp_path / "x"], tmp_path / "cmp")
    with pytest.raises(compare.CompareError, match="two or more"):
        compare.compare_runs([run_a], tmp_path / "cmp")
    with pytest.raises(compare.CompareError, match="--scoring 'exact'"):
        compare.compare_runs([run_a, run_a], tmp_path / "cmp", scoring="exact")
    assert not (tmp_path / "cmp").exists()


def test_same_named_runs_get_their_parents_name(tmp_path):
    assert compare.run_names([tmp_path / "sft" / "eval", tmp_path / "rl" / "eval", tmp_path / "x"]) == [
        "sft/eval", "rl/eval", "x"]
