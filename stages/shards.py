"""Data stages spread over workers: which inputs a shard takes, and the merge of the shards'
run directories into the files one unsharded run writes.

`data.shard = "i/N"` (caption, generate-qa, filter) runs shard i of N in
`<output dir>/shard-i-of-N`, a run directory of its own that resumes on its own. Under
torchrun or srun, caption and generate-qa take `data.shard = "RANK/WORLD_SIZE"` from the
launch (`launch_shard`); filter keeps all ranks on one run directory and splits its share
over them (`data.shard` first, then its data-parallel split).

The rule: every shard lists the whole input as an unsharded run would (`data.limit`
included), then keeps the inputs whose unit hashes to it, `sha256(unit) mod N == i`. The
unit is what the stage treats as a whole: the video (caption: its key, the path as listed;
generate-qa: its `video_id`, within which questions are deduplicated; filter: the
question's video, so a video's questions share a shard and its embedding is computed once).
A bad input line goes to the shard its key (`<input>:<line>`) hashes to. A hash and not
contiguous ranges of the sorted listing, because an input's shard then depends on nothing
but its own name: a folder that gains or loses videos between two shards' starts, or
between a kill and the resume, moves no other input from one shard to another, so no input
is done twice or by none. The price is balance: shares are even only on average.

`merge` puts finished shards back together in the order an uninterrupted single-process run
writes (input order, not the order the shards happened to finish in), so N shards merged
are the files of one unsharded run, byte for byte apart from timing fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SHARD_INFO = "shard.json"
RULE = "sha256(unit) mod N"
# stages whose single process would otherwise redo the whole input on every rank of a launch
LAUNCH_SHARDED = ("caption", "generate-qa")
# recipe keys in which the shards of one split may differ: where they write, and how many
# processes each runs on (filter scores the same on any number: its seeds are per question)
PER_SHARD_KEYS = (("data", "shard"), ("output", "dir"), ("output", "overwrite"), ("launch", None))


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """The shard `"i/N"` names; ValueError (one line, naming `shard`) when it is not `0 <= i < N`."""
        i, sep, n = text.partition("/")
        if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise ValueError(f"shard: expected 'i/N' with 0 <= i < N (e.g. '0/4'), got {text!r}")
        return cls(int(i), int(n))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dir_name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, unit: str) -> bool:
        return shard_of(unit, self.count) == self.index


def shard_of(unit: str, count: int) -> int:
    """The shard of an input unit among `count`: the first 8 bytes of its sha256, mod count."""
    return int.from_bytes(hashlib.sha256(unit.encode()).digest()[:8], "big") % count


def listing_digest(units: list[str]) -> str:
    return hashlib.sha256(json.dumps(units, ensure_ascii=False).encode()).hexdigest()


class Share:
    """The inputs one run takes: all (`data.shard` unset) or those of shard i of N."""

    def __init__(self, spec: str | None):
        self.shard = Shard.parse(spec) if spec else None

    def owns(self, unit: str) -> bool:
        return self.shard is None or self.shard.owns(unit)

    def errors(self, record: Callable[[str, str], None]) -> Callable[[str, str], None]:
        """`record(key, reason)` for the bad input lines of this share only."""
        return lambda key, reason: record(key, reason) if self.owns(key) else None

    def note(self, folder: Path, units: list[str]) -> None:
        """Write `shard.json`: the shard, the rule, and a digest of the whole listing, which the
        merge checks against the other shards' and against the input as it lists now."""
        if self.shard is None:
            return
        info = {"shard": str(self.shard), "rule": RULE, "units": len(units),
                "mine": sum(self.owns(u) for u in units), "listing_sha256": listing_digest(units)}
        tmp = Path(folder) / (SHARD_INFO + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(Path(folder) / SHARD_INFO)


def launch_shard(recipe) -> str | None:
    """`"RANK/WORLD_SIZE"` for caption and generate-qa run as one of several processes
    (torchrun's RANK/WORLD_SIZE, else srun's SLURM_PROCID/SLURM_NTASKS) without a `data.shard`
    of their own; None otherwise. Gives the process one GPU, its node-local rank's (among
    CUDA_VISIBLE_DEVICES when that names several), so the ranks of a node do not all load their
    backend onto the first; the variable, not torch, so a vLLM engine process inherits it."""
    env = os.environ
    if recipe.stage not in LAUNCH_SHARDED or recipe.data.shard is not None:
        return None
    if "WORLD_SIZE" in env:
        rank, world, local = env.get("RANK", "0"), env["WORLD_SIZE"], env.get("LOCAL_RANK", "0")
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        rank, world, local = env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID", "0")
    else:
        return None
    if int(world) <= 1:
        return None
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" not in env or len(visible) > 1:
        env["CUDA_VISIBLE_DEVICES"] = visible[int(local) % len(visible)] if visible else str(int(local))
    return f"{int(rank)}/{int(world)}"


def shard_dir(base: Path, spec: str | None) -> Path:
    """Where a run writes: `base` itself, or `base/shard-i-of-N` for shard i of N."""
    return Path(base) / Shard.parse(spec).dir_name if spec else Path(base)


# -- merge ---------------------------------------------------------------------------------------
class MergeError(Exception):
    """A set of shards that cannot be merged: the message is one line."""


@dataclass
class ShardRun:
    path: Path
    shard: Shard
    recipe: dict  # recipe.json
    summary: dict
    info: dict  # shard.json


@dataclass
class Plan:
    """How a stage's shards merge: its whole listing and, per output file, where a record goes."""

    units: list[str]  # the whole input's units, in input order (shard.json's digest is of these)
    # output file -> record -> (the unit that decides its shard, its place in an unsharded run's file)
    outputs: dict[str, Callable[[dict], tuple[str, tuple]]]
    error_place: Callable[[str], tuple]  # errors.jsonl key -> its place in an unsharded run's file
    # writes the files derived from the merged outputs; returns the summary fields it recomputes
    finish: Callable[[Path], dict] = lambda folder: {}
    same: tuple[str, ...] = ()  # summary fields that are settings, equal in every shard
    timing: dict[str, Callable[[list], object]] = field(default_factory=lambda: {"seconds": max})


def find_shards(base: Path) -> list[Path]:
    """The shard directories (`shard-i-of-N`) in `base`."""
    return sorted(p for p in Path(base).glob("shard-*-of-*") if p.is_dir())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def without_shard(recipe: dict) -> dict:
    """A shard's resolved recipe without the keys in which the shards of one split differ."""
    data = json.loads(json.dumps(recipe))
    for section, key in PER_SHARD_KEYS:
        if key is None:
            data.pop(section, None)
        else:
            data.get(section, {}).pop(key, None)
    return data


def first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return f"{prefix or '<recipe>'}: {json.dumps(a)} vs {json.dumps(b)}"


def read_shards(dirs: list[Path], expected: tuple[str, dict] | None = None) -> list[ShardRun]:
    """The finished shards of one split, in shard order; MergeError (one line) when the set is
    incomplete, duplicated, of different recipes or splits (or of another recipe than
    `expected`, `(its name, its resolved form)`), or not finished."""
    if not dirs:
        raise MergeError("no shard directories (shard-i-of-N) to merge")
    runs = []
    for path in dirs:
        recipe = _read_json(path / "recipe.json")
        spec = ((recipe or {}).get("data") or {}).get("shard")
        if not spec:
            raise MergeError(f"{path}: not a shard's run directory (no recipe.json with data.shard)")
        summary, info = _read_json(path / "summary.json"), _read_json(path / SHARD_INFO)
        if summary is None or info is None:
            raise MergeError(f"{path}: shard {spec} is unfinished (no summary.json): rerun it with "
                             f"data.shard={spec} to resume it, then merge")
        runs.append(ShardRun(Path(path), Shard.parse(spec), recipe, summary, info))
    first = runs[0]
    if expected is not None and without_shard(expected[1]) != without_shard(first.recipe):
        raise MergeError(f"{first.path}: ran a different recipe than {expected[0]} "
                         f"({first_difference(without_shard(expected[1]), without_shard(first.recipe))})")
    for run in runs[1:]:
        if run.shard.count != first.shard.count:
            raise MergeError(f"shards of different splits: {first.shard} ({first.path}) and {run.shard} ({run.path})")
        if without_shard(run.recipe) != without_shard(first.recipe):
            raise MergeError(f"{run.path}: a different recipe than {first.path} "
                             f"({first_difference(without_shard(first.recipe), without_shard(run.recipe))})")
    seen: dict[int, Path] = {}
    for run in runs:
        if run.shard.index in seen:
            raise MergeError(f"shard {run.shard} given twice: {seen[run.shard.index]} and {run.path}")
        seen[run.shard.index] = run.path
    missing = [f"{i}/{first.shard.count}" for i in range(first.shard.count) if i not in seen]
    if missing:
        raise MergeError(f"missing shard(s) {', '.join(missing)} of {first.shard.count} "
                         f"(have {', '.join(str(r.shard) for r in sorted(runs, key=lambda r: r.shard.index))})")
    return sorted(runs, key=lambda r: r.shard.index)


def _records(run: ShardRun, name: str) -> list[tuple[str, dict]]:
    """`(raw line, record)` of a shard's output file, so merged files keep the shards' bytes."""
    path = run.path / name
    if not path.exists():
        return []
    out = []
    # split on "\n" only: a caption may hold U+2028 and the like, which JSON writes unescaped
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            raise MergeError(f"{path}:{n}: malformed JSON line in a finished shard") from None
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def merge_values(values: list, same: bool = False):
    """One summary field over the shards: settings and strings the first shard's, flags any,
    counts summed (per key, for a dict of counts)."""
    if same or all(isinstance(v, str) or v is None for v in values):
        return values[0]
    if all(isinstance(v, bool) for v in values):
        return any(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values)
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v})
        return {k: merge_values([v.get(k, 0) for v in values]) for k in keys}
    return values[0]


