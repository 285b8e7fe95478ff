"""`lvr generate-qa`: turn clip captions into multiple-choice reasoning items -> qa.jsonl.

The second step of the LongVideo-Reason pipeline (LongVILA-R1, Sec. 3.1): for every video
of `captions.jsonl` and every category of `qa.categories` (temporal, goal, spatial, plot),
the prompt `<qa.prompts_dir>/<category>.txt` is filled with the video's captions, one line
`[mm:ss-mm:ss] caption` per clip, and a reasoning LLM is asked for `qa.questions_per_category`
items as JSON: `{question, options: {A..D}, answer, reasoning, source_clips}`. Per item:

1. parse the reply with `parse_json_reply` (think blocks, code fences, near-JSON) and
   validate it (`stages/qa_validate.py`): exactly four distinct non-empty options A-D, an
   answer among them, a non-empty reasoning that does not conclude another letter; a reply
   cut off mid-JSON before its n-th item fails (`reply has 1 of 2 items (cut off)`). A reply
   that fails is asked again, up to `qa.max_attempts` in all, with the reason appended to
   the prompt; a key (`<video_id>/<category>`) that never validates goes to `errors.jsonl`;
2. if `qa.refine`, ask once more per item for a concise reasoning consistent with the
   answer (`refine.txt`); a rewrite that fails to validate keeps the original (counted);
3. drop near-duplicate questions of a video (token Jaccard >= `qa.dedup_threshold`),
   including against items written by an earlier, interrupted run;
4. append the items of a key together to `qa.jsonl` in the LongVideo-Reason format
   (`problem_id` = `<video_id>-<category>-<i>`, `problem` with `A. ...` lines,
   `problem_type`, `videos`, `reasoning`, `answer`) plus `options`, `category`,
   `question`, `video_id`, `source_clips`, `duration_s`, and `qa_key` / `qa_key_items`,
   which make a resumed run exactly-once: keys already complete are skipped, and the
   records of a key cut short by a kill are dropped and the key redone.

`errors.jsonl` lists what failed now (see `RunDir.settle_errors`): a `<video_id>/<category>`
key, a whole `<video_id>` (standing until all its categories are done), a bad input line,
and notes finer than a key (`<video_id>/spatial/grounding`), which stand while the key's
items, written without what failed, stand. `failed` counts the first three.

Grounding (`qa.grounding`, spatial only): the middle frame of up to
`qa.grounding_max_clips` evenly spaced clips goes to `grounding_backend` (a VLM) with
`ground.txt`, which asks for `[{label, box: [x0, y0, x1, y1]}]` in pixels; the boxes,
as fractions of the frame, fill the `{objects}` slot of the spatial prompt.

Sharded (`data.shard = "i/N"`, or one shard per process under torchrun/srun): the videos
whose `video_id` hashes to shard i, in `<output dir>/shard-i-of-N` (deduplication is per
video, so a shard drops what an unsharded run drops); `lvr merge` joins the shards.

Departures from the paper: grounding runs before the spatial questions are written (on
sampled clips) rather than on the clip a finished question refers to; the refine step is
one request per item; `videos` holds the video path as `captions.jsonl` gives it (resolve
it with `data.video_dir` downstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from stages.backends.base import GenRequest, one_line
from stages.backends.factory import make_backend
from stages.backends.jsonparse import ReplyParseError, parse_json_reply
from stages.caption import fmt_ts
from stages.data.records import format_problem, iter_jsonl, repair_torn_tail, write_jsonl
from stages.qa_validate import (QAInvalid, near_duplicate, parse_items_reply, question_tokens, validate_refined,
                                validate_reply)
from stages.shards import Share

OUTPUT = "qa.jsonl"
_RETRY_NOTE = "\n\nYour previous reply was rejected: {error}\nReply again with JSON only, following the rules above."


# -- prompts -------------------------------------------------------------------------------------
def caption_lines(clips: list[dict]) -> str:
    """One `[mm:ss-mm:ss] caption` line per clip."""
    return "\n".join(f"[{fmt_ts(c['start_s'])}-{fmt_ts(c['end_s'])}] {' '.join(str(c['caption']).split())}"
                     for c in clips)


def fmt_frame_time(seconds: float) -> str:
    """mm:ss of a frame, with tenths when it does not fall on a whole second."""
    whole = fmt_ts(seconds)
    tenths = int(round((seconds - int(seconds + 1e-6)) * 10))
    return f"{whole}.{tenths}" if 0 < tenths < 10 else whole


def render(template: str, **values) -> str:
    """`template` with each `{name}` of `values` replaced (other braces, e.g. JSON examples, kept)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def load_templates(qa) -> dict[str, str]:
    """The prompt templates the recipe needs, by name; raise FileNotFoundError naming a missing one."""
    names = list(qa.categories) + (["refine"] if qa.refine else [])
    names += ["ground"] if qa.grounding and "spatial" in qa.categories else []
    templates = {}
    for name in names:
        path = Path(qa.prompts_dir) / f"{name}.txt"
        if not path.exists():
            raise FileNotFoundError(f"qa.prompts_dir: {path}: no such prompt file")
        templates[name] = path.read_text()
    return templates


