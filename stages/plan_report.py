"""The text `lvr plan` prints: per-GPU memory tables, the largest frame counts, the calibration
against a `lvr bench-mrsp` measurement. The arithmetic is in `stages/plan.py` and
`stages/plan_model.py`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from stages import plan_model as pm
from stages.plan import (GPUS, Breakdown, Gpu, Scenario, breakdown, budget_bytes, max_frames,
                         scenarios, shape)
from stages.plan_model import GIB, Dims, PlanError, load_dims


# -- the report ---------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def count(n: float) -> str:
    """A parameter count in words: 8.29 B, 4.33 M."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def per_token(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 1024:.1f} KiB"


def zero_table(d: Dims, s: Scenario, world: int) -> list[str]:
    """Weights, gradients and optimizer state per rank at each ZeRO stage."""
    lines = [f"  {'ZeRO stage':<26}{'weights':>10}{'gradients':>11}{'optimizer':>11}{'buffers':>12}"
             f"{'total GiB':>11}"]
    for stage in (None, 0, 1, 2, 3, "fsdp2"):
        st = pm.training_state(d.params_total, s.trainable, s.b, zero_stage=stage, world=world,
                               largest_layer=d.largest_layer_params, cpu=s.cpu, vision=d.params_vision)
        name = ("off (torch AdamW)" if stage is None else f"FSDP2 over {world} ranks" if stage == "fsdp2"
                else f"{stage} over {world} ranks")
        mark = "  <- recipe" if stage == s.zero_stage else ""
        buffers = sum(st.values()) - st["weights"] - st["gradients"] - st["optimizer"]
        lines.append(f"  {name:<26}{gib(st['weights']):>10}{gib(st['gradients']):>11}{gib(st['optimizer']):>11}"
                     f"{gib(buffers):>12}{gib(sum(st.values())):>11}{mark}")
    return lines


def report(recipe, recipe_path: str, gpus: list[str], model: str | None = None, against: Path | None = None) -> str:
    """The plan of `recipe` on each of `gpus`, as text."""
    if recipe.stage not in ("sft", "rl", "bench-mrsp"):
        raise PlanError(f"stage: lvr plan plans sft, rl and bench-mrsp recipes, not {recipe.stage}")
    unknown = [g for g in gpus if g not in GPUS]
    if unknown:
        raise PlanError(f"--gpu {unknown[0]}: unknown; available: {', '.join(GPUS)}")
    d, source = load_dims(model or recipe.model.path)
    lines = [f"model  {source}",
             f"       {count(d.params_total)} parameters (vision {count(d.params_vision)}); "
             f"language {d.layers} layers x {d.hidden}, {d.heads} heads / {d.kv_heads} KV heads, MLP {d.intermediate}"]
    for name in gpus:
        lines += [""] + gpu_report(d, recipe, GPUS[name], name)
    if against is not None:
        lines += [""] + calibration_lines(d, recipe, against)
    return "\n".join([f"lvr plan {recipe_path} ({recipe.stage})"] + lines)