def merge(out: Path, runs: list[ShardRun], plan: Plan) -> dict:
    """Write the merged outputs of `runs` (from `read_shards`) into `out`; return the merged summary
    (without writing it). MergeError when a shard holds what its listing says it should not."""
    digest = listing_digest(plan.units)
    for run in runs:
        if run.info.get("listing_sha256") != digest:
            raise MergeError(f"{run.path}: data.input lists other inputs now ({len(plan.units)}) than when shard "
                             f"{run.shard} ran ({run.info.get('units')}); merge where and when the shards ran")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # unfinished until the merge is whole
    for name, place_of in plan.outputs.items():
        placed = []
        for run in runs:
            for k, (line, rec) in enumerate(_records(run, name)):
                try:
                    unit, place = place_of(rec)
                except (KeyError, TypeError):
                    raise MergeError(f"{run.path / name}: line {k + 1} names an input "
                                     "data.input does not list") from None
                if not run.shard.owns(unit):
                    raise MergeError(f"{run.path / name}: {unit!r} belongs to shard "
                                     f"{shard_of(unit, run.shard.count)}/{run.shard.count}, not {run.shard}")
                placed.append((place, run.shard.index, k, line))
        if any(run.path.joinpath(name).exists() for run in runs):
            _write_lines(out / name, [line for *_, line in sorted(placed, key=lambda p: p[:3])])
    errors = []
    for run in runs:
        for k, (line, rec) in enumerate(_records(run, "errors.jsonl")):
            errors.append((plan.error_place(str(rec.get("key"))), run.shard.index, k, line))
    if any(run.path.joinpath("errors.jsonl").exists() for run in runs):
        _write_lines(out / "errors.jsonl", [line for *_, line in sorted(errors, key=lambda p: p[:3])])
    recomputed = plan.finish(out)
    summaries = [run.summary for run in runs]
    summary = {}
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        if key in recomputed:
            summary[key] = recomputed[key]
        elif key in plan.timing:
            summary[key] = plan.timing[key](values)
        else:
            summary[key] = merge_values(values, same=key in plan.same)
    return summary | {"shards": len(runs)}


