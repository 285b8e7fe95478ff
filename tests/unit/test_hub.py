"""`lvr push` (staging, cards, dry run, upload over real HTTP to a local stand-in) and `lvr plot`."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tomli_w

from lvr_cli.hub import file_stats, push_run, stage_run
from lvr_cli.recipes import load_recipe, recipe_hash
from lvr_cli.rundir import RunDir
from stages.data.gt_server import GTServer
from stages.data.records import CATEGORIES, read_jsonl
from tests.conftest import run_lvr

ROOT = Path(__file__).resolve().parents[2]
SYNTH = {"videos": 3, "seconds": 7, "fps": 2, "width": 56, "height": 56, "object_size_px": 28, "event_seconds": 2,
         "eval_fraction": 0.34, "clip_seconds": 3, "questions_per_category": 2}


def no_token_env(tmp_path) -> dict:
    """An environment in which huggingface_hub finds no token (no HF_TOKEN, an empty HF_HOME)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    return env | {"HF_HOME": str(tmp_path / "hf_home")}


def run_clean(tmp_path, *args, **env):
    """`lvr` in a subprocess with exactly `no_token_env` plus `env`."""
    exe = Path(sys.executable).with_name("lvr")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=no_token_env(tmp_path) | env, timeout=300)


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- a model run, written the way `lvr sft` / `lvr rl` write theirs -----------------------------------
@pytest.fixture(scope="module")
def tiny_final(tmp_path_factory):
    from stages.models.tiny import build_tiny

    return build_tiny("qwen2.5-vl", tmp_path_factory.mktemp("tiny") / "final")


SFT_METRICS = [{"loss": 7.020661, "target_tokens": 709.0, "lr": 0.0002, "grad_norm": 2.698602},
               {"loss": 6.829782, "target_tokens": 770.0, "lr": 0.0004, "grad_norm": 2.540924, "eval_loss": 6.676869}]
RL_METRICS = [{"reward/total": 0.25, "reward/format": 0.5, "reward/accuracy": 0.125, "kl": 0.0, "accuracy/goal": 0.0},
              {"reward/total": 0.8125, "reward/format": 1.0, "reward/accuracy": 0.5625, "kl": 0.00317,
               "accuracy/goal": 0.75}]


def model_run(tmp_path, tiny_final, stage: str, model_path: str, out: Path | None = None, data: Path | None = None,
              extra: str = "") -> Path:
    """A finished sft/rl run dir: recipe.json and env.json from `RunDir`, metrics, summary, final/."""
    if data is None:
        data = tmp_path / "train.jsonl"
        records = [{"problem_id": f"q{i}", "problem": "Q?\nA. a\nB. b", "problem_type": c, "videos": ["v.mp4"],
                    "reasoning": "r", "answer": "A"} for i, c in enumerate(["temporal"] * 3 + ["goal", "plot", "plot"])]
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = out or tmp_path / f"{stage}_run"
    rollout = "[rollout]\nn = 4\n" if stage == "rl" else ""
    recipe = load_recipe(write_recipe(tmp_path / f"{out.name}.toml", (
        f'stage = "{stage}"\nseed = 3\n{extra}[data]\ninput = "{data}"\n[model]\npath = "{model_path}"\n'
        f'[train]\nsteps = 2\nglobal_batch = 2\n{rollout}[output]\ndir = "{out}"\n')))
    run = RunDir(out, recipe).open()
    for step, values in enumerate(RL_METRICS if stage == "rl" else SFT_METRICS, 1):
        run.metric(step, **values)
    shutil.copytree(tiny_final, out / "final")
    last = (RL_METRICS if stage == "rl" else SFT_METRICS)[-1]
    summary = ({"steps": 2, "resumed_from": 0, "final": str(out / "final"), "accuracy_first_half": 0.125,
                "accuracy_second_half": last["reward/accuracy"], "failed": 0} if stage == "rl" else
               {"steps": 2, "resumed_from": 0, "final": str(out / "final"), "loss_first": 7.020661,
                "loss_last": last["loss"], "eval_loss_last": last["eval_loss"], "failed": 0})
    run.finish(summary)
    return out


def assert_no_local_path(text: str, *paths) -> None:
    """No path of this machine in `text`: the given ones (as given, absolute, resolved), cwd, home, tmp."""
    import tempfile

    forms = {str(Path.cwd()), str(Path.home()), tempfile.gettempdir(), "runs/"}
    for p in paths:
        forms |= {str(p), str(Path(p).absolute()), str(Path(p).resolve())}
    for form in forms - {"", ".", "/"}:
        assert form not in text, f"{form!r} in the card"
    assert not re.search(r"(?<![\w.:/-])/(tmp|home|root|Users|work|private|var)/", text)


def card_sections(text: str) -> tuple[dict, str]:
    """(front matter as data, the rest) of a README.md."""
    import yaml

    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.parametrize("stage, model_path", [("sft", "Qwen/Qwen2.5-VL-7B-Instruct"), ("rl", "tiny:qwen2.5-vl")])
