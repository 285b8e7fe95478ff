"""`lvr bench-components` at tiny size: real torchrun launches of SP 1 and 2."""

import json
from pathlib import Path

from stages.bench_components import PHASES


def test_bench_components_writes_per_rank_figures_and_checks_sp_against_sp1(tmp_path, lvr):
    # sp_sizes = [2] only: SP 1, the reference of the log-prob check, is run anyway
    res = lvr("bench-components", "recipes/demo/bench_components.toml", "model.path=tiny:qwen2.5-vl",
              "components.frames=8", "components.sp_sizes=[2]", "components.repeats=1",
              f"components.out_dir={tmp_path}", f"output.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "components"
    data = json.loads(Path(f"{out}.json").read_text())
    assert data["env"]["versions"]["torch"] and data["args"]["components"]["frames"] == 8
    by_sp = {r["sp"]: r for r in data["results"]}
    assert sorted(by_sp) == [1, 2]
    for sp, r in by_sp.items():
        assert [x["rank"] for x in r["ranks"]] == list(range(sp))
        for rank in r["ranks"]:
            assert set(rank["phases"]) == set(PHASES)
            for f in rank["phases"].values():
                assert len(f["seconds"]) == 1 and f["median_s"] > 0 and f["peak_mib"] >= 0
        assert set(r["summary"]) == set(PHASES)

    # SP 2 halves the work of a rank: tokens (up to one padding token) and frames
    L = data["sequence"]["sequence_tokens"]
    assert L > data["sequence"]["video_tokens"] + data["sequence"]["response_tokens"]
    assert [x["tokens_per_rank"] for x in by_sp[1]["ranks"]] == [L]
    assert all(abs(x["tokens_per_rank"] - L / 2) <= 1 for x in by_sp[2]["ranks"])
    assert [x["frames_per_rank"] for x in by_sp[1]["ranks"]] == [8]
    assert [x["frames_per_rank"] for x in by_sp[2]["ranks"]] == [4, 4]

    # self-check: the sharded encode and the SP forward give SP 1's outputs
    # the patch embedding is a matmul: 4-patch slices take another CPU sgemm path (1e-7 apart)
    assert by_sp[2]["vision_max_abs_diff"] <= 1e-6
    assert by_sp[2]["logprob_max_abs_diff"] < 1e-5
    assert by_sp[1]["logprob_mean"] < -1.0  # real log-probs of a random model, not zeros
    assert abs(by_sp[2]["logprob_mean"] - by_sp[1]["logprob_mean"]) < 1e-5

    md = Path(f"{out}.md").read_text()
    assert "| 2 | forward+backward |" in md and "tokens per rank" in md
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["sp_sizes"] == [1, 2]


def test_bench_components_refuses_odd_frames(lvr):
    res = lvr("validate", "recipes/demo/bench_components.toml", "components.frames=7")
    assert res.returncode == 2
    assert "components.frames: give an even number >= 2" in res.stderr
