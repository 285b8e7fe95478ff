"""What `lvr bench-mrsp` writes: the JSON, the markdown tables and the plot of its results.

`stages/bench_mrsp.py` measures; this module turns its results (one dict per mode and frame
count) into `benchmarks/<name>.{json,md,png}`, copies them into the run directory and prints
the tables on rank 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def report(recipe, run, grid: Grid, results: list[dict], peak: dict) -> dict:
    b = recipe.bench
    modes = list(b.modes)
    table = markdown_table(results, modes, b.frames)
    mfu = mfu_table(results, modes, b.frames)
    speedups = {}
    for f in b.frames:
        row = {r["mode"]: r for r in results if r["frames"] == f}
        best = "mrsp" if "mrsp" in row else ("mrsp-1" if "mrsp-1" in row else None)
        pairs = ((best, ("vanilla", "peer")), ("mrsp-shared", ("vanilla", "peer", "mrsp", "mrsp-shared-2pass")),
                 ("mrsp-shared-2pass", ("vanilla", "peer", "mrsp")))
        for fast, slower in pairs:
            if fast not in row or row[fast]["oom"]:
                continue
            for other in slower:
                if other in row and not row[other]["oom"]:
                    speedups[f"{fast}_over_{other}@{f}"] = round(row[other]["seconds_per_step"]
                                                                / row[fast]["seconds_per_step"], 2)
    if grid.is_main:
        from stages.env import environment

        out = Path(b.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        env = environment(grid.world_size)
        machine = (f"{env['devices'].get('cuda') or 'CPU'} x{grid.world_size} processes, "
                   f"{os.cpu_count()} cores, torch {env['versions']['torch']}")
        data = {"name": b.name, "machine": machine, "model": recipe.model.path, "world_size": grid.world_size,
                "sp_size": recipe.mrsp.sp_size, "rollout_n": recipe.rollout.n,
                "response_tokens": b.response_tokens, "frame_size": b.frame_size, "steps": b.steps,
                "warmup_steps": b.warmup_steps, "peak_flops": peak, "results": results, "speedups": speedups,
                "env": env}
        (out / f"{b.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / f"{b.name}.md").write_text(f"Machine: {machine}; model {recipe.model.path}; G = {recipe.rollout.n}, "
                                         f"{b.response_tokens} response tokens, frames {b.frame_size}x{b.frame_size}.\n\n"
                                         + table + "\n\n" + peak_line(peak) + "\n\n" + mfu + "\n")
        plot(results, modes, out / f"{b.name}.png", machine)
        for name in (f"{b.name}.json", f"{b.name}.md", f"{b.name}.png"):
            (run.path / name).write_bytes((out / name).read_bytes())
        from rich.console import Console

        Console().print(table + "\n\n" + peak_line(peak) + "\n\n" + mfu)
    return {"results": len(results), "oom": sum(r["oom"] for r in results), **speedups, "out_dir": b.out_dir,
            "failed": 0}


def markdown_table(results: list[dict], modes: list[str], frames: list[int]) -> str:
    lines = ["| frames | mode | s/step | vision | rollout | old | ref | update | peak GiB/rank | encodes/video "
             "| forward tokens/question |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in frames:
        for m in modes:
            r = next((x for x in results if x["frames"] == f and x["mode"] == m), None)
            if r is None:
                continue
            if r["oom"]:
                lines.append(f"| {f} | {m} | OOM | | | | | | | | |")
                continue
            bd = r["breakdown"]
            lines.append(f"| {f} | {m} | {r['seconds_per_step']:.2f} | " + " | ".join(f"{bd[p]:.2f}" for p in PHASES)
                         + f" | {r['peak_memory_gb']:.2f} | {r['vision_encodes_per_video']:g} "
                         f"| {r['train_forward_tokens'] // r['questions_per_rank']} |")
    return "\n".join(lines)


def peak_line(peak: dict) -> str:
    return (f"Measured matmul peak ({peak['dtype']} {peak['gemm']} torch.mm): "
            f"{peak['per_process'] / 1e9:.1f} GFLOP/s on one process alone, {peak['all_processes'] / 1e9:.1f} GFLOP/s "
            f"on all {peak['processes']} processes at once; MFU is against the latter.")


def mfu_table(results: list[dict], modes: list[str], frames: list[int]) -> str:
    """Per frame count and mode: GFLOPs of the step (all processes), achieved GFLOP/s, and
    MFU in % per step and per phase."""
    cols = ("step", *PHASES)
    lines = ["| frames | mode | GFLOP/step | GFLOP/s | " + " | ".join(f"MFU % {c}" for c in cols) + " |",
             "|---:|---|---:|---:|" + "---:|" * len(cols)]
    for f in frames:
        for m in modes:
            r = next((x for x in results if x["frames"] == f and x["mode"] == m), None)
            if r is None or r["oom"]:
                continue
            lines.append(f"| {f} | {m} | {r['flops']['step'] / 1e9:.2f} | {r['flops_per_s']['step'] / 1e9:.2f} | "
                         + " | ".join(f"{100 * r['mfu'][c]:.1f}" if r["flops"][c] > 0 else "" for c in cols) + " |")
    return "\n".join(lines)


def plot(results: list[dict], modes: list[str], path: Path, machine: str) -> None:
    """Seconds per step against frames, a line per mode; an x at the top edge where a mode ran
    out of memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    frames = sorted({r["frames"] for r in results})
    any_oom = False
    for i, m in enumerate(modes):
        colour = colours[i % len(colours)]
        pts = [(r["frames"], r["seconds_per_step"]) for r in results if r["mode"] == m and not r["oom"]]
        ooms = [r["frames"] for r in results if r["mode"] == m and r["oom"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=m)
        if ooms:  # x in data units, y at the top of the axes: visible whatever the times
            ax.scatter(ooms, [1.0] * len(ooms), transform=ax.get_xaxis_transform(), marker="x", s=80,
                       color=colour, clip_on=False, zorder=3)
            any_oom = True
    ax.set_xscale("log", base=2)
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.minorticks_off()
    ax.set_xlabel("frames per video")
    ax.set_ylabel("seconds per RL step (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"MR-SP vs vanilla\n{machine}", fontsize=9)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if any_oom:
        handles.append(Line2D([], [], marker="x", linestyle="", color="black", label="out of memory"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
