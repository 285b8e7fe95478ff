"""`lvr bench-components`: per-rank time and peak memory of MR-SP's two parallel components
at SP 1, 2, 4, ...

    lvr bench-components recipes/demo/bench_components.toml [components.frames=512 ...]

Where `lvr bench-mrsp` times whole GRPO steps, this stage isolates the two pieces that
sequence parallelism splits across ranks, on one long sequence (a video of
`components.frames` random frames + a short multiple-choice question + a response of
`components.response_tokens`):

- `vision`: the sharded vision encode (`stages.mrsp.vision.encode_sharded`): each rank
  encodes its temporal-patch slice of the frames, a variable-size all-gather rebuilds the
  whole embedding on every rank;
- `forward`: the Ulysses SP forward of the whole sequence computing the response's per-token
  log-probs (`stages.mrsp.logprobs.token_logprobs`), without gradients;
- `forward+backward` (with `components.backward`): the same forward with gradients for the language
  model, the backward, and the sum of parameter gradients over the SP group (the vision
  tower is frozen, as in the default RL recipe).
- `forward+backward checkpointed` (with `components.checkpointing`): the same with gradient
  checkpointing of every decoder layer (`train.gradient_checkpointing`): each layer's
  activations are recomputed in the backward, under the same Ulysses attention.

Every SP size from 2 runs in its own launch of `torch.distributed.run --standalone` (a free
port chosen at run time; gloo on CPU, NCCL with one GPU per rank when CUDA is there; SP 1
is one plain process), every collective under `launch.timeout_s`; each worker reads the
resolved recipe the stage hands it (`python -m stages.bench_components RECIPE.json OUT`,
not a user command). On each rank a phase runs once to warm up, then `components.repeats`
times after a barrier: its time is the median wall clock (device synchronised). Then each
phase runs `components.repeats` more times for its peak memory (the
largest of the runs), `stages.bench_mrsp.PeakMemory` reset before each: CUDA's allocator
peak (weights included) on GPU; on CPU the growth of the resident set above the phase's
start, sampled every 5 ms, with glibc switched (after the timed runs: it slows allocation)
to a fixed mmap threshold and its free heap trimmed before each run, so that freed tensors
leave the resident set and a run's growth is its own live memory rather than hidden by, or
added to, what earlier runs left in the heap. Each rank's CPU time is recorded beside its
wall time: on a machine shared with other jobs, a share well below 1 says the times are
upper bounds.

Self-check: SP 1 is always run and is the reference. The log-probs of every SP size must
equal SP 1's within `components.tolerance` (float32), and the gathered vision embedding is
compared too; the differences are stored, and one over is an error (`errors.jsonl`, exit 1).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from types import SimpleNamespace

import torch

from stages.bench_mrsp import exact_rss_mode, trim_heap
from stages.env import devices_line
from stages.mrsp.dist import barrier

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTED = "forward+backward checkpointed"
PHASES = ("vision", "forward", "forward+backward", CHECKPOINTED)


def namespace(data):
    """The resolved recipe (plain JSON data) as attributes, as the worker reads it."""
    if isinstance(data, dict):
        return SimpleNamespace(**{k: namespace(v) for k, v in data.items()})
    return data


# -- one rank ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_mib(memory, device: torch.device) -> float:
    """Memory in use now: CUDA's allocated bytes, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return memory._rss() / 2 ** 20


