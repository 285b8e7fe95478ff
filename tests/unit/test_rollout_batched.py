"""Rollouts of several prompts decoded as one batch equal those of each prompt decoded alone."""

import pytest
import torch

from stages.mrsp.rollout import HFEngine, Sampling
from tests.unit.test_rollout import get_adapter, make_prompt, teacher_forced_logprobs

QUESTIONS = ("What colour is the ball?", "Which object moves first, and where does it go after the red square stops?",
             "Count the circles.")


@pytest.fixture(scope="module")
def adapters():
    return {}


def _prompts(a):
    """Three prompts of different lengths (questions of different lengths, different videos)."""
    made = [make_prompt(a, key=f"p{k}", question=q, seed=k) for k, q in enumerate(QUESTIONS)]
    assert len({p.input_ids.shape[0] for p, *_ in made}) == 3
    return made


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_greedy_batch_equals_each_prompt_alone_and_teacher_forcing(adapters, family):
    a = get_adapter(adapters, family)
    made = _prompts(a)
    engine = HFEngine(a)
    greedy = Sampling(temperature=0, max_new_tokens=12)
    batch = engine.generate([p for p, *_ in made], 2, greedy)
    assert engine.prefills == 3 and engine.decode_steps == 11  # one prefill per prompt, one batch decoded
    for (p, _, _, sec), rows in zip(made, batch):
        alone = engine.generate([p], 2, greedy)[0]
        for r, ref in zip(rows, alone):
            assert r.prompt_key == p.key and r.token_ids == ref.token_ids
            assert max(abs(x - y) for x, y in zip(r.logprobs, ref.logprobs)) < 1e-5
            # positions continue each row's own prompt: the teacher-forced forward agrees
            tf = teacher_forced_logprobs(a, p, sec, r.token_ids)
            assert (torch.tensor(r.logprobs) - tf).abs().max() < 1e-5


def test_sampled_batch_equals_each_prompt_alone_with_per_prompt_seeds(adapters):
    """Per-prompt samplings: a prompt's generator is seeded from its own seed, so its samples do
    not depend on the other prompts of the call. The batched logits are not bitwise those of the
    prompt alone when padding is involved (log-probs differ by up to ~1e-6 here; bitwise equal for
    prompts of one length), so equal samples hold where no
    draw sits within rounding of a bin edge, which is the case for these seeds."""
    a = get_adapter(adapters, "qwen2.5-vl")
    made = _prompts(a)
    engine = HFEngine(a)
    samplings = [Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=100 + k) for k in range(3)]
    batch = engine.generate([p for p, *_ in made], 4, samplings)
    alone = [engine.generate([p], 4, [s])[0] for (p, *_), s in zip(made, samplings)]
    for rows, refs in zip(batch, alone):
        assert [r.token_ids for r in rows] == [r.token_ids for r in refs]
        assert len({tuple(r.token_ids) for r in rows}) > 1  # the rows of a group differ
        for r, ref in zip(rows, refs):
            assert max(abs(x - y) for x, y in zip(r.logprobs, ref.logprobs)) < 1e-5
    # the same call again gives the same samples (seeded streams)
    again = engine.generate([p for p, *_ in made], 4, samplings)
    assert [[r.token_ids for r in g] for g in again] == [[r.token_ids for r in g] for g in batch]


def test_rows_that_stop_early_leave_the_others_exact(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    made = _prompts(a)
    engine = HFEngine(a)
    free = engine.generate([p for p, *_ in made], 1, Sampling(temperature=0, max_new_tokens=12))
    stop = free[0][0].token_ids[3]  # prompt 0 stops after its 4th token; the others may run on
    cut = Sampling(temperature=0, max_new_tokens=12, stop_token_ids=[stop])
    batch = engine.generate([p for p, *_ in made], 1, cut)
    for (p, *_), (row,) in zip(made, batch):
        (ref,), = engine.generate([p], 1, cut)
        assert row.token_ids == ref.token_ids and row.finished == ref.finished
    assert batch[0][0].token_ids == free[0][0].token_ids[:4] and batch[0][0].finished


def test_samplings_must_agree_except_for_the_seed(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    p, *_ = make_prompt(a)
    with pytest.raises(ValueError, match="differ in more than their seeds"):
        HFEngine(a).generate([p, p], 2, [Sampling(max_new_tokens=3), Sampling(max_new_tokens=4)])
