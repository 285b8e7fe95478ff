"""Run directories: recipe.json, env.json, metrics/samples/errors JSONL, progress, summary.

One stage run writes one folder. A finished run (it has `summary.json`) is never silently
overwritten: re-running refuses unless `output.overwrite=true`. An unfinished run of the
same recipe is resumed (the stage skips what is done); one of a different recipe is refused.
Only rank 0 prints and writes the shared files; every rank may record errors.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from lvr_cli.recipes import Recipe, RecipeError, recipe_hash, resolved
from stages.data.records import JsonlAppender
from stages.env import environment


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
        self.started = time.time()

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> "RunDir":
        """Create or resume the folder; raise `RecipeError` where it would clobber work."""
        summary, recipe_file = self.path / "summary.json", self.path / "recipe.json"
        new = resolved(self.recipe)
        if not self.is_main:  # rank 0 decides; the stage's first barrier orders the others after it
            self.resumed = recipe_file.exists() and not summary.exists() and not self.recipe.output.overwrite
            return self
        if recipe_file.exists():
            old = json.loads(recipe_file.read_text())
            same = _without_overwrite(old) == _without_overwrite(new)
            if self.recipe.output.overwrite:
                if self.is_main:
                    shutil.rmtree(self.path)
            elif summary.exists():
                raise RecipeError(f"output.dir: {self.path} holds a finished run; pass output.overwrite=true "
                                  "or choose another output.dir")
            elif not same:
                raise RecipeError(f"output.dir: {self.path} holds an unfinished run of a different recipe; "
                                  "pass output.overwrite=true or choose another output.dir")
            else:
                self.resumed = True
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.json").write_text(json.dumps(new, indent=2) + "\n")
            env = environment(self.recipe.world_size()) | {"recipe_sha256": recipe_hash(self.recipe)}
            (self.path / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        return self

    def finish(self, summary: dict) -> dict:
        summary = {"stage": self.recipe.stage, "seconds": round(time.time() - self.started, 2),
                   "resumed": self.resumed, **summary}
        if self.is_main:
            tmp = self.path / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            tmp.replace(self.path / "summary.json")
        self.close()
        return summary

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

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
        self.append("metrics.jsonl", {"step": step, "time": round(time.time() - self.started, 3), **values})

    def sample(self, record: dict) -> None:
        self.append("samples.jsonl", record)

    def error(self, key: str, reason: str, **extra) -> None:
        """Record an input that failed; every rank may call it (one short line each)."""
        name = "errors.jsonl" if self.is_main else f"errors.rank{self.rank}.jsonl"
        self._writer(name).write({"key": key, "reason": reason, "rank": self.rank, **extra})
        if self.is_main:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]skipped[/] {key}: {reason}", highlight=False, markup=True)

    @contextmanager
    def progress(self, description: str, total: int | None):
        """A rich progress bar on rank 0 (items/s and ETA); a no-op elsewhere."""
        if not self.is_main or os.environ.get("LVR_NO_PROGRESS"):
            yield _NoProgress()
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*cols, transient=False) as p:
            task = p.add_task(description, total=total, rate="")
            yield _Bar(p, task)


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass


class _Bar:
    def __init__(self, progress, task):
        self.p, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)
        speed = self.p.tasks[self.task].speed
        self.p.update(self.task, rate=f"{speed:.2f} it/s" if speed else "")


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
