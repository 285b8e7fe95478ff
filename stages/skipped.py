"""Inputs a training stage could not use: recorded once, counted, never a crash.

`sft` and `rl` meet an unreadable record or video on whichever rank's share holds it, and
again at every step that draws it. `SkippedInputs` records each key once in the run's
`errors.jsonl` (rank 0 writes what any rank met) and counts them for the summary's `failed`,
also across a kill and resume: the keys an earlier attempt recorded stay counted, once.
"""

from __future__ import annotations

import sys

from stages.mrsp.dist import Grid, all_gather_objects, all_reduce_sum, broadcast_object


class SkippedInputs:
    """The run's skipped inputs by key; `skip` notes one on this rank, `flush` (every rank at the
    same point) records what any rank noted since."""

    def __init__(self, run, grid: Grid):
        self.run, self.grid = run, grid
        # errors.jsonl of a killed attempt: rewritten with each key once, and counted
        standing = run.settle_errors(lambda key: False) if grid.is_main else {}
        self.keys: set[str] = set(broadcast_object(sorted(standing), grid))
        self.noted: dict[str, str] = {}

    def skip(self, key: str, reason: str) -> None:
        if key not in self.keys:
            self.noted.setdefault(key, reason)

    def flush(self) -> None:
        everyone = all_gather_objects(self.noted, None) if self.grid.distributed else [self.noted]
        for rank, noted in enumerate(everyone):
            for key, reason in noted.items():
                if key not in self.keys:
                    self.keys.add(key)
                    if self.grid.is_main:
                        self.run.error(key, reason, rank=rank)
        self.noted = {}

    def none_read(self, read: int, step: int, what: str) -> bool:
        """Whether no rank read any of step `step`'s inputs (`read`: how many this rank did; every
        rank calls); if so, say on the terminal that the step is skipped."""
        if all_reduce_sum([read], self.grid)[0]:
            return False
        if self.grid.is_main:
            print(f"step {step + 1}: no {what} of the step could be read; skipped (see errors.jsonl)",
                  file=sys.stderr, flush=True)
        return True

    @property
    def count(self) -> int:
        return len(self.keys)
