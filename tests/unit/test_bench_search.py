"""The search for the largest frame count under a memory cap (`stages/bench_search.py`),
against a made-up peak per frame count, and the bench's response-length key."""

import pytest

from lvr_cli.recipes import RecipeError, load_recipe
from stages.bench_search import cap_table, largest_fitting
from tests.conftest import ROOT


def linear(cap: float, a: float = 0.001, b: float = 0.1):
    """A probe whose peak is a * frames + b GiB, and the frame counts it was asked for."""
    asked = []

    def probe(frames: int):
        asked.append(frames)
        peak = a * frames + b
        return peak <= cap, peak

    return probe, asked


def listed_from(probe, frames):
    return {f: probe(f) for f in frames}


def test_exact_boundary_at_resolution_two():
    # fits iff 0.001 f + 0.1 <= 1.0, i.e. f <= 900: the largest even count is 900, 902 fails
    probe, asked = linear(1.0)
    listed = listed_from(probe, [128, 256])
    asked.clear()
    found = largest_fitting(probe, listed, resolution=2, max_frames=4096)
    assert found["largest_fitting_frames"] == 900 and found["oom_at_frames"] == 902
    assert found["peak_memory_gb"] == pytest.approx(1.0) and found["oom_peak_memory_gb"] == pytest.approx(1.002)
    assert asked[:2] == [512, 1024]  # doubling from the largest listed count that fits, then bisection
    assert all(f % 2 == 0 for f in asked) and len(set(asked)) == len(asked)
    assert [p["frames"] for p in found["probes"]] == asked  # the listed counts are not probed again
    assert all(p["fits"] == (p["frames"] <= 900) for p in found["probes"])


def test_resolution_is_where_the_bisection_stops():
    probe, asked = linear(1.0)
    listed = listed_from(probe, [128, 256])
    asked.clear()
    found = largest_fitting(probe, listed, resolution=64, max_frames=4096)
    lo, hi = found["largest_fitting_frames"], found["oom_at_frames"]
    assert lo <= 900 < hi and hi - lo <= 64 and lo % 2 == hi % 2 == 0
    # 512 and 1024, then 768 and 896 (fit), 960 (fails): 960 - 896 = 64, no further probe
    assert asked == [512, 1024, 768, 896, 960]
    assert (lo, hi) == (896, 960)
    fewer = largest_fitting(linear(1.0)[0], listed, resolution=2, max_frames=4096)["probes"]
    assert len(fewer) > len(asked)


def test_a_failing_listed_count_starts_the_bisection_without_doubling():
    probe, asked = linear(1.0)
    listed = listed_from(probe, [512, 1024, 2048])  # 1024 and 2048 fail
    asked.clear()
    found = largest_fitting(probe, listed, resolution=2, max_frames=4096)
    assert (found["largest_fitting_frames"], found["oom_at_frames"]) == (900, 902)
    assert asked[0] == 768 and max(asked) < 1024


def test_fitting_up_to_the_max_reports_no_oom():
    probe, asked = linear(10.0)
    listed = listed_from(probe, [128])
    asked.clear()
    found = largest_fitting(probe, listed, resolution=64, max_frames=1000)
    assert found["largest_fitting_frames"] == 1000 and found["oom_at_frames"] is None
    assert asked == [256, 512, 1000]  # the last doubling is cut to the max


def test_a_mode_over_the_cap_at_the_smallest_listed_count_fits_none():
    probe, asked = linear(0.05)  # 0.001 * 128 + 0.1 > 0.05
    listed = listed_from(probe, [128, 256])
    asked.clear()
    found = largest_fitting(probe, listed, resolution=64, max_frames=4096)
    assert found["largest_fitting_frames"] is None and found["peak_memory_gb"] is None
    assert found["oom_at_frames"] == 128 and found["probes"] == [] and asked == []


def test_cap_table_says_fits_none_and_none_over_the_cap():
    searches = [{"mode": "vanilla", "response_tokens": 32, "largest_fitting_frames": None, "peak_memory_gb": None,
                 "oom_at_frames": 128, "oom_peak_memory_gb": 1.31, "probes": []},
                {"mode": "mrsp-shared", "response_tokens": 32, "largest_fitting_frames": 4096, "peak_memory_gb": 0.5,
                 "oom_at_frames": None, "oom_peak_memory_gb": None, "probes": [{}] * 5}]
    lines = cap_table(searches, 1.25, 64, 4096, lengths=False).splitlines()
    assert lines[0] == "Memory cap 1.25 GiB per rank; search resolution 64 frames, at most 4096 frames."
    assert lines[-2] == "| vanilla | none |  | 128 | >= 1.310 | 0 |"
    assert lines[-1] == "| mrsp-shared | 4096 | 0.500 | none up to 4096 |  | 5 |"


def test_response_tokens_takes_an_int_or_a_list():
    assert load_recipe(ROOT / "recipes/demo/bench.toml").bench.response_tokens == [32]
    assert load_recipe(ROOT / "recipes/demo/bench.toml", ["bench.response_tokens=[32,128]"]).bench.response_tokens \
        == [32, 128]
    with pytest.raises(RecipeError, match=r"bench.response_tokens: \[8, 8\] repeats a length"):
        load_recipe(ROOT / "recipes/demo/bench.toml", ["bench.response_tokens=[8,8]"])


@pytest.mark.parametrize("override,message", [
    ("bench.search_resolution_frames=63", "bench.search_resolution_frames: give an even number"),
    ("bench.max_frames=256", r"bench.max_frames: give an even number >= the largest of bench.frames \(512\)"),
])
def test_search_keys_are_checked_when_a_cap_is_set(override, message):
    load_recipe(ROOT / "recipes/demo/bench.toml", [override])  # no cap: no search, nothing to check
    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes/demo/bench.toml", ["bench.memory_cap_gb=2.0", override])
