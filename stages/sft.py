"""`lvr sft`: long chain-of-thought supervised fine-tuning (paper Sec. 4, stage 1).

Each record becomes the model's chat: the video and the question with its options as the
user turn, `<think>{reasoning}</think><answer>{answer}</answer>` as the assistant turn;
the loss is the mean negative log-likelihood of the assistant tokens only (token-mean
over the micro-batch). Videos go through the MR-SP runtime: frames encoded sharded over
the SP group, the sequence split over it for the forward and backward.

When no rank can read any record of a step, the step is skipped with a message, and no
optimizer step runs (AdamW would move the weights on a zero gradient: its moments and weight
decay). To know that before the first forward without holding a step's videos at once, each
rank decodes its records in order until one is readable, and decodes the rest with their
micro-batch (`StepReader`); the embedding cache keeps a micro-batch's worth.

Where it departs from the paper: the paper fine-tunes the vision tower too; here it is
frozen by default (`model.freeze_vision`), as in its RL stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from stages.data.records import answer_target, read_records
from stages.mrsp.checkpoint import resume, save_checkpoint, save_final
from stages.mrsp.data_order import step_records
from stages.mrsp.dist import all_reduce_sum, dp_mean
from stages.mrsp.runtime import Runtime, Sample
from stages.setup import UNREADABLE, InputError, open_grid, processor_source, read_samples, setup
from stages.skipped import SkippedInputs


def target_text(record: dict) -> str:
    return answer_target(record.get("reasoning", ""), record["answer"])


def nll(rt: Runtime, samples: list[Sample], grad_vision: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of assistant-token negative log-likelihoods over `samples`, and the token count.
    `grad_vision`: encode the videos with gradients (a trainable vision tower)."""
    total, count = torch.zeros(()), 0
    for s in samples:
        target = rt.target_ids(target_text(s.record))
        logp = rt.logprobs(s, [target], grad_vision=grad_vision)[0][0]
        total = total + (-logp).sum()
        count += logp.shape[0]
    return total, count


class StepReader:
    """This rank's records of one step (`idx`), decoded a micro-batch at a time.

    Whether any rank can read any record of the step must be known before its first forward.
    Decoding them all up front would hold the step's videos at once (global_batch / dp of them
    per rank; one 512-frame video of 100,352 pixels a frame is 0.6 GB of fp32 pixels), so the
    records are tried in order until one is readable (`first`, kept), and the rest are decoded
    with their micro-batch: each record is decoded once, and the micro-batch that holds `first`
    is the first with any sample, so at most one micro-batch of videos is held."""

    def __init__(self, rt: Runtime, records: list[dict], idx: list[int], micro: int, video_dir: str,
                 skipped: SkippedInputs):
        self.rt, self.records, self.idx, self.micro, self.video_dir, self.skipped = (
            rt, records, idx, micro, video_dir, skipped)
        self.first, self.sample = len(idx), None
        for pos, i in enumerate(idx):
            got = read_samples(rt, records, [i], video_dir, skipped)
            if got:
                self.first, self.sample = pos, got[0]
                break

    @property
    def readable(self) -> bool:
        """Whether this rank can read any record of the step."""
        return self.sample is not None

    def batches(self) -> Iterator[list[Sample]]:
        """The micro-batches in order, each the readable samples of its `micro` records."""
        for u in range(0, len(self.idx), self.micro):
            head = [self.sample] if u <= self.first < u + self.micro else []
            if head:
                self.sample = None  # its micro-batch holds it now
            yield head + read_samples(self.rt, self.records, self.idx[max(u, self.first + 1):u + self.micro],
                                      self.video_dir, self.skipped)


