"""Run directories: recipe.json, env.json, metrics/samples/errors JSONL, progress, summary.

Every scalar a stage logs goes through `metric`: metrics.jsonl, the `[log]` backends
(`lvr_cli/tracking.py`) and the live progress display (`lvr_cli/live.py`).

One stage run writes one folder. A finished run (it has `summary.json`) is never silently
overwritten: re-running refuses unless `output.overwrite=true`, or `retry_failed` reopens it
to redo its failed inputs. An unfinished run of the same recipe is resumed (the stage skips
what is done); one of a different recipe is refused. Only rank 0 prints and writes the
shared files; every rank may record errors.

`errors.jsonl` lists the inputs failed now, one line each. A failure is appended the moment
it happens, so a kill loses none; a stage that resumes settles the file (`settle_errors`)
when it starts and when it ends: one atomic rewrite keeps the latest failure of each key and
drops the keys its outputs now hold and the keys the run retried without failing again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from lvr_cli.live import LiveView
from lvr_cli.recipes import Recipe, RecipeError, recipe_hash, resolved
from lvr_cli.tracking import Trackers
from stages.data.records import JsonlAppender, iter_jsonl, write_jsonl
from stages.env import environment


ERRORS = "errors.jsonl"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class RunDir:
    """The folder of one stage run and its writers."""

    def __init__(self, path: Path, recipe: Recipe, rank: int | None = None):
        self.path = Path(path)
        self.recipe = recipe
        self.rank = _rank() if rank is None else rank
        self.is_main = self.rank == 0
        self.resumed = False
        self._writers: dict[str, JsonlAppender] = {}
        self._failed: set[str] = set()  # keys this process recorded as failed
        self.started = time.time()
        shown = self.is_main and not os.environ.get("LVR_NO_PROGRESS")
        self.live = LiveView(recipe.stage, recipe.log.every_steps, enabled=shown)
        self.trackers: Trackers | None = None  # rank 0, once open

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self, retry_failed: bool = False) -> "RunDir":
        """Create or resume the folder; raise `RecipeError` where it would clobber work.

        `retry_failed` resumes a finished run as well: its outputs are kept and the stage
        redoes what is not done, i.e. the inputs `errors.jsonl` lists.
        """
        summary, recipe_file = self.path / "summary.json", self.path / "recipe.json"
        new = resolved(self.recipe)
        overwrite = self.recipe.output.overwrite
        if retry_failed and overwrite:
            raise RecipeError("--retry-failed keeps a run's outputs; it cannot go with output.overwrite=true")
        if not self.is_main:  # rank 0 decides; the stage's first barrier orders the others after it
            self.resumed = recipe_file.exists() and (retry_failed or not summary.exists()) and not overwrite
            return self
        if recipe_file.exists():
            old = json.loads(recipe_file.read_text())
            same = _without_overwrite(old) == _without_overwrite(new)
            if overwrite:
                shutil.rmtree(self.path)
            elif summary.exists() and not (retry_failed and same):
                kind = "a finished run" + ("" if same else " of a different recipe")
                raise RecipeError(f"output.dir: {self.path} holds {kind}; pass output.overwrite=true"
                                  f"{', --retry-failed to redo its failed inputs,' if same else ''} "
                                  "or choose another output.dir")
            elif not same:
                raise RecipeError(f"output.dir: {self.path} holds an unfinished run of a different recipe; "
                                  "pass output.overwrite=true or choose another output.dir")
            else:
                self.resumed = True
                # unfinished from here on: a retry killed midway resumes like any other run
                summary.unlink(missing_ok=True)
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.json").write_text(json.dumps(new, indent=2) + "\n")
            env = environment(self.recipe.world_size()) | {"recipe_sha256": recipe_hash(self.recipe)}
            (self.path / "env.json").write_text(json.dumps(env, indent=2) + "\n")
            self.trackers = Trackers(self.recipe.log, self.path, new, self.resumed,
                                     verbose=bool(os.environ.get("LVR_VERBOSE")))
        return self

    def discard(self) -> None:
        """Remove a run folder this open created, when the stage refused its input before any
        work: the corrected command then starts afresh instead of meeting a different recipe."""
        if self.is_main and not self.resumed:
            shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, summary: dict) -> dict:
        summary = {"stage": self.recipe.stage, "seconds": round(time.time() - self.started, 2),
                   "resumed": self.resumed, **summary}
        if self.is_main:
            tmp = self.path / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            tmp.replace(self.path / "summary.json")
            if self.trackers:
                self.trackers.summary(summary)
        self.close()
        return summary

    def close(self, failed: bool = False) -> None:
        """Close the writers and the tracking backends (`failed`: the stage raised)."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        if self.trackers:
            self.trackers.close(failed=failed)

    # -- writers -------------------------------------------------------------------------------
    def _writer(self, name: str) -> JsonlAppender:
        if name not in self._writers:
            self._writers[name] = JsonlAppender(self.path / name)
        return self._writers[name]

    def file(self, name: str) -> Path:
        return self.path / name

    def append(self, name: str, record: dict) -> None:
        """Append a record to `name` (rank 0 only)."""
        if self.is_main:
            self._writer(name).write(record)

    def metric(self, step: int, **values) -> None:
        """Log one step's scalars: metrics.jsonl, the `[log]` backends, the progress display (rank 0)."""
        if not self.is_main:
            return
        self.append("metrics.jsonl", {"step": step, "time": round(time.time() - self.started, 3), **values})
        if self.trackers:
            self.trackers.metric(step, values)
        self.live.metric(step, values)

    def sample(self, record: dict) -> None:
        self.append("samples.jsonl", record)

    def error(self, key: str, reason: str, **extra) -> None:
        """Record an input that failed; every rank may call it (one short line each)."""
        name = ERRORS if self.is_main else f"errors.rank{self.rank}.jsonl"
        self._failed.add(key)
        self._writer(name).write({"key": key, "reason": reason, "rank": self.rank, **extra})
        if self.is_main:
            note("skipped", f"{key}: {reason}")
            self.live.error()

    def settle_errors(self, done: Callable[[str], bool],
                      retried: Callable[[str], bool] = lambda key: False) -> dict[str, dict]:
        """The failures standing now, by key, as `errors.jsonl` is rewritten to hold them (rank 0).

        Kept: the latest record of each key, unless `done(key)` (the outputs hold it) or
        `retried(key)` (this run tried it again) without this run recording it as failed.
        A stage calls it when it starts (`done` only: a killed run's stale lines go) and when
        it ends, interrupted or not (`retried` too, once the run has tried everything).
        """
        if not self.is_main:
            return {}
        writer = self._writers.pop(ERRORS, None)
        if writer is not None:  # the file is replaced: later errors go to a fresh appender
            writer.close()
        path = self.file(ERRORS)
        latest: dict[str, dict] = {}
        if path.exists():
            # a line torn by a kill is skipped: its input is not done, so the stage tries it again
            for _, rec in iter_jsonl(path, on_error=lambda *_: None):
                key = str(rec.get("key"))
                latest.pop(key, None)  # ordered by each key's latest failure
                latest[key] = rec
        standing = {key: rec for key, rec in latest.items()
                    if not done(key) and (key in self._failed or not retried(key))}
        if path.exists():
            write_jsonl(path, list(standing.values()))
        return standing

    def progress(self, description: str, total: int | None):
        """A context giving a bar to `advance(n)` (rank 0 shows it; see `lvr_cli/live.py`)."""
        return self.live.progress(description, total)


def note(label: str, text: str) -> None:
    """One line on stderr: `label` in yellow on a terminal; plain and never wrapped otherwise
    (a log file or a pipe gets each message on exactly one line)."""
    import sys

    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not sys.stderr.isatty():
        print(f"{label} {text}", file=sys.stderr, flush=True)
        return
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text.assemble((label, "yellow"), " ", text))


def _without_overwrite(data: dict) -> dict:
    data = json.loads(json.dumps(data))
    data.get("output", {}).pop("overwrite", None)
    return data


def print_summary(title: str, summary: dict) -> None:
    """The final table of a stage, on rank 0."""
    if _rank() != 0:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4g}"
        table.add_row(str(k), str(v))
    Console().print(table)
