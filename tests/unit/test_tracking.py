"""`[log]` backends: every scalar of metrics.jsonl reaches tensorboard / wandb / mlflow with its
step, read back with each tool's own reader; a resumed run continues the same run, each step
once; a backend that is not installed is refused before any work."""

import json
import struct
from pathlib import Path

import pytest

from lvr_cli.recipes import load_recipe
from lvr_cli.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
# float32-exact values: tensorboard stores float32
STEPS = {1: {"loss": 2.5, "lr": 0.125, "reward/total": 0.75, "mode": "mrsp", "ok": True},
         2: {"loss": 1.25, "lr": 0.25, "reward/total": 1.0, "mode": "mrsp", "ok": False},
         3: {"loss": 0.5, "lr": 0.5, "reward/total": 1.5, "mode": "mrsp", "ok": True}}
RERUN = {3: {"loss": 0.625, "lr": 0.5, "reward/total": 1.25}, 4: {"loss": 0.375, "lr": 0.5, "reward/total": 1.75}}


def open_run(out: Path, backends: list[str], *extra: str) -> RunDir:
    recipe = load_recipe(ROOT / "recipes/demo/sft.toml", [f'output.dir="{out}"', f"log.backends={json.dumps(backends)}",
                                                         *extra])
    return RunDir(out, recipe).open()


def killed_then_resumed(out: Path, backends: list[str], close_first: bool = True, *extra: str) -> tuple[RunDir, RunDir]:
    """Steps 1-3 logged, the run stopped unfinished; rerun from a step-2 checkpoint: steps 3-4."""
    first = open_run(out, backends, *extra)
    for step, values in STEPS.items():
        first.metric(step, **values)
    if close_first:  # wandb and mlflow flush their files when the run ends
        first.close()
    second = open_run(out, backends, *extra)
    assert second.resumed
    for step, values in RERUN.items():
        second.metric(step, **values)
    second.finish({"failed": 0, "loss_last": 0.375})
    return first, second


def test_tensorboard_has_every_scalar_at_its_step_and_a_rerun_replaces_the_steps_it_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    killed_then_resumed(out, ["jsonl", "tensorboard"], False)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr", "ok", "reward/total"]  # strings stay in metrics.jsonl
    want = {1: STEPS[1], 2: STEPS[2], **RERUN}
    for tag in ("loss", "lr", "reward/total"):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(s, v[tag]) for s, v in want.items()], tag
    assert [(e.step, e.value) for e in acc.Scalars("ok")] == [(1, 1.0), (2, 0.0)]
    recipe = json.loads((out / "recipe.json").read_text())
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == recipe
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3, 4]  # the stage's resume() trims metrics.jsonl itself


def wandb_records(run_dir: Path) -> list:
    """The records of a `.wandb` transaction log (LevelDB log format: 32 KiB blocks of
    crc32/length/type-framed chunks after a 7-byte header), as protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_dir.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def test_wandb_offline_files_hold_every_step_once_in_one_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc: no API key, so offline
    out = tmp_path / "run"
    killed_then_resumed(out, ["jsonl", "wandb"], True, 'log.wandb_project="lvr-test"', 'log.wandb_tags=["demo"]')
    run_id = json.loads((out / "tracking.json").read_text())["wandb_id"]
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one run, resumed

    history, runs = {}, []
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                assert rec.history.step.num not in history  # each step once
                history[rec.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "run":
                runs.append(rec.run)
    # steps 1-3 of the first run; of the rerun only step 4 (wandb cannot take a step back)
    assert history == {1: {"loss": 2.5, "lr": 0.125, "reward/total": 0.75, "ok": 1.0},
                       2: {"loss": 1.25, "lr": 0.25, "reward/total": 1.0, "ok": 0.0},
                       3: {"loss": 0.5, "lr": 0.5, "reward/total": 1.5, "ok": 1.0},
                       4: {"loss": 0.375, "lr": 0.5, "reward/total": 1.75}}
    assert {r.run_id for r in runs} == {run_id} and runs[0].project == "lvr-test" and list(runs[0].tags) == ["demo"]
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    recipe = json.loads((out / "recipe.json").read_text())
    assert config["optim"] == recipe["optim"] and config["log"]["backends"] == ["jsonl", "wandb"]


def test_mlflow_file_store_continues_the_run_each_step_once(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    out = tmp_path / "run"
    killed_then_resumed(out, ["jsonl", "mlflow"])
    run_id = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 1.25), (3, 0.5),
                                                                                      (4, 0.375)]
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["log.backends"] == "['jsonl', 'mlflow']"
    assert json.loads(Path(client.download_artifacts(run_id, "recipe.json", str(tmp_path))).read_text()) == \
        json.loads((out / "recipe.json").read_text())
    summary = json.loads(Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["loss_last"] == 0.375 and summary["stage"] == "sft"


def test_a_backend_not_installed_is_a_one_line_recipe_error_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from lvr_cli.main import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    data = tmp_path / "train.jsonl"
    data.write_text("")
    out = tmp_path / "run"
    recipe = ROOT / "recipes/demo/sft.toml"
    r = CliRunner().invoke(app, ["sft", str(recipe), f"data.input={data}", f"eval.input={data}",
                                 f"output.dir={out}", 'log.backends=["jsonl","tensorboard","wandb"]'])
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"error: {recipe}: log.backends: 'wandb' is not installed (pip install 'lvr[wandb]')"]
    assert not out.exists()
