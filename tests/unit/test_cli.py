import json
import time

from lvr_cli.recipes import load_recipe
from lvr_cli.rundir import RunDir


def test_help_is_fast_and_lists_commands(lvr):
    t = time.time()
    r = lvr("--help")
    assert r.returncode == 0
    for cmd in ("validate", "lock", "synth", "version", "env"):
        assert cmd in r.stdout
    # a subprocess start included; heavy imports would take several seconds
    assert time.time() - t < 5


def test_validate_prints_resolved_recipe_and_errors_exit_2(lvr, tmp_path):
    p = tmp_path / "rl.toml"
    (tmp_path / "rl.jsonl").write_text("")
    p.write_text(f'stage = "rl"\n[data]\ninput = "{tmp_path / "rl.jsonl"}"\n')
    r = lvr("validate", p, "rollout.n=4")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rollout"]["n"] == 4
    bad = lvr("validate", p, "rollout.nn=4")
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {p}: rollout.nn: unknown key"
    assert "Traceback" not in bad.stderr
    missing = lvr("validate", p, "data.input=nowhere.jsonl")
    assert missing.returncode == 2 and "data.input: nowhere.jsonl: no such file" in missing.stderr
    assert lvr("validate", tmp_path / "none.toml").returncode == 2


def test_version_and_env(lvr):
    assert lvr("version").stdout.startswith("lvr ")
    env = json.loads(lvr("env").stdout)
    assert env["versions"]["torch"].startswith("2.") and "cpu_count" in env["devices"]


def _recipe(tmp_path, **over):
    p = tmp_path / "s.toml"
    p.write_text('stage = "synth"\n')
    return load_recipe(p, [f"{k}={v}" for k, v in over.items()])


def test_rundir_refuses_to_clobber_finished_and_resumes_unfinished(tmp_path):
    out = tmp_path / "run"
    r = _recipe(tmp_path, **{"output.dir": f'"{out}"'})
    run = RunDir(out, r).open()
    assert not run.resumed and (out / "recipe.json").exists() and (out / "env.json").exists()
    run.metric(1, loss=0.5)
    run.error("video-3", "not a readable video")
    # killed before finishing: same recipe resumes
    again = RunDir(out, r).open()
    assert again.resumed
    # a different recipe on an unfinished run is refused
    other = _recipe(tmp_path, **{"output.dir": f'"{out}"', "seed": 9})
    try:
        RunDir(out, other).open()
        raise AssertionError("expected a refusal")
    except Exception as e:
        assert "unfinished run of a different recipe" in str(e)
    summary = again.finish({"items": 3})
    assert summary["items"] == 3 and json.loads((out / "summary.json").read_text())["resumed"] is True
    try:
        RunDir(out, r).open()
        raise AssertionError("expected a refusal")
    except Exception as e:
        assert "holds a finished run" in str(e) and "output.overwrite=true" in str(e)
    fresh = RunDir(out, _recipe(tmp_path, **{"output.dir": f'"{out}"', "output.overwrite": "true"})).open()
    assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists()
    assert fresh.path == out
    lines = (out / "env.json").read_text()
    assert '"world_size": 1' in lines


def test_backend_that_cannot_be_built_exits_2_with_one_line(lvr, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"video_id": "v", "video": "v.mp4", "duration_s": 10, "fps": 2, "clips": [{"index": 0, "start_s": 0, "end_s": 10, "caption": "a red screen"}]}\n')
    recipe = tmp_path / "qa.toml"
    recipe.write_text(f'stage = "generate-qa"\n[data]\ninput = "{captions}"\n[backend]\nkind = "openai"\n'
                      f'base_url = "http://127.0.0.1:9/v1"\nmodel = "m"\napi_key_env = "LVR_TEST_UNSET_KEY"\n'
                      f'[output]\ndir = "{tmp_path / "run"}"\n')
    r = lvr("generate-qa", recipe)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "backend.api_key_env" in last and "LVR_TEST_UNSET_KEY" in last
    assert "Traceback" not in r.stderr


def test_demo_summary_reads_every_stage_and_marks_missing_ones(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line

    from lvr_cli import demo_summary

    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "summary.json").write_text(json.dumps(
        {"steps": 32, "accuracy_first_half": 0.5508, "accuracy_second_half": 0.6621, "seconds": 67.11}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(
        {"items": 64, "accuracy": 0.671875, "by_category": {"temporal": 1.0}, "unparsed": 0}))
    demo_summary.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "accuracy_first_half=0.5508" in out and "accuracy_second_half=0.6621" in out
    assert "accuracy=0.6719" in out and "'temporal': 1.0" in out
    assert out.count("not run") == 4  # synth, filter, sft, eval_sft
