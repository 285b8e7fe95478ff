"""`lvr push`: a finished run directory to the Hugging Face Hub, with a card.

What goes up follows the run's stage (the `stage` of its recipe.json):
- sft, rl -> a model repo: the files of `final/` (the Hugging Face checkpoint) with the run's
  video settings written into the processor config, the run's curves (`*.png`) and
  `metrics.jsonl`, and a model card (lineage, prompt format, video settings, results of the
  eval runs given, data, recipe, environment, license).
- synth, caption, generate-qa, filter -> a dataset repo: the run's JSONL files with records
  (not `errors*.jsonl`, `metrics.jsonl` or per-rank shards) and plots, with `include_videos`
  the videos the records reference, and a dataset card with splits and record counts per
  reasoning category per file.
- eval -> a dataset repo: predictions (the `test` split), `results.json`, plots, and
  `report.md` in the card.

The folder to upload is always staged first (`RUN_DIR/push/` unless `out` is given); the run
directory itself is never written. A dry run (asked for, or no Hugging Face token) stops
there; a real push creates the repo and uploads that same folder, so what a dry run shows is
exactly what would be uploaded. No card names a path of this machine (`check_public`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from stages.data.records import CATEGORIES, iter_jsonl

MODEL_STAGES = ("sft", "rl")
DATA_STAGES = ("synth", "caption", "generate-qa", "filter")
CARD_MARK = "<!-- written by lvr push -->"  # a folder whose README has it may be replaced
SKIP_JSONL = re.compile(r"^(errors.*|metrics)\.jsonl$|\.(dp|rank)\d+\.jsonl$")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Where transformers' AutoVideoProcessor reads its settings, first found wins.
VIDEO_CONFIGS = ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json")


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


def push_run(run_dir: Path, repo_id: str, private: bool = True, dry_run: bool = False, out: Path | None = None,
             include_videos: bool = False, eval_runs: list[Path] = ()) -> PushResult:
    """Stage `run_dir` for `repo_id`, then upload it unless this is a dry run."""
    from huggingface_hub import HfApi, get_token

    staged = stage_run(run_dir, repo_id, out, include_videos, eval_runs)
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


def stage_run(run_dir: Path, repo_id: str, out: Path | None = None, include_videos: bool = False,
              eval_runs: list[Path] = ()) -> Staged:
    """Write the exact folder `push_run` uploads; raise `ValueError` naming the path and reason."""
    from huggingface_hub.utils import validate_repo_id

    from lvr_cli.cards import check_public, dataset_card, model_card, public_text

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
            raise ValueError(f"{run_dir}: {stage} run without JSONL records")
        kind = "dataset"
    else:
        raise ValueError(f"{run_dir}: {stage!r} runs have no final/ model and no JSONL data to push")
    if eval_runs and kind != "model":
        raise ValueError(f"--eval-run: {run_dir} is a {stage} run; only sft and rl runs take eval results")
    evals = [read_eval_run(Path(e), run_dir) for e in eval_runs]

    folder = _fresh_folder(run_dir, Path(out) if out else run_dir / "push")
    if kind == "model":
        for src in sorted((run_dir / "final").rglob("*")):
            if src.is_file():
                _place(src, folder / src.relative_to(run_dir / "final"))
        for src in [*sorted(run_dir.glob("*.png")), run_dir / "metrics.jsonl"]:
            if src.is_file():
                _place(src, folder / src.name)
        video_file = write_video_settings(folder, recipe.get("video") or {})
        card = model_card(run_dir, repo_id, recipe, summary, env, evals, folder, video_file)
    else:
        files = data_files(run_dir)
        for src in [*files, *sorted(run_dir.glob("*.png"))]:
            _place(src, folder / src.name)
        results = json.loads((run_dir / "results.json").read_text()) if kind == "eval" else {}
        if results:  # its model and data may be local paths
            (folder / "results.json").write_text(json.dumps(public(results), indent=2) + "\n")
        videos = _place_videos(run_dir, recipe, files, folder) if include_videos else 0
        report = (run_dir / "report.md").read_text() if kind == "eval" and (run_dir / "report.md").exists() else None
        card = dataset_card(run_dir, repo_id, recipe, summary, env, files, videos,
                            report and public_text(report, recipe, results))
    check_public(card, [run_dir, *map(Path, eval_runs)])
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


def read_eval_run(eval_dir: Path, run_dir: Path) -> EvalRun:
    """A finished eval run of `run_dir`'s final/ or one of its checkpoints; `ValueError` (one line) otherwise."""
    try:
        recipe, _, env = read_run(eval_dir)
    except ValueError as e:
        raise ValueError(f"--eval-run {e}") from None
    if recipe.get("stage") != "eval" or not (eval_dir / "results.json").is_file():
        raise ValueError(f"--eval-run {eval_dir}: not a finished eval run (stage {recipe.get('stage')!r}, "
                         f"results.json {'present' if (eval_dir / 'results.json').is_file() else 'missing'})")
    model_path = (recipe.get("model") or {}).get("path", "")
    found = find_local(model_path, anchors_of(eval_dir)) if is_local_model(model_path) else None
    run = run_dir.resolve()
    if found == run / "final" or (found and found.parent == run / "checkpoints"):
        return EvalRun(eval_dir.name, found.name, recipe, json.loads((eval_dir / "results.json").read_text()),
                       env.get("time", ""))
    raise ValueError(f"--eval-run {eval_dir}: it evaluated {model_path!r}, not {run_dir}/final or one of its "
                     "checkpoints")