def run(recipe, run) -> dict:
    grid = open_grid(recipe)
    per_rank = recipe.train.global_batch // grid.dp_size
    micro = recipe.train.micro_batch_per_rank
    built = setup(recipe, grid, train=(recipe.train.steps, per_rank // micro))
    adapter, rt, engine = built.adapter, built.rt, built.engine
    rt.cache.capacity = micro  # a video serves one forward per step: keep a micro-batch's embeddings, not a step's

    skipped = SkippedInputs(run, grid)
    records = read_records(recipe.data.input,
                           on_error=lambda line, why: skipped.skip(f"{recipe.data.input}:{line}", why))
    records = records[:recipe.data.limit] if recipe.data.limit else records
    if not records:
        raise InputError(f"data.input: {recipe.data.input} holds no readable records")
    video_dir = recipe.data.video_dir or str(Path(recipe.data.input).parent)
    held_out = []
    if recipe.eval.input:
        held_out = read_records(recipe.eval.input, on_error=lambda line, why: skipped.skip(
            f"{recipe.eval.input}:{line}", why))[:recipe.eval.limit or None]
    skipped.flush()
    start = resume(engine, run.path, [run.file("metrics.jsonl"), run.file("samples.jsonl")])
    adapter.model.train()
    history = []
    with run.progress("sft steps", recipe.train.steps) as bar:
        bar.advance(start)
        for step in range(start, recipe.train.steps):
            t = time.perf_counter()
            rt.new_step()
            rt.reset_counters()
            idx = step_records(len(records), step, recipe.train.global_batch, recipe.seed, grid.dp_rank, grid.dp_size)
            reader = StepReader(rt, records, idx, micro, video_dir, skipped)
            losses, tokens = [], 0
            update = not skipped.none_read(int(reader.readable), step, "record")  # else no forward, no update
            for samples in reader.batches() if update else []:
                # fewer forwards than other ranks (failed videos): one-token ones keep the collectives in step
                padding = engine.padding_loss(rt.lm_forwards([[None]] * len(samples)))
                if samples:
                    total, count = nll(rt, samples, grad_vision=rt.vision_trains)
                    loss = total / max(count, 1)
                    losses.append(float(loss.detach()))
                else:  # nothing readable: the padding forwards stand in
                    loss, count = torch.zeros(()), 0
                engine.backward(loss if padding is None else loss + padding)
                if engine.step():
                    rt.optimizer_stepped()
                tokens += count
            # the loss: a mean over the micro-batches that had inputs, on every rank
            loss_sum, loss_count = all_reduce_sum([sum(losses), len(losses)], grid)
            metrics = {"loss": loss_sum / loss_count} if loss_count else {}  # absent when nothing was read
            metrics |= dp_mean({"target_tokens": float(tokens), "lr": engine.lr, "time/step": time.perf_counter() - t}
                               | ({"grad_norm": engine.last_grad_norm} if update else {}), grid)
            metrics.update(rt.counters())
            if held_out and ((step + 1) % recipe.eval.every_steps == 0 or step + 1 == recipe.train.steps):
                with engine.gathered():
                    eval_loss = held_out_loss(rt, held_out, recipe, grid, skipped)
                if eval_loss is not None:  # absent, never 0.0, when no held-out item could be scored
                    metrics["eval_loss"] = eval_loss
            skipped.flush()
            metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
            history.append(metrics)
            run.metric(step + 1, **metrics)
            save_checkpoint(engine, adapter.tokenizer, run.path, step + 1, every_steps=recipe.checkpoint.every_steps,
                            last_step=recipe.train.steps, keep_last=recipe.checkpoint.keep_last,
                            processor_source=processor_source(recipe))
            bar.advance()
    final = save_final(adapter.model, adapter.tokenizer, run.path, grid, processor_source(recipe))
    if grid.is_main:
        from stages.plots import CURVES, plot_metrics

        name, keys, title = CURVES["sft"]
        plot_metrics(run.file("metrics.jsonl"), run.file(name), keys, title)
    losses = [h["loss"] for h in history if "loss" in h]
    return {"steps": recipe.train.steps, "resumed_from": start, "final": str(final),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "eval_loss_last": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
            "gradient_checkpointing": engine.checkpointing, "trainable_params": engine.trainable_params,
            "engine": engine.kind, **engine.state_mib(),
            "failed": skipped.count}


def held_out_loss(rt: Runtime, records: list[dict], recipe, grid, skipped: SkippedInputs) -> float | None:
    """Token-mean NLL of the held-out records' targets (each DP rank takes its share); None
    when no record could be scored. An unreadable record is noted in `skipped`."""
    video_dir = str(Path(recipe.eval.input).parent)
    mine = records[grid.dp_rank::grid.dp_size]
    total, count = 0.0, 0
    rt.adapter.model.eval()
    with torch.no_grad():
        for i, rec in enumerate(mine):
            try:
                t, c = nll(rt, [rt.sample(rec, video_dir)])
            except UNREADABLE as e:
                skipped.skip(f"eval:{rec.get('problem_id', grid.dp_rank + i * grid.dp_size)}",
                             f"{type(e).__name__}: {e}")
                continue
            total, count = total + float(t), count + c
    rt.adapter.model.train()
    total, count = all_reduce_sum([total, float(count)], grid)
    return total / count if count else None
