"""What `lvr bench-mrsp` writes: the JSON, the markdown tables and the plot of its results.

`stages/bench_mrsp.py` measures; this module turns its results (one dict per mode, frame
count and response length) and, with a memory cap, its searches (`stages/bench_search.py`)
into `benchmarks/<name>.{json,md,png}`, copies them into the run directory and prints the
tables on rank 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.bench_search import cap_table
from stages.mrsp.dist import Grid

PHASES = ("vision", "rollout", "old", "ref", "update")  # the parts a step's time is broken into


def with_mfu(res: dict, peak: dict) -> dict:
    """`res` with achieved FLOP/s (all processes' FLOPs over rank 0's seconds) and MFU
    (against every process's measured matmul rate added up), per phase and per step."""
    if res["oom"]:
        return res
    seconds = {**res["breakdown"], "step": res["seconds_per_step"]}
    rate = {k: (f / seconds[k] if seconds[k] > 0 else 0.0) for k, f in res["flops"].items()}
    return {**res, "flops_per_s": rate, "mfu": {k: v / peak["all_processes"] for k, v in rate.items()}}


# (faster mode, modes it is compared with) for the speed-ups; "best" is mrsp, or mrsp-1 without it
PAIRS = (("best", ("vanilla", "peer")), ("mrsp-shared", ("vanilla", "peer", "mrsp", "mrsp-shared-2pass")),
         ("mrsp-shared-2pass", ("vanilla", "peer", "mrsp")))


def cells(results: list[dict], frames: list[int], lengths: list[int]):
    """(frames, response tokens, {mode: result}) in the order of the recipe's lists."""
    for f in frames:
        for t in lengths:
            yield f, t, {r["mode"]: r for r in results if r["frames"] == f and r.get("response_tokens", t) == t}


def speedups_of(results: list[dict], frames: list[int], lengths: list[int]) -> dict[str, float]:
    """`<fast>_over_<other>@<frames>` (`@<frames>,T=<tokens>` with several response lengths):
    the other mode's seconds per step over the fast one's, where both ran."""
    out = {}
    for f, t, row in cells(results, frames, lengths):
        at = f"@{f}" + (f",T={t}" if len(lengths) > 1 else "")
        for fast, slower in PAIRS:
            if fast == "best":
                fast = "mrsp" if "mrsp" in row else "mrsp-1"
            if fast not in row or row[fast]["oom"]:
                continue
            for other in slower:
                if other in row and not row[other]["oom"]:
                    out[f"{fast}_over_{other}{at}"] = round(row[other]["seconds_per_step"]
                                                           / row[fast]["seconds_per_step"], 2)
    return out


def timing(b) -> str:
    """How many steps a cell's s/step is the median of."""
    more = f", more until they add up to {b.min_seconds:g} s (at most {b.max_steps})" if b.min_seconds else ""
    return f"s/step: the median of {b.steps} timed steps{more}, after {b.warmup_steps} warmup"


def memory_kind(grid: Grid, capped: bool, every_step: bool = False) -> str:
    """What `peak_memory_gb` measures on this run's device (`every_step`: `bench.trim_every_step`)."""
    if grid.device.type == "cuda":
        return "CUDA max_memory_allocated per rank (weights included)"
    if capped:
        return "resident-set growth per rank above the step's start (glibc mmap threshold fixed at 128 KiB)"
    steps = "every step" if every_step else "a cell's first step"
    return (f"resident-set growth per rank above the step's start (glibc's default heap; {steps}, "
            "started on a trimmed heap)")


def report(recipe, run, grid: Grid, results: list[dict], peak: dict, searches: list[dict]) -> dict:
    b = recipe.bench
    modes, lengths = list(b.modes), list(b.response_tokens)
    several = len(lengths) > 1
    speedups = speedups_of(results, b.frames, lengths)
    parts = [markdown_table(results, modes, b.frames, lengths), peak_line(peak),
             mfu_table(results, modes, b.frames, lengths)]
    if several:
        parts.append(speedup_table(results, speedups, b.frames, lengths))
    if searches:
        parts.append(cap_table(searches, b.memory_cap_gb, b.search_resolution_frames, b.max_frames, several))
    fits = {f"fits_up_to/{s['mode']}" + (f",T={s['response_tokens']}" if several else ""):
            f"{s['largest_fitting_frames'] or 'no'} frames" + (f", OOM at {s['oom_at_frames']}" if s["oom_at_frames"]
                                                              else f", none over the cap up to {b.max_frames}")
            for s in searches}
    if grid.is_main:
        from stages.env import devices_line, environment

        out = Path(b.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        env = environment(grid.world_size)
        machine = f"{devices_line(env['devices'])} x{grid.world_size} processes, {os.cpu_count()} cores, torch {env['versions']['torch']}"
        memory = memory_kind(grid, b.memory_cap_gb is not None, b.trim_every_step)
        data = {"name": b.name, "machine": machine, "model": recipe.model.path, "world_size": grid.world_size,
                "sp_size": recipe.mrsp.sp_size, "rollout_n": recipe.rollout.n,
                "response_tokens": lengths, "frame_size": b.frame_size, "steps": b.steps,
                "min_seconds": b.min_seconds, "max_steps": b.max_steps, "warmup_steps": b.warmup_steps,
                "memory": memory, "peak_flops": peak, "results": results,
                "speedups": speedups, "env": env}
        if searches:
            data["cap_search"] = {"memory_cap_gb": b.memory_cap_gb, "resolution_frames": b.search_resolution_frames,
                                  "max_frames": b.max_frames, "results": searches}
        tokens = (f"response tokens {', '.join(map(str, lengths))}" if several else f"{lengths[0]} response tokens")
        (out / f"{b.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / f"{b.name}.md").write_text(f"Machine: {machine}; model {recipe.model.path}; G = {recipe.rollout.n}, "
                                         f"{tokens}, frames {b.frame_size}x{b.frame_size}; {timing(b)}; "
                                         f"peak memory: {memory}."
                                         "\n\n" + "\n\n".join(parts) + "\n")
        plot(results, modes, out / f"{b.name}.png", machine, searches, b.memory_cap_gb)
        for name in (f"{b.name}.json", f"{b.name}.md", f"{b.name}.png"):
            (run.path / name).write_bytes((out / name).read_bytes())
        from rich.console import Console

        Console().print("\n\n".join(parts))
    return {"results": len(results), "oom": sum(r["oom"] for r in results), **speedups, **fits,
            "out_dir": b.out_dir, "failed": 0}


def markdown_table(results: list[dict], modes: list[str], frames: list[int], lengths: list[int]) -> str:
    """Per frame count (and response length, with several) and mode: seconds per step and per
    phase, peak memory, vision encodes per video, training-forward tokens per question."""
    t_col = len(lengths) > 1
    lines = ["| frames | " + ("response tokens | " if t_col else "") + "mode | s/step | vision | rollout | old | ref "
             "| update | peak GiB/rank | encodes/video | forward tokens/question |",
             "|---:|" + ("---:|" if t_col else "") + "---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f, t, row in cells(results, frames, lengths):
        for m in modes:
            r = row.get(m)
            if r is None:
                continue
            key = f"| {f} | " + (f"{t} | " if t_col else "") + f"{m} | "
            if r["oom"]:
                lines.append(key + "OOM | | | | | | | | |")
                continue
            bd = r["breakdown"]
            lines.append(key + f"{r['seconds_per_step']:.2f} | " + " | ".join(f"{bd[p]:.2f}" for p in PHASES)
                         + f" | {r['peak_memory_gb']:.2f} | {r['vision_encodes_per_video']:g} "
                         f"| {r['train_forward_tokens'] // r['questions_per_rank']} |")
    return "\n".join(lines)


def peak_line(peak: dict) -> str:
    return (f"Measured matmul peak ({peak['dtype']} {peak['gemm']} torch.mm): "
            f"{peak['per_process'] / 1e9:.1f} GFLOP/s on one process alone, {peak['all_processes'] / 1e9:.1f} GFLOP/s "
            f"on all {peak['processes']} processes at once; MFU is against the latter.")


def mfu_table(results: list[dict], modes: list[str], frames: list[int], lengths: list[int]) -> str:
    """Per frame count (and response length, with several) and mode: GFLOPs of the step (all
    processes), achieved GFLOP/s, and MFU in % per step and per phase."""
    cols, t_col = ("step", *PHASES), len(lengths) > 1
    lines = ["| frames | " + ("response tokens | " if t_col else "") + "mode | GFLOP/step | GFLOP/s | "
             + " | ".join(f"MFU % {c}" for c in cols) + " |",
             "|---:|" + ("---:|" if t_col else "") + "---|---:|---:|" + "---:|" * len(cols)]
    for f, t, row in cells(results, frames, lengths):
        for m in modes:
            r = row.get(m)
            if r is None or r["oom"]:
                continue
            lines.append(f"| {f} | " + (f"{t} | " if t_col else "") + f"{m} | {r['flops']['step'] / 1e9:.2f} | "
                         f"{r['flops_per_s']['step'] / 1e9:.2f} | "
                         + " | ".join(f"{100 * r['mfu'][c]:.1f}" if r["flops"][c] > 0 else "" for c in cols) + " |")
    return "\n".join(lines)


def speedup_table(results: list[dict], speedups: dict[str, float], frames: list[int], lengths: list[int]) -> str:
    """Per frame count and response length: the prompt (video + question) against the G
    responses, and every speed-up measured there."""
    names = list(dict.fromkeys(k.split("@")[0] for k in speedups))
    lines = ["| frames | response tokens | prompt tokens | response / prompt tokens | "
             + " | ".join(n.replace("_over_", " over ") for n in names) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(names)]
    for f, t, row in cells(results, frames, lengths):
        ran = [r for r in row.values() if not r["oom"]]
        if not ran:
            continue
        prompt = ran[0]["prompt_tokens"]
        lines.append(f"| {f} | {t} | {prompt} | {t / prompt:.3f} | "
                     + " | ".join(f"{speedups[k]:.2f}x" if (k := f"{n}@{f},T={t}") in speedups else ""
                                  for n in names) + " |")
    return "\n".join(lines)


def plot(results: list[dict], modes: list[str], path: Path, machine: str, searches: list[dict] = (),
         cap_gb: float | None = None) -> None:
    """Seconds per step against frames (against response tokens when the run has one frame
    count and several lengths), a line per mode (and length); an x at the top edge where a
    mode ran out of memory. With a cap search, a second panel: peak memory per rank against
    frames, the cap, and an x at each mode's first failing frame count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2 if searches else 1, figsize=(12 if searches else 7, 4), layout="constrained",
                             squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    lengths = sorted({r["response_tokens"] for r in results if "response_tokens" in r})
    frames = sorted({r["frames"] for r in results})
    x_key = "response_tokens" if len(frames) == 1 and len(lengths) > 1 else "frames"
    series = [(m, t) for m in modes for t in (lengths if x_key == "frames" and len(lengths) > 1 else [None])]
    ax, any_oom = axes[0][0], False
    for m, t in series:
        i, j = modes.index(m), lengths.index(t) if t is not None else 0
        mine = [r for r in results if r["mode"] == m and (t is None or r["response_tokens"] == t)]
        pts = sorted((r[x_key], r["seconds_per_step"]) for r in mine if not r["oom"])
        ooms = [r[x_key] for r in mine if r["oom"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[i % len(colours)],
                linestyle=("-", "--", ":", "-.")[j % 4], label=m if t is None else f"{m}, {t} tokens")
        if ooms:  # x in data units, y at the top of the axes: visible whatever the times
            ax.scatter(ooms, [1.0] * len(ooms), transform=ax.get_xaxis_transform(), marker="x", s=80,
                       color=colours[i % len(colours)], clip_on=False, zorder=3)
            any_oom = True
    ticks = lengths if x_key == "response_tokens" else frames
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel("response tokens per rollout" if x_key == "response_tokens" else "frames per video")
    ax.set_ylabel("seconds per RL step (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"MR-SP vs vanilla\n{machine}", fontsize=9)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if searches:
        any_oom = memory_panel(axes[0][1], results, searches, modes, cap_gb, colours) or any_oom
        handles += [h for h in axes[0][1].get_legend_handles_labels()[0] if h.get_label() == "memory cap"]
    if any_oom:
        handles.append(Line2D([], [], marker="x", linestyle="", color="black", label="out of memory"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_panel(ax, results: list[dict], searches: list[dict], modes: list[str], cap_gb: float, colours) -> bool:
    """Peak GiB per rank against frames (the sweep's cells and the search's probes that fit),
    the cap as a dashed line, an x at the top edge at each first failing count; whether any
    mode failed."""
    lengths = sorted({s["response_tokens"] for s in searches})
    any_oom, xs = False, set()
    for s in searches:
        i, j = modes.index(s["mode"]), lengths.index(s["response_tokens"])
        colour = colours[i % len(colours)]
        measured = {r["frames"]: r["peak_memory_gb"] for r in results if r["mode"] == s["mode"]
                    and r.get("response_tokens") == s["response_tokens"] and not r["oom"]
                    and r["peak_memory_gb"] <= cap_gb}
        measured.update({p["frames"]: p["peak_memory_gb"] for p in s["probes"] if p["fits"]})
        pts = sorted(measured.items())
        xs.update(measured)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=colour,
                linestyle=("-", "--", ":", "-.")[j % 4])
        if s["oom_at_frames"] is not None:
            ax.scatter([s["oom_at_frames"]], [1.0], transform=ax.get_xaxis_transform(), marker="x", s=80,
                       color=colour, clip_on=False, zorder=3)
            ax.annotate(str(s["oom_at_frames"]), (s["oom_at_frames"], 1.0), xycoords=ax.get_xaxis_transform(),
                        textcoords="offset points", xytext=(0, -9), ha="center", va="top", fontsize=7,
                        color=colour)
            xs.add(s["oom_at_frames"])
            any_oom = True
    ax.axhline(cap_gb, color="black", linestyle="--", linewidth=1, label="memory cap")
    ax.set_xscale("log", base=2)
    if xs:
        ticks = [2 ** k for k in range(min(xs).bit_length() - 1, max(xs).bit_length() + 1)
                 if min(xs) <= 2 ** k <= max(xs)] or sorted(xs)
        ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel("frames per video")
    ax.set_ylabel("peak memory per rank (GiB)")
    ax.set_ylim(0, cap_gb * 1.15)
    ax.set_title(f"Largest video under a {cap_gb:g} GiB cap (x: first frame count over it)", fontsize=9)
    ax.grid(alpha=0.3)
    return any_oom
