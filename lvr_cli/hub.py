"""`lvr push`: a finished run directory to the Hugging Face Hub, with a card.

What goes up follows the run's stage (the `stage` of its recipe.json):
- sft, rl -> a model repo: the files of `final/` (the Hugging Face checkpoint), the run's
  curves (`*.png`) and `metrics.jsonl`, and a model card (recipe, final metrics, data,
  environment, how to load it).
- synth, caption, generate-qa, filter -> a dataset repo: the run's JSONL files (not
  `errors*.jsonl`, `metrics.jsonl` or per-rank shards) and plots, with `include_videos` the
  videos the records reference, and a dataset card with record counts per reasoning category
  per file.
- eval -> a dataset repo: predictions, `results.json`, plots, and `report.md` in the card.

The folder to upload is always staged first (`RUN_DIR/push/` unless `out` is given). A dry
run (asked for, or no Hugging Face token) stops there; a real push creates the repo and
uploads that same folder, so what a dry run shows is exactly what would be uploaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stages.data.records import CATEGORIES, iter_jsonl

MODEL_STAGES = {"sft": "sft", "rl": "grpo"}  # stage -> the card's method tag
DATA_STAGES = ("synth", "caption", "generate-qa", "filter")
CARD_MARK = "<!-- written by lvr push -->"  # a folder whose README has it may be replaced
PAPER = "LongVILA-R1 ([Scaling RL to Long Videos](https://arxiv.org/abs/2507.07966))"
SKIP_JSONL = re.compile(r"^(errors.*|metrics)\.jsonl$|\.(dp|rank)\d+\.jsonl$")


class PushError(Exception):
    """The Hub refused the upload or could not be reached (the message is one line)."""


@dataclass
class Staged:
    """A folder ready to upload: its files (relative, sorted) and the kind of repo."""
    folder: Path
    repo_type: str  # "model" or "dataset"
    stage: str
    files: list[str]


@dataclass
class PushResult:
    staged: Staged
    repo_id: str
    dry_run_reason: str | None  # why nothing was uploaded; None after an upload
    commit_url: str | None = None


def push_run(run_dir: Path, repo_id: str, private: bool = True, dry_run: bool = False,
             out: Path | None = None, include_videos: bool = False) -> PushResult:
    """Stage `run_dir` for `repo_id`, then upload it unless this is a dry run."""
    from huggingface_hub import HfApi, get_token

    staged = stage_run(run_dir, repo_id, out, include_videos)
    token = None if dry_run else get_token()
    if dry_run or token is None:
        reason = "--dry-run" if dry_run else "no token: HF_TOKEN is unset and `hf auth login` was not run"
        return PushResult(staged, repo_id, reason)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=staged.repo_type, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=staged.folder, repo_type=staged.repo_type,
                                 commit_message=f"lvr push: {staged.stage} run {Path(run_dir).name}")
    except Exception as e:  # HTTP status, network and protocol errors of huggingface_hub alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PushError(f"push to {staged.repo_type} repo {repo_id}: {type(e).__name__}: {first}") from e
    return PushResult(staged, repo_id, None, info.commit_url)


def stage_run(run_dir: Path, repo_id: str, out: Path | None = None, include_videos: bool = False) -> Staged:
    """Write the exact folder `push_run` uploads; raise `ValueError` naming the path and reason."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise ValueError(f"--repo-id {repo_id!r}: {str(e).splitlines()[0]}") from None
    run_dir = Path(run_dir)
    recipe, summary, env = read_run(run_dir)
    stage = recipe.get("stage")
    if stage in MODEL_STAGES:
        if not (run_dir / "final" / "config.json").exists():
            raise ValueError(f"{run_dir}: {stage} run without final/config.json (no model to push)")
        kind = "model"
    elif stage == "eval":
        if not (run_dir / "results.json").exists():
            raise ValueError(f"{run_dir}: eval run without results.json")
        kind = "eval"
    elif stage in DATA_STAGES:
        if not data_files(run_dir):
            raise ValueError(f"{run_dir}: {stage} run without JSONL data files")
        kind = "dataset"
    else:
        raise ValueError(f"{run_dir}: {stage!r} runs have no final/ model and no JSONL data to push")

    folder = _fresh_folder(run_dir, Path(out) if out else run_dir / "push")
    if kind == "model":
        for src in sorted((run_dir / "final").rglob("*")):
            if src.is_file():
                _place(src, folder / src.relative_to(run_dir / "final"))
        for src in [*sorted(run_dir.glob("*.png")), run_dir / "metrics.jsonl"]:
            if src.is_file():
                _place(src, folder / src.name)
        card = model_card(run_dir, repo_id, recipe, summary, env)
    else:
        files = data_files(run_dir)
        for src in files:
            _place(src, folder / src.name)
        for src in [run_dir / "results.json", *sorted(run_dir.glob("*.png"))]:
            if src.is_file():
                _place(src, folder / src.name)
        videos = _place_videos(run_dir, recipe, files, folder) if include_videos else 0
        report = (run_dir / "report.md").read_text() if kind == "eval" and (run_dir / "report.md").exists() else None
        card = dataset_card(run_dir, repo_id, recipe, summary, env, files, videos, report)
    (folder / "README.md").unlink(missing_ok=True)  # a README of final/ is a hard link: never write through it
    (folder / "README.md").write_text(card)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return Staged(folder, "model" if kind == "model" else "dataset", stage, names)


