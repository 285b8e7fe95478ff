"""`lvr rl`: GRPO on long videos with the MR-SP runtime (paper Sec. 4, Eq. 1-2).

One step, top to bottom (`GRPOTrainer.train_step`): pick `train.global_batch` questions ->
G rollouts each from the rollout engine with the video embedding encoded once (sharded over
the SP group) -> format + accuracy rewards -> old-policy and reference log-probs (SP
forwards reusing the embedding) -> group-normalised advantages -> clipped objective + KL,
for `algo.ppo_epochs` passes over `algo.mini_batches` mini-batches -> optimizer step(s).
What a step logs is assembled apart from its math (`step_metrics`).

Where it departs from the paper:
- The paper rolls out with vLLM on GPUs; the default engine here is the `hf` engine (one
  prefill per group, G rows decoded together), which also runs on CPU.
- Within an SP group the step's questions are dealt out to the ranks for rollouts (one
  prefill and decode per question in the group, not one per rank) and the rollouts are
  all-gathered; a question's sampling seed depends on its place in the step only, so the
  rollouts equal those of one process. The training forwards' long prefill is split by
  token position (Ulysses) instead.
- The loss of a mini-batch is reduced over all its tokens (or sequences) at once, on every
  data-parallel rank together, whatever the micro-batching (`loss_denominator`): verl's
  and DAPO's token-mean, not a mean of per-question means.
- `model.freeze_vision = false` trains the vision tower too: the update forward re-encodes
  with gradients, embeddings are dropped after each optimizer step, and the reference
  encodes with its own tower (`Runtime.embed`).
- Old-policy log-probs are recomputed by a teacher-forced forward (as verl does), not taken
  from the sampler, so the ratio is exact even when the engine's numerics differ. On-policy
  steps (`algo.ppo_epochs = 1`, `algo.mini_batches = 1`, the default) skip that forward: the
  policy that sampled is the one being updated, so the update forward's own log-probs,
  detached, are the old ones (TRL with `num_iterations = 1`); the ratio is exactly 1 and
  clipping inactive. `algo.kl_in_reward` needs the old log-probs before the advantages, so it
  keeps the separate forward, as does `algo.reuse_old_logprobs = false`; the metric
  `old_logprobs_reused` (1/0) says which path ran.
- With `mrsp.shared_prompt` (the default) the old, reference and update forwards run each
  question's prompt once for its G responses (Prefix Grouper, arXiv 2506.05433), packing the
  groups of a micro-batch into one sequence: same log-probs and gradients, fewer tokens
  (`train_forward_tokens` against `train_forward_tokens_unshared` in metrics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.algo.grpo import (group_advantages, grpo_loss, kl_in_reward, loss_denominator, masked_mean,
                              pad_rows)
from stages.algo.rewards import combined_reward
from stages.data.records import CATEGORIES, read_records
from stages.mrsp.checkpoint import resume, save_checkpoint, save_final
from stages.mrsp.data_order import step_records
from stages.mrsp.dist import all_gather_objects, all_reduce_sum, dp_mean
from stages.mrsp.rollout import Sampling
from stages.mrsp.runtime import Sample
from stages.setup import UNREADABLE, InputError, open_grid, processor_source, read_samples, setup
from stages.skipped import SkippedInputs

PHASES = ("vision", "rollout", "old", "ref", "update")


@dataclass
class StepBatch:
    """One step's questions on this rank and everything computed about them, in order."""

    samples: list[Sample]
    responses: list[list[list[int]]] = field(default_factory=list)  # [question][rollout] token ids
    texts: list[list[str]] = field(default_factory=list)
    rewards: list[dict] = field(default_factory=list)  # [question * G + rollout] reward parts
    old: list[list[torch.Tensor]] = field(default_factory=list)  # [question][rollout] log-probs [T]
    refs: list[list[torch.Tensor]] = field(default_factory=list)
    advantages: torch.Tensor | None = None  # [questions * G]
    group_std: torch.Tensor | None = None  # [questions]
    masks: list[torch.Tensor] = field(default_factory=list)  # [question] loss mask [G, T]
    timers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    stats: dict[str, list[float]] = field(default_factory=dict)


