"""The cards `lvr push` writes: what a run is, where it came from, how to use it.

A card names only what a reader can find: Hub ids, lvr stages and run names, file names,
never a path of this machine (see `lvr_cli.hub.public`); lineage is followed through local
checkpoints to the Hub model at its root.

License rule (each card states the one it used): a model built by lvr from a `tiny:`
model is under lvr's own Apache-2.0; a fine-tune of a Hub model takes that model's license
when `KNOWN_LICENSES` knows it, else `other` with a link to the base model's page, never a
guess. A dataset is Apache-2.0 only when every record comes from `lvr synth` without text
written by a backend model (through filter and eval runs); otherwise `other`. An eval run's
predictions are Apache-2.0 when both its data and the evaluated model are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePath

from lvr_cli.hub import (CARD_MARK, EvalRun, Lineage, Step, anchors_of, file_stats, find_local, hub_dataset,
                         is_local, is_local_model, jsonl_files, public, public_name, run_of, trace_model)
from stages.data.records import CATEGORIES

METHOD_TAGS = {"sft": "sft", "rl": "grpo"}
PAPER = "LongVILA-R1 ([Scaling RL to Long Videos](https://arxiv.org/abs/2507.07966))"
PROJECT_LICENSE = "apache-2.0"  # lvr's own, pyproject.toml
# As the models' own pages state them; any other Hub base gets `other` and a link.
KNOWN_LICENSES = {"Qwen/Qwen2.5-VL-7B-Instruct": "apache-2.0", "Qwen/Qwen2-VL-7B-Instruct": "apache-2.0",
                  "Qwen/Qwen2-VL-2B-Instruct": "apache-2.0"}
PIPELINE_TAG = "video-text-to-text"  # the Hub's task; huggingface_hub ships no list to check it against
NO_TEXT_WRITTEN = {"synth", "filter", "eval"}  # stages whose records hold no backend-written text
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation",
          "test": "test", "eval": "test"}  # file stem -> the split a user expects
EXAMPLE = {"problem": "Where is the red ball when the screen flashes?\nA. On the table\nB. Under the chair\n"
                      "C. In the box\nD. On the shelf", "answer": "C"}


# -- what a card may say -------------------------------------------------------------------------------
def public_text(text: str, *sources) -> str:
    """`text` with the local paths found in `sources` (a run's JSON files) replaced, longest first."""
    found = {v for s in sources for v in _leaves(s) if is_local(v)}
    for value in sorted(found, key=len, reverse=True):
        text = text.replace(value, public_name(value))
    return text


def _leaves(data):
    if isinstance(data, (dict, list)):
        for v in data.values() if isinstance(data, dict) else data:
            yield from _leaves(v)
    else:
        yield data


def check_public(text: str, run_dirs: list[Path]) -> None:
    """Raise `ValueError` when `text` names a local path of the runs, cwd, home or tmp."""
    import tempfile

    roots = {Path.cwd(), Path.home(), Path(tempfile.gettempdir())}
    for d in run_dirs:
        roots |= {Path(d), Path(d).absolute(), Path(d).resolve()}
    for root in sorted({str(r) for r in roots} | {str(r.resolve()) for r in roots if r.is_absolute()}):
        if root in ("/", ".") or (not PurePath(root).is_absolute() and len(PurePath(root).parts) < 2):
            continue
        if re.search(rf"(?<![\w.-]){re.escape(root)}(?=[/\\\s`'\")\]>|]|$)", text, re.M):
            raise ValueError(f"the card would show the local path {root} (a bug in lvr push; please report it)")


def model_license(lineage: Lineage) -> tuple[dict, str]:
    """(license fields of the card's metadata, the sentence saying why)."""
    base = lineage.base
    if base and base.startswith("tiny:"):
        return {"license": PROJECT_LICENSE}, (f"Apache-2.0: built by lvr from `{base}`, a randomly initialised "
                                              "tiny model, so only lvr's own license applies.")
    if base in KNOWN_LICENSES:
        return {"license": KNOWN_LICENSES[base]}, f"`{KNOWN_LICENSES[base]}`, the license of the base model `{base}`."
    if base:
        return ({"license": "other", "license_name": "base-model-license",
                 "license_link": f"https://huggingface.co/{base}"},
                f"`other`: the weights derive from `{base}`, whose license lvr does not know; they are under "
                "that model's license (see its page). Set the right license before making the repo public.")
    return ({"license": "other"}, f"`other`: the base model is not known ({lineage.unknown}), so neither is its "
                                  "license. Set the right license before making the repo public.")


def data_license(recipe: dict, anchors: list[Path]) -> tuple[str, str]:
    """(license, why) of a data or eval run's records."""
    stages, why = [recipe.get("stage")], ""
    while stages[-1] in NO_TEXT_WRITTEN - {"synth"}:
        data_input = (recipe.get("data") or {}).get("input")
        src = find_local(data_input, anchors) if data_input else None
        run = run_of(src) if src and src.is_file() else None
        if run is None:
            why = "its input data is not from an lvr run on this machine"
            break
        recipe, anchors = json.loads((run / "recipe.json").read_text()), anchors_of(run)
        stages.append(recipe.get("stage"))
    chain = " <- ".join(f"`{s}`" for s in stages)
    if stages[-1] == "synth" and all(s in NO_TEXT_WRITTEN for s in stages):
        return PROJECT_LICENSE, f"Apache-2.0: every record comes from `lvr synth` ({chain}), lvr's own synthetic data."
    why = why or (f"its records derive from videos and backend-model text ({chain}) whose licenses lvr does not know")
    return "other", f"`other`: {why}. Set the right license before making the repo public."


def describe_data(path: str | None, anchors: list[Path]) -> str:
    """One line on a data file: its Hub dataset, or its name, the lvr run that wrote it and its records."""
    if not path:
        return "none"
    if hub := hub_dataset(path):
        return f"Hub dataset [`{hub}`](https://huggingface.co/datasets/{hub}), file `{PurePath(path).name}`"
    found, name = find_local(path, anchors), PurePath(path).name  # recipes check that data paths exist: all local
    if found is None or not found.is_file():
        return f"local file `{name}` (not on this machine when the card was written)"
    run = run_of(found)
    stage = json.loads((run / "recipe.json").read_text()).get("stage") if run else None
    origin = f", written by the `{stage}` run `{run.name}`" if run else ""
    s = file_stats(found)
    cats = ", ".join(f"{c} {s['categories'][c]}" for c in CATEGORIES if s["categories"].get(c))
    return f"local file `{name}`{origin}: {s['records']} records" + (f" ({cats})" if cats else "")


# -- evaluation results ------------------------------------------------------------------------------
def eval_results(evals: list[EvalRun], repo_id: str) -> list:
    """model-index entries: the latest eval of `final/` per dataset; accuracy per frame count, and
    per category (or other breakdown) at the largest frame count."""
    from huggingface_hub import EvalResult

    latest: dict[tuple, EvalRun] = {}
    for e in sorted((e for e in evals if e.checkpoint == "final"), key=_started):
        d = e.dataset()
        latest[(d["dataset_type"], d.get("dataset_config"))] = e
    out = []
    for e in latest.values():
        common = dict(task_type=PIPELINE_TAG, task_name="long-video multiple-choice QA", metric_type="accuracy",
                      source_name=f"lvr eval run {e.name}",
                      source_url=f"https://huggingface.co/{repo_id}#evaluation", **e.dataset())
        by = e.results.get("by_frames") or {}
        scores = {f"accuracy ({frames} frames)": res["overall"] for frames, res in by.items()}
        top = max(by, key=int) if by else None
        for key, values in (by[top].items() if top else ()):
            if key.startswith("by_"):  # by_category, by_duration, ...: at the largest frame count
                scores |= {f"accuracy, {key[3:]} {v} ({top} frames)": s for v, s in values.items()}
        out += [EvalResult(metric_name=name, metric_value=s["accuracy"], **common)
                for name, s in scores.items() if s["accuracy"] is not None]
    return out


def _started(e: EvalRun) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(e.time).timestamp()
    except ValueError:  # no start time recorded: as old as can be
        return 0.0


# -- model card --------------------------------------------------------------------------------------
def model_card(run_dir: Path, repo_id: str, recipe: dict, summary: dict, env: dict, evals: list[EvalRun],
               folder: Path, video_file: str | None) -> str:
    from huggingface_hub import ModelCardData

    stage, anchors = recipe["stage"], anchors_of(run_dir)
    lineage = trace_model((recipe.get("model") or {}).get("path", ""), anchors)
    license_fields, license_why = model_license(lineage)
    trained = [*lineage.steps, Step(Path(run_dir).name, stage, "final", recipe, anchors)]
    datasets = sorted({h for s in trained if (h := hub_dataset(str((s.recipe.get("data") or {}).get("input") or "")))})
    results = eval_results(evals, repo_id)
    base = lineage.base if lineage.base and not lineage.base.startswith("tiny:") else None
    meta = ModelCardData(library_name="transformers", base_model=base, datasets=datasets or None,
                         pipeline_tag=PIPELINE_TAG, tags=["lvr", "video", "reasoning", METHOD_TAGS[stage]],
                         model_name=repo_id.split("/")[-1] if results else None, eval_results=results or None,
                         **license_fields)
    what = ("long chain-of-thought supervised fine-tuning (`lvr sft`)" if stage == "sft"
            else "GRPO reinforcement learning (`lvr rl`)")
    lines = [f"---\n{meta.to_yaml()}\n---", CARD_MARK, "", f"# {repo_id}", "",
             f"A long-video reasoning model trained with {what} by lvr, a reproduction of {PAPER}. It answers "
             "multiple-choice questions about a video with `<think>...</think><answer>...</answer>`.", ""]
    lines += ["## Lineage", "", _base_line(lineage), ""]
    for i, s in enumerate(trained, 1):
        this = " (this model)" if i == len(trained) else f", its `{s.checkpoint}` checkpoint"
        repo = (s.recipe.get("hub") or {}).get("repo_id")
        lines.append(f"{i}. `{s.stage}` run `{s.name}`{this}" + (f"; its recipe's Hub repo: `{repo}`" if repo else "")
                     + f". Trained on {describe_data((s.recipe.get('data') or {}).get('input'), s.anchors)}.")
    lines += _prompt_section(recipe, folder) + _video_section(recipe, video_file) + _eval_section(evals, results)
    lines += ["", "## Training results", "", "From the run's `summary.json`:", "", *_table(public(_scalars(summary)))]
    last = _last_metrics(run_dir / "metrics.jsonl")
    if last:
        lines += ["", f"Last record of `metrics.jsonl` (step {last.get('step')}):", "", *_table(public(_scalars(last)))]
    lines += [f"\n![{png.stem}]({png.name})" for png in sorted(run_dir.glob("*.png"))]
    held_out = (recipe.get("eval") or {}).get("input")
    if held_out:
        lines += ["", f"Held out during training (`eval.input`): {describe_data(held_out, anchors)}."]
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor",
              "", f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}")',
              f'processor = AutoProcessor.from_pretrained("{repo_id}")  # its video processor needs torchvision',
              "```", "", "Build the chat as under *Prompt format*; the processor samples and resizes the video with "
              "the settings above.", "", f'With lvr: `model.path = "{repo_id}"` in an `eval` or `rl` recipe.']
    lines += ["", "## License", "", license_why]
    lines += _recipe_and_env(recipe, env)
    return "\n".join(lines) + "\n"