# -- inputs and resume ---------------------------------------------------------------------------
@dataclass
class VideoJob:
    video_id: str
    video: str
    duration_s: float | None
    clips: list[dict]
    categories: list[str]  # still to do
    objects: str = "(none)"
    items: dict[str, list[dict]] = field(default_factory=dict)  # category -> validated items


def read_videos(recipe, on_error) -> list[VideoJob]:
    """The caption records of `data.input` (first `data.limit`), each video once."""
    jobs, seen = [], set()
    source = recipe.data.input
    for lineno, rec in iter_jsonl(source, on_error=lambda n, reason: on_error(f"{source}:{n}", reason)):
        video = rec.get("video") or (rec.get("videos") or [None])[0]
        clips = rec.get("clips")
        if not isinstance(video, str) or not isinstance(clips, list) or not clips:
            on_error(f"{source}:{lineno}", "caption record needs 'video' and a non-empty 'clips' list")
            continue
        if not all(isinstance(c, dict) and {"start_s", "end_s", "caption"} <= set(c) for c in clips):
            on_error(f"{source}:{lineno}", "every clip needs start_s, end_s and caption")
            continue
        video_id = str(rec.get("video_id") or Path(video).stem)
        if video_id in seen:
            continue
        seen.add(video_id)
        jobs.append(VideoJob(video_id, video, rec.get("duration_s"), clips, list(recipe.qa.categories)))
        if recipe.data.limit and len(jobs) >= recipe.data.limit:
            break
    return jobs


def complete_records(path: Path) -> list[dict]:
    """The records of `path` whose key is complete; rewrites the file without the others."""
    if not path.exists():
        return []
    repair_torn_tail(path)
    records = [rec for _, rec in iter_jsonl(path, on_error=lambda *_: None)]
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.get("qa_key")] = counts.get(rec.get("qa_key"), 0) + 1
    keep = [rec for rec in records if rec.get("qa_key") and counts[rec["qa_key"]] == rec.get("qa_key_items")]
    if len(keep) != len(records):
        write_jsonl(path, keep)
    return keep