def test_model_run_dry_run_stages_the_checkpoint_and_a_card(tmp_path, tiny_final, stage, model_path):
    from huggingface_hub import ModelCard

    from stages.plots import plot_run

    run = model_run(tmp_path, tiny_final, stage, model_path)
    png = plot_run(run)
    staged = stage_run(run, "lvr-test/tiny-" + stage)
    assert staged.folder == run / "push" and staged.repo_type == "model"
    final_files = sorted(p.name for p in (run / "final").iterdir())
    assert staged.files == sorted([*final_files, "README.md", "metrics.jsonl", png.name])
    for name in set(final_files) - {"video_preprocessor_config.json"}:  # that one gains the video settings
        assert (staged.folder / name).read_bytes() == (run / "final" / name).read_bytes()

    text = (staged.folder / "README.md").read_text()
    assert_no_local_path(text, tmp_path, run)
    meta, body = ModelCard.load(staged.folder / "README.md").data.to_dict(), card_sections(text)[1]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "video-text-to-text"
    assert meta["tags"] == ["lvr", "video", "reasoning", "grpo" if stage == "rl" else "sft"]
    assert meta.get("base_model") == (model_path if "/" in model_path else None)
    assert meta["license"] == "apache-2.0" and "datasets" not in meta and "model-index" not in meta
    summary = json.loads((run / "summary.json").read_text())
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert last["step"] == 2
    for key in ("steps", "failed", "accuracy_second_half" if stage == "rl" else "loss_last"):
        assert f"| `{key}` | {json.dumps(summary[key])} |" in body
    assert '| `final` | "<local: final>" |' in body  # summary.json names final/ by its path
    for key, value in last.items():
        assert f"| `{key}` | {json.dumps(value)} |" in body
    assert f"![{png.stem}]({png.name})" in body
    assert f"1. `{stage}` run `{stage}_run` (this model). Trained on local file `train.jsonl`: 6 records " \
           "(temporal 3, goal 1, plot 2)." in body
    # the card's recipe is the run's recipe with each local path shown by its last part
    toml_text = re.search(r"```toml\n(.*?)\n```", body, re.S).group(1)
    recipe = json.loads((run / "recipe.json").read_text())
    shown = tomllib.loads(toml_text)
    assert shown["data"]["input"] == "<local: train.jsonl>" and shown["output"]["dir"] == f"<local: {stage}_run>"
    shown["data"]["input"], shown["output"]["dir"] = recipe["data"]["input"], recipe["output"]["dir"]
    assert shown == without_nulls(recipe)
    env = json.loads((run / "env.json").read_text())
    assert recipe_hash(load_recipe(write_recipe(tmp_path / "back.toml", tomli_w.dumps(shown)))) == env["recipe_sha256"]
    assert f"git commit: `{env['git_commit']}`" in body and env["versions"]["torch"] in body

    if stage == "sft":  # the staged folder is a loadable checkpoint with the same weights
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        pushed = AutoModelForImageTextToText.from_pretrained(staged.folder)
        original = AutoModelForImageTextToText.from_pretrained(run / "final")
        for (name, a), (_, b) in zip(pushed.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), name
        assert AutoTokenizer.from_pretrained(staged.folder).get_vocab() == \
            AutoTokenizer.from_pretrained(run / "final").get_vocab()


def without_nulls(data):
    return {k: without_nulls(v) for k, v in data.items() if v is not None} if isinstance(data, dict) else data


QA = [{"problem_id": f"q{i}", "problem": "Q?\nA. a\nB. b", "problem_type": c, "videos": ["v.mp4"], "reasoning": "r",
       "answer": "A"} for i, c in enumerate(["temporal", "goal", "goal"])]


def eval_run(out: Path, model_path: str, data: Path, time: str, answers: dict[int, list[str]]) -> Path:
    """A finished eval run of `model_path` written as `lvr eval` writes it; `answers`: frames -> letters."""
    from stages.eval import EvalItem, report_markdown, results_dict, summary_dict

    recipe = load_recipe(write_recipe(out.with_suffix(".toml"), (
        f'stage = "eval"\n[data]\ninput = "{data}"\n[model]\npath = "{model_path}"\n[output]\ndir = "{out}"\n')))
    run = RunDir(out, recipe).open()
    rows = [{"key": q["problem_id"], "frames": f, "prediction": f"<answer>{a}</answer>", "extracted": a,
             "answer": "A", "correct": a == "A", "category": q["problem_type"]}
            for f, letters in answers.items() for q, a in zip(QA, letters)]
    run.file("predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = [EvalItem(q["problem_id"], "?", {"A": "a", "B": "b"}, "A", "v.mp4", {"category": q["problem_type"]})
             for q in QA]
    results = results_dict(recipe, items, list(answers), rows, 0)
    run.file("results.json").write_text(json.dumps(results))
    run.file("report.md").write_text(report_markdown(results, None))
    run.finish(summary_dict(results))
    env = json.loads(run.file("env.json").read_text())
    run.file("env.json").write_text(json.dumps(env | {"time": time}))
    return out