def _base_line(lineage: Lineage) -> str:
    base = lineage.base
    if base is None:
        return f"Base model: not known: {lineage.unknown}."
    if base.startswith("tiny:"):
        return f"Base model: `{base}`, a tiny randomly initialised model built locally by lvr (for demos and tests)."
    return f"Base model: [`{base}`](https://huggingface.co/{base}). Then, by lvr:"


def _prompt_section(recipe: dict, folder: Path) -> list[str]:
    from stages.data.records import answer_target
    from stages.mrsp.runtime import PLAIN_INSTRUCTION, THINK_INSTRUCTION, question_messages

    prompt = recipe.get("prompt") or {}
    system, think = prompt.get("system"), prompt.get("think", True)
    messages = question_messages(EXAMPLE, system, think)
    lines = ["", "## Prompt format", "", "Each training chat, as lvr builds it (`question_messages`): "
             + (f"the system message `{json.dumps(system)}` (`prompt.system`), then " if system else
                "no system message of lvr's own (`prompt.system` unset; the chat template may add its default), ")
             + "a user turn of the video, then the question with its options one per line and this instruction:",
             "", f"> {THINK_INSTRUCTION if think else PLAIN_INSTRUCTION}", "", "For example, as `messages`:", "",
             "```json", json.dumps(messages, indent=2), "```"]
    try:
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
        lines += ["", "rendered by this checkpoint's chat template (lvr replaces the video placeholder with the "
                  "video's tokens):", "", "```text", text.rstrip("\n"), "```"]
    except Exception as e:  # a checkpoint without a chat template still gets the messages
        lines += ["", f"(This checkpoint's tokenizer could not render them: {type(e).__name__}.)"]
    lines += ["", "and the reply it was trained to give:", "", "```text",
              answer_target("step-by-step reasoning about what the video shows", EXAMPLE["answer"]), "```"]
    return lines


