"""`lvr rl`: GRPO on long videos with the MR-SP runtime (paper Sec. 4, Eq. 1-2).

One step, top to bottom: pick `train.global_batch` questions -> G rollouts each from the
rollout engine with the video embedding encoded once (sharded over the SP group) ->
format + accuracy rewards -> old-policy and reference log-probs (SP forwards reusing the
embedding) -> group-normalised advantages -> clipped objective + KL, for `algo.ppo_epochs`
passes over `algo.mini_batches` mini-batches -> optimizer step(s).

Where it departs from the paper:
- The paper rolls out with vLLM on GPUs; the default engine here is the `hf` engine (one
  prefill per group, G rows decoded together), which also runs on CPU.
- Within an SP group the step's questions are dealt out to the ranks for rollouts (one
  prefill and decode per question in the group, not one per rank) and the rollouts are
  all-gathered; a question's sampling seed depends on its place in the step only, so the
  rollouts equal those of one process. The training forwards' long prefill is split by
  token position (Ulysses) instead.
- `model.freeze_vision = false` trains the vision tower too: the update forward re-encodes
  with gradients, embeddings are dropped after each optimizer step, and the reference
  encodes with its own tower (`Runtime.embed`).
- Old-policy log-probs are recomputed by a teacher-forced forward (as verl does), not taken
  from the sampler, so the ratio is exact even when the engine's numerics differ.
- With `mrsp.shared_prompt` (the default) the old, reference and update forwards run each
  question's prompt once for its G responses (Prefix Grouper, arXiv 2506.05433), packing the
  groups of a micro-batch into one sequence: same log-probs and gradients, fewer tokens
  (`train_forward_tokens` against `train_forward_tokens_unshared` in metrics).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stages.algo.grpo import group_advantages, grpo_loss, kl_in_reward, masked_mean, pad_rows
from stages.algo.rewards import combined_reward
from stages.data.records import read_jsonl
from stages.data.video import VideoDecodeError
from stages.models.adapter import VLAdapter, load_adapter, load_model
from stages.mrsp.dist import init_grid
from stages.mrsp.rollout import Sampling
from stages.mrsp.runtime import Runtime
from stages.mrsp.trainer import (TrainEngine, dp_mean, model_dtype, resume, save_checkpoint, save_final,
                                 step_records)


CATEGORIES = ("temporal", "goal", "spatial", "plot")


def run(recipe, run) -> dict:
    grid = init_grid(recipe.mrsp.sp_size, recipe.launch.backend, recipe.launch.timeout_s)
    torch.manual_seed(recipe.seed)
    dtype = model_dtype(recipe.model.dtype, grid.device)
    adapter = load_adapter(recipe.model.path, dtype, grid.device, recipe.model.attn_implementation)
    ref = None
    if recipe.algo.kl_coef > 0:
        ref_model = load_model(recipe.model.path, dtype, grid.device, recipe.model.attn_implementation).eval()
        ref_model.requires_grad_(False)
        ref = VLAdapter(ref_model, adapter.tokenizer, adapter.patch_spec)
    rt = Runtime.from_recipe(adapter, grid, recipe)

    records = read_jsonl(recipe.data.input, on_error=lambda line, why: run.error(f"{recipe.data.input}:{line}", why))
    records = records[:recipe.data.limit] if recipe.data.limit else records
    video_dir = recipe.data.video_dir or str(Path(recipe.data.input).parent)
    G, algo = recipe.rollout.n, recipe.algo
    per_rank = recipe.train.global_batch // grid.dp_size
    micro = recipe.train.micro_batch_per_rank
    accum = per_rank // (micro * algo.mini_batches)
    engine = TrainEngine(adapter.model, grid, recipe.optim, recipe.deepspeed,
                         total_steps=recipe.train.steps * algo.ppo_epochs * algo.mini_batches, accum_steps=accum,
                         freeze_vision=recipe.model.freeze_vision, freeze_llm_layers=recipe.model.freeze_llm_layers,
                         gradient_checkpointing=recipe.train.gradient_checkpointing, lora=recipe.lora)

    start = resume(engine, run)
    adapter.model.train()
    held_out = read_jsonl(recipe.eval.input)[:recipe.eval.limit or None] if recipe.eval.input else []
    if held_out and start == 0:  # where the policy starts, as step 0
        run.metric(0, **held_out_accuracy(rt, held_out, recipe, grid))
    history = []
    with run.progress("rl steps", recipe.train.steps) as bar:
        bar.advance(start)
        for step in range(start, recipe.train.steps):
            metrics = train_step(recipe, run, rt, ref, engine, records, video_dir, step, G, algo, per_rank, micro)
            if held_out and ((step + 1) % recipe.eval.every_steps == 0 or step + 1 == recipe.train.steps):
                metrics.update(held_out_accuracy(rt, held_out, recipe, grid))
            history.append(metrics)
            run.metric(step + 1, **metrics)
            save_checkpoint(engine, adapter, run.path, recipe, step + 1)
            bar.advance()
    final = save_final(adapter, run.path, recipe.model.path, grid)
    if grid.is_main:
        from stages.plots import CURVES, plot_metrics

        name, keys, title = CURVES["rl"]
        plot_metrics(run.file("metrics.jsonl"), run.file(name), keys, title)
    # One step's accuracy is a few questions' worth: compare the halves of the run instead.
    acc = [m["reward/accuracy"] for m in history if "reward/accuracy" in m]
    half = len(acc) // 2
    mean = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
    return {"steps": recipe.train.steps, "resumed_from": start, "final": str(final),
            "accuracy_first_half": mean(acc[:half]), "accuracy_second_half": mean(acc[half:]),
            "eval_accuracy_last": next((h["eval_accuracy"] for h in reversed(history) if "eval_accuracy" in h), None),
            "gradient_checkpointing": engine.checkpointing, "trainable_params": engine.trainable_params, "failed": 0}


def held_out_accuracy(rt: Runtime, records: list[dict], recipe, grid) -> dict:
    """Greedy accuracy on the held-out records (`[eval]`), overall and per category, scored by
    the RL accuracy reward; each DP rank takes its share. Unreadable items are left out."""
    video_dir = str(Path(recipe.eval.input).parent)
    greedy = Sampling(0.0, 1.0, recipe.rollout.max_new_tokens)
    sums = {f"{c}/{i}": 0.0 for c in ("all", *CATEGORIES) for i in (0, 1)}
    for rec in records[grid.dp_rank::grid.dp_size]:
        try:
            sample = rt.sample(rec, video_dir)
        except (VideoDecodeError, KeyError, ValueError):
            continue
        (rollout,), = rt.generate([sample], 1, greedy)
        text = rt.response_text(rollout.token_ids)
        right = combined_reward(text, rec["answer"], options=rec.get("options"))["accuracy"]
        for c in ("all", rec.get("category", rec.get("problem_type"))):
            if f"{c}/0" in sums:
                sums[f"{c}/0"] += right
                sums[f"{c}/1"] += 1
    sums = dp_mean(sums, grid)  # a mean of sums: the ratios below are unchanged
    out = {"eval_accuracy": sums["all/0"] / max(sums["all/1"], 1e-9)}
    out.update({f"eval_accuracy/{c}": sums[f"{c}/0"] / sums[f"{c}/1"] for c in CATEGORIES if sums[f"{c}/1"] > 0})
    return {k: round(v, 6) for k, v in out.items()}


def train_step(recipe, run, rt: Runtime, ref: VLAdapter | None, engine: TrainEngine, records, video_dir,
               step: int, G: int, algo, per_rank: int, micro: int) -> dict:
    grid = rt.grid
    timers = dict.fromkeys(("vision", "rollout", "old", "ref", "update"), 0.0)
    rt.new_step()
    rt.reset_counters()

    # 1. the step's questions and their videos (encoded once, sharded over the SP group)
    samples = []
    for i in step_records(len(records), step, recipe.train.global_batch, recipe.seed, grid.dp_rank, grid.dp_size):
        try:
            samples.append(rt.sample(records[i], video_dir))
        except (VideoDecodeError, KeyError, ValueError) as e:
            run.error(str(records[i].get("problem_id", i)), f"{type(e).__name__}: {e}")
    t = time.perf_counter()
    with torch.no_grad():
        for s in samples:
            rt.embed(s)
    timers["vision"] = time.perf_counter() - t

    # 2. G rollouts per question
    t = time.perf_counter()
    sampling = Sampling(recipe.rollout.temperature, recipe.rollout.top_p, recipe.rollout.max_new_tokens,
                        seed=(recipe.seed * 1_000_003 + step) * 1_009 + grid.dp_rank)
    groups = rt.generate(samples, G, sampling)
    timers["rollout"] = time.perf_counter() - t
    responses = [[r.token_ids for r in g] for g in groups]

    # 3. rewards
    rewards, parts = [], []
    for s, g in zip(samples, groups):
        for r in g:
            text = rt.response_text(r.token_ids)
            rw = combined_reward(text, s.record["answer"], options=s.record.get("options"),
                                 format_weight=recipe.reward.format_weight,
                                 accuracy_weight=recipe.reward.accuracy_weight)
            rewards.append(rw["total"])
            parts.append(rw)

    # 4. old-policy and reference log-probs (no gradient, embedding reused), a micro-batch per forward
    old, refs = [], []
    with torch.no_grad():
        t = time.perf_counter()
        for u in range(0, len(samples), micro):
            old += rt.group_logprobs(samples[u:u + micro], responses[u:u + micro])[0]
        timers["old"] = time.perf_counter() - t
        t = time.perf_counter()
        if ref is not None:
            for u in range(0, len(samples), micro):
                refs += rt.group_logprobs(samples[u:u + micro], responses[u:u + micro], model=ref)[0]
        timers["ref"] = time.perf_counter() - t

    # 5. advantages (KL folded into the reward when asked)
    reward_t = torch.tensor(rewards, dtype=torch.float32)
    if ref is not None and algo.kl_in_reward:
        lp, mask = pad_rows([x for g in old for x in g])
        rl_, _ = pad_rows([x for g in refs for x in g])
        reward_t = kl_in_reward(reward_t, lp, rl_, mask, algo.kl_coef, algo.kl_kind)
    adv = group_advantages(reward_t, G, scale_by_std=algo.scale_by_std) if samples else reward_t
    group_std = reward_t.view(-1, G).std(dim=1) if samples else reward_t
    keep_group = (group_std > 0) if algo.drop_zero_variance_groups else torch.ones_like(group_std, dtype=torch.bool)

    # 6. clipped objective + KL, ppo_epochs x mini_batches optimizer steps
    t = time.perf_counter()
    stats_acc: dict[str, list[float]] = {}
    kl_ref = ref is not None and not algo.kl_in_reward
    for _ in range(algo.ppo_epochs):
        # A micro-batch per `micro` question slots, so the optimizer steps on the same
        # boundaries even when a question's video failed to load (its slot is empty).
        for u0 in range(0, per_rank, micro):
            idx = range(u0, min(u0 + micro, len(samples)))
            loss = torch.zeros((), requires_grad=True)
            lps, ents = rt.group_logprobs([samples[q] for q in idx], [responses[q] for q in idx], entropy=True,
                                          grad_vision=rt.vision_trains)
            for q, lp_list, ent_list in zip(idx, lps, ents):
                lp, mask = pad_rows(lp_list)
                mask = mask & bool(keep_group[q])
                total, st = grpo_loss(lp, pad_rows(old[q])[0], pad_rows(refs[q])[0] if kl_ref else None,
                                      adv[q * G:(q + 1) * G], mask, algo.clip_low, algo.clip_high, algo.dual_clip,
                                      algo.loss_agg, algo.kl_coef, algo.kl_kind)
                st["entropy"] = float(masked_mean(pad_rows(ent_list)[0].detach(), mask))
                st["loss"] = float(total.detach())
                for k, v in st.items():
                    stats_acc.setdefault(k, []).append(float(v))
                loss = loss + total / len(idx)
            engine.backward(loss)
            if engine.step():
                rt.optimizer_stepped()
    timers["update"] = time.perf_counter() - t

    # 7. metrics and samples
    n = max(len(rewards), 1)
    out = {f"reward/{k}": sum(p[k] for p in parts) / n for k in ("total", "format", "accuracy")}
    per_cat = {c: [0.0, 0.0] for c in CATEGORIES}  # accuracy sum, count (summed over ranks below)
    for qi, s in enumerate(samples):
        cat = s.record.get("category", s.record.get("problem_type"))
        if cat in per_cat:
            per_cat[cat][0] += sum(p["accuracy"] for p in parts[qi * G:(qi + 1) * G])
            per_cat[cat][1] += G
    lengths = [len(r) for g in responses for r in g]
    out.update({
        "advantage/mean": float(adv.mean()) if len(adv) else 0.0,
        "advantage/abs_mean": float(adv.abs().mean()) if len(adv) else 0.0,
        "zero_variance_groups": float((group_std == 0).float().mean()) if len(group_std) else 0.0,
        "response_length": sum(lengths) / max(len(lengths), 1),
        **{k: sum(v) / len(v) for k, v in stats_acc.items()},
        "lr": engine.lr, "grad_norm": engine.last_grad_norm,
        **{f"time/{k}": v for k, v in timers.items()},
    })
    out = dp_mean(out, grid)
    sums = dp_mean({f"{c}/{i}": v[i] for c, v in per_cat.items() for i in (0, 1)}, grid)
    out.update({f"accuracy/{c}": sums[f"{c}/0"] / sums[f"{c}/1"] for c in CATEGORIES if sums[f"{c}/1"] > 0})
    out.update(rt.counters())
    if torch.cuda.is_available():
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    for qi, (s, g) in enumerate(zip(samples, groups)):
        for j, r in enumerate(g):
            p = parts[qi * G + j]
            run.sample({"step": step + 1, "problem_id": s.key, "rollout": j, "response": r.text,
                        "reward": p["total"], "format": p["format"], "accuracy": p["accuracy"],
                        "advantage": float(adv[qi * G + j])})
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}
