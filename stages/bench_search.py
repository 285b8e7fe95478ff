"""The largest video that fits a memory cap: `bench-mrsp`'s search over frame counts.

With `bench.memory_cap_gb` set, `lvr bench-mrsp` looks, for each mode (and response length),
for the largest frame count whose measured peak memory per rank stays within the cap. It
starts from the sweep's cells (`bench.frames`): the smallest listed count that went over the
cap is the first failing one, the largest listed count below it that fitted the last fitting
one. With none failing it doubles the last fitting count (at most to `bench.max_frames`)
until a probe fails; then it bisects between the two until they are at most
`bench.search_resolution_frames` apart. A mode over the cap at the smallest listed count fits
none and is not searched below it. Every probed count is a multiple of the temporal patch
(two frames). What a probe is (one step, stopped once the cap is crossed) is the stage's
business: here a probe is a function of the frame count.
"""

from __future__ import annotations

from collections.abc import Callable

TEMPORAL_PATCH = 2  # frames per temporal patch: probed counts are multiples of it


def largest_fitting(probe: Callable[[int], tuple[bool, float | None]], listed: dict[int, tuple[bool, float | None]],
                    *, resolution: int, max_frames: int, step: int = TEMPORAL_PATCH) -> dict:
    """The largest fitting frame count, its peak, the first failing count and every probe.

    `listed`: frame count -> (fits, peak GiB) measured by the sweep; `probe(frames)` measures
    one more count the same way. Returns `largest_fitting_frames` (None: not even the
    smallest listed count fits), `peak_memory_gb` (its peak), `oom_at_frames` (the smallest
    failing count seen; None: everything up to `max_frames` fits), `oom_peak_memory_gb` (the
    peak when that probe stopped, a lower bound of what it would have needed) and `probes`
    (frames, fits, peak in the order run)."""
    seen = dict(listed)
    probes = []

    def measure(frames: int) -> bool:
        seen[frames] = probe(frames)
        probes.append({"frames": frames, "fits": seen[frames][0], "peak_memory_gb": seen[frames][1]})
        return seen[frames][0]

    failing = [f for f, (fits, _) in seen.items() if not fits]
    hi = min(failing) if failing else None
    below = [f for f, (fits, _) in seen.items() if fits and (hi is None or f < hi)]
    lo = max(below) if below else None
    if lo is not None:
        while hi is None and lo < max_frames:  # no failing count yet: double the fitting one
            nxt = min(2 * lo, max_frames) // step * step
            if nxt <= lo:
                break
            if measure(nxt):
                lo = nxt
            else:
                hi = nxt
        while hi is not None and hi - lo > resolution:  # bisect (fits at lo, fails at hi)
            mid = (lo + hi) // 2 // step * step
            if not lo < mid < hi:
                break
            if measure(mid):
                lo = mid
            else:
                hi = mid
    return {"largest_fitting_frames": lo, "peak_memory_gb": seen[lo][1] if lo is not None else None,
            "oom_at_frames": hi, "oom_peak_memory_gb": seen[hi][1] if hi is not None else None, "probes": probes}


def cap_table(searches: list[dict], cap_gb: float, resolution: int, max_frames: int, lengths: bool) -> str:
    """Markdown: per mode (and response length, with `lengths`), the largest fitting frame
    count, its peak and the first failing count (peaks to the MiB: they decide against the cap)."""
    head = "| mode | " + ("response tokens | " if lengths else "") + \
        "largest frames that fit | its peak GiB/rank | OOM at frames | peak GiB/rank when stopped | probes |"
    lines = [f"Memory cap {cap_gb:g} GiB per rank; search resolution {resolution} frames, at most {max_frames} frames.",
             "", head, "|---|" + ("---:|" if lengths else "") + "---:|---:|---:|---:|---:|"]
    for s in searches:
        fit = s["largest_fitting_frames"]
        oom = s["oom_at_frames"]
        cells = [s["mode"], *([str(s["response_tokens"])] if lengths else []),
                 "none" if fit is None else str(fit),
                 "" if s["peak_memory_gb"] is None else f"{s['peak_memory_gb']:.3f}",
                 f"none up to {max_frames}" if oom is None else str(oom),
                 "" if s["oom_peak_memory_gb"] is None else f">= {s['oom_peak_memory_gb']:.3f}",
                 str(len(s["probes"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
