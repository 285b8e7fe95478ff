"""Values the schema accepts in form but a stage cannot use: refused up front in one line
naming the key (exit 2), the recipe's location named once, nothing left that blocks the
corrected command."""

import json

LONG = "a_folder_name_long_enough_that_any_80_column_wrapping_would_split_the_message"


def _recipe(tmp_path, text: str):
    folder = tmp_path / LONG / LONG
    folder.mkdir(parents=True)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


def _one_line_error(r, path, key: str) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"error: {path}: {key}: ") and lines[0].count(str(path)) == 1, lines[0]
    return lines[0]


def test_synth_scenes_and_seed_are_checked_by_the_schema(lvr, tmp_path):
    path = _recipe(tmp_path, f'stage = "synth"\n[synth]\nseconds = 12.0\n[output]\ndir = "{tmp_path / "out"}"\n')
    line = _one_line_error(lvr("synth", path), path, "synth.seconds")
    assert "needs 3 complete scenes" in line and not (tmp_path / "out").exists()
    line = _one_line_error(lvr("synth", path, "synth.seconds=64.0", "synth.fps=0.25"), path, "synth.event_seconds")
    assert "a scene needs at least 4" in line
    _one_line_error(lvr("validate", path, "synth.seconds=64.0", "seed=-1"), path, "seed")


def test_prompts_dir_and_its_prompt_files_are_checked_up_front(lvr, tmp_path):
    (tmp_path / "captions.jsonl").write_text("{}\n")
    path = _recipe(tmp_path, f'stage = "generate-qa"\n[data]\ninput = "{tmp_path / "captions.jsonl"}"\n'
                             f'[qa]\nprompts_dir = "{tmp_path / "prompts"}"\n[output]\ndir = "{tmp_path / "out"}"\n')
    line = _one_line_error(lvr("generate-qa", path), path, "qa.prompts_dir")
    assert line.endswith("no such folder")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "temporal.txt").write_text("{captions}")
    line = _one_line_error(lvr("generate-qa", path, "qa.refine=false"), path, "qa.prompts_dir")
    assert line.endswith(f"{tmp_path / 'prompts' / 'goal.txt'}: no such prompt file")
    assert not (tmp_path / "out").exists()


def test_an_unloadable_model_path_is_one_line_and_leaves_no_run_folder(lvr, tmp_path):
    """A local path that is no model folder is refused before the run folder is made; one the
    loader rejects (a config without a model type) is caught where the stage loads it, and the
    run folder it had opened is removed, so the corrected command starts afresh."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"problem_id": "x", "problem": "Q?\nA. x\nB. y", "videos": ["v.mp4"], "answer": "A"}) + "\n")
    out = tmp_path / "run"
    path = _recipe(tmp_path, f'stage = "sft"\n[data]\ninput = "{data}"\n[train]\nsteps = 1\nglobal_batch = 1\n'
                             f'[deepspeed]\nenabled = false\n[output]\ndir = "{out}"\n')
    for bad, why in ((tmp_path / "nowhere" / "model", "no such folder"), (tmp_path, "no config.json"),
                     (data, "a file, not a model folder")):
        line = _one_line_error(lvr("sft", path, f"model.path={json.dumps(str(bad))}"), path, "model.path")
        assert why in line and not out.exists(), line
    _one_line_error(lvr("sft", path, "model.path='tiny:qwen9'"), path, "model.path")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    line = _one_line_error(lvr("sft", path, f"model.path={json.dumps(str(broken))}"), path, "model.path")
    assert "cannot be loaded" in line and not out.exists(), line
    # the corrected command is not refused as "an unfinished run of a different recipe"
    fixed = lvr("sft", path, "model.path='tiny:qwen2.5-vl'")
    assert "different recipe" not in fixed.stderr and (out / "recipe.json").exists(), fixed.stderr[-2000:]
