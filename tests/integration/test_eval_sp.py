"""`lvr eval` of a video too long for one device: sequence-parallel inference (the video encode
sharded over the SP group, the group's prompts dealt out to its ranks) gives the predictions of
one process, at 1,024 frames."""

import json
from pathlib import Path

import av
import numpy as np

from tests.conftest import run_lvr

FRAMES = 1024
RECIPE = """stage = "eval"
[data]
input = "{data}"
[video]
max_frames = {frames}
max_pixels = 784  # 28 x 28: one LLM token per pair of frames (2 x 2 patches merged), 512 video tokens
[generation]
max_new_tokens = 12
batch_per_rank = 3
[output]
dir = "{out}"
"""


def write_long_video(path: Path, frames: int) -> None:
    """`frames` frames of 28 x 28 at 32 fps, each different (a colour ramp and a moving bar)."""
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=32)
        s.width = s.height = 28
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            a = np.zeros((28, 28, 3), np.uint8)
            a[:, :, i % 3] = (7 * i) % 256
            a[(i // 8) % 28] = 255
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode(None))


def test_eval_sp2_gives_the_predictions_of_sp1_at_1024_frames(tmp_path):
    write_long_video(tmp_path / "long.mp4", FRAMES)
    records = [{"problem_id": f"q{i}", "problem": f"Question {i}: which colour comes first?\nA. red\nB. green\n"
                "C. blue\nD. white", "problem_type": "temporal", "videos": ["long.mp4"], "answer": "ABCD"[i]}
               for i in range(3)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = tmp_path / "eval.toml"
    recipe.write_text(RECIPE.format(data=tmp_path / "eval.jsonl", frames=FRAMES, out=tmp_path / "sp1"))
    one = run_lvr("eval", recipe)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_lvr("eval", recipe, f"output.dir={json.dumps(str(tmp_path / 'sp2'))}", "launch.nproc_per_node=2",
                  "mrsp.sp_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ([json.loads(x) for x in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
            for run in ("sp1", "sp2"))
    assert [r["key"] for r in a] == [r["key"] for r in b] == ["q0", "q1", "q2"]
    assert all(r["frames_sampled"] == FRAMES for r in a + b)
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert [r["response_tokens"] for r in a] == [r["response_tokens"] for r in b]
    assert json.loads((tmp_path / "sp2" / "env.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "sp2" / "recipe.json").read_text())["mrsp"]["sp_size"] == 2
