"""On CUDA: `lvr bench-mrsp` through the real command line, every mode, one GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.gpu.common import needs_cuda

pytestmark = needs_cuda
ROOT = Path(__file__).resolve().parents[2]
MODES = ("vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared")
FRAMES = (16, 32)
G, TOKENS = 3, 4


def lvr_command() -> list[str]:
    """The `lvr` console script beside this Python, or the module where it is not installed."""
    exe = Path(sys.executable).with_name("lvr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lvr_cli.main"]


def run_bench(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "bench"
    args = ["bench-mrsp", "recipes/demo/bench.toml", f"bench.frames={list(FRAMES)}", "bench.steps=1",
            "bench.warmup_steps=0", f"bench.response_tokens={TOKENS}", f"rollout.n={G}", "bench.name=gpu",
            "bench.modes=" + json.dumps(list(MODES)), "launch.nproc_per_node=1", "mrsp.sp_size=1",
            f"bench.out_dir={json.dumps(str(out))}", f"output.dir={json.dumps(str(tmp_path / 'run'))}"]
    r = subprocess.run(lvr_command() + args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ),
                       timeout=540)
    return r, out / "gpu.json"


def check_bench(data: dict, cuda: bool) -> None:
    """What the CPU bench test asserts, at one process: every mode and frame count, the vision
    encodes per video of each mode, the forward-token counts; on CUDA a peak memory > 0."""
    assert data["world_size"] == 1 and data["sp_size"] == 1
    if cuda:
        assert data["env"]["devices"]["cuda"], data["env"]["devices"]
    rows = {(x["mode"], x["frames"]): x for x in data["results"]}
    assert set(rows) == {(m, f) for m in MODES for f in FRAMES}
    for (mode, frames), x in rows.items():
        assert not x["oom"], x
        assert set(x["breakdown"]) == {"vision", "rollout", "old", "ref", "update"}
        assert x["seconds_per_step"] > 0
        expected = {"vanilla": 4 * G, "peer": 1 + 3 * G, "mrsp-1": 1, "mrsp": 1, "mrsp-shared": 1}[mode]
        assert x["vision_encodes_per_video"] == expected, (mode, frames, x["vision_encodes_per_video"])
        if cuda:
            assert x["peak_memory_gb"] > 0, x  # CUDA's allocator peak: something was allocated
        assert x["first_step_logp"] < -1, x
        P, Q = x["prompt_tokens"], x["questions_per_rank"]
        unshared = 3 * Q * G * (P + TOKENS)
        assert x["train_forward_tokens_unshared"] == unshared, x
        assert x["train_forward_tokens"] == (3 * Q * (P + G * TOKENS) if mode == "mrsp-shared" else unshared), x
    assert rows[("mrsp", 32)]["video_tokens"] == 2 * rows[("mrsp", 16)]["video_tokens"]
    assert {"mrsp-shared_over_vanilla@32", "mrsp-shared_over_mrsp@32"} <= set(data["speedups"])


def test_bench_mrsp_cli_on_one_gpu(tmp_path):
    r, path = run_bench(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    check_bench(json.loads(path.read_text()), cuda=True)
