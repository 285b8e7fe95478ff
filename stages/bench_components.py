"""Per-rank time and peak memory of MR-SP's two parallel components at SP 1, 2, 4, ...

    python -m stages.bench_components [--model tiny:qwen2.5-vl-bench] [--frames 512]
        [--sp 1 2 4] [--repeats 3] [--backward] [--checkpointing] [--out benchmarks/components]

Where `lvr bench-mrsp` times whole GRPO steps, this script isolates the two pieces that
sequence parallelism splits across ranks, on one long sequence (a video of `--frames`
random frames + a short multiple-choice question + a response of `--response-tokens`):

- `vision`: the sharded vision encode (`stages.mrsp.vision.encode_sharded`): each rank
  encodes its temporal-patch slice of the frames, a variable-size all-gather rebuilds the
  whole embedding on every rank;
- `forward`: the Ulysses SP forward of the whole sequence computing the response's per-token
  log-probs (`stages.mrsp.logprobs.token_logprobs`), without gradients;
- `forward+backward` (with `--backward`): the same forward with gradients for the language
  model, the backward, and the sum of parameter gradients over the SP group (the vision
  tower is frozen, as in the default RL recipe).
- `forward+backward checkpointed` (with `--checkpointing`): the same with gradient
  checkpointing of every decoder layer (`train.gradient_checkpointing`): each layer's
  activations are recomputed in the backward, under the same Ulysses attention.

Every SP size from 2 runs in its own launch of `torch.distributed.run --standalone` (a free
port chosen at run time; gloo on CPU, NCCL with one GPU per rank when CUDA is there; SP 1
is one plain process), every collective under `--timeout-s`. On each rank a phase runs
once to warm up, then `--repeats` times after a barrier: its time is the median wall clock
(device synchronised). Then each phase runs `--repeats` more times for its peak memory (the
largest of the runs), `stages.bench_mrsp.PeakMemory` reset before each: CUDA's allocator
peak (weights included) on GPU; on CPU the growth of the resident set above the phase's
start, sampled every 5 ms, with glibc switched (after the timed runs: it slows allocation)
to a fixed mmap threshold and its free heap trimmed before each run, so that freed tensors
leave the resident set and a run's growth is its own live memory rather than hidden by, or
added to, what earlier runs left in the heap. Each rank's CPU time is recorded beside its
wall time: on a machine shared with other jobs, a share well below 1 says the times are
upper bounds.

Self-check: SP 1 is always run and is the reference. The log-probs of every SP size must
equal SP 1's within `--tolerance` (1e-5, float32), and the gathered vision embedding is
compared too; the differences are stored, and the script exits 1 when one is over.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from stages.bench_mrsp import libc, trim_heap

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTED = "forward+backward checkpointed"
PHASES = ("vision", "forward", "forward+backward", CHECKPOINTED)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.bench_components", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:qwen2.5-vl-bench", help="model.path: hub id, folder or tiny:<family>")
    p.add_argument("--frames", type=int, default=512, help="frames of the video (even: whole temporal patches)")
    p.add_argument("--frame-size", type=int, default=56, help="frame side in pixels (a multiple of the patch factor)")
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4], help="SP sizes (SP 1 is always run: the reference)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per phase after one warm-up")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--checkpointing", action="store_true",
                   help="also time forward+backward with gradient checkpointing (implies --backward)")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="mrsp.logprob_chunk_tokens")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="max |log-prob(SP s) - log-prob(SP 1)| (checked in float32 only)")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="timeout of every collective")
    p.add_argument("--launch-timeout-s", type=float, default=3600.0, help="timeout of one SP size's launch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/components", help="writes OUT.json and OUT.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # rank 0 of a launch writes here
    args = p.parse_args(argv)
    if args.frames < 2 or args.frames % 2:
        p.error("--frames: give an even number >= 2 (a temporal patch is two frames)")
    if min(args.sp) < 1 or args.repeats < 1:
        p.error("--sp and --repeats must be >= 1")
    args.backward = args.backward or args.checkpointing
    return args


# -- one rank ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_mib(memory, device: torch.device) -> float:
    """Memory in use now: CUDA's allocated bytes, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return memory._rss() / 2 ** 20


