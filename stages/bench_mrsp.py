"""`lvr bench-mrsp`: seconds per GRPO step and peak memory, MR-SP against the vanilla way.

For each frame count, each response length (`bench.response_tokens`, one or a list) and
each mode, K real RL steps run on the same model and videos: G rollouts per question,
old-policy, reference and update forwards (with backward and an AdamW step). Modes (see
`stages/mrsp/runtime.py`):

- `vanilla`: the paper's baseline: every rollout encodes the video and prefills alone,
  every sequence of every training forward re-encodes it, no sequence parallelism;
- `peer`: what verl/EasyR1 do: one encode + prefill per prompt for the rollouts (the
  prompts dealt out to the ranks of an SP group, each rank encoding its own prompts' videos,
  as a rollout engine does), but each training forward re-encodes the video for every one
  of the G sequences; SP forwards on;
- `mrsp-1`: the MR-SP runtime at SP 1 (embedding encoded once per step and reused);
- `mrsp`: the MR-SP runtime at SP = `mrsp.sp_size` (sharded encode + SP forwards; the
  rollouts dealt out to the group's ranks from the cached embeddings);
- `mrsp-shared`: `mrsp` whose reference and update forwards run each question's prompt once
  for its G responses (`stages/mrsp/shared.py`, Prefix Grouper), and whose old log-probs are
  the update forward's, detached (an on-policy step: `lvr rl`'s default with one PPO epoch
  and one mini-batch, `algo.reuse_old_logprobs`), so it runs no old-policy forward;
- `mrsp-shared-2pass`: `mrsp-shared` with the separate old-policy forward
  (`algo.reuse_old_logprobs = false`, or any off-policy setting). Every other mode runs the
  separate old forward too, as verl does.

A step processes `launch.nproc_per_node` questions in every mode (one per data-parallel
rank, or several in turn per SP group), so every mode does the same useful work.

What is not real: videos are random frames and rewards are seeded random numbers (a tiny
random model earns none): the benchmark measures cost, not learning. What is checked: at
the first step every mode computes, for the question every mode gives this process (question
r on rank r), the GRPO loss and the mean old-policy token log-prob of the same reference rollouts
from the same weights; both must agree across modes within 1e-4 (else the run fails). The
log-prob is the sensitive one: at the first step the ratio is 1 and the policy term of the
loss is minus the mean advantage, near 0 whatever the forward computed.

Peak memory: CUDA's allocator peak on GPU (weights included); on CPU the resident-set
high-water mark above the step's start (the step's decoded videos included, the weights
not), sampled every 5 ms, of a cell's first step, which starts on a trimmed heap (glibc's
free pages given back) so that its growth counts every page it touches. The cell's later
steps run on the heap as the earlier ones left it, as a training loop does, unsampled:
trimming before every step would make each step fault its memory in again (about 5% of
an mrsp-shared step at 512 frames on CPU; `bench.trim_every_step = true` does it, as
revisions before it did, for comparisons with them). With `bench.memory_cap_gb` a step stops once the peak of any rank
passes the cap (checked on every rank after each question of each phase, and between a
question's update forward and its backward, the ranks agreeing on the largest peak, so all
stop together), the cell is reported as OOM and the sweep goes on; then, per mode,
`stages/bench_search.py` looks for the largest frame count under the cap with one step per
probe. On CPU a capped run fixes glibc's mmap threshold first (as
`bench-components` does), so the resident set follows live memory; allocation is slower.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from stages.algo.grpo import group_advantages, grpo_loss, pad_rows
from stages.bench_report import PHASES, report, with_mfu
from stages.bench_search import largest_fitting
from stages.flops import ModelShape, bench_step_flops, gemm_peak
from stages.models.adapter import VLAdapter
from stages.models.patchify import patchify
from stages.mrsp.dist import Grid, all_reduce_sum, average_gradients, init_grid
from stages.mrsp.rollout import Sampling
from stages.mrsp.runtime import Mode, Runtime, Sample, VideoInput
from stages.setup import load_policy, load_reference, make_runtime, open_grid

# bench mode -> (runtime mode, SP over the grid, old log-probs taken from the update forward)
MODES = {"vanilla": ("vanilla", False, False), "peer": ("peer", True, False), "mrsp-1": ("mrsp", False, False),
         "mrsp": ("mrsp", True, False), "mrsp-shared": ("mrsp-shared", True, True),
         "mrsp-shared-2pass": ("mrsp-shared", True, False)}


class MemoryCapExceeded(RuntimeError):
    def __init__(self, peak_gb: float, cap_gb: float):
        super().__init__(f"peak {peak_gb:.2f} GiB on a rank > cap {cap_gb:g} GiB")
        self.peak_gb = peak_gb


class MemoryCap:
    """Stops a step once the peak memory of any rank passes `gb` (None: never).

    Every rank checks at the same points of a step (after each question of each phase, and
    between a question's update forward and backward) and takes the largest peak over the
    ranks, so all ranks stop together and none is left waiting in a collective of the step.
    A step passes the cap by at most what one piece between two checks adds."""

    def __init__(self, memory: PeakMemory, gb: float | None, grid: Grid):
        self.memory, self.gb, self.grid = memory, gb, grid

    def check(self) -> None:
        if self.gb is None:
            return
        peak = all_reduce_sum([self.memory.gb()], self.grid, op="max")[0]
        if peak > self.gb:
            raise MemoryCapExceeded(peak, self.gb)


class Phase:
    """Time one phase of a step; vision-tower time inside it is moved to the `vision` phase."""

    def __init__(self, timers: dict, name: str, rt: Runtime):
        self.timers, self.name, self.rt = timers, name, rt

    def __enter__(self) -> "Phase":
        self.t, self.enc = time.perf_counter(), self.rt.cache.encode_seconds
        return self

    def __exit__(self, *exc):
        enc = self.rt.cache.encode_seconds - self.enc
        self.timers[self.name] += time.perf_counter() - self.t - enc
        self.timers["vision"] += enc


def libc():
    """glibc's allocator controls (`mallopt`, `malloc_trim`), or None elsewhere."""
    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def trim_heap(device: torch.device) -> None:
    """Give the heap's free pages back to the system (glibc, CPU), so that the next RSS
    growth counts every page a run touches, not only those earlier runs left unmapped."""
    lib = libc() if device.type == "cpu" else None
    if lib is not None:
        lib.malloc_trim(0)


def exact_rss_mode() -> None:
    """Make the resident set follow live memory (glibc, CPU): allocations of 128 KiB and more
    get their own mapping, returned to the system when freed (a fixed `M_MMAP_THRESHOLD`,
    instead of the dynamic one that keeps freed tensors in the heap). Slows allocation.
    Without glibc, RSS growth under-counts reuse."""
    lib = libc()
    if lib is not None:
        lib.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


class PeakMemory:
    """Peak memory in GiB since `reset()`: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._base = self._peak = 0
        self._stop, self._on = threading.Event(), threading.Event()
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            if self._on.is_set():
                self._peak = max(self._peak, self._rss())

    def reset(self, measure: bool = True) -> None:
        """Start measuring a step: on CPU, trim the heap and sample from here. `measure=False`:
        leave the heap as it is and stop sampling (a step whose memory is not reported)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = 0
            return
        if not measure:
            self._on.clear()
            return
        trim_heap(torch.device("cpu"))
        self._base = self._peak = self._rss()
        self._on.set()

    def gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 30
        return max(0, max(self._peak, self._rss()) - self._base) / 2 ** 30

    def close(self) -> None:
        self._stop.set()


def synthetic_sample(rt: Runtime, frames: int, size: int, index: int) -> Sample:
    """A question on a video of random frames (distinct per `index`)."""
    g = torch.Generator().manual_seed(1000 + index)
    pixels_u8 = torch.randint(0, 256, (frames, 3, size, size), dtype=torch.uint8, generator=g)
    pixels, grid_thw = patchify(pixels_u8, rt.adapter.patch_spec)
    times = [i * 0.5 for i in range(frames)]
    video = VideoInput(f"bench-{index}-{frames}-{size}", pixels, grid_thw, times, rt.adapter.second_per_grid(2.0))
    record = {"problem_id": f"q{index}", "problem": "What happens in the video?\nA. a\nB. b\nC. c\nD. d"}
    return rt.sample_of(record, video, record["problem_id"])


def step_loss(rt: Runtime, ref: VLAdapter, samples, responses, rewards, G, algo, timers, cap: MemoryCap,
              optimizer=None, reuse_old: bool = False) -> list[tuple[float, float]]:
    """Old + reference + update forwards of one step (no old forward with `reuse_old`: the
    update forward's log-probs, detached, are the old ones); return per question its update
    loss and its mean old-policy token log-prob."""
    old, refs = [], []
    passes = (("ref", refs, ref),) if reuse_old else (("old", old, None), ("ref", refs, ref))
    with torch.no_grad():
        for phase, out, model in passes:
            with Phase(timers, phase, rt):
                for s, resp in zip(samples, responses):
                    out.append(rt.logprobs(s, resp, model=model)[0])
                    cap.check()
    adv = group_advantages(rewards, G, scale_by_std=algo.scale_by_std)
    out = []
    with Phase(timers, "update", rt):
        for q, (s, resp) in enumerate(zip(samples, responses)):
            lps = rt.logprobs(s, resp)[0]
            cap.check()  # the forward's activations are held: check before the backward adds to them
            if reuse_old:
                old.append([x.detach() for x in lps])
            lp, mask = pad_rows(lps)
            loss, _ = grpo_loss(lp, pad_rows(old[q])[0], pad_rows(refs[q])[0], adv[q * G:(q + 1) * G], mask,
                                algo.clip_low, algo.clip_high, algo.dual_clip, algo.loss_agg, algo.kl_coef,
                                algo.kl_kind, algo.kl_clamp, horizon=len(resp[0]) if resp else None)
            (loss * rt.sp_grid.sp_size).backward()
            out.append((float(loss.detach()), float(torch.cat(old[q]).mean())))
            cap.check()
        if optimizer is not None:
            average_gradients([p for p in rt.adapter.model.parameters() if p.requires_grad], rt.grid)
            optimizer.step()
        rt.adapter.model.zero_grad(set_to_none=True)
    cap.check()
    return out


@dataclass
class Bench:
    """What every measurement of a run shares: the recipe, the models, the initial weights
    each mode starts from, the grids (`one`: SP 1 over the world; `sp`: `mrsp.sp_size`) and
    the memory sampler."""

    recipe: object
    adapter: VLAdapter
    ref: VLAdapter
    initial: dict
    grids: dict[str, Grid]
    memory: PeakMemory

    @property
    def grid(self) -> Grid:
        return self.grids["sp"]


def reference_responses(qids: list[int], G: int, tokens: int) -> list[list[list[int]]]:
    """Fixed rollouts (seeded random tokens) per question, for the cross-mode loss check."""
    out = []
    for q in qids:
        g = torch.Generator().manual_seed(77 + q)
        out.append([torch.randint(10, 900, (tokens,), generator=g).tolist() for _ in range(G)])
    return out


def bench_mode(bench: Bench, name: str, frames: int, tokens: int, warmup_steps: int, steps: int,
               parity: bool = True, min_seconds: float = 0.0, max_steps: int = 0) -> dict:
    """One cell: `name` at `frames` frames and `tokens` response tokens, `warmup_steps` + `steps`
    steps, more timed ones (up to `max_steps`) until they add up to `min_seconds`, the median
    of the timed ones reported; with `parity`, first the loss check on the reference rollouts.
    A step whose peak passes `bench.memory_cap_gb` stops there: an OOM result."""
    recipe, adapter = bench.recipe, bench.adapter
    b, algo = recipe.bench, recipe.algo
    mode_name, use_sp, reuse_old = MODES[name]
    grid = bench.grids["sp"] if use_sp else bench.grids["one"]
    rt = make_runtime(recipe, adapter, grid, Mode.named(mode_name))
    adapter.model.load_state_dict(bench.initial)
    # what a step stopped at the cap left (gradients, unreachable cycles) goes before this one is measured
    adapter.model.zero_grad(set_to_none=True)
    gc.collect()
    opt = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-5)
    memory, G = bench.memory, recipe.rollout.n
    cap, no_cap = MemoryCap(memory, b.memory_cap_gb, grid), MemoryCap(memory, None, grid)
    # Every SP group handles world / dp questions in turn so all modes do the same work.
    per_group = grid.world_size // grid.dp_size if grid.world_size > 1 else 1
    qids = [grid.dp_rank * per_group + k for k in range(per_group)]
    times, first, counters, peak = [], (None, None), {}, 0.0
    cell = {"mode": name, "frames": frames, "response_tokens": tokens}
    try:
        for step in itertools.count():
            if not more_steps(step, warmup_steps, steps, [t for t, _ in times], min_seconds, max_steps, grid):
                break
            timers = dict.fromkeys(PHASES, 0.0)
            rewards = torch.cat([torch.rand(G, generator=torch.Generator().manual_seed(step * 100_003 + q))
                                 for q in qids])  # a question's rewards do not depend on the mode
            if step == 0 and parity:  # same rollouts, same weights -> same numbers in every mode
                rt.new_step()
                first = step_loss(rt, bench.ref, [synthetic_sample(rt, frames, b.frame_size, q) for q in qids],
                                  reference_responses(qids, G, tokens), rewards, G, algo,
                                  dict.fromkeys(PHASES, 0.0), no_cap, reuse_old=reuse_old)[qids.index(grid.rank)]
            rt.new_step()  # every timed step starts cold: no embedding cached, counters at zero
            rt.reset_counters()
            # a step's memory includes its decoded videos: they are built after the reset
            measured = step == 0 or b.memory_cap_gb is not None or b.trim_every_step
            memory.reset(measure=measured)
            samples = [synthetic_sample(rt, frames, b.frame_size, q) for q in qids]
            t0 = time.perf_counter()
            with Phase(timers, "rollout", rt):
                for s in samples:  # MR-SP: encoded once (sharded over the SP group), reused below
                    rt.embed_for_step(s)
                    cap.check()
            sampling = Sampling(recipe.rollout.temperature, recipe.rollout.top_p, tokens,
                                seed=recipe.seed + step, stop_token_ids=[-1])  # fixed length: never stop
            with Phase(timers, "rollout", rt):
                groups = rt.generate(samples, G, sampling)
            cap.check()
            responses = [[r.token_ids for r in g] for g in groups]
            step_loss(rt, bench.ref, samples, responses, rewards, G, algo, timers, cap, opt, reuse_old=reuse_old)
            elapsed = time.perf_counter() - t0
            if step >= warmup_steps:
                times.append((elapsed, timers))
            counters = rt.counters()
            if grid.sp_group is not None:  # encodes on one rank alone (peer rollouts) add up over the group
                alone = all_reduce_sum([counters["vision_encodes_alone"]], grid, group=grid.sp_group)[0]
                counters["vision_encodes"] += int(alone) - counters["vision_encodes_alone"]
            if measured:
                peak = max(peak, memory.gb())
    except (MemoryCapExceeded, torch.OutOfMemoryError, MemoryError) as e:
        return {**cell, "oom": True, "reason": str(e).splitlines()[0][:200],
                "peak_memory_gb": e.peak_gb if isinstance(e, MemoryCapExceeded) else None}
    med = statistics.median(t for t, _ in times)
    breakdown = {p: statistics.median(tm[p] for _, tm in times) for p in PHASES}
    flops = bench_step_flops(ModelShape.of(adapter), prompt=int(samples[0].prompt.input_ids.shape[0]),
                             response=tokens, G=G, questions=len(qids) * grid.dp_size,
                             grid_thw=samples[0].video.grid_thw,
                             encodes_per_video=counters["vision_encodes"] / len(qids),
                             prefills_per_question=1 if rt.mode.group_rollouts else G,
                             shared_prompt=rt.mode.shared_prompt, old_pass=not reuse_old)
    flops["step"] = sum(flops.values())
    return {**cell, "flops": flops, "oom": False, "seconds_per_step": med, "timed_steps": len(times),
            "breakdown": breakdown,
            "peak_memory_gb": peak, "vision_encodes_per_video": counters["vision_encodes"] / len(qids),
            "video_tokens": int(samples[0].prompt.input_ids.eq(adapter.video_token_id).sum()),
            "prompt_tokens": int(samples[0].prompt.input_ids.shape[0]), "first_step_loss": first[0],
            "first_step_logp": first[1],
            "questions_per_rank": len(qids), "train_forward_tokens": counters["train_forward_tokens"],
            "train_forward_tokens_unshared": counters["train_forward_tokens_unshared"]}


