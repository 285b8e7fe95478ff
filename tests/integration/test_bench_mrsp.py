"""`lvr bench-mrsp` on 2 gloo processes with tiny frame counts: every mode, a list of response
lengths, the search for the largest video under a memory cap."""

import json
from types import SimpleNamespace

import pytest

from tests.conftest import run_lvr

FIELDS = {"mode", "frames", "oom", "seconds_per_step", "breakdown", "peak_memory_gb", "vision_encodes_per_video",
          "video_tokens", "prompt_tokens", "first_step_loss", "questions_per_rank", "train_forward_tokens", "first_step_logp",
          "train_forward_tokens_unshared"}


MODES = ("vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared", "mrsp-shared-2pass")


def test_bench_writes_every_field_and_counts_encodes(tmp_path):
    out = tmp_path / "bench"
    r = run_lvr("bench-mrsp", "recipes/demo/bench.toml", "bench.frames=[4,8]", "bench.steps=1", "bench.min_seconds=0",
                'bench.modes=["vanilla","peer","mrsp-1","mrsp","mrsp-shared","mrsp-shared-2pass"]',
                "bench.warmup_steps=0", "bench.response_tokens=4", "rollout.n=3", "bench.name=t",
                f"bench.out_dir={json.dumps(str(out))}", f"output.dir={json.dumps(str(tmp_path / 'run'))}",
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "t.json").read_text())
    assert (out / "t.png").stat().st_size > 0 and "| frames | mode |" in (out / "t.md").read_text()
    assert data["world_size"] == 2 and data["sp_size"] == 2
    rows = {(x["mode"], x["frames"]): x for x in data["results"]}
    assert set(rows) == {(m, f) for m in MODES for f in (4, 8)}
    G = 3
    for (mode, frames), x in rows.items():
        assert FIELDS <= set(x) and not x["oom"]
        assert set(x["breakdown"]) == {"vision", "rollout", "old", "ref", "update"}
        assert x["seconds_per_step"] > 0
        # per video per step: vanilla encodes for each rollout and each sequence of 3 forwards
        expected = {"vanilla": 4 * G, "peer": 1 + 3 * G}.get(mode, 1)
        assert x["vision_encodes_per_video"] == expected, (mode, frames, x["vision_encodes_per_video"])
        # every mode computed the same first-step loss from the same rollouts and weights
        assert abs(x["first_step_loss"] - rows[("vanilla", frames)]["first_step_loss"]) <= 1e-4
        assert x["first_step_logp"] < -1  # a real mean log-prob (not a vacuous 0) ...
        assert abs(x["first_step_logp"] - rows[("vanilla", frames)]["first_step_logp"]) <= 1e-4  # ... equal
        # 3 training forwards per question (same prompt length), 2 on-policy (mrsp-shared: no old
        # forward): each prompt once per group when shared
        P, T, Q = x["prompt_tokens"], 4, x["questions_per_rank"]
        passes = 2 if mode == "mrsp-shared" else 3
        assert (x["breakdown"]["old"] == 0) == (mode == "mrsp-shared"), (mode, x["breakdown"])
        unshared = passes * Q * G * (P + T)
        assert x["train_forward_tokens_unshared"] == unshared, (mode, frames)
        shared = mode.startswith("mrsp-shared")
        assert x["train_forward_tokens"] == (passes * Q * (P + G * T) if shared else unshared), mode
    # FLOPs and MFU per phase and per step, against the matmul peak measured in the run
    peak = data["peak_flops"]
    assert peak["all_processes"] > 0 and peak["per_process"] > 0 and peak["processes"] == 2
    for (mode, frames), x in rows.items():
        assert set(x["flops"]) == set(x["mfu"]) == {"vision", "rollout", "old", "ref", "update", "step"}
        assert x["flops"]["step"] == pytest.approx(sum(v for k, v in x["flops"].items() if k != "step"))
        assert (x["flops"]["old"] == 0) == (mode == "mrsp-shared")
        assert x["flops"]["update"] == pytest.approx(3 * x["flops"]["ref"])
        assert 0 < x["mfu"]["step"] == pytest.approx(x["flops"]["step"] / x["seconds_per_step"] / peak["all_processes"])
    f = {m: rows[(m, 8)]["flops"] for m in MODES}
    assert f["vanilla"]["vision"] == pytest.approx(4 * G * f["mrsp"]["vision"])  # 4G encodes against 1
    assert f["mrsp-shared"]["ref"] < f["mrsp"]["ref"] == f["vanilla"]["ref"]
    assert "MFU % update" in (out / "t.md").read_text()
    assert rows[("mrsp", 8)]["video_tokens"] == 2 * rows[("mrsp", 4)]["video_tokens"]
    assert any(k.startswith("mrsp_over_vanilla@") for k in data["speedups"])
    assert {"mrsp-shared_over_vanilla@8", "mrsp-shared_over_mrsp@8",
            "mrsp-shared_over_mrsp-shared-2pass@8"} <= set(data["speedups"])


