"""`lvr bench-mrsp`: seconds per GRPO step and peak memory, MR-SP against the vanilla way.

For each frame count and each mode, K real RL steps run on the same model and videos:
G rollouts per question, old-policy, reference and update forwards (with backward and an
AdamW step). Modes (see `stages/mrsp/runtime.py`):

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

Peak memory: CUDA's allocator peak on GPU; on CPU the resident-set high-water mark above
the step's start, sampled every 5 ms. With `bench.memory_cap_gb` a mode whose peak passes
the cap is reported as OOM at the end of the phase that passed it and the sweep goes on.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time

import torch

from stages.algo.grpo import group_advantages, grpo_loss, pad_rows
from stages.bench_report import PHASES, report, with_mfu
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
    pass


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


class PeakMemory:
    """Peak memory in GiB since `reset()`: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._base = self._peak = 0
        self._stop = threading.Event()
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss())

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = 0
        else:
            trim_heap(torch.device("cpu"))
            self._base = self._peak = self._rss()

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


def step_loss(rt: Runtime, ref: VLAdapter, samples, responses, rewards, G, algo, timers, memory, cap,
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
            check_cap(memory, cap)
    adv = group_advantages(rewards, G, scale_by_std=algo.scale_by_std)
    out = []
    with Phase(timers, "update", rt):
        for q, (s, resp) in enumerate(zip(samples, responses)):
            lps = rt.logprobs(s, resp)[0]
            if reuse_old:
                old.append([x.detach() for x in lps])
            lp, mask = pad_rows(lps)
            loss, _ = grpo_loss(lp, pad_rows(old[q])[0], pad_rows(refs[q])[0], adv[q * G:(q + 1) * G], mask,
                                algo.clip_low, algo.clip_high, algo.dual_clip, algo.loss_agg, algo.kl_coef,
                                algo.kl_kind, algo.kl_clamp, horizon=len(resp[0]) if resp else None)
            (loss * rt.sp_grid.sp_size).backward()
            out.append((float(loss.detach()), float(torch.cat(old[q]).mean())))
        if optimizer is not None:
            average_gradients([p for p in rt.adapter.model.parameters() if p.requires_grad], rt.grid)
            optimizer.step()
        rt.adapter.model.zero_grad(set_to_none=True)
    check_cap(memory, cap)
    return out


def check_cap(memory: PeakMemory, cap: float | None) -> None:
    if cap is not None and memory.gb() > cap:
        raise MemoryCapExceeded(f"peak {memory.gb():.2f} GiB > cap {cap} GiB")


def bench_mode(name, frames, recipe, adapter, ref, grids, initial, memory, ref_responses) -> dict:
    b, algo = recipe.bench, recipe.algo
    mode_name, use_sp, reuse_old = MODES[name]
    grid = grids["sp"] if use_sp else grids["one"]
    rt = make_runtime(recipe, adapter, grid, Mode.named(mode_name))
    adapter.model.load_state_dict(initial)
    opt = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-5)
    G = recipe.rollout.n
    # Every SP group handles world / dp questions in turn so all modes do the same work.
    per_group = grid.world_size // grid.dp_size if grid.world_size > 1 else 1
    qids = [grid.dp_rank * per_group + k for k in range(per_group)]
    times, first, counters, peak = [], (0.0, 0.0), {}, 0.0
    try:
        for step in range(b.warmup_steps + b.steps):
            timers = dict.fromkeys(PHASES, 0.0)
            rt.new_step()
            rt.reset_counters()
            memory.reset()
            samples = [synthetic_sample(rt, frames, b.frame_size, q) for q in qids]
            rewards = torch.cat([torch.rand(G, generator=torch.Generator().manual_seed(step * 100_003 + q))
                                 for q in qids])  # a question's rewards do not depend on the mode
            if step == 0:  # the parity check: same rollouts, same weights -> same numbers in every mode
                first = step_loss(rt, ref, samples, ref_responses(qids), rewards, G, algo,
                                  dict.fromkeys(PHASES, 0.0), memory, None,
                                  reuse_old=reuse_old)[qids.index(grid.rank)]
                rt.new_step()  # the timed step starts cold: no embedding cached, counters at zero
                rt.reset_counters()
                memory.reset()
            t0 = time.perf_counter()
            with torch.no_grad(), Phase(timers, "rollout", rt):
                if rt.mode.reuse_embeddings:  # encode once (sharded over the SP group), reused below
                    for s in samples:
                        rt.embed(s)
            check_cap(memory, b.memory_cap_gb)
            sampling = Sampling(recipe.rollout.temperature, recipe.rollout.top_p, b.response_tokens,
                                seed=recipe.seed + step, stop_token_ids=[-1])  # fixed length: never stop
            with Phase(timers, "rollout", rt):
                groups = rt.generate(samples, G, sampling)
            check_cap(memory, b.memory_cap_gb)
            responses = [[r.token_ids for r in g] for g in groups]
            step_loss(rt, ref, samples, responses, rewards, G, algo, timers, memory, b.memory_cap_gb, opt,
                      reuse_old=reuse_old)
            elapsed = time.perf_counter() - t0
            if step >= b.warmup_steps:
                times.append((elapsed, timers))
            counters = rt.counters()
            if grid.sp_group is not None:  # encodes on one rank alone (peer rollouts) add up over the group
                alone = all_reduce_sum([counters["vision_encodes_alone"]], grid, group=grid.sp_group)[0]
                counters["vision_encodes"] += int(alone) - counters["vision_encodes_alone"]
            peak = max(peak, memory.gb())
    except (MemoryCapExceeded, torch.OutOfMemoryError, MemoryError) as e:
        return {"mode": name, "frames": frames, "oom": True, "reason": str(e).splitlines()[0][:200]}
    med = statistics.median(t for t, _ in times)
    breakdown = {p: statistics.median(tm[p] for _, tm in times) for p in PHASES}
    flops = bench_step_flops(ModelShape.of(adapter), prompt=int(samples[0].prompt.input_ids.shape[0]),
                             response=b.response_tokens, G=G, questions=len(qids) * grid.dp_size,
                             grid_thw=samples[0].video.grid_thw,
                             encodes_per_video=counters["vision_encodes"] / len(qids),
                             prefills_per_question=1 if rt.mode.group_rollouts else G,
                             shared_prompt=rt.mode.shared_prompt, old_pass=not reuse_old)
    flops["step"] = sum(flops.values())
    return {"flops": flops, "mode": name, "frames": frames, "oom": False, "seconds_per_step": med, "breakdown": breakdown,
            "peak_memory_gb": peak, "vision_encodes_per_video": counters["vision_encodes"] / len(qids),
            "video_tokens": int(samples[0].prompt.input_ids.eq(adapter.video_token_id).sum()),
            "prompt_tokens": int(samples[0].prompt.input_ids.shape[0]), "first_step_loss": first[0],
            "first_step_logp": first[1],
            "questions_per_rank": len(qids), "train_forward_tokens": counters["train_forward_tokens"],
            "train_forward_tokens_unshared": counters["train_forward_tokens_unshared"]}