def time_phase(fn, grid, repeats: int) -> tuple[object, dict]:
    """Run `fn` once to warm up, then `repeats` times after a barrier; return its last output
    and the wall-clock and process CPU seconds of each run."""
    fn()
    seconds, cpu_seconds, out = [], [], None
    for _ in range(repeats):
        out = None  # the previous output must not stay alive during this run
        barrier(grid)
        _sync(grid.device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _sync(grid.device)
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
    return out, {"median_s": statistics.median(seconds), "seconds": seconds, "cpu_seconds": cpu_seconds}


def peak_of_phase(fn, grid, memory, repeats: int) -> dict:
    """Run `fn` `repeats` more times; return its peak memory (MiB: the largest run, and each
    run's) and the memory in use before it."""
    peaks, starts = [], []
    for _ in range(repeats):
        barrier(grid)
        _sync(grid.device)
        trim_heap(grid.device)
        memory.reset()
        starts.append(_allocated_mib(memory, grid.device))
        fn()
        _sync(grid.device)
        peaks.append(memory.gb() * 1024)
    return {"peak_mib": max(peaks), "peak_mib_runs": peaks, "start_mib": min(starts)}


def worker(recipe, result: Path) -> None:
    """One rank of one SP size: build the sequence, time the phases and take their peak
    memory; rank 0 gathers every rank's figures and writes them to `result`."""
    from transformers.utils import logging as hf_logging

    from stages.bench_mrsp import PeakMemory, synthetic_sample
    from stages.mrsp.dist import all_reduce_grads, destroy, gather_objects, init_grid
    from stages.mrsp.engine import disable_checkpointing, enable_checkpointing
    from stages.mrsp.logprobs import TokenBatch, token_logprobs
    from stages.mrsp.positions import padded_length, shard_range
    from stages.mrsp.runtime import Mode
    from stages.mrsp.vision import encode_sharded, temporal_slices
    from stages.setup import load_policy, make_runtime

    hf_logging.disable_progress_bar()
    c, chunk = recipe.components, recipe.mrsp.logprob_chunk_tokens
    sp = int(os.environ.get("WORLD_SIZE", "1"))
    grid = init_grid(sp, recipe.launch.backend, recipe.launch.timeout_s)
    torch.set_num_threads(c.threads)
    torch.manual_seed(recipe.seed)
    adapter = load_policy(recipe, grid)
    adapter.model.requires_grad_(False)
    params = list(adapter.model.model.language_model.parameters()) + list(adapter.lm_head.parameters())
    rt = make_runtime(recipe, adapter, grid, Mode.named("mrsp"))
    sample = synthetic_sample(rt, c.frames, c.frame_size, recipe.seed)
    pixels, grid_thw = sample.video.pixels.to(grid.device), sample.video.grid_thw.to(grid.device)
    g = torch.Generator().manual_seed(77 + recipe.seed)
    response = torch.randint(10, 900, (c.response_tokens,), generator=g).tolist()

    def vision():
        with torch.no_grad():
            return encode_sharded(adapter, pixels, grid_thw, grid)

    def forward():
        with torch.no_grad():
            return token_logprobs(adapter, batch, grid, chunk)[0]

    def forward_backward():
        logp = token_logprobs(adapter, batch, grid, chunk)[0]
        logp[batch.score_mask].sum().backward()
        all_reduce_grads(params, grid.sp_group)
        adapter.model.zero_grad(set_to_none=True)

    def checkpointed():  # layers checkpoint only in training mode
        enable_checkpointing(adapter.model)
        adapter.model.train()
        try:
            forward_backward()
        finally:
            disable_checkpointing(adapter.model)
            adapter.model.eval()

    phases = {"vision": vision, "forward": forward}
    backward = c.backward or c.checkpointing
    if backward:
        phases["forward+backward"] = forward_backward
    if c.checkpointing:
        phases[CHECKPOINTED] = checkpointed
    figures = {}
    emb, figures["vision"] = time_phase(vision, grid, c.repeats)
    b = TokenBatch.from_rows([(i, p, [emb], m) for i, p, m in rt.rows(sample, [response])], rt.pad_id)
    batch = TokenBatch(b.input_ids.to(grid.device), b.position_ids.to(grid.device), b.videos,
                       b.score_mask.to(grid.device))
    logp, figures["forward"] = time_phase(forward, grid, c.repeats)
    if backward:
        for p in params:
            p.requires_grad_(True)
        _, figures["forward+backward"] = time_phase(forward_backward, grid, c.repeats)
    if c.checkpointing:
        _, figures[CHECKPOINTED] = time_phase(checkpointed, grid, c.repeats)

    if grid.device.type == "cpu":
        exact_rss_mode()
    memory = PeakMemory(grid.device)
    for name, fn in phases.items():
        figures[name].update(peak_of_phase(fn, grid, memory, c.repeats))
    memory.close()

    L = batch.input_ids.shape[1]
    start, stop = shard_range(padded_length(L, sp), sp, grid.sp_rank)
    t0, t1 = temporal_slices(int(grid_thw[0, 0]), sp)[grid.sp_rank]
    h, w = int(grid_thw[0, 1]), int(grid_thw[0, 2])
    mine = {"rank": grid.rank, "sp_rank": grid.sp_rank, "device": str(grid.device), "phases": figures,
            "tokens_per_rank": stop - start, "frames_per_rank": (t1 - t0) * adapter.patch_spec.temporal_patch_size,
            "video_tokens_per_rank": (t1 - t0) * h * w // adapter.merge_size ** 2}
    ranks = gather_objects(mine, grid)
    if grid.is_main:
        out = result
        scored = logp[0][batch.score_mask[0]].float().cpu()
        torch.save({"logprobs": scored, "vision": emb.embeds.float().cpu()}, out.with_suffix(".pt"))
        seq = {"frames": c.frames, "frame_size": c.frame_size, "sequence_tokens": L,
               "video_tokens": int(batch.input_ids[0].eq(adapter.video_token_id).sum()),
               "prompt_tokens": int(sample.prompt.input_ids.shape[0]), "response_tokens": len(response)}
        out.write_text(json.dumps({"sp": sp, "sequence": seq, "ranks": ranks}))
    destroy()


# -- the driver ----------------------------------------------------------------------------------
def launch(sp: int, recipe, spec: Path, result: Path) -> dict:
    """Run the workers of one SP size (under torchrun from SP 2); return what its rank 0 wrote."""
    this = ["-m", "stages.bench_components", str(spec), str(result)]
    # SP 1 is one process without a process group: no launcher needed
    cmd = [sys.executable, *this] if sp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}", *this]
    c = recipe.components
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(c.threads)
    load_before = os.getloadavg()[0]  # includes the previous launch's own processes, decaying
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=c.launch_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session started above
        proc.wait()
        raise RuntimeError(f"SP {sp}: no result within components.launch_timeout_s {c.launch_timeout_s:g}")
    if rc != 0 or not result.exists():
        raise RuntimeError(f"SP {sp}: the launch failed (exit code {rc}); its ranks' errors are above")
    return {**json.loads(result.read_text()), "load_average_1min_before": load_before}


def _uses_cuda(recipe) -> bool:
    return torch.cuda.is_available() and recipe.launch.backend != "gloo"


def summarise(res: dict) -> dict:
    """Per phase: the slowest rank's median time and the largest per-rank peak memory."""
    out = {}
    for phase in PHASES:
        figs = [r["phases"][phase] for r in res["ranks"] if phase in r["phases"]]
        if figs:
            out[phase] = {"time_s": max(f["median_s"] for f in figs), "peak_mib": max(f["peak_mib"] for f in figs)}
    return out


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_line(env: dict, threads: int) -> str:
    """The machine in words: devices, cores, threads per rank, versions."""
    return (f"{devices_line(env['devices'])}, {cores()} cores, {threads} thread(s) per rank, torch {env['versions']['torch']}, "
            f"transformers {env['versions']['transformers']}")


def markdown(data: dict) -> str:
    a, seq = data["args"], data["sequence"]
    a = {**a["components"], "model": a["model"]["path"], "dtype": a["model"]["dtype"]}
    n_cores = cores()
    lines = [f"Machine: {data['machine']}.",
             f"Model {a['model']} ({a['dtype']}); one sequence of {seq['sequence_tokens']} tokens: a video of "
             f"{seq['frames']} frames at {seq['frame_size']}x{seq['frame_size']} ({seq['video_tokens']} video tokens) "
             f"+ question ({seq['prompt_tokens']} prompt tokens in all) + {seq['response_tokens']} response tokens.",
             f"Time: median of {a['repeats']} runs after one warm-up, slowest rank. "
             f"Peak memory: the largest of {a['repeats']} more runs, "
             + ("CUDA allocator peak, weights included." if data["cuda"] else
                "growth of the resident set above the phase's start (weights excluded), sampled every 5 ms, "
                "with glibc set to unmap freed tensors at once and its heap trimmed before each run."),
             "Max abs diff vs SP 1: of the gathered video embedding (vision), of the response's log-probs "
             "(forward).",
             ]
    over = [r["sp"] for r in data["results"] if r["sp"] * a["threads"] > n_cores and not data["cuda"]]
    if over:
        lines.append(f"Oversubscribed: SP {', '.join(map(str, over))} runs more threads than the {n_cores} cores, "
                     "so its ranks take turns on the cores and its times are not what SP would give with a "
                     "core (or GPU) per rank; per-rank memory is unaffected.")
    if not data["cuda"]:
        shares = ", ".join(f"SP {r['sp']} {r['cpu_share']:.2f}" for r in data["results"])
        lines.append("CPU share of a rank in the timed runs (process CPU time / wall time over ranks and phases; "
                     "1 = a core to itself, less = waiting for a core, for other jobs' load or for the other "
                     f"ranks): {shares}.")
    lines += ["", "| SP | phase | time s (max over ranks) | peak memory per rank MiB (max over ranks) "
                  "| tokens per rank | frames per rank | max abs diff vs SP 1 |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        tokens = max(x["tokens_per_rank"] for x in r["ranks"])
        frames = max(x["frames_per_rank"] for x in r["ranks"])
        for phase, s in r["summary"].items():
            diff = {"vision": f"{r['vision_max_abs_diff']:.2g}",
                    "forward": f"{r['logprob_max_abs_diff']:.2g}"}.get(phase, "")
            lines.append(f"| {r['sp']} | {phase} | {s['time_s']:.3f} | {s['peak_mib']:.1f} | {tokens} | {frames} "
                         f"| {diff} |")
    return "\n".join(lines)


def run(recipe, run) -> dict:
    """Every SP size of `components.sp_sizes` (and SP 1, the reference) in its own launch;
    `<out_dir>/<name>.json` and `.md`; an SP size whose outputs differ from SP 1's by more
    than `components.tolerance` is an error."""
    from stages.env import environment
    from stages.models.adapter import resolve_model_path

    c = recipe.components
    sizes = sorted(set([1] + c.sp_sizes))
    resolve_model_path(recipe.model.path)  # build a tiny model once, before any launch
    results = []
    with tempfile.TemporaryDirectory(prefix="lvr-bench-components-") as tmp:
        spec = Path(tmp) / "recipe.json"
        spec.write_text(json.dumps(recipe.model_dump(mode="json")))
        ref = None
        with run.progress("bench-components", len(sizes)) as bar:
            for sp in sizes:
                path = Path(tmp) / f"sp{sp}.json"
                res = launch(sp, recipe, spec, path)
                tensors = torch.load(path.with_suffix(".pt"), weights_only=True)
                if ref is None:  # SP 1, the first size: the reference
                    ref = tensors
                res["logprob_max_abs_diff"] = (tensors["logprobs"] - ref["logprobs"]).abs().max().item()
                res["vision_max_abs_diff"] = (tensors["vision"] - ref["vision"]).abs().max().item()
                res["logprob_mean"] = tensors["logprobs"].mean().item()
                res["summary"] = summarise(res)
                figs = [f for r in res["ranks"] for f in r["phases"].values()]
                res["cpu_share"] = sum(sum(f["cpu_seconds"]) for f in figs) / sum(sum(f["seconds"]) for f in figs)
                results.append(res)
                bar.advance()
    env = environment(max(sizes))
    data = {"name": c.name, "machine": machine_line(env, c.threads), "cuda": _uses_cuda(recipe),
            "args": recipe.model_dump(mode="json"), "sequence": results[0]["sequence"],
            "results": [{k: v for k, v in r.items() if k != "sequence"} for r in results], "env": env}
    out = Path(c.out_dir) / c.name
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(data)
    Path(f"{out}.json").write_text(json.dumps(data, indent=2) + "\n")
    Path(f"{out}.md").write_text(table + "\n")
    failed = 0
    if recipe.model.dtype in ("float32", "auto") and not _uses_cuda(recipe):  # bf16 rounding differs per shard
        for r in results:
            for what in ("vision", "logprob"):
                if r[f"{what}_max_abs_diff"] > c.tolerance:
                    failed += 1
                    run.error(f"sp{r['sp']}/{what}", f"differs from SP 1 by {r[f'{what}_max_abs_diff']:.3g} "
                                                      f"> components.tolerance {c.tolerance:g}")
    return {"sp_sizes": sizes, "json": f"{out}.json", "table": f"{out}.md", "failed": failed,
            **{f"sp{r['sp']}_{p}_s": round(v["time_s"], 4) for r in results for p, v in r["summary"].items()}}


if __name__ == "__main__":  # one rank of a launch: python -m stages.bench_components RECIPE.json RESULT
    worker(namespace(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]))