def merged_recipe(runs: list[ShardRun], output_dir: str | None) -> dict:
    """The resolved recipe of the unsharded run the merge stands for."""
    recipe = json.loads(json.dumps(runs[0].recipe))
    recipe["data"]["shard"] = None
    recipe.setdefault("output", {})["dir"] = output_dir
    recipe["output"]["overwrite"] = False
    return recipe


def check_target(out: Path, runs: list[ShardRun]) -> None:
    """Refuse to merge into a shard, or over a run directory that is not an earlier merge (whose
    env.json names the shards it came from)."""
    for run in runs:
        if out.resolve() == run.path.resolve():
            raise MergeError(f"{out}: is shard {run.shard}'s directory; merge into another folder")
    if (out / "recipe.json").exists() and "merged_from" not in (_read_json(out / "env.json") or {}):
        raise MergeError(f"{out}: holds a run that is not a merge of shards; choose another folder")


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")


# -- the stages' plans -------------------------------------------------------------------------
def plan_for(recipe) -> Plan:
    """The merge plan of `recipe`'s stage, from its whole listing as the stage makes it."""
    if recipe.stage not in ("caption", "generate-qa", "filter"):
        raise MergeError(f"stage: {recipe.stage!r} runs are not sharded (caption, generate-qa and filter are)")
    return {"caption": _caption_plan, "generate-qa": _generate_qa_plan, "filter": _filter_plan}[recipe.stage](recipe)