def run(recipe, run) -> dict:
    b = recipe.bench
    grids = {"one": init_grid(1, recipe.launch.backend, recipe.launch.timeout_s), "sp": open_grid(recipe)}
    grid: Grid = grids["sp"]
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    adapter = load_policy(recipe, grid)
    adapter.model.model.visual.requires_grad_(False)
    ref = load_reference(recipe, grid, adapter)
    initial = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    peak = gemm_peak(grid, next(adapter.model.parameters()).dtype)  # the limit MFU is measured against
    memory = PeakMemory(grid.device)
    results = []
    with run.progress("bench-mrsp", len(b.frames) * len(b.modes)) as bar:
        for frames in b.frames:
            cache: dict = {}

            def ref_responses(qids, G=recipe.rollout.n, cache=cache):
                """Fixed reference rollouts (seeded random tokens) for the cross-mode loss check."""
                out = []
                for q in qids:
                    if q not in cache:
                        g = torch.Generator().manual_seed(77 + q)
                        cache[q] = [torch.randint(10, 900, (b.response_tokens,), generator=g).tolist()
                                    for _ in range(G)]
                    out.append(cache[q])
                return out

            row = {}
            for name in b.modes:
                res = bench_mode(name, frames, recipe, adapter, ref, grids, initial, memory, ref_responses)
                res = gather_peak(res, grid)
                row[name] = res
                results.append(res)
                run.metric(len(results), **{k: v for k, v in res.items() if k != "breakdown"})
                bar.advance()
            ok = [r for r in row.values() if not r["oom"]]
            for key in ("first_step_loss", "first_step_logp"):
                values = [r[key] for r in ok] or [0.0]
                worst = max(abs(v - values[0]) for v in values)
                if worst > 1e-4 * max(1.0, abs(values[0])):
                    raise RuntimeError(f"bench: modes disagree on the {key.replace('_', ' ')} at {frames} frames "
                                       f"(max difference {worst:.3g})")
    memory.close()
    return report(recipe, run, grid, [with_mfu(r, peak) for r in results], peak)


def gather_peak(res: dict, grid: Grid) -> dict:
    """Peak memory of the worst rank (and the median step time of rank 0)."""
    if grid.world_size == 1 or res["oom"]:
        return res
    return {**res, "peak_memory_gb": all_reduce_sum([res["peak_memory_gb"]], grid, op="max")[0]}