def exact_rss_mode() -> None:
    """Make the resident set follow live memory (glibc, CPU): allocations of 128 KiB and more
    get their own mapping, returned to the system when freed (a fixed `M_MMAP_THRESHOLD`,
    instead of the dynamic one that keeps freed tensors in the heap). Slows allocation, so
    it is switched on after the timed runs. Without glibc, RSS growth under-counts reuse."""
    lib = libc()
    if lib is not None:
        lib.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def time_phase(fn, grid, repeats: int) -> tuple[object, dict]:
    """Run `fn` once to warm up, then `repeats` times after a barrier; return its last output
    and the wall-clock and process CPU seconds of each run."""
    fn()
    seconds, cpu_seconds, out = [], [], None
    for _ in range(repeats):
        out = None  # the previous output must not stay alive during this run
        if grid.distributed:
            dist.barrier()
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
        if grid.distributed:
            dist.barrier()
        _sync(grid.device)
        trim_heap(grid.device)
        memory.reset()
        starts.append(_allocated_mib(memory, grid.device))
        fn()
        _sync(grid.device)
        peaks.append(memory.gb() * 1024)
    return {"peak_mib": max(peaks), "peak_mib_runs": peaks, "start_mib": min(starts)}


def worker(args: argparse.Namespace) -> None:
    """One rank of one SP size: build the sequence, time the phases and take their peak
    memory; rank 0 gathers every rank's figures and writes them to `args.worker`."""
    from transformers.utils import logging as hf_logging

    from stages.bench_mrsp import PeakMemory, synthetic_sample
    from stages.models.adapter import load_adapter
    from stages.mrsp.dist import all_reduce_grads, destroy, init_grid
    from stages.mrsp.logprobs import TokenBatch, token_logprobs
    from stages.mrsp.positions import padded_length, shard_range
    from stages.mrsp.runtime import Mode, Runtime
    from stages.mrsp.trainer import disable_checkpointing, enable_checkpointing
    from stages.mrsp.vision import encode_sharded, temporal_slices

    hf_logging.disable_progress_bar()
    sp = int(os.environ.get("WORLD_SIZE", "1"))
    grid = init_grid(sp, args.backend, args.timeout_s)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    adapter = load_adapter(args.model, DTYPES[args.dtype], grid.device)
    adapter.model.requires_grad_(False)
    params = list(adapter.model.model.language_model.parameters()) + list(adapter.lm_head.parameters())
    rt = Runtime(adapter, grid, Mode.named("mrsp"), chunk_tokens=args.chunk_tokens)
    sample = synthetic_sample(rt, args.frames, args.frame_size, args.seed)
    pixels, grid_thw = sample.video.pixels.to(grid.device), sample.video.grid_thw.to(grid.device)
    g = torch.Generator().manual_seed(77 + args.seed)
    response = torch.randint(10, 900, (args.response_tokens,), generator=g).tolist()

    def vision():
        with torch.no_grad():
            return encode_sharded(adapter, pixels, grid_thw, grid)

    def forward():
        with torch.no_grad():
            return token_logprobs(adapter, batch, grid, args.chunk_tokens)[0]

    def forward_backward():
        logp = token_logprobs(adapter, batch, grid, args.chunk_tokens)[0]
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
    if args.backward:
        phases["forward+backward"] = forward_backward
    if args.checkpointing:
        phases[CHECKPOINTED] = checkpointed
    figures = {}
    emb, figures["vision"] = time_phase(vision, grid, args.repeats)
    b = TokenBatch.from_rows([(i, p, [emb], m) for i, p, m in rt.rows(sample, [response])], rt.pad_id)
    batch = TokenBatch(b.input_ids.to(grid.device), b.position_ids.to(grid.device), b.videos,
                       b.score_mask.to(grid.device))
    logp, figures["forward"] = time_phase(forward, grid, args.repeats)
    if args.backward:
        for p in params:
            p.requires_grad_(True)
        _, figures["forward+backward"] = time_phase(forward_backward, grid, args.repeats)
    if args.checkpointing:
        _, figures[CHECKPOINTED] = time_phase(checkpointed, grid, args.repeats)

    if grid.device.type == "cpu":
        exact_rss_mode()
    memory = PeakMemory(grid.device)
    for name, fn in phases.items():
        figures[name].update(peak_of_phase(fn, grid, memory, args.repeats))
    memory.close()

    L = batch.input_ids.shape[1]
    start, stop = shard_range(padded_length(L, sp), sp, grid.sp_rank)
    t0, t1 = temporal_slices(int(grid_thw[0, 0]), sp)[grid.sp_rank]
    h, w = int(grid_thw[0, 1]), int(grid_thw[0, 2])
    mine = {"rank": grid.rank, "sp_rank": grid.sp_rank, "device": str(grid.device), "phases": figures,
            "tokens_per_rank": stop - start, "frames_per_rank": (t1 - t0) * adapter.patch_spec.temporal_patch_size,
            "video_tokens_per_rank": (t1 - t0) * h * w // adapter.merge_size ** 2}
    ranks = [None] * sp if grid.is_main else None
    if grid.distributed:
        dist.gather_object(mine, ranks, dst=0)
    else:
        ranks = [mine]
    if grid.is_main:
        out = Path(args.worker)
        scored = logp[0][batch.score_mask[0]].float().cpu()
        torch.save({"logprobs": scored, "vision": emb.embeds.float().cpu()}, out.with_suffix(".pt"))
        seq = {"frames": args.frames, "frame_size": args.frame_size, "sequence_tokens": L,
               "video_tokens": int(batch.input_ids[0].eq(adapter.video_token_id).sum()),
               "prompt_tokens": int(sample.prompt.input_ids.shape[0]), "response_tokens": len(response)}
        out.write_text(json.dumps({"sp": sp, "sequence": seq, "ranks": ranks}))
    destroy()


# -- the driver ----------------------------------------------------------------------------------
def launch(sp: int, args: argparse.Namespace, result: Path, argv: list[str]) -> dict:
    """Run the workers of one SP size (under torchrun from SP 2); return what its rank 0 wrote."""
    this = ["-m", "stages.bench_components", *argv, "--worker", str(result)]
    # SP 1 is one process without a process group: no launcher needed
    cmd = [sys.executable, *this] if sp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}", *this]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()[0]  # includes the previous launch's own processes, decaying
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.launch_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session started above
        proc.wait()
        raise RuntimeError(f"SP {sp}: no result within --launch-timeout-s {args.launch_timeout_s:g}")
    if rc != 0 or not result.exists():
        raise RuntimeError(f"SP {sp}: the launch failed (exit code {rc}); its ranks' errors are above")
    return {**json.loads(result.read_text()), "load_average_1min_before": load_before}


