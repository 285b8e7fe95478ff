"""The shipped training recipes run on a machine with Python and pip but no C++ compiler:
DeepSpeed (on by default) builds no op (`stages/mrsp/engine.py: skip_shm_comm_build`)."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_lvr

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"sft": ["train.global_batch=2", "train.micro_batch_per_rank=2"],
         "rl": ["train.global_batch=2", "rollout.max_new_tokens=8"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_shipped_training_recipe_runs_without_a_compiler(tiny_data, tmp_path, stage):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    no_compiler = {"CXX": str(tmp_path / "no-such-c++"), "CC": str(tmp_path / "no-such-cc"),
                   "TORCH_EXTENSIONS_DIR": str(extensions)}
    out = tmp_path / "run"
    r = run_lvr(stage, ROOT / f"recipes/demo/{stage}.toml", f"data.input={tiny_data / 'train.jsonl'}",
                f"eval.input={tiny_data / 'eval.jsonl'}", "eval.limit=1", "train.steps=1", f"output.dir={out}",
                "video.max_frames=8", *SMALL[stage], env=no_compiler)
    assert r.returncode == 0, r.stderr + (out / "run.log").read_text()
    assert json.loads((out / "recipe.json").read_text())["deepspeed"]["enabled"] is True
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == 1
    assert not any(extensions.iterdir())  # nothing was built (or tried)
    assert "Error building extension" not in (out / "run.log").read_text()
