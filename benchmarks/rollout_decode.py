"""Time `HFEngine.generate` on long video prompts: KV copied per row against shared prefix.

One process per measurement: the tiny bench model, `--prompts` prompts of a 512-frame 56x56
video (1,024 video tokens, the bench's largest), n rows sampled at temperature 1 with no
stop token (every row runs `--tokens` tokens), torch threads 1. Prints one JSON line: per
`--tokens` value, `--repeat` timings of generate (wall seconds, and CPU seconds of the
thread that runs torch, less noisy on a shared machine) and the peak resident-set growth
during each. Run both paths interleaved, several times, and compare medians. Time with
glibc's default malloc (what runs in production); measure memory in separate runs with the
mmap threshold fixed, so that the resident set follows live memory (with it, every large
allocation is a fresh mmap, which slows the copy path's growing cache most):

    for i in 1 2 3 4 5; do for share in 0 1; do
      OMP_NUM_THREADS=1 python benchmarks/rollout_decode.py --share $share --tokens 32 64 --repeat 3
    done; done
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 OMP_NUM_THREADS=1 \
      python benchmarks/rollout_decode.py --share 1 --tokens 32 64 --prompts 4

`--profile FILE` writes a cProfile (thread CPU time) of one more generate (last `--tokens`);
`--summarize benchmarks/rollout-decode.jsonl` prints the medians of the runs recorded there.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time

import torch


class PeakRSS:
    """Peak resident set (bytes) above the level at `reset()`, sampled every millisecond."""

    def __init__(self):
        self._base = self._peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self.rss())

    def reset(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._base = self._peak = self.rss()

    def growth(self) -> int:
        return max(self._peak, self.rss()) - self._base


def summarize(path: str) -> None:
    """Print the medians of the JSON lines in `path` (this script's output, with `checkout`
    and `malloc` fields added) per malloc setting, prompt count and path."""
    import statistics

    groups: dict = {}
    for line in open(path):
        r = json.loads(line)
        key = (r["malloc"], len(r["prompt_tokens"]), r["checkout"], "shared" if r["share"] else "copy")
        groups.setdefault(key, []).append(r)
    print("| malloc | prompts | checkout | path | runs | generate 32 tok CPU s | 64 tok CPU s | per extra token CPU ms "
          "| 32 tok wall s | 64 tok wall s | peak RSS growth MiB (32 / 64) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (malloc, prompts, checkout, path_name), rs in groups.items():
        med = {k: statistics.median(x for r in rs for x in r[k])
               for k in ("cpu_s_32", "cpu_s_64", "s_32", "s_64", "rss_mib_32", "rss_mib_64")}
        print(f"| {malloc} | {prompts} | {checkout} | {path_name} | {len(rs)} | {med['cpu_s_32']:.3f} | "
              f"{med['cpu_s_64']:.3f} | {(med['cpu_s_64'] - med['cpu_s_32']) / 32 * 1e3:.1f} | {med['s_32']:.3f} | "
              f"{med['s_64']:.3f} | {med['rss_mib_32']:.1f} / {med['rss_mib_64']:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", default=None, help="print the medians of a results file and exit")
    ap.add_argument("--share", type=int, choices=[0, 1], help="1: shared-prefix KV, 0: KV copied per row")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="time each --tokens value this many times")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    if args.share is None:
        ap.error("--share is required")
    torch.set_num_threads(1)

    from stages.models.adapter import load_adapter
    from stages.models.patchify import patchify
    from stages.mrsp.rollout import HFEngine, RolloutPrompt, Sampling

    a = load_adapter("tiny:qwen2.5-vl-bench")
    prompts = []
    for k in range(args.prompts):
        g = torch.Generator().manual_seed(1000 + k)
        frames = torch.randint(0, 256, (args.frames, 3, args.size, args.size), dtype=torch.uint8, generator=g)
        pixels, grid = patchify(frames, a.patch_spec)
        question = "What happens in the video?\nA. a\nB. b\nC. c\nD. d" + " Answer briefly." * k
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        ids = a.prompt_ids(messages, [(grid, [i * 0.5 for i in range(args.frames)])])
        with torch.no_grad():
            video = a.encode_video(pixels, grid)
        prompts.append(RolloutPrompt.build(a, f"q{k}", ids, [video], [a.second_per_grid(2.0)]))
    try:
        engine = HFEngine(a, share_prefix_kv=bool(args.share))
    except TypeError:  # a checkout from before the flag: the copy path
        assert not args.share
        engine = HFEngine(a)

    def sampling(tokens):
        return Sampling(temperature=1.0, max_new_tokens=tokens, seed=0, stop_token_ids=[])

    engine.generate(prompts, args.n, sampling(4))  # warm-up
    memory = PeakRSS()
    out = {"share": args.share, "n": args.n, "prompt_tokens": [int(p.input_ids.shape[0]) for p in prompts]}
    for _ in range(args.repeat):
        for tokens in args.tokens:
            memory.reset()
            t0, c0 = time.perf_counter(), time.thread_time()
            groups = engine.generate(prompts, args.n, sampling(tokens))
            out.setdefault(f"s_{tokens}", []).append(round(time.perf_counter() - t0, 4))
            # this thread's CPU time (torch runs on it with 1 thread): less noisy on a shared machine
            out.setdefault(f"cpu_s_{tokens}", []).append(round(time.thread_time() - c0, 4))
            out.setdefault(f"rss_mib_{tokens}", []).append(round(memory.growth() / 2 ** 20, 1))
            assert all(len(r) == tokens for g in groups for r in g)
    if args.profile:
        import cProfile

        profile = cProfile.Profile(time.thread_time)  # CPU time: other processes' load does not count
        profile.runcall(engine.generate, prompts, args.n, sampling(args.tokens[-1]))
        profile.dump_stats(args.profile)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