def _uses_cuda(args: argparse.Namespace) -> bool:
    return torch.cuda.is_available() and args.backend != "gloo"


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
    cuda = env["devices"].get("cuda") or []
    where = f"{len(cuda)}x {cuda[0]}" if cuda else "CPU"
    return (f"{where}, {cores()} cores, {threads} thread(s) per rank, torch {env['versions']['torch']}, "
            f"transformers {env['versions']['transformers']}")


def markdown(data: dict) -> str:
    a, seq = data["args"], data["sequence"]
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from stages.env import environment
    from stages.models.adapter import resolve_model_path

    sizes = sorted(set([1] + args.sp))
    if _uses_cuda(args) and max(sizes) > torch.cuda.device_count():
        print(f"--sp {max(sizes)} needs one GPU per rank, found {torch.cuda.device_count()} "
              "(use --backend gloo to run on CPU)", file=sys.stderr)
        return 2
    resolve_model_path(args.model)  # build a tiny model once, before any launch
    results = []
    with tempfile.TemporaryDirectory(prefix="lvr-bench-components-") as tmp:
        ref = None
        for sp in sizes:
            path = Path(tmp) / f"sp{sp}.json"
            try:
                res = launch(sp, args, path, argv)
            except RuntimeError as e:
                print(f"bench_components: {e}", file=sys.stderr)
                return 1
            tensors = torch.load(path.with_suffix(".pt"))
            if ref is None:  # SP 1, the first size: the reference
                ref = tensors
            res["logprob_max_abs_diff"] = (tensors["logprobs"] - ref["logprobs"]).abs().max().item()
            res["vision_max_abs_diff"] = (tensors["vision"] - ref["vision"]).abs().max().item()
            res["logprob_mean"] = tensors["logprobs"].mean().item()
            res["summary"] = summarise(res)
            figs = [f for r in res["ranks"] for f in r["phases"].values()]
            res["cpu_share"] = sum(sum(f["cpu_seconds"]) for f in figs) / sum(sum(f["seconds"]) for f in figs)
            results.append(res)
    env = environment(max(sizes))
    data = {"name": Path(args.out).name, "machine": machine_line(env, args.threads), "cuda": _uses_cuda(args),
            "args": {k: v for k, v in vars(args).items() if k != "worker"}, "sequence": results[0]["sequence"],
            "results": [{k: v for k, v in r.items() if k != "sequence"} for r in results], "env": env}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table = markdown(data)
    Path(f"{args.out}.json").write_text(json.dumps(data, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(table + "\n")
    print(table)
    if args.dtype != "float32":  # bfloat16 rounding differs with the shard shapes: no exact check
        return 0
    bad = [(r["sp"], what, r[f"{what}_max_abs_diff"]) for r in results for what in ("vision", "logprob")
           if r[f"{what}_max_abs_diff"] > args.tolerance]
    for sp, what, diff in bad:
        print(f"SP {sp}: the {what} output differs from SP 1 by {diff:.3g} > --tolerance {args.tolerance:g}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