def more_steps(step: int, warmup: int, steps: int, timed: list[float], min_seconds: float, max_steps: int,
               grid: Grid) -> bool:
    """Whether a cell takes step `step`: the warmup and `steps` timed ones, then more until the
    timed ones add up to `min_seconds` (rank 0's clock decides for all: the ranks step
    together), at most `max_steps` timed."""
    if step < warmup + steps:
        return True
    if step >= warmup + max_steps or min_seconds <= 0:
        return False
    total = sum(timed) if grid.rank == 0 else 0.0
    if grid.world_size > 1:
        total = all_reduce_sum([total], grid)[0]
    return total < min_seconds


def run(recipe, run) -> dict:
    b = recipe.bench
    grids = {"one": init_grid(1, recipe.launch.backend, recipe.launch.timeout_s), "sp": open_grid(recipe)}
    grid: Grid = grids["sp"]
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if b.memory_cap_gb is not None and grid.device.type == "cpu":
        exact_rss_mode()  # what fits is live memory, not what glibc's heap keeps after earlier steps
    adapter = load_policy(recipe, grid)
    adapter.model.model.visual.requires_grad_(False)
    ref = load_reference(recipe, grid, adapter)
    initial = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    peak = gemm_peak(grid, next(adapter.model.parameters()).dtype)  # the limit MFU is measured against
    bench = Bench(recipe, adapter, ref, initial, grids, PeakMemory(grid.device))
    results = []
    with run.progress("bench-mrsp", len(b.frames) * len(b.response_tokens) * len(b.modes)) as bar:
        for frames in b.frames:
            for tokens in b.response_tokens:
                row = []
                for name in b.modes:
                    res = gather_peak(bench_mode(bench, name, frames, tokens, b.warmup_steps, b.steps,
                                                 min_seconds=b.min_seconds, max_steps=b.max_steps), grid)
                    row.append(res)
                    results.append(res)
                    run.metric(len(results), **{k: v for k, v in res.items() if k != "breakdown"})
                    bar.advance()
                check_parity(row, frames, tokens)
    searches = search_caps(bench, results, run) if b.memory_cap_gb is not None else []
    bench.memory.close()
    return report(recipe, run, grid, [with_mfu(r, peak) for r in results], peak, searches)