def test_model_card_follows_local_checkpoints_to_the_hub_base_and_carries_eval_results(tmp_path, tiny_final,
                                                                                       monkeypatch):
    """Qwen -> sft1 (Hub data) -> sft2 (from sft1's final/) -> rl (from sft2's checkpoint), relative paths as
    in the Makefile; the rl card names the Hub base, both runs by name and stage, and the latest eval of final/."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    from lvr_cli.cards import EXAMPLE
    from stages.mrsp.runtime import THINK_INSTRUCTION, question_messages

    monkeypatch.chdir(tmp_path)
    hub_data = tmp_path / "hf/hub/datasets--LongVideo-Reason--longvideo-reason/snapshots/abc123/train.jsonl"
    hub_data.parent.mkdir(parents=True)
    hub_data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    Path("data").mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        Path("data", name).write_text("".join(json.dumps(r) + "\n" for r in QA))
    model_run(tmp_path, tiny_final, "sft", "Qwen/Qwen2.5-VL-7B-Instruct", out=Path("runs/demo/sft1"), data=hub_data,
              extra='[hub]\nrepo_id = "lvr-test/sft1"\n')
    model_run(tmp_path, tiny_final, "sft", "runs/demo/sft1/final", out=Path("runs/demo/sft2"),
              data=Path("data/train.jsonl"))
    shutil.copytree(tiny_final, "runs/demo/sft2/checkpoints/step_2")
    system = "You are a careful video analyst."
    run = model_run(tmp_path, tiny_final, "rl", "runs/demo/sft2/checkpoints/step_2", out=Path("runs/demo/rl"),
                    data=Path("data/train.jsonl"),
                    extra=f'[prompt]\nsystem = "{system}"\n[video]\nmax_frames = 16\nfps = 2.0\nmax_pixels = 12544\n')
    shutil.copytree(tiny_final, run / "checkpoints" / "step_1")
    evals = [eval_run(Path("runs/demo/eval_old"), "runs/demo/rl/final", Path("data/eval.jsonl"),
                      "2026-01-01T10:00:00+0000", {16: ["B", "B", "A"]}),
             eval_run(Path("runs/demo/eval_new"), "runs/demo/rl/final", Path("data/eval.jsonl"),
                      "2026-02-01T10:00:00+0000", {8: ["A", "B", "B"], 16: ["A", "A", "B"]}),
             eval_run(Path("runs/demo/eval_step1"), str(tmp_path / "runs/demo/rl/checkpoints/step_1"),
                      Path("data/eval.jsonl"), "2026-03-01T10:00:00+0000", {16: ["A", "A", "A"]})]

    staged = stage_run(run, "lvr-test/tiny-r1", eval_runs=evals)
    text = (staged.folder / "README.md").read_text()
    assert_no_local_path(text, tmp_path, run, *evals, "runs/demo")
    card = ModelCard.load(staged.folder / "README.md")
    meta, body = card.data.to_dict(), card.text
    assert meta["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["LongVideo-Reason/longvideo-reason"] and meta["pipeline_tag"] == "video-text-to-text"
    hub = "LongVideo-Reason/longvideo-reason"
    assert "1. `sft` run `sft1`, its `final` checkpoint; its recipe's Hub repo: `lvr-test/sft1`. Trained on Hub " \
           f"dataset [`{hub}`](https://huggingface.co/datasets/{hub}), file `train.jsonl`." in body
    assert "2. `sft` run `sft2`, its `step_2` checkpoint. Trained on local file `train.jsonl`: 3 records " \
           "(temporal 1, goal 2)." in body
    assert "3. `rl` run `rl` (this model)." in body

    # model-index: the latest eval of final/ (eval_new), every value as in its results.json
    results = json.loads((tmp_path / "runs/demo/eval_new/results.json").read_text())
    shown = {r.metric_name: r.metric_value for r in card.data.eval_results}
    expected = {f"accuracy ({f} frames)": v["overall"]["accuracy"] for f, v in results["by_frames"].items()}
    expected |= {f"accuracy, category {c} (16 frames)": s["accuracy"]
                 for c, s in results["by_frames"]["16"]["by_category"].items()}
    assert shown == expected == {"accuracy (8 frames)": 1 / 3, "accuracy (16 frames)": 2 / 3,
                                 "accuracy, category temporal (16 frames)": 1.0,
                                 "accuracy, category goal (16 frames)": 0.5}
    assert {(r.dataset_type, r.dataset_config, r.source_name, r.task_type) for r in card.data.eval_results} == \
        {("json", "eval", "lvr eval run eval_new", "video-text-to-text")}
    data = "eval.jsonl (longvideo-reason, 3 items, a local file)"
    for row in (f"| `eval_old` | `final` | {data} | 16 | 3 | 33.3 | no |",
                f"| `eval_new` | `final` | {data} | 8 | 3 | 33.3 | yes |",
                f"| `eval_new` | `final` | {data} | 16 | 3 | 66.7 | yes |",
                f"| `eval_step1` | `step_1` | {data} | 16 | 3 | 100.0 | no |"):
        assert row in body, row

    # the prompt: recipe's system message and lvr's instruction, rendered by the checkpoint's own template
    messages = question_messages(EXAMPLE, system, True)
    assert f"> {THINK_INSTRUCTION}" in body and f"the system message `\"{system}\"`" in body
    assert "```json\n" + json.dumps(messages, indent=2) + "\n```" in body
    rendered = AutoTokenizer.from_pretrained(run / "final").apply_chat_template(messages, tokenize=False,
                                                                                 add_generation_prompt=True)
    assert "```text\n" + rendered.rstrip("\n") + "\n```" in body and system in rendered

    # video settings: in the card, and in the staged processor config only
    for key, value in (("max_frames", "16"), ("fps", "2.0"), ("max_pixels", "12544")):
        assert re.search(rf"^\| `video\.{key}` \| {re.escape(value)} \|", body, re.M), key
    config = json.loads((staged.folder / "video_preprocessor_config.json").read_text())
    assert {k: config[k] for k in ("size", "max_pixels", "max_frames", "fps", "num_frames", "do_sample_frames")} == \
        {"size": {"shortest_edge": 28 * 28, "longest_edge": 12544}, "max_pixels": 12544, "max_frames": 16, "fps": 2.0,
         "num_frames": None, "do_sample_frames": True}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        assert (run / "final" / name).read_bytes() == (tiny_final / name).read_bytes()
    assert json.loads((staged.folder / "preprocessor_config.json").read_text()) == \
        json.loads((tiny_final / "preprocessor_config.json").read_text())  # images keep their own settings

    pushed = push_run(run, "lvr-test/tiny-r1", dry_run=True, out=tmp_path / "dry", eval_runs=evals[1:2])
    assert pushed.dry_run_reason == "--dry-run" and pushed.staged.folder == tmp_path / "dry"
    assert ModelCard.load(pushed.staged.folder / "README.md").data.eval_results == card.data.eval_results

    # an eval run of another model is refused in one line, before anything is staged
    with pytest.raises(ValueError, match=r"^--eval-run runs/demo/eval_x: it evaluated 'runs/demo/sft1/final', "
                                         r"not runs/demo/rl/final or one of its checkpoints$"):
        stage_run(run, "lvr-test/tiny-r1", out=tmp_path / "o", eval_runs=[
            eval_run(Path("runs/demo/eval_x"), "runs/demo/sft1/final", Path("data/eval.jsonl"),
                     "2026-01-01T00:00:00+0000", {16: ["A", "A", "A"]})])
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"^--eval-run runs/demo/sft1: not a finished eval run \(stage 'sft'"):
        stage_run(run, "lvr-test/tiny-r1", eval_runs=[Path("runs/demo/sft1")])


@pytest.mark.parametrize("layout", ["video_preprocessor_config.json", "preprocessor_config.json only",
                                    "processor_config.json"])
def test_video_settings_go_where_transformers_reads_them(tmp_path, layout):
    """transformers' order: processor_config.json's `video_processor`, video_preprocessor_config.json,
    then preprocessor_config.json (copied to a video config, so images keep their own budget)."""
    from lvr_cli.hub import write_video_settings

    grid = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
            "image_processor_type": "Qwen2VLImageProcessor"}
    image = grid | {"max_pixels": 1003520, "min_pixels": 3136}
    run, staged = tmp_path / "final", tmp_path / "staged"
    run.mkdir()
    (run / "preprocessor_config.json").write_text(json.dumps(image))
    if layout == "video_preprocessor_config.json":
        (run / layout).write_text(json.dumps(grid))
    if layout == "processor_config.json":
        (run / layout).write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor", "video_processor": grid}))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    shutil.copytree(run, staged, copy_function=os.link)  # hard links, as staging places them
    name = write_video_settings(staged, {"max_frames": 64, "fps": None, "max_pixels": 50176})
    expected = {"size": {"shortest_edge": 32 * 32, "longest_edge": 50176}, "min_pixels": 32 * 32, "max_pixels": 50176,
                "do_sample_frames": True, "max_frames": 64, "min_frames": 2, "num_frames": 64, "fps": None,
                "cap_pixels_per_frame": False}
    written = json.loads((staged / name).read_text())
    if layout == "processor_config.json":
        assert name == layout
        assert written == {"processor_class": "Qwen2_5_VLProcessor", "video_processor": grid | expected}
    else:
        assert name == "video_preprocessor_config.json"
        assert written == (grid if layout == name else image) | expected
    assert json.loads((staged / "preprocessor_config.json").read_text()) == image
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the run's files are untouched


@pytest.mark.parametrize("fps", [None, 4.0])
def test_staged_video_processor_samples_and_resizes_as_lvr_does(tmp_path, tiny_final, fps):
    """transformers' own video processor, loaded from the staged folder, gives lvr's patch grid."""
    pytest.importorskip("torchvision")  # transformers' video processors need it; lvr does not
    import numpy as np
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from stages.data.video import fit_size, sample_indices

    video = "[video]\nmax_frames = 12\nmax_pixels = 12544\n" + (f"fps = {fps}\n" if fps else "")
    run = model_run(tmp_path, tiny_final, "sft", "tiny:qwen2.5-vl", extra=video)
    processor = AutoProcessor.from_pretrained(stage_run(run, "lvr-test/x").folder).video_processor
    frames, native_fps, (h, w) = 40, 8.0, (90, 160)
    pixels = np.random.default_rng(0).integers(0, 255, (frames, h, w, 3), dtype=np.uint8)
    grid = processor(videos=[pixels], video_metadata=[VideoMetadata(total_num_frames=frames, fps=native_fps)],
                     return_tensors="pt")["video_grid_thw"][0].tolist()
    n = len(sample_indices(frames, native_fps, 12, fps))  # 12 frames spread, or 4 fps of a 5 s video capped at 12
    rh, rw = fit_size(h, w, 28, 12544)
    assert grid == [-(-n // 2), rh // 14, rw // 14]


@pytest.mark.parametrize("model_path, license, base", [
    ("someone/Other-VL-7B", "other", "someone/Other-VL-7B"), ("runs/gone/final", "other", None)])
def test_unknown_base_license_is_other_with_the_rule_stated(tmp_path, tiny_final, monkeypatch, model_path, license,
                                                            base):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    run = model_run(tmp_path, tiny_final, "sft", model_path)
    card = ModelCard.load(stage_run(run, "lvr-test/x").folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == license and meta.get("base_model") == base
    if base:
        assert meta["license_link"] == f"https://huggingface.co/{base}" and meta["license_name"] == "base-model-license"
        assert f"`other`: the weights derive from `{base}`, whose license lvr does not know" in card.text
    else:
        assert "Base model: not known: the local checkpoint <local: final> is not on this machine." in card.text
        assert "`other`: the base model is not known" in card.text
    assert_no_local_path(str(card), tmp_path, run)


def test_local_paths_are_shown_by_name_and_a_leak_is_refused(tmp_path, monkeypatch):
    from lvr_cli.cards import check_public
    from lvr_cli.hub import public

    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    values = {"abs": str(tmp_path / "runs/sft/final"), "rel": "runs/demo/sft/final", "home": "~/videos/a.mp4",
              "dot": "./train.jsonl", "existing_two_parts": "data", "text": f"saved to {tmp_path}/x/model.pt today",
              "hub": "Qwen/Qwen2.5-VL-7B-Instruct", "tiny": "tiny:qwen2.5-vl", "url": "http://127.0.0.1:8000/v1",
              "prose": "A / B and/or <think> </think>", "nested": [{"p": "/etc/lvr/recipe.toml"}, 3, None]}
    assert public(values) == values | {
        "abs": "<local: final>", "rel": "<local: final>", "home": "<local: a.mp4>", "dot": "<local: train.jsonl>",
        "text": "saved to <local: model.pt> today", "nested": [{"p": "<local: recipe.toml>"}, 3, None]}
    run = Path("runs/demo/rl")
    leaks = (f"see {tmp_path}/runs/x", f"`{(tmp_path / run).resolve()}`", "in runs/demo/rl/final", f"{Path.home()}/x")
    for leak in leaks:
        with pytest.raises(ValueError, match=r"^the card would show the local path .+ \(a bug in lvr push"):
            check_public(f"a card\n{leak}\n", [run])
    check_public("Qwen/Qwen2.5-VL-7B-Instruct <local: final> https://huggingface.co/x/y </think> runs_x", [run])


def test_bad_run_dirs_are_refused_with_the_path_and_reason(tmp_path, tiny_final):
    run = model_run(tmp_path, tiny_final, "sft", "tiny:qwen2.5-vl")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'nowhere'))}: no such run directory$"):
        stage_run(tmp_path / "nowhere", "a/b")
    with pytest.raises(ValueError, match=r"--repo-id 'a/b/c': Repo id must be in the form"):
        stage_run(run, "a/b/c")
    shutil.rmtree(run / "final")
    with pytest.raises(ValueError, match=f"^{re.escape(str(run))}: sft run without final/config.json"):
        stage_run(run, "a/b")
    (run / "summary.json").unlink()
    with pytest.raises(ValueError, match=f"^{re.escape(str(run))}: no summary.json \\(the run has not finished\\)$"):
        stage_run(run, "a/b")
    # a folder that is not a staging of ours is never replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    (tmp_path / "again").mkdir()
    run2 = model_run(tmp_path / "again", tiny_final, "sft", "tiny:qwen2.5-vl")
    with pytest.raises(ValueError, match="exists, is not empty and was not written by lvr push"):
        stage_run(run2, "a/b", out=foreign)
    assert (foreign / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match=f"would overwrite the run {re.escape(str(run2))} itself"):
        stage_run(run2, "a/b", out=run2 / "final" / "x")


# -- dataset runs: a real `lvr synth` and `lvr generate-qa` (auto-push from the recipe) ----------------
@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    spec = "".join(f"{k} = {v}\n" for k, v in SYNTH.items())
    recipe = write_recipe(tmp / "synth.toml", f'stage = "synth"\n[synth]\n{spec}[output]\ndir = "{tmp / "data"}"\n')
    r = run_lvr("synth", recipe)
    assert r.returncode == 0, r.stderr
    return tmp / "data"


def card_table(body: str) -> dict[str, dict]:
    """The card's per-file table: file -> {records, temporal, goal, spatial, plot, other}."""
    rows = {}
    for m in re.finditer(r"^\| `([^`]+)` \| (\d+) \| (.+) \|$", body, re.M):
        cells = [c.strip() for c in m.group(3).split("|")]
        rows[m.group(1)] = {"records": int(m.group(2)),
                            **{c: (None if v == "-" else int(v)) for c, v in zip((*CATEGORIES, "other"), cells)}}
    return rows


