"""RunDir: errors.jsonl settles to the failures standing now; --retry-failed reopens a finished run."""

import json

import pytest

from lvr_cli.recipes import RecipeError, load_recipe
from lvr_cli.rundir import RunDir
from stages.data.records import read_jsonl


def _recipe(tmp_path, out, **over):
    p = tmp_path / "s.toml"
    p.write_text('stage = "synth"\n')
    return load_recipe(p, [f'output.dir="{out}"'] + [f"{k}={v}" for k, v in over.items()])


def _errors(run) -> list[tuple[str, str]]:
    return [(e["key"], e["reason"]) for e in read_jsonl(run.file("errors.jsonl"))]


def test_settle_keeps_the_latest_failure_of_each_key_not_done(tmp_path):
    out = tmp_path / "run"
    r = _recipe(tmp_path, out)
    first = RunDir(out, r).open()
    first.error("a", "boom 1")
    first.error("b", "bad")
    first.error("c", "gone")
    first.error("a", "boom 2")  # the same key again, in one run
    # killed here: the next run's start drops what its outputs hold and keeps one line per key
    with open(out / "errors.jsonl", "a") as f:
        f.write('{"key": "d", "rea')  # a line torn by the kill
    second = RunDir(out, r).open()
    standing = second.settle_errors(done={"c"}.__contains__)
    assert _errors(second) == [("b", "bad"), ("a", "boom 2")] and list(standing) == ["b", "a"]

    second.error("b", "bad again")  # appended after the rewrite: the writer follows the new file
    second.error("e", "new")
    assert _errors(second)[-2:] == [("b", "bad again"), ("e", "new")]
    # the end of a run that retried everything: "a" was retried and did not fail again
    standing = second.settle_errors(done=lambda key: False, retried=lambda key: True)
    assert _errors(second) == [("b", "bad again"), ("e", "new")] and set(standing) == {"b", "e"}
    second.error("f", "after the rewrite, its writer open before it")
    assert _errors(second)[-1] == ("f", "after the rewrite, its writer open before it")
    second.settle_errors(done="f".__eq__)
    # not retried: an older failure stands
    third = RunDir(out, r).open()
    third.settle_errors(done=lambda key: False, retried=lambda key: key == "e")
    assert _errors(third) == [("b", "bad again")]
    assert not (out / "errors.jsonl.tmp").exists()


def test_settle_without_errors_writes_nothing(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, _recipe(tmp_path, out)).open()
    assert run.settle_errors(done=lambda key: False, retried=lambda key: True) == {}
    assert not run.file("errors.jsonl").exists()


def test_retry_failed_reopens_a_finished_run(tmp_path):
    out = tmp_path / "run"
    r = _recipe(tmp_path, out)
    run = RunDir(out, r).open()
    run.append("items.jsonl", {"key": "kept"})
    run.finish({"failed": 1})
    with pytest.raises(RecipeError, match="holds a finished run; pass output.overwrite=true, --retry-failed"):
        RunDir(out, r).open()
    with pytest.raises(RecipeError, match="cannot go with output.overwrite=true"):
        RunDir(out, _recipe(tmp_path, out, **{"output.overwrite": "true"})).open(retry_failed=True)
    with pytest.raises(RecipeError, match="holds a finished run of a different recipe; pass output.overwrite=true or"):
        RunDir(out, _recipe(tmp_path, out, seed=9)).open(retry_failed=True)

    retry = RunDir(out, r).open(retry_failed=True)
    assert retry.resumed and read_jsonl(out / "items.jsonl") == [{"key": "kept"}]
    assert not (out / "summary.json").exists()  # a retry killed midway resumes like any unfinished run
    assert RunDir(out, r).open().resumed
    retry.finish({"failed": 0})
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    other_rank = RunDir(out, r, rank=1).open(retry_failed=True)
    assert other_rank.resumed