def read_run(run_dir: Path) -> tuple[dict, dict, dict]:
    """recipe.json, summary.json and env.json of a finished run; `ValueError` otherwise."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    found = {}
    for name, why in (("recipe.json", "not an lvr run directory"), ("summary.json", "the run has not finished"),
                      ("env.json", "not an lvr run directory")):
        path = run_dir / name
        if not path.exists():
            raise ValueError(f"{run_dir}: no {name} ({why})")
        try:
            found[name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return found["recipe.json"], found["summary.json"], found["env.json"]


def data_files(run_dir: Path) -> list[Path]:
    """The run's JSONL data files (top level), without errors, metrics and per-rank shards."""
    return [p for p in sorted(run_dir.glob("*.jsonl")) if not SKIP_JSONL.search(p.name) and p.stat().st_size]


def file_stats(path: Path) -> dict:
    """Records in a JSONL file, per reasoning category, and whether they are QA records."""
    counts, records, qa = Counter(), 0, True
    for _, rec in iter_jsonl(path, on_error=lambda *_: None):
        records += 1
        qa = qa and "answer" in rec and ("problem" in rec or "question" in rec)
        cat = rec.get("category") or rec.get("problem_type")
        if cat:
            counts[cat if cat in CATEGORIES else "other"] += 1
    return {"records": records, "categories": dict(counts), "qa": qa and records > 0}