def expected_row(path: Path) -> dict:
    records = read_jsonl(path)
    cats = Counter(r.get("category") or r.get("problem_type") for r in records)
    cats.pop(None, None)
    row = {"records": len(records)}
    for c in (*CATEGORIES, "other"):
        row[c] = (cats.get(c, 0) if c != "other" else sum(v for k, v in cats.items() if k not in CATEGORIES)) \
            if cats else None
    return row


def test_dataset_run_card_counts_per_category_and_loads_with_datasets(synth_run, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    run = tmp_path / "data"
    shutil.copytree(synth_run, run)
    (run / "errors.jsonl").write_text(json.dumps({"key": "x", "reason": "bad"}) + "\n")
    (run / "rl.jsonl").write_text("")
    staged = stage_run(run, "lvr-test/synth", out=tmp_path / "staged")
    assert staged.repo_type == "dataset"
    assert staged.files == ["README.md", "captions_ref.jsonl", "eval.jsonl", "train.jsonl"]  # no videos, errors
    text = (staged.folder / "README.md").read_text()
    assert_no_local_path(text, tmp_path, run, synth_run)
    meta, body = DatasetCard.load(staged.folder / "README.md").data.to_dict(), card_sections(text)[1]
    table = card_table(body)
    assert set(table) == {"captions_ref.jsonl", "eval.jsonl", "train.jsonl"}
    for name, row in table.items():
        assert row == expected_row(run / name), name
    train = read_jsonl(run / "train.jsonl")
    assert table["train.jsonl"]["records"] == len(train) > 0 and table["train.jsonl"]["spatial"] > 0
    assert "No records, so not uploaded and no split: `rl.jsonl`" in body
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "test", "path": "eval.jsonl"},
                                                  {"split": "train", "path": "train.jsonl"}]},
        {"config_name": "captions_ref", "data_files": [{"split": "train", "path": "captions_ref.jsonl"}]}]
    assert meta["license"] == "apache-2.0" and "every record comes from `lvr synth` (`synth`)" in body

    ds = load_dataset(str(staged.folder), cache_dir=str(tmp_path / "cache"))
    assert {s: ds[s].num_rows for s in ds} == {"train": len(train), "test": len(read_jsonl(run / "eval.jsonl"))}
    assert ds["train"][0]["problem_id"] == train[0]["problem_id"]
    captions = load_dataset(str(staged.folder), "captions_ref", split="train", cache_dir=str(tmp_path / "cache"))
    assert captions.num_rows == len(read_jsonl(run / "captions_ref.jsonl"))
    # why the empty file is left out: `datasets` has no empty split to give
    with pytest.raises(Exception) as no_rows:
        load_dataset("json", data_files={"train": str(run / "rl.jsonl")}, cache_dir=str(tmp_path / "cache2"))
    assert type(no_rows.value).__name__ in ("StopIteration", "ValueError", "DatasetGenerationError")