def gpu_report(d: Dims, recipe, gpu: Gpu, name: str) -> list[str]:
    nproc, world = recipe.launch.nproc_per_node, recipe.world_size()
    budget = budget_bytes(gpu, nproc)
    pairs = scenarios(d, recipe, gpu)
    s0, frames = next(((s, f) for s, f in pairs if s.sp > 1), pairs[0])  # per-token figures at the recipe's SP
    video, patches, P = shape(d, s0, frames)
    dtype = {2: "bf16", 4: "fp32"}[s0.b]
    lines = [f"{name}: {gpu.name}, {gpu.total_gib:g} GiB; per rank {budget / GIB:.1f} GiB usable "
             + (f"({gpu.reserve_gib:g} GiB kept for the CUDA context, NCCL and fragmentation)" if gpu.cuda else
                f"({gpu.total_gib:g} GiB over {nproc} ranks, {gpu.reserve_gib:g} GiB each for the interpreter)"),
             f"grid   world {world} ({nproc} per node x {recipe.launch.nnodes} node), SP {recipe.mrsp.sp_size}, "
             f"DP {max(1, world // recipe.mrsp.sp_size)}; {dtype} weights and activations; "
             f"{count(s0.trainable)} trainable",
             f"video  {frames} frames x {pm.tokens_per_temporal_patch(d, s0.pixels_per_frame) / d.temporal_patch:g}"
             f" tokens/frame = {video:,} video tokens ({patches:,} patches); prompt {P:,} tokens"
             + (f"; G {s0.G} x {s0.T:,} response tokens" if s0.rollouts else f"; target {s0.T:,} tokens (assumed)")]
    uly = s0.sp > 1 or s0.shared
    per_tok = pm.saved_per_token(d, s0.b, uly, False)
    ck = pm.saved_per_token(d, s0.b, uly, True)
    lines.append(f"per token of a rank's shard: activations {per_token(per_tok)} without gradient checkpointing, "
                 f"{per_token(ck)} with it (+ {per_token(pm.layer_saved_per_token(d, s0.b, uly))} for the layer "
                 f"recomputed in the backward)" + (f"; rollout KV cache {per_token(pm.kv_per_token(d, s0.b))}"
                                                   if s0.rollouts else ""))
    if not s0.bench:
        lines += ["parameters, gradients, optimizer per rank (GiB):"] + zero_table(d, s0, world)
        lines.append(scenario_table(d, pairs))
        fits = ", ".join(f"{s.label}: {max_frames(d, s, budget):,} frames" for s, _ in pairs)
        lines.append(f"largest frame count that fits on {name}: {fits}")
        if s0.rollouts and s0.grouped:
            lines.append(f"rollout KV cache of one group at {frames} frames: "
                         f"{gib(pm.kv_cache_bytes(d, s0.b, s0.G, P, s0.T, True))} GiB in lvr's hf engine (the "
                         f"prompt's cache shared by the G rows), {gib(pm.kv_cache_bytes(d, s0.b, s0.G, P, s0.T, False))}"
                         f" GiB with it copied into each row (HFEngine(share_prefix_kv=False))")
        return lines
    lines.append(bench_table(d, recipe, pairs))
    best = next((s for s, _ in pairs if s.label == "mrsp-shared"), pairs[-1][0])
    van = next((s for s, _ in pairs if s.label == "vanilla"), None)
    fits = [f"{best.label}: {max_frames(d, best, budget):,} frames"]
    if van is not None:
        fits.append(f"vanilla: {max_frames(d, van, budget):,} frames")
    lines.append(f"largest frame count that fits on {name} (weights included): {', '.join(fits)}")
    return lines


def scenario_table(d: Dims, pairs) -> str:
    """Resident, step and per-phase items, side by side for each scenario."""
    bds = [(s, breakdown(d, s, f)) for s, f in pairs]
    width = max(24, *(len(s.label) + 2 for s, _ in bds))
    head = f"  {'per rank, GiB':<48}" + "".join(f"{s.label:>{width}}" for s, _ in bds)
    rows = [head, f"  {'tokens per rank in a training forward':<48}"
            + "".join(f"{b.tokens_per_rank:>{width},}" for _, b in bds)]
    keys: list[tuple[str, str]] = []
    for _, bd in bds:
        for group, items in [("", bd.resident), ("", bd.step)] + [(p, v) for p, v in bd.phases.items()]:
            for k in items:
                if (group, k) not in keys:
                    keys.append((group, k))

    def value(bd: Breakdown, group: str, key: str) -> str:
        src = bd.phases.get(group, {}) if group else {**bd.resident, **bd.step}
        return gib(src[key]) if key in src else "-"

    for group, key in keys:
        label = f"{group}: {key}" if group else key
        rows.append(f"  {label[:48]:<48}" + "".join(f"{value(bd, group, key):>{width}}" for _, bd in bds))
    rows.append(f"  {'peak phase':<48}" + "".join(f"{bd.peak_phase:>{width}}" for _, bd in bds))
    rows.append(f"  {'peak per rank':<48}" + "".join(f"{gib(bd.peak):>{width}}" for _, bd in bds))
    return "\n".join(rows)