def data_files(run_dir: Path) -> list[Path]:
    """The run's JSONL files with records (top level), without errors, metrics and per-rank shards."""
    return [p for p in jsonl_files(run_dir) if file_stats(p)["records"]]


def jsonl_files(run_dir: Path) -> list[Path]:
    """The run's JSONL files that could be data, records or not."""
    return [p for p in sorted(run_dir.glob("*.jsonl")) if not SKIP_JSONL.search(p.name)]


def write_video_settings(folder: Path, video: dict) -> str | None:
    """Write the run's frame sampling and pixel budget where the staged checkpoint's video
    processor reads them (`VIDEO_CONFIGS`); return that file's name, None without a config.

    A checkpoint with only preprocessor_config.json gets a video_preprocessor_config.json
    (a copy plus the settings), so images keep their own pixel budget.
    """
    name = next((n for n in VIDEO_CONFIGS if (folder / n).is_file() and
                 (n != "processor_config.json" or "video_processor" in json.loads((folder / n).read_text()))), None)
    if name is None or not video:
        return None
    data = json.loads((folder / name).read_text())
    config = data["video_processor"] if name == "processor_config.json" else data
    if name == "preprocessor_config.json":
        name = "video_preprocessor_config.json"
    factor = int(config.get("patch_size", 14)) * int(config.get("merge_size", 2))
    fps = video.get("fps")
    config.update({  # lvr's sampling (stages/data/video.py) in the keys of transformers' Qwen2-VL video processor
        "size": {"shortest_edge": factor * factor, "longest_edge": video["max_pixels"]},
        "min_pixels": factor * factor, "max_pixels": video["max_pixels"], "do_sample_frames": True,
        "max_frames": video["max_frames"], "min_frames": int(config.get("temporal_patch_size", 2)),
        "num_frames": None if fps else video["max_frames"], "fps": fps,
        "cap_pixels_per_frame": False})  # lvr bounds pixels per frame, not per video
    (folder / name).unlink(missing_ok=True)  # staged files are hard links into the run: never write through them
    (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    return name


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


def _video_refs(rec: dict, key: str) -> list[str]:
    refs = rec.get(key) or []
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
    for key in ("videos", "video"):
        for path in files:
            for _, rec in iter_jsonl(path, on_error=lambda *_: None):
                for ref in _video_refs(rec, key):
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


# -- local paths ----------------------------------------------------------------------------------
def is_local(value) -> bool:
    """True for a string naming a file or folder of this machine (not a Hub id, `tiny:` model, URL or text)."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith("tiny:"):
        return False
    if re.search(r"\s", value):  # text; `public` hides the paths inside it
        return False
    if value.startswith(("/", "~", "./", "../", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):
        return True
    if HUB_ID.fullmatch(value) and not Path(value).exists():
        return False
    return "/" in value or "\\" in value


def is_local_model(path: str) -> bool:
    """A `model.path` naming a folder of this machine (transformers, too, prefers a folder to a Hub id)."""
    return is_local(path) or (bool(path) and not path.startswith("tiny:") and Path(path).is_dir())


def public_name(value: str) -> str:
    return f"<local: {PurePath(value).name or value}>"


def public(data):
    """`data` with every local path replaced by its `public_name`, also inside text (after a space)."""
    if isinstance(data, dict):
        return {k: public(v) for k, v in data.items()}
    if isinstance(data, list):
        return [public(v) for v in data]
    if isinstance(data, str) and re.search(r"\s", data):
        return re.sub(r"(?<!\S)(~|\.{1,2})?/[^\s`'\"]+", lambda m: public_name(m.group(0)), data)
    return public_name(data) if is_local(data) else data


def find_local(path: str, anchors: list[Path]) -> Path | None:
    """The existing folder or file `path` names, relative paths tried against each anchor."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p.resolve() if p.exists() else None
    return next(((a / p).resolve() for a in anchors if (a / p).exists()), None)


def anchors_of(run_dir: Path) -> list[Path]:
    """Where a run's relative paths may start: the working directory, then the run's parents
    (a run at runs/<stage>/<name> was started two levels up)."""
    return [Path.cwd(), *Path(run_dir).resolve().parents]


def run_of(folder: Path) -> Path | None:
    """The lvr run directory that wrote checkpoint or data `folder` (final/, checkpoints/step_N/, a file)."""
    for d in (folder.parent, folder.parent.parent):
        if (d / "recipe.json").is_file():
            return d
    return None


def hub_dataset(path: str) -> str | None:
    """The Hub id of a data file inside the Hugging Face cache (`datasets--ORG--NAME`), else None."""
    part = next((p for p in PurePath(path).parts if p.startswith("datasets--")), None)
    return "/".join(part.split("--")[1:3]) if part and part.count("--") == 2 else None


# -- lineage ---------------------------------------------------------------------------------------
@dataclass
class Step:
    """An lvr run that trained the weights on the way from the base model."""
    name: str  # its folder name (by default the recipe's name)
    stage: str
    checkpoint: str  # "final" or "step_N"
    recipe: dict
    anchors: list[Path]


@dataclass
class Lineage:
    base: str | None  # the Hub id or `tiny:` model at the root; None when not known
    steps: list[Step] = field(default_factory=list)  # lvr runs before this one, oldest first
    unknown: str = ""  # why the root is not known


def trace_model(model_path: str, anchors: list[Path]) -> Lineage:
    """Follow `model.path` through local lvr checkpoints (their run's recipe.json) to its root."""
    steps, seen = [], set()
    while is_local_model(model_path):
        folder = find_local(model_path, anchors)
        run = run_of(folder) if folder else None
        if folder is None or run is None or run in seen:
            why = ("is not on this machine" if folder is None else
                   "was not written by an lvr run" if run is None else "is part of a loop of runs")
            return Lineage(None, steps[::-1], f"the local checkpoint {public_name(model_path)} {why}")
        seen.add(run)
        recipe = json.loads((run / "recipe.json").read_text())
        checkpoint = "final" if folder == run / "final" else folder.name
        steps.append(Step(run.name, recipe.get("stage", "?"), checkpoint, recipe, anchors_of(run)))
        model_path, anchors = (recipe.get("model") or {}).get("path", ""), anchors_of(run)
    return Lineage(model_path or None, steps[::-1])


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


@dataclass
class EvalRun:
    """A finished `lvr eval` run of the pushed run's `final/` or one of its checkpoints."""
    name: str
    checkpoint: str  # "final" or "step_N"
    recipe: dict
    results: dict
    time: str  # env.json's start time, ISO 8601

    def dataset(self) -> dict:
        """EvalResult dataset fields: a Hub id, or the `json` builder and the local file's name."""
        path = str((self.recipe.get("data") or {}).get("input") or "")
        name, formats = PurePath(path).name, ", ".join(self.results.get("formats") or [])
        if hub := hub_dataset(path):
            return {"dataset_type": hub, "dataset_name": f"{hub} ({formats})"}
        return {"dataset_type": "json", "dataset_config": PurePath(path).stem, "dataset_args": {"data_files": name},
                "dataset_name": f"{name} ({formats}, {self.results.get('items')} items, a local file)"}