def test_filter_run_splits_are_train_configs_and_an_empty_one_is_left_out(synth_run, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    out = tmp_path / "filter"
    recipe = load_recipe(write_recipe(tmp_path / "filter.toml", f'stage = "filter"\n[data]\n'
                                                                   f'input = "{synth_run / "train.jsonl"}"\n'
                                                                   f'[output]\ndir = "{out}"\n'))
    run = RunDir(out, recipe).open()
    rl = read_jsonl(synth_run / "train.jsonl")[:3]
    (out / "rl.jsonl").write_text("".join(json.dumps(r | {"pass_rate": 0.5}) + "\n" for r in rl))
    (out / "sft.jsonl").write_text("")
    scores = [{"key": r["problem_id"], "pass_rate": 0.5} for r in rl]
    (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    run.finish({"rl": 3, "sft": 0})

    staged = stage_run(out, "lvr-test/filtered")
    assert staged.files == ["README.md", "rl.jsonl", "scores.jsonl"]
    card = DatasetCard.load(staged.folder / "README.md")
    assert card.data.to_dict()["configs"] == [
        {"config_name": "rl", "data_files": [{"split": "train", "path": "rl.jsonl"}]},
        {"config_name": "scores", "data_files": [{"split": "train", "path": "scores.jsonl"}]}]
    assert card.data.license == "apache-2.0" and "(`filter` <- `synth`)" in card.text
    assert "No records, so not uploaded and no split: `sft.jsonl`" in card.text
    assert 'load_dataset("lvr-test/filtered", "rl", split="train")' in card.text
    assert_no_local_path(str(card), tmp_path, out, synth_run)
    got = load_dataset(str(staged.folder), "rl", split="train", cache_dir=str(tmp_path / "cache"))
    assert [r["problem_id"] for r in got] == [r["problem_id"] for r in rl] and got[0]["pass_rate"] == 0.5


def test_include_videos_places_each_referenced_video_at_its_path(synth_run, tmp_path):
    staged = stage_run(synth_run, "lvr-test/synth", out=tmp_path / "staged", include_videos=True)
    refs = {v for name in ("train.jsonl", "eval.jsonl") for r in read_jsonl(synth_run / name) for v in r["videos"]}
    assert refs and all(r.startswith("videos/") for r in refs)
    videos = [f for f in staged.files if f.endswith(".mp4")]
    assert sorted(videos) == sorted(refs)  # captions_ref names the same files relative to videos/: not twice
    for v in videos:
        assert (staged.folder / v).read_bytes() == (synth_run / v).read_bytes()
    assert f"{len(refs)} video file(s) included" in (staged.folder / "README.md").read_text()
    broken = tmp_path / "broken"
    shutil.copytree(synth_run, broken, ignore=shutil.ignore_patterns("videos"))
    with pytest.raises(ValueError, match=r"referenced video\(s\) not found \(first: "):
        stage_run(broken, "lvr-test/synth", out=tmp_path / "staged2", include_videos=True)


def test_generate_qa_with_hub_push_stages_a_dry_run_after_the_stage(synth_run, tmp_path):
    out = tmp_path / "qa"
    with GTServer(synth_run) as server:
        recipe = write_recipe(tmp_path / "qa.toml", (
            f'stage = "generate-qa"\n[data]\ninput = "{synth_run / "captions_ref.jsonl"}"\n'
            f'[qa]\nquestions_per_category = 2\nprompts_dir = "{ROOT / "recipes" / "prompts"}"\n'
            f'dedup_threshold = 0.9\n[backend]\nkind = "openai"\nmodel = "gt"\nbase_url = "{server.url}"\n'
            f'backoff_s = 0.01\n[output]\ndir = "{out}"\n[hub]\nrepo_id = "lvr-test/qa"\npush = true\n'))
        r = run_clean(tmp_path, "generate-qa", recipe, LVR_NO_PROGRESS="1")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (out / "push").iterdir())
    assert files == ["README.md", "qa.jsonl"]
    assert r.stdout.strip().splitlines()[-1] == (
        f"dry run (no token: HF_TOKEN is unset and `hf auth login` was not run): staged 2 files for dataset repo "
        f"lvr-test/qa in {out / 'push'}; nothing uploaded")
    meta, body = card_sections((out / "push" / "README.md").read_text())
    assert meta["configs"] == [{"config_name": "qa", "data_files": [{"split": "train", "path": "qa.jsonl"}],
                                "default": True}]
    assert meta["license"] == "other" and "backend-model text (`generate-qa`)" in body
    assert 'load_dataset("lvr-test/qa", split="train")' in body
    row = card_table(body)["qa.jsonl"]
    assert row == expected_row(out / "qa.jsonl") and row["records"] > 0
    assert all(row[c] > 0 for c in CATEGORIES) and file_stats(out / "qa.jsonl")["qa"]


def test_eval_run_stages_predictions_results_and_the_report_as_card(tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from stages.eval import aggregate, report_markdown, summary_dict

    data = tmp_path / "eval.jsonl"
    data.write_text("")
    out = tmp_path / "eval_run"
    model = tmp_path / "models" / "final"
    recipe = load_recipe(write_recipe(tmp_path / "eval.toml", (
        f'stage = "eval"\n[data]\ninput = "{data}"\n[model]\npath = "{model}"\n[output]\ndir = "{out}"\n')))
    run = RunDir(out, recipe).open()
    rows = [{"key": f"q{i}", "frames": 16, "prediction": "<answer>A</answer>", "extracted": "A", "answer": a,
             "correct": a == "A", "finished": True, "response_tokens": 5, "category": c}
            for i, (a, c) in enumerate([("A", "temporal"), ("B", "temporal"), ("A", "goal"), ("A", "plot")])]
    run.file("predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"model": str(model), "data": str(data), "formats": ["longvideo-reason"], "items": 4,
               "failed": 0, "frames": [16], "think": True, "temperature": 0.0, "max_new_tokens": 64,
               "by_frames": {str(f): v for f, v in aggregate(rows).items()}}
    run.file("results.json").write_text(json.dumps(results))
    run.file("report.md").write_text(report_markdown(results, None))
    run.finish(summary_dict(results))

    staged = stage_run(out, "lvr-test/eval")
    assert staged.repo_type == "dataset"
    assert staged.files == ["README.md", "predictions.jsonl", "results.json"]
    text = (staged.folder / "README.md").read_text()
    assert_no_local_path(text + (staged.folder / "results.json").read_text(), tmp_path, out)
    assert json.loads((staged.folder / "results.json").read_text()) == \
        results | {"model": "<local: final>", "data": "<local: eval.jsonl>"}
    card = DatasetCard.load(staged.folder / "README.md")
    body = card.text
    assert card.data.to_dict()["configs"] == [{"config_name": "default",
                                               "data_files": [{"split": "test", "path": "predictions.jsonl"}]}]
    assert card.data.license == "other"
    assert "| `accuracy` | 0.75 |" in body and "| temporal | 1 | 2 | 50.0 |" in body
    assert "# lvr eval: <local: final>" not in body and "Data: `<local: eval.jsonl>`" in body
    assert card_table(body)["predictions.jsonl"] == {"records": 4, "temporal": 2, "goal": 1, "spatial": 0,
                                                    "plot": 1, "other": 0}
    test = load_dataset(str(staged.folder), split="test", cache_dir=str(tmp_path / "cache"))
    assert test.num_rows == 4 and test["correct"] == [r["correct"] for r in rows]


# -- the command line -----------------------------------------------------------------------------------
def test_cli_push_without_token_is_a_dry_run_and_bad_dirs_exit_2(tmp_path, tiny_final):
    run = model_run(tmp_path, tiny_final, "sft", "tiny:qwen2.5-vl")
    r = run_clean(tmp_path, "push", run, "--repo-id", "lvr-test/tiny")
    assert r.returncode == 0, r.stderr
    n = sum(1 for p in (run / "push").rglob("*") if p.is_file())
    assert r.stdout.splitlines() == [
        f"dry run (no token: HF_TOKEN is unset and `hf auth login` was not run): staged {n} files for model repo "
        f"lvr-test/tiny in {run / 'push'}; nothing uploaded"]
    r = run_clean(tmp_path, "push", run, "--repo-id", "lvr-test/tiny", "--dry-run", "--out", tmp_path / "o",
                  HF_TOKEN="hf_not_used")
    assert r.returncode == 0 and r.stdout.startswith("dry run (--dry-run): ") and (tmp_path / "o" / "README.md").exists()
    (run / "summary.json").unlink()
    bad = run_clean(tmp_path, "push", run, "--repo-id", "lvr-test/tiny")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"error: {run}: no summary.json (the run has not finished)"]


class LocalHub:
    """A loopback HTTP server answering the four Hub endpoints `create_repo` + `upload_folder` use
    (create, validate-yaml, preupload, commit: every file sent inline, base64). A stand-in for the Hub
    to check what the client sends; it says nothing of what the real Hub accepts beyond that."""

    def __init__(self):
        self.repos, self.files, self.auth = {}, {}, set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth.add(self.headers.get("authorization"))
                parts = self.path.split("?")[0].strip("/").split("/")
                base = f"http://{self.headers['host']}"
                if parts == ["api", "repos", "create"]:
                    p = json.loads(data)
                    hub.repos[f"{p['organization']}/{p['name']}"] = p
                    return self.reply(200, {"url": f"{base}/{p['organization']}/{p['name']}"})
                if parts == ["api", "validate-yaml"]:
                    return self.reply(200, {"errors": [], "warnings": []})
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self.reply(404, {"error": f"Repository not found: {repo}"})
                if parts[4:5] == ["preupload"]:
                    files = json.loads(data)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if parts[4:5] == ["commit"]:
                    for line in data.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self.reply(200, {"commitUrl": f"{base}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40})
                self.reply(404, {"error": f"no endpoint {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_cli_push_with_a_token_uploads_the_staged_folder_over_http(tmp_path, tiny_final):
    run = model_run(tmp_path, tiny_final, "rl", "tiny:qwen2.5-vl")
    hub = LocalHub()
    try:
        r = run_clean(tmp_path, "push", run, "--repo-id", "lvr-test/tiny-rl", "--public",
                      HF_ENDPOINT=hub.url, HF_TOKEN="hf_local_test")
    finally:
        hub.server.shutdown()
    assert r.returncode == 0, r.stderr
    staged = sorted(str(p.relative_to(run / "push")) for p in (run / "push").rglob("*") if p.is_file())
    assert r.stdout.splitlines() == [f"pushed {len(staged)} files for model repo lvr-test/tiny-rl: "
                                     f"{hub.url}/lvr-test/tiny-rl/commit/{'c' * 40}"]
    assert hub.repos["lvr-test/tiny-rl"] == {"name": "tiny-rl", "organization": "lvr-test", "visibility": "public",
                                             "type": "model"}
    assert hub.auth == {"Bearer hf_local_test"}
    assert sorted(hub.files) == staged
    for name, content in hub.files.items():
        assert content == (run / "push" / name).read_bytes(), name


def test_cli_push_reports_a_refused_upload_in_one_line(tmp_path, tiny_final):
    run = model_run(tmp_path, tiny_final, "rl", "tiny:qwen2.5-vl")
    hub = LocalHub()
    hub.server.shutdown()
    hub.server.server_close()  # nothing listens there any more
    r = run_clean(tmp_path, "push", run, "--repo-id", "lvr-test/x", HF_ENDPOINT=hub.url, HF_TOKEN="hf_x")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: push to model repo lvr-test/x: ")


def test_cli_plot_redraws_the_curves_from_metrics(tmp_path, lvr):
    run = tmp_path / "rl"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"stage": "rl"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **m}) + "\n" for i, m in enumerate(RL_METRICS)))
    r = lvr("plot", run)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {run / 'rewards.png'}"
    from PIL import Image

    with Image.open(run / "rewards.png") as im:
        assert im.format == "PNG" and im.size == (660, 385)  # plot_metrics: 6 x 3.5 in at 110 dpi
    (run / "recipe.json").write_text(json.dumps({"stage": "eval"}))
    bad = lvr("plot", run)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"error: {run}: eval runs have no metric curves (only sft and rl runs do)"]
    (run / "recipe.json").write_text(json.dumps({"stage": "sft"}))
    empty = lvr("plot", run)
    assert empty.returncode == 2 and "no values of loss, eval_loss to plot" in empty.stderr