def _video_section(recipe: dict, video_file: str | None) -> list[str]:
    video = recipe.get("video") or {}
    fps = video.get("fps")
    rows = [("video.max_frames", video.get("max_frames"), "frames per video at most"),
            ("video.fps", fps, "frames sampled per second, up to max_frames" if fps else
             "unset: max_frames spread uniformly over the whole video"),
            ("video.max_pixels", video.get("max_pixels"), "pixels per frame at most, after resizing to the patch grid")]
    lines = ["", "## Video settings", "", "The frames the model saw in training:", "", "| setting | value | meaning |",
             "|---|---:|---|", *(f"| `{k}` | {json.dumps(v)} | {why} |" for k, v, why in rows)]
    if video_file:
        differs = ("rounds the frame count down to whole temporal patches where lvr repeats the last frame" if fps else
                   "takes each segment's first frame where lvr takes its middle one, and refuses a video with fewer "
                   "frames than `num_frames` where lvr takes them all")
        lines += ["", f"`{video_file}` carries them for transformers' video processor (`size.longest_edge`, "
                  f"`max_frames`, `{'fps' if fps else 'num_frames'}`, `do_sample_frames`); it {differs}."]
    return lines


def _eval_section(evals: list[EvalRun], results: list) -> list[str]:
    if not evals:
        return []
    indexed = {r.source_name for r in results}
    lines = ["", "## Evaluation", "", "By `lvr eval`; the model-index holds the latest evaluation of `final` per "
             "dataset. Accuracy in %:", "", "| eval run | checkpoint | data | frames | predicted | accuracy % | "
             "in model-index |", "|---|---|---|---:|---:|---:|---|"]
    for e in evals:
        for frames, res in (e.results.get("by_frames") or {}).items():
            acc = res["overall"]["accuracy"]
            lines.append(f"| `{e.name}` | `{e.checkpoint}` | {e.dataset()['dataset_name']} | {frames} | "
                         f"{res['overall']['total']} | {'-' if acc is None else f'{100 * acc:.1f}'} | "
                         f"{'yes' if f'lvr eval run {e.name}' in indexed else 'no'} |")
    return lines