class GRPOTrainer:
    """`lvr rl`: setup, the training loop, the final model."""

    def __init__(self, recipe, run):
        self.recipe, self.run, self.algo = recipe, run, recipe.algo
        r = recipe
        self.grid = open_grid(r)
        self.per_rank = r.train.global_batch // self.grid.dp_size  # questions per rank per step
        self.micro = r.train.micro_batch_per_rank
        self.mini = self.per_rank // self.algo.mini_batches  # questions per mini-batch
        # on-policy: the update forward's log-probs, detached, are the old policy's (module docstring)
        self.reuse_old = (self.algo.reuse_old_logprobs and self.algo.ppo_epochs == 1
                          and self.algo.mini_batches == 1 and not self.algo.kl_in_reward)
        optimizer_steps = r.train.steps * self.algo.ppo_epochs * self.algo.mini_batches
        self.s = setup(r, self.grid, reference=self.algo.kl_coef > 0,
                       train=(optimizer_steps, self.mini // self.micro))
        self.rt, self.engine = self.s.rt, self.s.engine
        self.skipped = SkippedInputs(run, self.grid)  # unreadable inputs: recorded once, counted in `failed`
        self.records = read_records(r.data.input, on_error=lambda line, why: self.skipped.skip(
            f"{r.data.input}:{line}", why))
        self.records = self.records[:r.data.limit] if r.data.limit else self.records
        if not self.records:
            raise InputError(f"data.input: {r.data.input} holds no readable records")
        self.video_dir = r.data.video_dir or str(Path(r.data.input).parent)
        self.held_out = read_records(r.eval.input, on_error=lambda line, why: self.skipped.skip(
            f"{r.eval.input}:{line}", why))[:r.eval.limit or None] if r.eval.input else []
        self.skipped.flush()

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        r, run = self.recipe, self.run
        start = resume(self.engine, run.path, [run.file("metrics.jsonl"), run.file("samples.jsonl")])
        self.s.adapter.model.train()
        if self.held_out and start == 0:  # where the policy starts, as step 0
            with self.engine.gathered():
                accuracy = held_out_accuracy(self.rt, self.held_out, self.recipe, self.grid, self.skipped)
            if accuracy:
                run.metric(0, **accuracy)
        history = []
        with run.progress("rl steps", r.train.steps) as bar:
            bar.advance(start)
            for step in range(start, r.train.steps):
                metrics = self.train_step(step)
                if self.held_out and ((step + 1) % r.eval.every_steps == 0 or step + 1 == r.train.steps):
                    with self.engine.gathered():
                        metrics.update(held_out_accuracy(self.rt, self.held_out, self.recipe, self.grid,
                                                         self.skipped))
                self.skipped.flush()
                history.append(metrics)
                run.metric(step + 1, **metrics)
                save_checkpoint(self.engine, self.s.adapter.tokenizer, run.path, step + 1,
                                every_steps=r.checkpoint.every_steps, last_step=r.train.steps,
                                keep_last=r.checkpoint.keep_last, processor_source=processor_source(r))
                bar.advance()
        final = save_final(self.s.adapter.model, self.s.adapter.tokenizer, run.path, self.grid, processor_source(r))
        if self.grid.is_main:
            from stages.plots import CURVES, plot_metrics

            name, keys, title = CURVES["rl"]
            plot_metrics(run.file("metrics.jsonl"), run.file(name), keys, title)
        return summary(history, start, final, self.engine, r.train.steps, self.skipped.count)

    def train_step(self, step: int) -> dict:
        rt, algo, G = self.rt, self.algo, self.recipe.rollout.n
        rt.new_step()
        rt.reset_counters()

        # 1. the step's questions and their videos (encoded once, sharded over the SP group)
        b = StepBatch([])
        b.samples = self.load_samples(step, b.timers)
        if self.skipped.none_read(len(b.samples), step, "question"):  # no rollouts, no update
            return {"questions": 0, "lr": self.engine.lr}

        # 2-4 on the policy's full weights when they are sharded (gathered once, no collective inside)
        with self.engine.gathered():
            # 2. G rollouts per question
            with Timer(b.timers, "rollout"):
                groups = rt.generate(b.samples, G, self.sampling(step), first_index=self.grid.dp_rank * self.per_rank)
            b.responses = [[r.token_ids for r in g] for g in groups]
            b.texts = [[r.text for r in g] for g in groups]

            # 3. rewards
            b.rewards = [self.reward(s, rt.response_text(ids)) for s, g in zip(b.samples, b.responses) for ids in g]

            # 4. old-policy log-probs (no gradient, embedding reused), a micro-batch per forward;
            #    on-policy steps take them from the update forward instead (step 6)
            if not self.reuse_old:
                with Timer(b.timers, "old"), torch.no_grad():
                    b.old = self.logprobs(b)
        # 4. reference log-probs, likewise (on the reference's own gathered weights)
        with Timer(b.timers, "ref"), torch.no_grad(), self.s.ref_gathered():
            b.refs = self.logprobs(b, model=self.s.ref) if self.s.ref is not None else []

        # 5. advantages (KL folded into the reward when asked); loss masks without dropped groups
        reward_t = torch.tensor([p["total"] for p in b.rewards], dtype=torch.float32)
        if b.refs and algo.kl_in_reward:
            lp, mask = pad_rows([x for g in b.old for x in g])
            reward_t = kl_in_reward(reward_t, lp, pad_rows([x for g in b.refs for x in g])[0], mask,
                                    algo.kl_coef, algo.kl_kind, algo.kl_clamp)
        b.advantages = group_advantages(reward_t, G, scale_by_std=algo.scale_by_std) if b.samples else reward_t
        b.group_std = reward_t.view(-1, G).std(dim=1) if b.samples else reward_t
        keep = b.group_std > 0 if algo.drop_zero_variance_groups else torch.ones_like(b.group_std, dtype=torch.bool)
        b.masks = [length_mask([len(r) for r in g]) & bool(keep[q]) for q, g in enumerate(b.responses)]

        # 6. clipped objective + KL: ppo_epochs x mini_batches optimizer steps, each mini-batch's
        #    loss reduced over all its tokens on every data-parallel rank
        with Timer(b.timers, "update"):
            denoms = self.mini_batch_denominators(b)
            for _ in range(algo.ppo_epochs):
                for m, denom in enumerate(denoms):
                    self.update_mini_batch(b, range(m * self.mini, (m + 1) * self.mini), denom)

        # 7. metrics and samples
        self.write_samples(b, step)
        return step_metrics(b, self, G)

    # -- the pieces of a step ------------------------------------------------------------------
    def load_samples(self, step: int, timers: dict) -> list[Sample]:
        """This rank's questions of `step`, each video decoded and (MR-SP) encoded once into the
        step's cache (timed as `vision`) before the next is decoded, its frames released when
        that embedding serves the whole step (`Runtime.release_pixels`), so a step holds one
        video's frames, not all of them; vanilla encodes at every use, not here. An unreadable
        video is noted in `skipped` and left out."""
        r, grid, rt = self.recipe, self.grid, self.rt
        samples = []
        for i in step_records(len(self.records), step, r.train.global_batch, r.seed, grid.dp_rank, grid.dp_size):
            for s in read_samples(rt, self.records, [i], self.video_dir, self.skipped):
                with Timer(timers, "vision"):
                    rt.embed_for_step(s)
                rt.release_pixels(s)
                samples.append(s)
        return samples

    def sampling(self, step: int) -> Sampling:
        """The step's sampling; a question's seed is its place in the global batch (`generate`'s
        `first_index`), so rollouts do not depend on how the batch is spread over ranks."""
        ro = self.recipe.rollout
        return Sampling(ro.temperature, ro.top_p, ro.max_new_tokens, seed=(self.recipe.seed * 1_000_003 + step) * 1_009)

    def reward(self, s: Sample, text: str) -> dict:
        w = self.recipe.reward
        return combined_reward(text, s.record["answer"], options=s.record.get("options"),
                               format_weight=w.format_weight, accuracy_weight=w.accuracy_weight)

    def logprobs(self, b: StepBatch, model=None) -> list[list[torch.Tensor]]:
        out = []
        for u in range(0, len(b.samples), self.micro):
            out += self.rt.group_logprobs(b.samples[u:u + self.micro], b.responses[u:u + self.micro], model=model)[0]
        return out

    def mini_batch_denominators(self, b: StepBatch) -> list[float]:
        """Per mini-batch, what its loss is divided by: summed over its questions on every
        data-parallel rank (question slots past a failed video count nothing)."""
        local = [sum(loss_denominator(b.masks[q], self.algo.loss_agg, self.recipe.rollout.max_new_tokens)
                     for q in range(m * self.mini, min((m + 1) * self.mini, len(b.samples))))
                 for m in range(self.algo.mini_batches)]
        return all_reduce_sum(local, self.grid, group=self.grid.dp_group)

    def update_mini_batch(self, b: StepBatch, slots: range, denom: float) -> None:
        """Backward over the mini-batch's micro-batches (a micro-batch per `micro` question
        slots, so the optimizer steps on the same boundaries when a video failed to load)."""
        algo, G, rt = self.algo, self.recipe.rollout.n, self.rt
        kl_ref = bool(b.refs) and not algo.kl_in_reward
        for u0 in range(slots.start, slots.stop, self.micro):
            idx = [q for q in range(u0, u0 + self.micro) if q < len(b.samples)]
            # fewer forwards than other ranks (failed videos): one-token ones keep the collectives in step
            padding = self.engine.padding_loss(rt.lm_forwards([b.responses[q] for q in idx]))
            loss = torch.zeros(())  # no question left in the slots
            if idx:
                lps, ents = rt.group_logprobs([b.samples[q] for q in idx], [b.responses[q] for q in idx],
                                              entropy=True, grad_vision=rt.vision_trains)
                lp, _ = pad_rows([x for g in lps for x in g])
                mask = pad_rows_mask([b.masks[q] for q in idx], lp.shape[1])
                width = lp.shape[1]
                old = lp.detach() if self.reuse_old else _rows([x for q in idx for x in b.old[q]], width)
                loss, st = grpo_loss(
                    lp, old,
                    _rows([x for q in idx for x in b.refs[q]], width) if kl_ref else None,
                    torch.cat([b.advantages[q * G:(q + 1) * G] for q in idx]), mask,
                    algo.clip_low, algo.clip_high, algo.dual_clip, algo.loss_agg, algo.kl_coef, algo.kl_kind,
                    algo.kl_clamp, denom=denom, horizon=self.recipe.rollout.max_new_tokens)
                ent, _ = pad_rows([x.detach() for g in ents for x in g])
                st["entropy"] = float(masked_mean(_widen(ent, width), mask))
                st["loss"] = float(loss.detach())
                for k, v in st.items():
                    b.stats.setdefault(k, []).append(float(v))
            self.engine.backward(loss if padding is None else loss + padding, summed=True)
            if self.engine.step():
                rt.optimizer_stepped()

    def write_samples(self, b: StepBatch, step: int) -> None:
        G = self.recipe.rollout.n
        for qi, s in enumerate(b.samples):
            for j, text in enumerate(b.texts[qi]):
                p = b.rewards[qi * G + j]
                self.run.sample({"step": step + 1, "problem_id": s.key, "rollout": j, "response": text,
                                 "reward": p["total"], "format": p["format"], "accuracy": p["accuracy"],
                                 "advantage": float(b.advantages[qi * G + j])})


def held_out_accuracy(rt, records: list[dict], recipe, grid, skipped: SkippedInputs) -> dict:
    """Greedy accuracy on the held-out records (`[eval]`), overall and per category, scored by
    the RL accuracy reward; each DP rank takes its share. Unreadable items are noted in
    `skipped` and left out; an accuracy over no item is absent."""
    video_dir = str(Path(recipe.eval.input).parent)
    greedy = Sampling(0.0, 1.0, recipe.rollout.max_new_tokens)
    sums = {f"{c}/{i}": 0.0 for c in ("all", *CATEGORIES) for i in (0, 1)}
    for i, rec in enumerate(records[grid.dp_rank::grid.dp_size]):
        try:
            sample = rt.sample(rec, video_dir)
        except UNREADABLE as e:
            skipped.skip(f"eval:{rec.get('problem_id', grid.dp_rank + i * grid.dp_size)}", f"{type(e).__name__}: {e}")
            continue
        (rollout,), = rt.generate([sample], 1, greedy)
        rt.new_step()  # not one held-out embedding kept past its rollout
        text = rt.response_text(rollout.token_ids)
        right = combined_reward(text, rec["answer"], options=rec.get("options"))["accuracy"]
        for c in ("all", rec.get("category", rec.get("problem_type"))):
            if f"{c}/0" in sums:
                sums[f"{c}/0"] += right
                sums[f"{c}/1"] += 1
    sums = dp_mean(sums, grid)  # a mean of sums: the ratios below are unchanged
    out = {f"eval_accuracy/{c}": sums[f"{c}/0"] / sums[f"{c}/1"] for c in CATEGORIES if sums[f"{c}/1"] > 0}
    if sums["all/1"] > 0:
        out = {"eval_accuracy": sums["all/0"] / sums["all/1"], **out}
    return {k: round(v, 6) for k, v in out.items()}


# -- helpers -------------------------------------------------------------------------------------
class Timer:
    """Add the seconds of a `with` block to `timers[name]`."""

    def __init__(self, timers: dict, name: str):
        self.timers, self.name = timers, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timers[self.name] += time.perf_counter() - self.t0


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """`[B, T]` zero-padded on the right to `[B, width]`."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def _rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return _widen(pad_rows(rows)[0], width)


def length_mask(lengths: list[int]) -> torch.Tensor:
    """`[len(lengths), max(lengths, 1)]` bool, row i true on its first `lengths[i]` positions
    (the mask `pad_rows` gives rows of these lengths)."""
    T = max(lengths + [1])
    return torch.arange(T)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


def pad_rows_mask(masks: list[torch.Tensor], width: int) -> torch.Tensor:
    """The questions' `[G, T_q]` masks stacked to `[sum G, width]`."""
    return torch.cat([_widen(m, width) for m in masks]) if masks else torch.zeros(0, width, dtype=torch.bool)


def step_metrics(b: StepBatch, t: GRPOTrainer, G: int) -> dict:
    """One step's metrics over all data-parallel ranks: means over the step's rollouts (groups,
    micro-batches) wherever they are, so a rank whose questions failed to load counts none."""
    grid, adv = t.grid, b.advantages
    lengths = [len(r) for g in b.responses for r in g]
    # (sum, count) on this rank, summed over the ranks below
    parts = {f"reward/{k}": (sum(p[k] for p in b.rewards), len(b.rewards)) for k in ("total", "format", "accuracy")}
    parts |= {"advantage/mean": (float(adv.sum()), len(adv)), "advantage/abs_mean": (float(adv.abs().sum()), len(adv)),
              "zero_variance_groups": (float((b.group_std == 0).sum()), len(b.group_std)),
              "response_length": (float(sum(lengths)), len(lengths))}
    # `loss` and `kl` of a micro-batch are its share of the mini-batch's: add the shares up
    # (over micro-batches and data-parallel ranks), averaged over the optimizer updates
    updates = t.algo.ppo_epochs * t.algo.mini_batches
    parts |= {k: (sum(v) / updates, 1) if k in ("loss", "kl") else (sum(v), len(v)) for k, v in b.stats.items()}
    keys = sorted(set().union(*all_gather_objects(sorted(parts), None))) if grid.distributed else sorted(parts)
    sums = all_reduce_sum([parts.get(k, (0.0, 0))[i] for k in keys for i in (0, 1)], grid)
    out = {}
    for j, k in enumerate(keys):
        total, count = sums[2 * j], sums[2 * j + 1]
        if k in ("loss", "kl"):  # an SP group's ranks all hold the group's share
            out[k] = total / grid.sp_size
        elif count:
            out[k] = total / count
    out |= dp_mean({"lr": t.engine.lr, "grad_norm": t.engine.last_grad_norm,
                    **{f"time/{k}": v for k, v in b.timers.items()}}, grid)
    per_cat = {c: [0.0, 0.0] for c in CATEGORIES}  # accuracy sum, count (summed over ranks below)
    for qi, s in enumerate(b.samples):
        cat = s.record.get("category", s.record.get("problem_type"))
        if cat in per_cat:
            per_cat[cat][0] += sum(p["accuracy"] for p in b.rewards[qi * G:(qi + 1) * G])
            per_cat[cat][1] += G
    sums = dp_mean({f"{c}/{i}": v[i] for c, v in per_cat.items() for i in (0, 1)}, grid)
    out.update({f"accuracy/{c}": sums[f"{c}/0"] / sums[f"{c}/1"] for c in CATEGORIES if sums[f"{c}/1"] > 0})
    out.update(t.rt.counters())
    out["old_logprobs_reused"] = int(t.reuse_old)
    if torch.cuda.is_available():
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def summary(history: list[dict], start: int, final: Path, engine, steps: int, failed: int) -> dict:
    # One step's accuracy is a few questions' worth: compare the halves of the run instead.
    acc = [m["reward/accuracy"] for m in history if "reward/accuracy" in m]
    half = len(acc) // 2
    mean = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
    return {"steps": steps, "resumed_from": start, "final": str(final),
            "accuracy_first_half": mean(acc[:half]), "accuracy_second_half": mean(acc[half:]),
            "eval_accuracy_last": next((h["eval_accuracy"] for h in reversed(history) if "eval_accuracy" in h), None),
            "gradient_checkpointing": engine.checkpointing, "trainable_params": engine.trainable_params,
            "engine": engine.kind, **engine.state_mib(), "failed": failed}


def run(recipe, run) -> dict:
    return GRPOTrainer(recipe, run).train()