# -- the stage -------------------------------------------------------------------------------------
class Stage:
    """One generate-qa run: backends, templates, counters."""

    def __init__(self, recipe, run):
        self.recipe, self.run, self.qa = recipe, run, recipe.qa
        self.templates = load_templates(recipe.qa)
        self.backend = None
        self.grounder = None
        self.done: set[str] = set()  # keys complete in qa.jsonl
        self.stats = {"failed": 0, "retries": 0, "refined": 0, "refine_kept_original": 0, "deduplicated": 0,
                      "grounding_failed": 0, "items": 0, "keys_written": 0}

    def request(self, key: str, content: str | list, cfg=None) -> GenRequest:
        cfg = cfg or self.recipe.backend
        return GenRequest(key, [{"role": "user", "content": content}], max_tokens=cfg.max_tokens,
                          temperature=cfg.temperature, seed=self.recipe.seed)

    def error(self, key: str, reason: str) -> None:
        self.run.error(key, reason)

    # -- grounding ---------------------------------------------------------------------------
    def ground(self, jobs: list[VideoJob]) -> None:
        """Fill `job.objects` of the videos whose spatial key is still to do."""
        from stages.data.video import VideoDecodeError, fit_size, probe, read_frames, resize_frames

        data = self.recipe.data
        base = Path(data.video_dir) if data.video_dir else Path(data.input).parent
        requests, where = [], []
        for job in jobs:
            if "spatial" not in job.categories:
                continue
            path = Path(job.video) if Path(job.video).is_absolute() else base / job.video
            n, m = len(job.clips), min(len(job.clips), self.qa.grounding_max_clips)
            picks = sorted({round(i * (n - 1) / (m - 1)) for i in range(m)}) if m > 1 else [n // 2]
            try:
                info = probe(path)
                # the frame on screen at each clip's middle, and its own time (right on variable-rate files)
                idx = [info.frame_at((job.clips[i]["start_s"] + job.clips[i]["end_s"]) / 2) for i in picks]
                times = [float(info.frame_times_s[i]) for i in idx]
                raw = read_frames(path, idx, info)
            except VideoDecodeError as exc:
                self.stats["grounding_failed"] += 1
                self.run.error(f"{job.video_id}/spatial/grounding", str(exc))
                continue
            h, w = fit_size(raw.shape[1], raw.shape[2], 28, self.qa.grounding_max_pixels)
            frames = resize_frames(raw, h, w).permute(0, 2, 3, 1).numpy()
            for t, frame in zip(times, frames):
                text = render(self.templates["ground"], video_id=job.video_id, time=fmt_frame_time(t),
                              frame_size=f"{w}x{h}")
                content = [{"type": "video", "frames": [frame], "fps": info.fps}, {"type": "text", "text": text}]
                requests.append(self.request(f"{job.video_id}/ground@{t:g}", content, self.recipe.grounding_backend))
                where.append((job, t, w, h))
        if not requests:
            return
        if self.grounder is None:
            self.grounder = make_backend(self.recipe.grounding_backend)
        lines: dict[str, list[str]] = {}
        problems: dict[str, str] = {}
        for (job, t, w, h), result in zip(where, self.grounder.generate(requests)):
            try:
                if not result.ok:
                    raise QAInvalid(f"backend: {result.error}")
                for label, box in parse_boxes(parse_json_reply(result.text), w, h):
                    box_text = ", ".join(f"{v:.2f}" for v in box)
                    lines.setdefault(job.video_id, []).append(f"[{fmt_frame_time(t)}] {label}: [{box_text}]")
            except (QAInvalid, ReplyParseError) as exc:
                problems.setdefault(job.video_id, f"frame at {fmt_frame_time(t)}: {exc}")
        for job in jobs:
            if job.video_id in problems:
                self.stats["grounding_failed"] += 1
                self.run.error(f"{job.video_id}/spatial/grounding", one_line(problems[job.video_id], 300))
            if lines.get(job.video_id):
                job.objects = "\n".join(lines[job.video_id])

    # -- questions ---------------------------------------------------------------------------
    def generate(self, jobs: list[VideoJob]) -> None:
        """Fill `job.items[category]` for every key that validates within `qa.max_attempts`."""
        pending: dict[str, list] = {}  # key -> [job, category, prompt, last error]
        for job in jobs:
            for category in job.categories:
                prompt = render(self.templates[category], video_id=job.video_id, category=category,
                                duration=fmt_ts(job.duration_s or job.clips[-1]["end_s"]),
                                captions=caption_lines(job.clips), n=self.qa.questions_per_category,
                                objects=job.objects)
                pending[f"{job.video_id}/{category}"] = [job, category, prompt, None]
        for attempt in range(1, self.qa.max_attempts + 1):
            if not pending:
                return
            if attempt > 1:
                self.stats["retries"] += len(pending)
            keys = list(pending)
            requests = []
            for key in keys:
                _, _, prompt, error = pending[key]
                requests.append(self.request(key, prompt + (_RETRY_NOTE.format(error=error) if error else "")))
            for key, result in zip(keys, self.backend.generate(requests)):
                job, category = pending[key][:2]
                try:
                    if not result.ok:
                        raise QAInvalid(f"backend: {result.error}")
                    n = self.qa.questions_per_category
                    items = validate_reply(parse_items_reply(result.text, n), n, len(job.clips))
                except (QAInvalid, ReplyParseError) as exc:
                    pending[key][3] = one_line(str(exc), 300)
                    continue
                job.items[category] = items
                del pending[key]
        for key, (_, _, _, reason) in pending.items():
            self.error(key, f"no valid reply after {self.qa.max_attempts} attempt(s): {reason}")

    def refine(self, jobs: list[VideoJob]) -> None:
        """Rewrite each item's reasoning once; keep the original where the rewrite does not validate."""
        targets, requests = [], []
        for job in jobs:
            for category, items in job.items.items():
                for i, item in enumerate(items):
                    prompt = render(self.templates["refine"], video_id=job.video_id, captions=caption_lines(job.clips),
                                    question=item["question"], answer=item["answer"], reasoning=item["reasoning"],
                                    options="\n".join(f"{k}. {v}" for k, v in item["options"].items()))
                    targets.append(item)
                    requests.append(self.request(f"{job.video_id}/{category}#{i}/refine", prompt))
        for item, result in zip(targets, self.backend.generate(requests) if requests else []):
            try:
                if not result.ok:
                    raise QAInvalid(f"backend: {result.error}")
                item["reasoning"] = validate_refined(parse_json_reply(result.text), item["answer"], item["options"])
                self.stats["refined"] += 1
            except (QAInvalid, ReplyParseError):
                self.stats["refine_kept_original"] += 1

    def write(self, job: VideoJob, kept: list[frozenset]) -> None:
        """Append the deduplicated items of each finished key of `job`, key by key."""
        for category in job.categories:
            if category not in job.items:
                continue
            fresh = []
            for item in job.items[category]:
                tokens = question_tokens(item["question"])
                if near_duplicate(tokens, kept, self.qa.dedup_threshold):
                    self.stats["deduplicated"] += 1
                    continue
                kept.append(tokens)
                fresh.append(item)
            key = f"{job.video_id}/{category}"
            for i, item in enumerate(fresh):
                record = {
                    "problem_id": f"{job.video_id}-{category}-{i}",
                    "problem": format_problem(item["question"], item["options"]),
                    "problem_type": category, "category": category, "videos": [job.video],
                    "reasoning": item["reasoning"], "answer": item["answer"], "options": item["options"],
                    "question": item["question"], "video_id": job.video_id, "duration_s": job.duration_s,
                }
                if item["source_clips"] is not None:
                    record["source_clips"] = [job.clips[c].get("index", c) for c in item["source_clips"]]
                self.run.append(OUTPUT, record | {"qa_key": key, "qa_key_items": len(fresh)})
            self.stats["items"] += len(fresh)
            self.stats["keys_written"] += bool(fresh)
            if fresh:
                self.done.add(key)

    def close(self) -> None:
        for backend in (self.backend, self.grounder):
            if backend is not None:
                backend.close()


def parse_boxes(value, width: int, height: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """`(label, box as fractions of the frame)` of a grounding reply's valid entries."""
    items = value.get("objects", value.get("boxes")) if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise QAInvalid("expected a list of {label, box}")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) or not item["label"].strip():
            continue
        box = item.get("box", item.get("bbox_2d"))
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            continue
        x0, x1 = sorted(min(max(float(v), 0.0), width) / width for v in (box[0], box[2]))
        y0, y1 = sorted(min(max(float(v), 0.0), height) / height for v in (box[1], box[3]))
        if x1 > x0 and y1 > y0:
            out.append((" ".join(item["label"].split()), (x0, y0, x1, y1)))
    return out


class ErrorScope(NamedTuple):
    """What an errors.jsonl key names: `<video_id>`, `<video_id>/<category>`, or a note finer than
    a key (`<video_id>/<category>/...`); a key that names no input video has no scope."""

    video_id: str
    category: str | None
    finer: bool


def error_scope(key: str, video_ids: set[str]) -> ErrorScope | None:
    cuts = [len(key)] + [i for i in range(len(key) - 1, 0, -1) if key[i] == "/"]
    video_id = next((key[:i] for i in cuts if key[:i] in video_ids), None)  # the longest: ids may hold "/"
    if video_id is None:
        return None
    rest = key[len(video_id) + 1:].split("/", 1)
    return ErrorScope(video_id, rest[0] or None, len(rest) > 1)


def run(recipe, run) -> dict:
    """Write QA items for every (video, category) of `data.input` not yet in `qa.jsonl`; return the summary."""
    stage = Stage(recipe, run)
    share = Share(recipe.data.shard)  # all videos, or those of shard i/N (stages/shards.py)
    listed = read_videos(recipe, share.errors(stage.error))
    if run.is_main:
        share.note(run.path, [job.video_id for job in listed])
    jobs = [job for job in listed if share.owns(job.video_id)]
    existing = complete_records(run.file(OUTPUT))
    stage.done = {rec["qa_key"] for rec in existing}
    categories = list(recipe.qa.categories)
    video_ids = {job.video_id for job in jobs}

    def done(key: str) -> bool:
        scope = error_scope(key, video_ids)
        if scope is None or scope.finer:
            return False  # a bad input line is read again; a finer note stands while its key's items do
        wanted = [scope.category] if scope.category else categories
        return all(f"{scope.video_id}/{c}" in stage.done for c in wanted)

    run.settle_errors(done)
    kept: dict[str, list[frozenset]] = {}
    for rec in existing:
        kept.setdefault(rec["video_id"], []).append(question_tokens(rec["question"]))
    n_keys = sum(len(job.categories) for job in jobs)
    for job in jobs:
        job.categories = [c for c in job.categories if f"{job.video_id}/{c}" not in stage.done]
    todo = [job for job in jobs if job.categories]
    tried = {job.video_id: set(job.categories) for job in todo}

    def retried(key: str) -> bool:  # input lines are all read again; a video or key, when it was to do
        scope = error_scope(key, video_ids)
        if scope is None:
            return True
        return scope.category in tried.get(scope.video_id, ()) if scope.category else scope.video_id in tried

    already_done = n_keys - sum(len(job.categories) for job in todo)
    per_wave = max(1, -(-2 * recipe.backend.max_concurrency // max(1, len(recipe.qa.categories))))
    try:
        with run.progress("generate-qa", total=len(todo)) as bar:
            for start in range(0, len(todo), per_wave):
                wave = todo[start:start + per_wave]
                if stage.backend is None:
                    stage.backend = make_backend(recipe.backend)
                if recipe.qa.grounding:
                    stage.ground(wave)
                stage.generate(wave)
                if recipe.qa.refine:
                    stage.refine(wave)
                for job in wave:
                    stage.write(job, kept.setdefault(job.video_id, []))
                    bar.advance()
    except BaseException:
        run.settle_errors(done)
        raise
    finally:
        stage.close()
    standing = run.settle_errors(done, retried)
    notes = [key for key in standing if (scope := error_scope(key, video_ids)) and scope.finer]
    stage.stats["failed"] = len(standing) - len(notes)
    return {"videos": len(jobs), "keys": n_keys, "already_done": already_done,
            "done": sum(f"{job.video_id}/{c}" in stage.done for job in jobs for c in categories), **stage.stats}
