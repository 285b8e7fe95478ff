"""What a run shows while it works: progress, the numbers that matter, an ETA.

Everything comes through the run directory: `run.metric(step, ...)` hands each step's
scalars to `LiveView.metric`, `run.error(...)` counts a failed input, and a stage's
`run.progress(...)` bar says how far it is. On a terminal that is one rich progress bar whose
fields follow the metrics (`HEADLINE`: loss, lr and grad norm for sft; reward, accuracy, KL
and response length for rl; failed inputs for every stage). Anywhere else (nohup, Slurm, a
pipe) a bar cannot redraw, so a plain line with the same numbers is printed and flushed every
`log.every_steps` steps, or items for a data stage, and at the last one: `tail -f` follows it.

The rate and ETA count from a bar's first advance: a training stage's first advance skips
the steps a resumed run had done (0 on a fresh run), so they do not pass for instant steps.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import TextIO

# stage -> what its progress shows of each step's metrics: (key in metrics.jsonl, label, format)
HEADLINE: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sft": (("loss", "loss", ".4f"), ("eval_loss", "eval_loss", ".4f"), ("lr", "lr", ".2e"),
            ("grad_norm", "grad_norm", ".3g")),
    "rl": (("reward/total", "reward", ".3f"), ("reward/accuracy", "acc", ".1%"), ("kl", "kl", ".2e"),
           ("response_length", "len", ".1f"), ("eval_accuracy", "eval_acc", ".1%")),
    "bench-mrsp": (("mode", "mode", ""), ("frames", "frames", ""), ("seconds_per_step", "s/step", ".3f"),
                   ("peak_memory_gb", "peak_GB", ".2f")),
}


def headline(stage: str, values: dict) -> dict[str, str]:
    """The stage's headline numbers among `values`, formatted: label -> text."""
    out = {}
    for key, label, fmt in HEADLINE.get(stage, ()):
        v = values.get(key)
        if v is None or isinstance(v, bool):
            continue
        out[label] = format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v)
    return out


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LiveView:
    """The progress display of one run (rank 0); `enabled=False` shows nothing.

    `file`: where it writes (stdout); `terminal`: draw a bar (default: whether `file` is one)."""

    def __init__(self, stage: str, every_steps: int, enabled: bool = True, file: TextIO | None = None,
                 terminal: bool | None = None):
        self.stage, self.every, self.enabled = stage, every_steps, enabled
        self._file, self._terminal = file, terminal
        self.last: dict = {}  # the last value of every metric: the bar shows those of `HEADLINE`
        self.failed = 0
        self.bar: Bar | None = None

    @property
    def file(self) -> TextIO:
        return self._file or sys.stdout

    @property
    def terminal(self) -> bool:
        if self._terminal is None:
            from rich.console import Console

            self._terminal = Console(file=self.file).is_terminal
        return self._terminal

    @contextmanager
    def progress(self, description: str, total: int | None):
        if not self.enabled:
            yield _NoBar()
            return
        bar = Bar(self, description, total)
        self.bar = bar
        try:
            if self.terminal:
                with bar.drawn():
                    yield bar
            else:
                yield bar
        finally:
            self.bar = None

    def metric(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        shown = headline(self.stage, values)
        self.last.update(values)
        if self.bar is not None:
            self.bar.metric(step, shown)
        elif shown:  # a step logged outside any bar (rl's held-out accuracy before step 1)
            self.print(f"{self.stage} step {step} | {_join(shown)}")

    def error(self) -> None:
        """One more input failed."""
        self.failed += 1
        if self.bar is not None:
            self.bar.refresh()

    def print(self, line: str) -> None:
        if self.bar is not None and self.bar.rich is not None:
            self.bar.rich.console.print(line, highlight=False, markup=False)
            return
        self.file.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
        self.file.flush()


class Bar:
    """One progress bar: `advance(n)` after n items or steps; drawn by rich on a terminal,
    else plain lines."""

    def __init__(self, view: LiveView, description: str, total: int | None):
        self.view, self.description, self.total = view, description, total
        self.done = 0
        self.started = time.monotonic()
        self.origin: tuple[float, int] | None = None  # (time, done) at the first advance: the rate counts from it
        self.metered = False  # the stage logs metrics: lines go with its steps, not with advance
        self.rich = None
        self._task = None

    # -- what the stage calls --------------------------------------------------------------------
    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.origin is None:
            self.origin = (time.monotonic(), self.done)
        if self.rich is not None:
            self.refresh()
        elif not self.metered and (self.done // self.view.every > before // self.view.every or self.done == self.total):
            self.view.print(self.line(self.done, {}))

    # -- what the view calls ----------------------------------------------------------------------
    def metric(self, step: int, shown: dict[str, str]) -> None:
        self.metered = True
        if self.rich is not None:
            self.refresh()
        elif step % self.view.every == 0 or step == self.total:
            # the stage logs a step before advancing past it: `step` of `total` are done
            self.view.print(self.line(step, shown))

    def refresh(self) -> None:
        if self.rich is not None:
            shown = headline(self.view.stage, self.view.last)
            self.rich.update(self._task, completed=self.done, numbers=self.numbers(shown, markup=True),
                             rate=self.rate_text(self.done), eta=clock(self.eta(self.done)))

    @contextmanager
    def drawn(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn)

        cols = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[numbers]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}")]
        console = Console(file=self.view.file, force_terminal=True) if self.view._file else None  # tests
        with Progress(*cols, console=console, transient=False) as p:
            self.rich = p
            self._task = p.add_task(self.description, total=self.total, numbers="", rate="", eta=clock(None))
            try:
                yield self
            finally:
                self.refresh()
                self.rich = None

    # -- numbers ----------------------------------------------------------------------------------
    def eta(self, done: int) -> float | None:
        """Seconds left at the rate since the first advance (None until there is one)."""
        rate = self.rate(done)
        if not rate or self.total is None:
            return None
        return max(0, self.total - done) / rate

    def rate(self, done: int) -> float | None:
        if self.origin is None or done <= self.origin[1]:
            return None
        return (done - self.origin[1]) / max(time.monotonic() - self.origin[0], 1e-9)

    def rate_text(self, done: int) -> str:
        r = self.rate(done)
        if not r:
            return ""
        return f"{r:.2f} it/s" if r >= 1 else f"{1 / r:.2f} s/it"

    def numbers(self, shown: dict[str, str], markup: bool = False) -> str:
        failed = f"failed {self.view.failed}" if self.view.failed else ""
        if failed and markup:
            failed = f"[red]{failed}[/]"
        return "  ".join(x for x in (_join(shown), failed) if x)

    def line(self, done: int, shown: dict[str, str]) -> str:
        """The plain progress line after `done` of the bar's steps."""
        parts = [f"{self.description} {done}/{self.total} {100 * done / self.total:.0f}%" if self.total
                 else f"{self.description} {done}"]
        if numbers := self.numbers(shown):
            parts.append(numbers)
        if rate := self.rate_text(done):
            parts.append(rate)
        timing = f"elapsed {clock(time.monotonic() - self.started)}"
        parts.append(f"{timing} eta {clock(self.eta(done))}" if self.total else timing)
        return " | ".join(parts)


class _NoBar:
    def advance(self, n: int = 1) -> None:
        pass


def _join(shown: dict[str, str]) -> str:
    return "  ".join(f"{k} {v}" for k, v in shown.items())