# -- dataset card ------------------------------------------------------------------------------------
def dataset_configs(stage: str, names: list[str]) -> list[dict]:
    """The card's `configs`: files named like a split (train, eval -> test, ...) or an eval run's
    predictions form `default`; any other file is a config of its own, with one `train` split (an
    eval run's: `test`)."""
    split_of = {n: ("test" if n == "predictions.jsonl" else None) if stage == "eval" else SPLITS.get(Path(n).stem)
                for n in names}
    default = [{"split": split_of[n], "path": n} for n in names if split_of[n]]
    configs = [{"config_name": "default", "data_files": default}] if default else []
    configs += [{"config_name": re.sub(r"\W", "_", Path(n).stem),
                 "data_files": [{"split": "test" if stage == "eval" else "train", "path": n}]}
                for n in names if not split_of[n]]
    if len(configs) == 1 and not default:
        configs[0]["default"] = True  # `load_dataset(repo, split=...)` then needs no config name
    return configs


def dataset_card(run_dir: Path, repo_id: str, recipe: dict, summary: dict, env: dict, files: list[Path],
                 videos: int, report: str | None = None) -> str:
    from huggingface_hub import DatasetCardData

    stage, anchors = recipe["stage"], anchors_of(run_dir)
    stats = {p.name: file_stats(p) for p in files}
    configs = dataset_configs(stage, list(stats))
    license_id, license_why = data_license(recipe, anchors)
    if stage == "eval":
        model_path = (recipe.get("model") or {}).get("path", "")
        model_license_id = model_license(trace_model(model_path, anchors))[0]["license"]
        if model_license_id != PROJECT_LICENSE and license_id == PROJECT_LICENSE:
            license_id, license_why = "other", ("`other`: the predictions are text written by the evaluated model, "
                                                "whose license is not Apache-2.0 or not known.")
    meta = DatasetCardData(pretty_name=repo_id.split("/")[-1], license=license_id, configs=configs,
                           tags=["lvr", "video", "reasoning", stage], task_categories=[PIPELINE_TAG])
    lvr = f"lvr reproduces {PAPER}"
    if stage == "eval":
        model = (recipe.get("model") or {}).get("path", "")
        about = (f"Evaluation of `{public_name(model) if is_local_model(model) else model}` on "
                 f"{describe_data((recipe.get('data') or {}).get('input'), anchors)}, by `lvr eval` ({lvr}): one "
                 "prediction per item and frame count (the `test` split), `results.json`, the report below.")
    else:
        about = (f"Written by the `lvr {stage}` run `{run_dir.name}` ({lvr}). QA records use the LongVideo-Reason "
                 "fields: `problem_id`, `problem` (question with `A. ...` option lines), `problem_type` "
                 "(temporal | goal | spatial | plot), `videos`, `reasoning`, `answer`.")
    lines = [f"---\n{meta.to_yaml()}\n---", CARD_MARK, "", f"# {repo_id}", "", about, ""]
    lines += ["## Files and records per reasoning category", "",
              "| file | records | " + " | ".join(CATEGORIES) + " | other |",
              "|---|---:|" + "---:|" * (len(CATEGORIES) + 1)]
    for name, s in stats.items():
        cats = s["categories"]
        cells = [str(cats.get(c, 0)) if cats else "-" for c in (*CATEGORIES, "other")]
        lines.append(f"| `{name}` | {s['records']} | " + " | ".join(cells) + " |")
    if videos:
        lines += ["", f"{videos} video file(s) included, at the paths the records name."]
    elif stage != "eval":
        lines += ["", "Videos are not included; the records name them by path "
                  "(push with `--include-videos` to add them)."]
    empty = [p.name for p in jsonl_files(run_dir) if p.name not in stats]
    if empty:
        lines += ["", f"No records, so not uploaded and no split: {', '.join(f'`{n}`' for n in empty)} "
                  "(`datasets` cannot load a split without rows)."]
    first = configs[0]
    name = "" if first["config_name"] == "default" or first.get("default") else f'"{first["config_name"]}", '
    lines += ["", "```python", "from datasets import load_dataset", "",
              f'ds = load_dataset("{repo_id}", {name}split="{first["data_files"][0]["split"]}")', "```"]
    if not report:  # an eval report shows its own plot
        lines += [f"\n![{png.stem}]({png.name})" for png in sorted(run_dir.glob("*.png"))]
    if report:
        body = report.split("\n", 1)[-1] if report.startswith("# ") else report  # the card has its own title
        lines += ["", "## Report", "", body.replace("\n## ", "\n### ").strip()]
    lines += ["", "## Run summary", "", *_table(public(_scalars(summary)))]
    lines += ["", "## License", "", license_why]
    lines += _recipe_and_env(recipe, env)
    return "\n".join(lines) + "\n"


