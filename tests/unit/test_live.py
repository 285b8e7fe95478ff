"""The live progress: a rich bar with the step's numbers on a terminal, plain flushed lines
every `log.every_steps` elsewhere; fed by `run.metric` and `run.error`."""

import io
import json
import re
from pathlib import Path

import pytest

from lvr_cli import live
from lvr_cli.live import LiveView

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """`time.monotonic` that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(live.time, "monotonic", c)
    monkeypatch.setattr(live.time, "strftime", lambda fmt: "12:00:00")
    return c


def sft_step(step: int) -> dict:
    return {"loss": 2.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5, "target_tokens": 100.0, "time/step": 2.0}


def test_plain_lines_every_n_steps_with_the_numbers_and_an_eta(clock):
    out = io.StringIO()
    view = LiveView("sft", every_steps=2, file=out, terminal=False)
    with view.progress("sft steps", 5) as bar:
        bar.advance(0)  # what a fresh run's stage does first (a resumed one skips its done steps)
        for step in range(1, 6):
            clock.now += 2.0  # two seconds a step
            view.metric(step, sft_step(step) | ({"eval_loss": 1.5} if step == 4 else {}))
            bar.advance()
    assert out.getvalue().splitlines() == [
        "[12:00:00] sft steps 2/5 40% | loss 1.0000  lr 2.00e-03  grad_norm 0.5 | 2.00 s/it | elapsed 0:00:04 eta 0:00:06",
        "[12:00:00] sft steps 4/5 80% | loss 0.5000  eval_loss 1.5000  lr 4.00e-03  grad_norm 0.5 | 2.00 s/it "
        "| elapsed 0:00:08 eta 0:00:02",
        "[12:00:00] sft steps 5/5 100% | loss 0.4000  lr 5.00e-03  grad_norm 0.5 | 2.00 s/it | elapsed 0:00:10 eta 0:00:00",
    ]


def test_a_resumed_bar_rates_only_the_steps_it_runs(clock):
    out = io.StringIO()
    view = LiveView("rl", every_steps=1, file=out, terminal=False)
    view.metric(0, {"eval_accuracy": 0.5625})  # rl's held-out accuracy before any step: no bar yet
    with view.progress("rl steps", 10) as bar:
        bar.advance(8)  # steps 1-8 done by the killed run: not 8 steps in no time
        clock.now += 30.0
        view.metric(9, {"reward/total": 1.25, "reward/accuracy": 0.75, "kl": 0.00125, "response_length": 41.5,
                        "reward/format": 1.0})
        bar.advance()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[12:00:00] rl step 0 | eval_acc 56.2%",
        "[12:00:00] rl steps 8/10 80% | elapsed 0:00:00 eta -:--:--",
        "[12:00:00] rl steps 9/10 90% | reward 1.250  acc 75.0%  kl 1.25e-03  len 41.5 | 30.00 s/it "
        "| elapsed 0:00:30 eta 0:00:30",
    ]


def test_data_stage_lines_count_items_and_failures(clock):
    out = io.StringIO()
    view = LiveView("caption", every_steps=10, file=out, terminal=False)
    with view.progress("caption", 25) as bar:
        for i in range(25):
            clock.now += 0.5
            if i in (3, 17):
                view.error()
            bar.advance()
    lines = out.getvalue().splitlines()
    assert [re.sub(r" \| elapsed.*", "", x) for x in lines] == [
        "[12:00:00] caption 10/25 40% | failed 1 | 2.00 it/s",  # the rate counts from the first item
        "[12:00:00] caption 20/25 80% | failed 2 | 2.00 it/s",
        "[12:00:00] caption 25/25 100% | failed 2 | 2.00 it/s",
    ]
    assert lines[-1].endswith("| elapsed 0:00:12 eta 0:00:00")


def test_terminal_bar_shows_the_numbers_failures_and_eta(clock, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    view = LiveView("sft", every_steps=1, file=out, terminal=True)
    with view.progress("sft steps", 4) as bar:
        bar.advance(0)
        for step in (1, 2):
            clock.now += 3.0
            view.metric(step, sft_step(step))
            bar.advance()
        view.error()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    final = [x for x in re.split(r"[\r\n]", text) if "sft steps" in x][-1]
    assert re.search(r"sft steps .* 2/4 +50% loss 1\.0000  lr 2\.00e-03  grad_norm 0\.5  failed 1 3\.00 s/it "
                     r"\S+ eta 0:00:06", final), final
    assert "[12:00:00]" not in text  # no plain lines on a terminal


def test_run_metric_feeds_the_view_and_lvr_no_progress_silences_it(tmp_path, capsys, monkeypatch):
    from lvr_cli.recipes import load_recipe
    from lvr_cli.rundir import RunDir

    monkeypatch.delenv("LVR_NO_PROGRESS", raising=False)
    recipe = load_recipe(ROOT / "recipes/demo/sft.toml", [f'output.dir="{tmp_path / "run"}"', "log.every_steps=2"])
    run = RunDir(tmp_path / "run", recipe).open()
    with run.progress("sft steps", 2) as bar:
        for step in (1, 2):
            run.metric(step, **sft_step(step))
            bar.advance()
    run.finish({"failed": 0})
    out = capsys.readouterr().out.splitlines()  # pytest's stdout is no terminal: plain lines
    assert len(out) == 1 and re.fullmatch(r"\[\d\d:\d\d:\d\d\] sft steps 2/2 100% \| loss 1\.0000 .*", out[0]), out
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    monkeypatch.setenv("LVR_NO_PROGRESS", "1")
    quiet = RunDir(tmp_path / "quiet", recipe).open()
    with quiet.progress("sft steps", 1) as bar:
        quiet.metric(1, **sft_step(1))
        bar.advance()
    assert capsys.readouterr().out == ""


def test_data_recipes_default_to_a_line_every_10_items_training_every_step():
    from lvr_cli.recipes import STAGES, load_recipe

    every = {stage: cls.model_fields["log"].default.every_steps for stage, cls in STAGES.items()}
    assert {s: every[s] for s in ("caption", "generate-qa", "filter", "eval")} == dict.fromkeys(
        ("caption", "generate-qa", "filter", "eval"), 10)
    assert every["sft"] == every["rl"] == every["bench-mrsp"] == 1
    partial = load_recipe(ROOT / "recipes/demo/caption.toml", ['log.backends=["jsonl"]'])
    assert partial.log.every_steps == 10