def test_response_tokens_list_runs_one_cell_per_length(tmp_path):
    out = tmp_path / "bench"
    r = run_lvr("bench-mrsp", "recipes/demo/bench.toml", "bench.frames=[4]", "bench.steps=1", "bench.warmup_steps=0",
                'bench.modes=["vanilla","mrsp-shared"]', "bench.response_tokens=[2,6]", "rollout.n=2", "bench.name=t",
                "bench.min_seconds=1.5", "bench.max_steps=3",
                f"bench.out_dir={json.dumps(str(out))}", f"output.dir={json.dumps(str(tmp_path / 'run'))}",
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "t.json").read_text())
    assert data["response_tokens"] == [2, 6]
    rows = {(x["mode"], x["response_tokens"]): x for x in data["results"]}
    assert len(data["results"]) == 4 and set(rows) == {(m, t) for m in ("vanilla", "mrsp-shared") for t in (2, 6)}
    G = 2
    for (mode, T), x in rows.items():
        assert x["frames"] == 4 and not x["oom"]
        # timed steps until they add up to 1.5 s, at most 3: a cell faster than that took more than one
        assert 1 <= x["timed_steps"] <= 3 and (x["timed_steps"] > 1 or x["seconds_per_step"] >= 1.5), x
        P, Q = x["prompt_tokens"], x["questions_per_rank"]
        passes = 2 if mode == "mrsp-shared" else 3
        # the rollouts were T tokens long: every training forward saw G responses of T tokens
        assert x["train_forward_tokens_unshared"] == passes * Q * G * (P + T), (mode, T)
        assert abs(x["first_step_logp"] - rows[("vanilla", T)]["first_step_logp"]) <= 1e-4
    assert rows[("vanilla", 6)]["flops"]["rollout"] > rows[("vanilla", 2)]["flops"]["rollout"]
    assert {"mrsp-shared_over_vanilla@4,T=2", "mrsp-shared_over_vanilla@4,T=6"} == set(data["speedups"])
    md = (out / "t.md").read_text()
    assert "| frames | response tokens | mode | s/step |" in md
    line = next(x for x in md.splitlines() if x.startswith("| 4 | 6 | ") and x.count("|") == 6)
    P = rows[("vanilla", 6)]["prompt_tokens"]
    assert line == f"| 4 | 6 | {P} | {6 / P:.3f} | {data['speedups']['mrsp-shared_over_vanilla@4,T=6']:.2f}x |"


def test_cap_search_finds_the_largest_video_under_the_cap(tmp_path):
    """Vanilla at 112x112 frames, G = 2: measured here at 0.057 GiB per rank at 8 frames and
    0.139 at 64, so a 0.1 GiB cap falls between the listed 8 frames and the 64 allowed."""
    out, cap, resolution = tmp_path / "bench", 0.1, 16
    r = run_lvr("bench-mrsp", "recipes/demo/bench.toml", "bench.frames=[8]", "bench.steps=1", "bench.warmup_steps=0",
                "bench.min_seconds=0",
                'bench.modes=["vanilla"]', "bench.response_tokens=2", "rollout.n=2", "bench.frame_size=112",
                f"bench.memory_cap_gb={cap}", "bench.max_frames=64", f"bench.search_resolution_frames={resolution}",
                "bench.name=t", f"bench.out_dir={json.dumps(str(out))}",
                f"output.dir={json.dumps(str(tmp_path / 'run'))}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "t.json").read_text())
    assert "mmap threshold fixed" in data["memory"]
    search = data["cap_search"]
    assert (search["memory_cap_gb"], search["resolution_frames"], search["max_frames"]) == (cap, resolution, 64)
    (s,) = search["results"]
    (cell,) = data["results"]
    assert s["mode"] == "vanilla" and s["response_tokens"] == 2 and cell["peak_memory_gb"] <= cap
    probes = {p["frames"]: p for p in s["probes"]}
    assert s["probes"][0]["frames"] == 16  # doubling from the listed 8 frames
    assert len(probes) == len(s["probes"]) and all(f % 2 == 0 and 8 < f <= 64 for f in probes)
    for p in s["probes"]:  # one measured step each; a probe over the cap was stopped there
        assert p["fits"] == (p["peak_memory_gb"] <= cap), p
        assert p["seconds_per_step"] is not None or not p["fits"], p
    lo, hi = s["largest_fitting_frames"], s["oom_at_frames"]
    assert 8 < lo < hi <= 64 and hi - lo <= resolution, (lo, hi, s["probes"])
    assert probes[lo]["fits"] and s["peak_memory_gb"] == probes[lo]["peak_memory_gb"] <= cap
    assert not probes[hi]["fits"] and s["oom_peak_memory_gb"] == probes[hi]["peak_memory_gb"] > cap
    assert all(p["fits"] == (f <= lo) for f, p in probes.items())  # one boundary: fits below, fails above
    md = (out / "t.md").read_text()
    assert f"| vanilla | {lo} | {s['peak_memory_gb']:.3f} | {hi} | >= {s['oom_peak_memory_gb']:.3f} | " \
           f"{len(probes)} |" in md
    assert (out / "t.png").stat().st_size > 0


def _cap_on_two_ranks(rank, world, peaks, cap):
    from stages.bench_mrsp import MemoryCap, MemoryCapExceeded
    from stages.mrsp.dist import all_reduce_sum, init_grid

    grid = init_grid(1, "gloo", 60)
    memory = SimpleNamespace(gb=lambda: peaks[rank])
    try:
        MemoryCap(memory, cap, grid).check()
        stopped = None
    except MemoryCapExceeded as e:
        stopped = e.peak_gb
    return stopped, all_reduce_sum([rank + 1], grid)[0]  # the ranks still meet in the next collective


def test_memory_cap_stops_every_rank_when_one_passes_it():
    from tests.integration.mp import run_workers

    out = run_workers(_cap_on_two_ranks, 2, [0.5, 2.0], 1.0, timeout=120)
    assert out == {0: (2.0, 3.0), 1: (2.0, 3.0)}  # rank 0, under the cap, stops too, with rank 1's peak
    assert run_workers(_cap_on_two_ranks, 2, [0.5, 2.0], 3.0, timeout=120) == {0: (None, 3.0), 1: (None, 3.0)}
