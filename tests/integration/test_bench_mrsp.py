"""`lvr bench-mrsp` on 2 gloo processes with two tiny frame counts."""

import json

import pytest

from tests.conftest import run_lvr

FIELDS = {"mode", "frames", "oom", "seconds_per_step", "breakdown", "peak_memory_gb", "vision_encodes_per_video",
          "video_tokens", "prompt_tokens", "first_step_loss", "questions_per_rank", "train_forward_tokens", "first_step_logp",
          "train_forward_tokens_unshared"}


MODES = ("vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared", "mrsp-shared-2pass")


def test_bench_writes_every_field_and_counts_encodes(tmp_path):
    out = tmp_path / "bench"
    r = run_lvr("bench-mrsp", "recipes/demo/bench.toml", "bench.frames=[4,8]", "bench.steps=1",
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
