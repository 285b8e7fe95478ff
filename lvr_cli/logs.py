"""A quiet console: what libraries print goes to the run's log file, not the terminal.

While a stage runs, the console keeps lvr's own output (the progress, skipped inputs, the
summary, one-line errors) and `<run>/run.log` on rank 0 gets the rest:
- Python logging of every library at WARNING and above (transformers, torch.distributed, ...),
  and all of DeepSpeed's (its banners and INFO lines: it prints them through its own handler);
- Python warnings (`FutureWarning`, ...);
- whatever native code writes to stderr: FFmpeg's and decord's decoder messages (`moov atom
  not found`), gloo's, torch's C++ warnings. File descriptor 2 points at the log file while
  Python's `sys.stderr` keeps the terminal, so lvr's own messages still reach it.
transformers' progress bars (weight loading, shard writing) are switched off. Other ranks
send the same noise nowhere: rank 0's log has it. An unexpected exception's traceback goes
to the log file (`run.rank<N>.log` on other ranks) and the console gets one line naming it.

`lvr --verbose` (or `LVR_VERBOSE=1`) leaves the libraries alone: they print where they would.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import traceback
from pathlib import Path

LOG_FILE = "run.log"


def verbose() -> bool:
    return bool(os.environ.get("LVR_VERBOSE"))


class _ToHandler(logging.Filter):
    """On a logger with its own console handler (DeepSpeed's): hand each record to ours instead."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False


class RunLog:
    """The log file of one process of a stage run; `start()` ... `stop()` around the stage."""

    def __init__(self, run_dir: Path, rank: int = 0, verbose: bool = False):
        self.run_dir, self.rank, self.verbose = Path(run_dir), rank, verbose
        self.path = self.run_dir / (LOG_FILE if rank == 0 else f"run.rank{rank}.log")
        self._undo: list = []

    def start(self) -> "RunLog":
        if self.verbose:
            return self
        sink = open(self.path if self.rank == 0 else os.devnull, "a", buffering=1, encoding="utf-8",
                    errors="backslashreplace")
        if self.rank == 0:
            sink.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} lvr {' '.join(sys.argv[1:])}\n")
        self._undo.append(sink.close)
        self._redirect_stderr(sink)
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        old_level = root.level
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)
        self._undo += [lambda: root.removeHandler(handler), lambda: root.setLevel(old_level),
                       lambda: logging.captureWarnings(False)]
        ds = logging.getLogger("DeepSpeed")  # DeepSpeed prints through its own handler, set at import
        route = _ToHandler(handler)
        ds.addFilter(route)
        self._undo.append(lambda: ds.removeFilter(route))
        self._quiet_transformers()
        return self

    def stop(self) -> None:
        while self._undo:
            self._undo.pop()()

    def crash(self, exc: BaseException) -> str:
        """Write `exc`'s traceback to the log file; return the console's line about it."""
        text = "".join(traceback.format_exception(exc))
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} the stage failed:\n{text}")
            where = f"traceback in {self.path}"
        except OSError:
            where = "no log file could be written"
            sys.stderr.write(text)
        if self.verbose:
            sys.stderr.write(text)
        first = (str(exc).strip().splitlines() or [""])[0]
        rank = f"rank {self.rank}: " if self.rank else ""
        return f"{rank}{type(exc).__name__}{': ' + first if first else ''} ({where})"

    # -- pieces --------------------------------------------------------------------------------
    def _redirect_stderr(self, sink) -> None:
        """Native stderr (fd 2) to `sink`; Python's `sys.stderr` to a copy of the terminal's."""
        sys.stderr.flush()
        terminal_fd = os.dup(2)
        os.dup2(sink.fileno(), 2)
        old = sys.stderr
        sys.stderr = io.TextIOWrapper(io.FileIO(terminal_fd, "w"), encoding=getattr(old, "encoding", None) or "utf-8",
                                      errors="backslashreplace", line_buffering=True)

        def undo():
            sys.stderr.flush()
            os.dup2(terminal_fd, 2)
            sys.stderr.close()  # closes terminal_fd
            sys.stderr = old

        self._undo.append(undo)

    def _quiet_transformers(self) -> None:
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()  # its records reach the root logger, and so the file
        hf_logging.enable_propagation()
        self._undo += [hf_logging.enable_progress_bar, hf_logging.enable_default_handler,
                       hf_logging.disable_propagation]
