"""generate-qa in 3 shards, one of them a real `lvr` process killed with SIGKILL mid-run and run
again, merged: the same qa.jsonl and errors.jsonl, byte for byte, as one uninterrupted run."""

import json
import os
import subprocess
from pathlib import Path

import stages.generate_qa as gq
from lvr_cli.recipes import load_recipe
from lvr_cli.rundir import RunDir
from stages.data.gt_server import GTServer
from stages.shards import shard_dir, shard_of
from tests.conftest import run_lvr
from tests.unit.test_generate_qa import ROOT, data  # noqa: F401 (fixture)
from tests.unit.test_generate_qa_resume import V0, V1, V2, cli, kill_after_a_new_line


def run_in_process(toml: Path, *overrides: str) -> dict:
    r = load_recipe(toml, list(overrides))
    run = RunDir(shard_dir(Path(r.output.dir), r.data.shard), r).open()  # where `lvr generate-qa` puts it
    return run.finish(gq.run(r, run))


def test_a_shard_killed_and_rerun_merges_to_one_uninterrupted_run(data, tmp_path, monkeypatch):  # noqa: F811
    assert [shard_of(v, 3) for v in (V0, V1, V2)] == [1, 0, 1]  # shard 1 has two videos, shard 2 none
    split = tmp_path / "split"
    faults = {f"{V0}/plot": ["three_options"] * 99}  # fails in every run, sharded or not
    with GTServer(data, faults=faults, delay_s=0.05) as server:
        cmd = cli(tmp_path, data, server.url, split)
        toml = Path(cmd[-1])
        whole = run_in_process(toml, f'output.dir="{tmp_path / "whole"}"')

        # shard 1 as one rank of a 3-process launch (torchrun's variables, no data.shard), killed
        # once its first line is written; then run again as an explicit shard: the same run directory
        with monkeypatch.context() as mp:
            mp.setenv("RANK", "1")
            mp.setenv("WORLD_SIZE", "3")
            assert kill_after_a_new_line(cmd, split / "shard-1-of-3" / "qa.jsonl"), "the kill must land mid-run"
        killed = split / "shard-1-of-3"
        assert json.loads((killed / "recipe.json").read_text())["data"]["shard"] == "1/3"
        assert not (killed / "summary.json").exists()
        early = run_lvr("merge", toml)
        assert early.returncode == 2 and early.stderr == (
            f"error: {killed}: shard 1/3 is unfinished (no summary.json): rerun it with data.shard=1/3 "
            "to resume it, then merge\n")

        rerun = subprocess.run([*cmd, "data.shard=1/3", "--allow-failures"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "LVR_NO_PROGRESS": "1"})
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        resumed = json.loads((killed / "summary.json").read_text())
        assert resumed["resumed"] and resumed["already_done"] >= 1 and resumed["videos"] == 2
        parts = [run_in_process(toml, f"data.shard={i}/3") for i in (0, 2)]
    assert [p["videos"] for p in parts] == [1, 0]

    merged = run_lvr("merge", toml)
    assert merged.returncode == 1 and "1 input(s) failed" in merged.stderr, merged.stderr[-2000:]
    for name in ("qa.jsonl", "errors.jsonl"):
        assert (split / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert [json.loads(x)["key"] for x in (split / "errors.jsonl").read_text().splitlines()] == [f"{V0}/plot"]
    summary = json.loads((split / "summary.json").read_text())
    # what the dataset holds matches; per-run counters (items written now, retries) are the shards' sums
    dataset = ("videos", "keys", "done", "failed")
    assert {k: summary[k] for k in dataset} == {k: whole[k] for k in dataset}
    assert {k: summary[k] for k in dataset} == {"videos": 3, "keys": 12, "done": 11, "failed": 1}
    assert summary["shards"] == 3 and summary["resumed"] is True
