"""`lvr push` (staging, cards, dry run, upload over real HTTP to a local stand-in) and `lvr plot`."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lvr_cli.hub import file_stats, stage_run
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


def model_run(tmp_path, tiny_final, stage: str, model_path: str) -> Path:
    """A finished sft/rl run dir: recipe.json and env.json from `RunDir`, metrics, summary, final/."""
    data = tmp_path / "train.jsonl"
    records = [{"problem_id": f"q{i}", "problem": "Q?\nA. a\nB. b", "problem_type": c, "videos": ["v.mp4"],
                "reasoning": "r", "answer": "A"} for i, c in enumerate(["temporal"] * 3 + ["goal", "plot", "plot"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"{stage}_run"
    rollout = "[rollout]\nn = 4\n" if stage == "rl" else ""
    recipe = load_recipe(write_recipe(tmp_path / f"{stage}.toml", (
        f'stage = "{stage}"\nseed = 3\n[data]\ninput = "{data}"\n[model]\npath = "{model_path}"\n'
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


def card_sections(text: str) -> tuple[dict, str]:
    """(front matter as data, the rest) of a README.md."""
    import yaml

    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.parametrize("stage, model_path", [("sft", "Qwen/Qwen2.5-VL-7B-Instruct"), ("rl", "tiny:qwen2.5-vl")])
def test_model_run_dry_run_stages_the_checkpoint_and_a_card(tmp_path, tiny_final, stage, model_path):
    from stages.plots import plot_run

    run = model_run(tmp_path, tiny_final, stage, model_path)
    png = plot_run(run)
    staged = stage_run(run, "lvr-test/tiny-" + stage)
    assert staged.folder == run / "push" and staged.repo_type == "model"
    final_files = sorted(p.name for p in (run / "final").iterdir())
    assert staged.files == sorted([*final_files, "README.md", "metrics.jsonl", png.name])
    for name in final_files:
        assert (staged.folder / name).read_bytes() == (run / "final" / name).read_bytes()

    text = (staged.folder / "README.md").read_text()
    meta, body = card_sections(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["tags"] == ["lvr", "video", "reasoning", "grpo" if stage == "rl" else "sft"]
    assert meta.get("base_model") == (model_path if "/" in model_path else None)
    summary = json.loads((run / "summary.json").read_text())
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert last["step"] == 2
    for key in ("steps", "failed", "accuracy_second_half" if stage == "rl" else "loss_last"):
        assert f"| `{key}` | {json.dumps(summary[key])} |" in body
    for key, value in last.items():
        assert f"| `{key}` | {json.dumps(value)} |" in body
    assert f"![{png.stem}]({png.name})" in body
    assert f"`data.input` = `{tmp_path / 'train.jsonl'}`: 6 records (temporal 3, goal 1, plot 2)" in body
    # the card's recipe is the run's recipe: loaded back, it hashes to env.json's recipe_sha256
    toml_text = re.search(r"```toml\n(.*?)\n```", body, re.S).group(1)
    env = json.loads((run / "env.json").read_text())
    assert recipe_hash(load_recipe(write_recipe(tmp_path / "back.toml", toml_text))) == env["recipe_sha256"]
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
    run = tmp_path / "data"
    shutil.copytree(synth_run, run)
    (run / "errors.jsonl").write_text(json.dumps({"key": "x", "reason": "bad"}) + "\n")
    (run / "rl.jsonl").write_text("")
    staged = stage_run(run, "lvr-test/synth", out=tmp_path / "staged")
    assert staged.repo_type == "dataset"
    assert staged.files == ["README.md", "captions_ref.jsonl", "eval.jsonl", "train.jsonl"]  # no videos, errors
    meta, body = card_sections((staged.folder / "README.md").read_text())
    table = card_table(body)
    assert set(table) == {"captions_ref.jsonl", "eval.jsonl", "train.jsonl"}
    for name, row in table.items():
        assert row == expected_row(run / name), name
    train = read_jsonl(run / "train.jsonl")
    assert table["train.jsonl"]["records"] == len(train) > 0 and table["train.jsonl"]["spatial"] > 0
    assert "Empty, so not uploaded: `rl.jsonl`." in body
    assert {c["config_name"] for c in meta["configs"]} == {"default", "captions_ref"}

    from datasets import load_dataset

    ds = load_dataset(str(staged.folder), cache_dir=str(tmp_path / "cache"))
    assert {s: ds[s].num_rows for s in ds} == {"train": len(train), "eval": len(read_jsonl(run / "eval.jsonl"))}
    assert ds["train"][0]["problem_id"] == train[0]["problem_id"]


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
    _, body = card_sections((out / "push" / "README.md").read_text())
    row = card_table(body)["qa.jsonl"]
    assert row == expected_row(out / "qa.jsonl") and row["records"] > 0
    assert all(row[c] > 0 for c in CATEGORIES) and file_stats(out / "qa.jsonl")["qa"]


def test_eval_run_stages_predictions_results_and_the_report_as_card(tmp_path):
    from stages.eval import aggregate, report_markdown, summary_dict

    data = tmp_path / "eval.jsonl"
    data.write_text("")
    out = tmp_path / "eval_run"
    recipe = load_recipe(write_recipe(tmp_path / "eval.toml", f'stage = "eval"\n[data]\ninput = "{data}"\n'
                                                                 f'[output]\ndir = "{out}"\n'))
    run = RunDir(out, recipe).open()
    rows = [{"key": f"q{i}", "frames": 16, "prediction": "<answer>A</answer>", "extracted": "A", "answer": a,
             "correct": a == "A", "finished": True, "response_tokens": 5, "category": c}
            for i, (a, c) in enumerate([("A", "temporal"), ("B", "temporal"), ("A", "goal"), ("A", "plot")])]
    run.file("predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"model": "tiny:qwen2.5-vl", "data": str(data), "formats": ["longvideo-reason"], "items": 4,
               "failed": 0, "frames": [16], "think": True, "temperature": 0.0, "max_new_tokens": 64,
               "by_frames": {str(f): v for f, v in aggregate(rows).items()}}
    run.file("results.json").write_text(json.dumps(results))
    run.file("report.md").write_text(report_markdown(results, None))
    run.finish(summary_dict(results))

    staged = stage_run(out, "lvr-test/eval")
    assert staged.repo_type == "dataset"
    assert staged.files == ["README.md", "predictions.jsonl", "results.json"]
    meta, body = card_sections((staged.folder / "README.md").read_text())
    assert meta["configs"] == [{"config_name": "predictions", "data_files": "predictions.jsonl"}]
    assert "| `accuracy` | 0.75 |" in body and "| temporal | 1 | 2 | 50.0 |" in body
    assert card_table(body)["predictions.jsonl"] == {"records": 4, "temporal": 2, "goal": 1, "spatial": 0,
                                                    "plot": 1, "other": 0}


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