def bench_table(d: Dims, recipe, pairs) -> str:
    """Predicted per-rank step growth (what bench-mrsp measures on CPU) and peak with weights."""
    rows = [f"  {'frames':>6} {'mode':<18}{'tokens/rank':>12}{'step growth GiB':>17}{'peak GiB':>10}  peak phase"]
    for f in recipe.bench.frames:
        for s, _ in pairs:
            bd = breakdown(d, s, f)
            rows.append(f"  {f:>6} {s.label:<18}{bd.tokens_per_rank:>12,}{gib(bd.step_growth):>17}{gib(bd.peak):>10}"
                        f"  {bd.peak_phase}")
    return "\n".join(rows)


# -- calibration ---------------------------------------------------------------------------------
def calibration(d: Dims, recipe, measured: dict) -> list[dict]:
    """Predicted step growth against a bench-mrsp JSON's peak per rank, per (mode, frames)."""
    gpu = GPUS["h100-80g" if measured.get("memory", "").startswith("CUDA") else "cpu-24g"]  # weights counted or not
    lengths = measured["response_tokens"]  # a list since bench.response_tokens is one; one int before
    lengths = lengths if isinstance(lengths, list) else [lengths]
    # the run's own settings, whatever the recipe says now
    update = {"bench": recipe.bench.model_copy(update={
                  "frames": sorted({r["frames"] for r in measured["results"]}),
                  "modes": sorted({r["mode"] for r in measured["results"]}),
                  "frame_size": measured["frame_size"], "response_tokens": lengths}),
              "rollout": recipe.rollout.model_copy(update={"n": measured["rollout_n"]}),
              "mrsp": recipe.mrsp.model_copy(update={"sp_size": measured["sp_size"]}),
              "launch": recipe.launch.model_copy(update={"nproc_per_node": measured["world_size"], "nnodes": 1})}
    modes = {s.label: s for s, _ in scenarios(d, recipe.model_copy(update=update), gpu)}
    out = []
    for r in measured["results"]:
        if r.get("oom"):
            continue
        s = replace(modes[r["mode"]], T=r.get("response_tokens", lengths[0]))
        predicted = breakdown(d, s, r["frames"]).step_growth / GIB
        out.append({"mode": r["mode"], "frames": r["frames"], "predicted_gib": predicted,
                    "measured_gib": r["peak_memory_gb"], "error": predicted / r["peak_memory_gb"] - 1,
                    "prompt_tokens": shape(d, s, r["frames"])[2], "measured_prompt_tokens": r.get("prompt_tokens")})
    return out


def calibration_lines(d: Dims, recipe, path: Path) -> list[str]:
    try:
        measured = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"--against {path}: not a readable bench-mrsp JSON ({e})") from None
    if recipe.stage != "bench-mrsp" or "results" not in measured:
        raise PlanError("--against: compares a bench-mrsp recipe with a bench-mrsp JSON (benchmarks/<name>.json)")
    rows = calibration(d, recipe, measured)
    lines = [f"against {path} ({measured.get('machine', '?')}): predicted step growth vs measured peak per rank",
             f"  {'frames':>6} {'mode':<18}{'predicted GiB':>14}{'measured GiB':>14}{'error':>8}"]
    for r in rows:
        lines.append(f"  {r['frames']:>6} {r['mode']:<18}{r['predicted_gib']:>14.3f}{r['measured_gib']:>14.3f}"
                     f"{r['error']:>+8.0%}")
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    lines.append(f"  worst error {worst:.0%} over {len(rows)} cells")
    return lines