# -- staging --------------------------------------------------------------------------------------
def _fresh_folder(run_dir: Path, out: Path) -> Path:
    """An empty `out`, replacing an earlier staging there but nothing else."""
    res_out, res_run = out.resolve(), run_dir.resolve()
    if res_run == res_out or res_run.is_relative_to(res_out) or res_out.is_relative_to(res_run / "final"):
        raise ValueError(f"--out {out}: would overwrite the run {run_dir} itself; choose another folder")
    if out.exists() and any(out.iterdir()):
        readme = out / "README.md"
        ours = res_out == (res_run / "push") or (readme.exists() and CARD_MARK in readme.read_text(errors="replace"))
        if not ours:
            raise ValueError(f"--out {out}: exists, is not empty and was not written by lvr push")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _place(src: Path, dst: Path) -> None:
    """Hard-link `src` at `dst` (checkpoints can be large), copying across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _video_refs(rec: dict, field: str) -> list[str]:
    refs = rec.get(field) or []
    return [refs] if isinstance(refs, str) else [r for r in refs if isinstance(r, str)]


def _place_videos(run_dir: Path, recipe: dict, files: list[Path], folder: Path) -> int:
    """Copy the videos the records name, each at the path it is named by; return how many.

    `videos` (LongVideo-Reason records) are placed before `video` (caption records, named
    relative to the video folder), so a file both name is uploaded once, where the QA
    records find it.
    """
    data = recipe.get("data") or {}
    roots = [run_dir]
    if data.get("video_dir"):
        roots.append(Path(data["video_dir"]))
    if data.get("input"):
        roots.append(Path(data["input"]) if Path(data["input"]).is_dir() else Path(data["input"]).parent)
    roots.append(run_dir / "videos")
    placed: set[Path] = set()
    missing = []
    for field in ("videos", "video"):
        for path in files:
            for _, rec in iter_jsonl(path, on_error=lambda *_: None):
                for ref in _video_refs(rec, field):
                    if Path(ref).is_absolute() or ".." in Path(ref).parts:
                        raise ValueError(f"{path}: video {ref!r} is not a relative path inside the dataset; "
                                         "push without --include-videos")
                    src = next((r / ref for r in roots if (r / ref).is_file()), None)
                    if src is None:
                        missing.append(ref)
                    elif src.resolve() not in placed and not (folder / ref).exists():
                        placed.add(src.resolve())
                        _place(src, folder / ref)
    if missing:
        raise ValueError(f"{run_dir}: {len(set(missing))} referenced video(s) not found (first: {missing[0]}; "
                         f"looked in {', '.join(map(str, roots))})")
    return len(placed)


# -- cards ------------------------------------------------------------------------------------------
def model_card(run_dir: Path, repo_id: str, recipe: dict, summary: dict, env: dict) -> str:
    from huggingface_hub import ModelCardData

    stage, model_path = recipe["stage"], (recipe.get("model") or {}).get("path", "")
    base = model_path if _is_hub_id(model_path) else None
    meta = ModelCardData(library_name="transformers", base_model=base, pipeline_tag="image-text-to-text",
                         tags=["lvr", "video", "reasoning", MODEL_STAGES[stage]])
    tiny = " (a tiny model built locally by lvr, for demos and tests)" if model_path.startswith("tiny:") else ""
    what = ("long chain-of-thought supervised fine-tuning (`lvr sft`)" if stage == "sft"
            else "GRPO reinforcement learning (`lvr rl`)")
    lines = [f"---\n{meta.to_yaml()}\n---", CARD_MARK, "", f"# {repo_id}", "",
             f"A long-video reasoning model trained with {what} by lvr, a reproduction of {PAPER}, "
             f"starting from `{model_path}`{tiny}. It answers with `<think>...</think><answer>...</answer>`.", ""]
    lines += ["## Results", "", "From the run's `summary.json`:", "", *_table(_scalars(summary))]
    last = _last_metrics(run_dir / "metrics.jsonl")
    if last:
        lines += ["", f"Last record of `metrics.jsonl` (step {last.get('step')}):", "", *_table(_scalars(last))]
    for png in sorted(run_dir.glob("*.png")):
        lines += ["", f"![{png.stem}]({png.name})"]
    lines += ["", "## Data", ""]
    data_inputs = [("data.input", (recipe.get("data") or {}).get("input")),
                   ("eval.input", (recipe.get("eval") or {}).get("input"))]
    for key, path in data_inputs:
        if path:
            lines.append(f"- `{key}` = `{path}`: {_describe_counts(Path(path))}")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor",
              "", f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}")',
              f'processor = AutoProcessor.from_pretrained("{repo_id}")  # its video processor needs torchvision',
              "```", "", f'With lvr: `model.path = "{repo_id}"` in an `eval` or `rl` recipe.']
    lines += _recipe_and_env(recipe, env)
    return "\n".join(lines) + "\n"


def dataset_card(run_dir: Path, repo_id: str, recipe: dict, summary: dict, env: dict, files: list[Path],
                 videos: int, report: str | None = None) -> str:
    from huggingface_hub import DatasetCardData

    stats = {p.name: file_stats(p) for p in files}
    qa = [n for n, s in stats.items() if s["qa"]]
    configs = ([{"config_name": "default", "data_files": [{"split": _split(n), "path": n} for n in qa]}] if qa else [])
    configs += [{"config_name": _split(n), "data_files": n} for n in stats if n not in qa]
    meta = DatasetCardData(pretty_name=repo_id.split("/")[-1], tags=["lvr", "video", "reasoning", recipe["stage"]],
                           task_categories=["video-text-to-text"], configs=configs)
    stage, lvr = recipe["stage"], f"lvr reproduces {PAPER}"
    if stage == "eval":
        about = (f"Evaluation of `{(recipe.get('model') or {}).get('path')}` on `{(recipe.get('data') or {}).get('input')}`"
                 f" by `lvr eval` ({lvr}): one prediction per item and frame count, `results.json`, the report below.")
    else:
        about = (f"Written by `lvr {stage}` ({lvr}). QA records use the LongVideo-Reason fields: "
                 "`problem_id`, `problem` (question with `A. ...` option lines), `problem_type` "
                 "(temporal | goal | spatial | plot), `videos`, `reasoning`, `answer`.")
    lines = [f"---\n{meta.to_yaml()}\n---", CARD_MARK, "", f"# {repo_id}", "", about, ""]
    lines += ["## Files and records per reasoning category", "",
              "| file | records | " + " | ".join(CATEGORIES) + " | other |", "|---|---:|" + "---:|" * (len(CATEGORIES) + 1)]
    for name, s in stats.items():
        cats = s["categories"]
        cells = [str(cats.get(c, 0)) if cats else "-" for c in (*CATEGORIES, "other")]
        lines.append(f"| `{name}` | {s['records']} | " + " | ".join(cells) + " |")
    if videos:
        lines += ["", f"{videos} video file(s) included, at the paths the records name."]
    elif stage != "eval":
        lines += ["", "Videos are not included; the records name them by path (push with `--include-videos` to add them)."]
    empty = [p.name for p in sorted(run_dir.glob("*.jsonl")) if not SKIP_JSONL.search(p.name) and not p.stat().st_size]
    if empty:
        lines += ["", f"Empty, so not uploaded: {', '.join(f'`{n}`' for n in empty)}."]
    if qa:
        split = "train" if "train.jsonl" in qa else _split(qa[0])
        lines += ["", "```python", "from datasets import load_dataset", "",
                  f'ds = load_dataset("{repo_id}", split="{split}")', "```"]
    if not report:  # an eval report shows its own plot
        lines += [f"\n![{png.stem}]({png.name})" for png in sorted(run_dir.glob("*.png"))]
    if report:
        body = report.split("\n", 1)[-1] if report.startswith("# ") else report  # the card has its own title
        lines += ["", "## Report", "", body.replace("\n## ", "\n### ").strip()]
    lines += ["", "## Run summary", "", *_table(_scalars(summary))]
    lines += _recipe_and_env(recipe, env)
    return "\n".join(lines) + "\n"


def _recipe_and_env(recipe: dict, env: dict) -> list[str]:
    import tomli_w

    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    devices = env.get("devices") or {}
    cuda = ", ".join(devices.get("cuda") or []) or f"CPU only ({devices.get('cpu_count')} cores)"
    return ["", "## Recipe", "", "The resolved recipe (`recipe.json`; null values, which are the schema "
            "defaults, left out):", "", "```toml", tomli_w.dumps(_without_nulls(recipe)).strip(), "```",
            "", "## Environment", "", f"- python {env.get('python')}; {versions}",
            f"- git commit: `{env.get('git_commit')}`", f"- world size {env.get('world_size')}; devices: {cuda}",
            f"- recipe sha256: `{env.get('recipe_sha256')}`; started {env.get('time')}"]


def _describe_counts(path: Path) -> str:
    if not path.is_file():
        return "not on this machine"
    s = file_stats(path)
    cats = ", ".join(f"{c} {s['categories'].get(c, 0)}" for c in CATEGORIES if s["categories"].get(c))
    return f"{s['records']} records" + (f" ({cats})" if cats else "")


def _last_metrics(path: Path) -> dict:
    last = {}
    if path.exists():
        for _, rec in iter_jsonl(path, on_error=lambda *_: None):
            last = rec
    return last


def _scalars(data: dict, prefix: str = "") -> dict:
    """Scalar values of `data`, nested dicts flattened as `a.b`."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _table(values: dict) -> list[str]:
    return ["| metric | value |", "|---|---:|", *(f"| `{k}` | {json.dumps(v)} |" for k, v in values.items())]


def _without_nulls(data):
    if isinstance(data, dict):
        return {k: _without_nulls(v) for k, v in data.items() if v is not None}
    return data


def _is_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not Path(path).exists()


def _split(name: str) -> str:
    return re.sub(r"\W", "_", Path(name).stem)