def _line_places(keys: list[str]) -> Callable[[str], tuple | None]:
    where = {key: i for i, key in enumerate(keys)}
    return lambda key: (0, where[key]) if key in where else None


def _caption_plan(recipe) -> Plan:
    from stages import caption

    bad_lines: list[str] = []
    videos = caption.list_videos(recipe.data, lambda key, reason: bad_lines.append(key))
    pos = {v.key: i for i, v in enumerate(videos)}
    line = _line_places(bad_lines)

    def error_place(key: str) -> tuple:  # bad list lines first, then the videos in input order
        return line(key) or ((1, pos[key]) if key in pos else (2,))

    return Plan([v.key for v in videos], {caption.OUTPUT: lambda rec: (rec["video"], (pos[rec["video"]],))},
                error_place)


def _generate_qa_plan(recipe) -> Plan:
    from stages import generate_qa

    bad_lines: list[str] = []
    jobs = generate_qa.read_videos(recipe, lambda key, reason: bad_lines.append(key))
    pos = {job.video_id: i for i, job in enumerate(jobs)}
    cat = {c: i for i, c in enumerate(recipe.qa.categories)}
    line = _line_places(bad_lines)

    def error_place(key: str) -> tuple:  # per video: its grounding notes, then its keys by category
        scope = None if line(key) else generate_qa.error_scope(key, set(pos))
        if scope is None:
            return line(key) or (2,)
        return (1, pos[scope.video_id], not scope.finer, cat.get(scope.category, -1))

    def place(rec: dict) -> tuple[str, tuple]:
        return rec["video_id"], (pos[rec["video_id"]], cat[rec["category"]])

    return Plan(list(pos), {generate_qa.OUTPUT: place}, error_place)


def _filter_plan(recipe) -> Plan:
    from stages import filter as filt
    from stages.data.records import read_jsonl

    items, errors = filt.read_items(recipe.data)
    video = {key: filt.video_name(rec) for key, rec in items}
    # scores and samples: an uninterrupted single process scores in order of each video's first appearance
    pos = {key: i for i, (key, _) in enumerate(filt.video_order(items))}
    line = _line_places([key for key, _, _ in errors])

    def place(rec: dict) -> tuple[str, tuple]:
        key = str(rec["problem_id"])
        return video[key], (pos[key],)

    def finish(folder: Path) -> dict:
        rows = read_jsonl(folder / filt.SCORES) if (folder / filt.SCORES).exists() else []
        stats = filt.write_split(folder, items, {r["problem_id"]: r for r in rows}, recipe.filter)
        return {k: stats[k] for k in ("items", "scored", "rl", "sft", "dropped", "mean_pass_rate",
                                      "rl_by_category", "sft_by_category")}

    return Plan([key for key, _ in items], {filt.SCORES: place, filt.SAMPLES: place},
                lambda key: (1, pos[key]) if key in pos else line(key) or (2,), finish,
                same=("samples_per_item",), timing={"seconds": max, "items_per_s": _sum_known})


def _sum_known(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 4) if known else None