def check_parity(row: list[dict], frames: int, tokens: int) -> None:
    """Every mode that ran gave the same first-step loss and log-prob (else RuntimeError)."""
    ok = [r for r in row if not r["oom"]]
    for key in ("first_step_loss", "first_step_logp"):
        values = [r[key] for r in ok] or [0.0]
        worst = max(abs(v - values[0]) for v in values)
        if worst > 1e-4 * max(1.0, abs(values[0])):
            raise RuntimeError(f"bench: modes disagree on the {key.replace('_', ' ')} at {frames} frames, "
                               f"{tokens} response tokens (max difference {worst:.3g})")


def search_caps(bench: Bench, results: list[dict], run) -> list[dict]:
    """Per mode and response length, the largest frame count under `bench.memory_cap_gb`
    (`stages/bench_search.py`), from the sweep's cells and probes of one step each."""
    b = bench.recipe.bench

    def fits(res: dict) -> tuple[bool, float | None]:
        return not res["oom"] and res["peak_memory_gb"] <= b.memory_cap_gb, res["peak_memory_gb"]

    out, step = [], len(results)
    with run.progress("bench-mrsp: the largest video under the memory cap", None) as bar:
        for tokens in b.response_tokens:
            for name in b.modes:
                seconds = {}

                def probe(frames: int, name=name, tokens=tokens, seconds=seconds) -> tuple[bool, float | None]:
                    nonlocal step
                    res = gather_peak(bench_mode(bench, name, frames, tokens, 0, 1, parity=False), bench.grid)
                    seconds[frames] = res.get("seconds_per_step")
                    step += 1
                    run.metric(step, probe=True, mode=name, frames=frames, response_tokens=tokens, oom=res["oom"],
                               peak_memory_gb=res["peak_memory_gb"], seconds_per_step=seconds[frames])
                    bar.advance()
                    return fits(res)

                listed = {r["frames"]: fits(r) for r in results if r["mode"] == name and r["response_tokens"] == tokens}
                found = largest_fitting(probe, listed, resolution=b.search_resolution_frames, max_frames=b.max_frames)
                for p in found["probes"]:
                    p["seconds_per_step"] = seconds[p["frames"]]
                out.append({"mode": name, "response_tokens": tokens, **found})
    return out


def gather_peak(res: dict, grid: Grid) -> dict:
    """Peak memory of the worst rank (and the median step time of rank 0)."""
    if grid.world_size == 1 or res["oom"]:
        return res
    return {**res, "peak_memory_gb": all_reduce_sum([res["peak_memory_gb"]], grid, op="max")[0]}