def _recipe_and_env(recipe: dict, env: dict) -> list[str]:
    import tomli_w

    from lvr_cli.recipes import INPUT_PATHS

    shown = public(_without_nulls(recipe))
    for key in (*INPUT_PATHS, "output.dir"):  # paths of this machine even when they look like a Hub id
        section, name = key.split(".")
        value = (shown.get(section) or {}).get(name)
        if isinstance(value, str) and not value.startswith("<local: "):
            shown[section][name] = public_name(value)
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    devices = env.get("devices") or {}
    cuda = ", ".join(devices.get("cuda") or []) or f"CPU only ({devices.get('cpu_count')} cores)"
    return ["", "## Recipe", "", "The resolved recipe (`recipe.json`; null values, which are the schema defaults, left "
            "out; local paths shown as `<local: NAME>`):", "", "```toml", tomli_w.dumps(shown).strip(), "```",
            "", "## Environment", "", f"- python {env.get('python')}; {versions}",
            f"- git commit: `{env.get('git_commit')}`", f"- world size {env.get('world_size')}; devices: {cuda}",
            f"- recipe sha256: `{env.get('recipe_sha256')}` (of the recipe before paths were hidden); started "
            f"{env.get('time')}"]


def _last_metrics(path: Path) -> dict:
    from stages.data.records import iter_jsonl

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
