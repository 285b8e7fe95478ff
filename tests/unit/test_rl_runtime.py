"""The RL side of the runtime: the reference model's video embedding when the policy's vision
tower trains, and the held-out accuracy logged during RL."""

import torch

from stages.models.adapter import VLAdapter, load_adapter, load_model
from stages.models.patchify import patchify
from stages.models.tiny import resolve_tiny
from stages.mrsp.runtime import Runtime, VideoInput
from tests.helpers import make_runtime


def _sample(rt: Runtime):
    f = rt.adapter.patch_spec.factor
    frames = torch.randint(0, 256, (6, 3, 2 * f, 2 * f), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    px, grid = patchify(frames, rt.adapter.patch_spec)
    video = VideoInput("v0", px, grid, [i * 0.5 for i in range(6)], rt.adapter.second_per_grid(2.0))
    return rt.sample_of({"problem_id": "q0", "problem": "Which colour comes first?\nA. red\nB. blue"}, video, "q0")


def test_reference_encodes_with_its_own_tower_when_the_policy_vision_trains():
    policy = load_adapter("tiny:qwen2.5-vl")
    ref = VLAdapter(load_model(str(resolve_tiny("tiny:qwen2.5-vl"))).eval(), policy.tokenizer, policy.patch_spec)
    with torch.no_grad():  # the policy's tower has trained away from the reference's
        for p in policy.model.model.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    responses = [[[40, 41, 42, 300], [300, 301]]]

    alone = make_runtime(ref)  # the reference on its own: its tower, its embedding
    want, _ = alone.group_logprobs([_sample(alone)], responses)

    rt = make_runtime(policy)
    rt.vision_trains = True
    sample = _sample(rt)
    with torch.no_grad():
        rt.embed(sample)  # the step's policy embedding, cached
    rt.reset_counters()
    got, _ = rt.group_logprobs([sample], responses, model=ref)
    assert rt.counters()["vision_encodes"] == 1  # the reference's own encode, not the policy's cache
    assert all(torch.equal(x, y) for x, y in zip(got[0], want[0]))
    again, _ = rt.group_logprobs([sample], responses, model=ref)
    assert rt.counters()["vision_encodes"] == 1 and rt.counters()["embedding_cache_hits"] == 1

    rt.vision_trains = False  # control: with a frozen tower the reference shares the policy's embedding
    shared, _ = rt.group_logprobs([sample], responses, model=ref)
    assert max((x - y).abs().max().item() for x, y in zip(shared[0], want[0])) > 1e-4


def test_rl_held_out_accuracy_scores_greedy_replies_per_category():
    """`[eval]` during RL: one greedy reply per held-out question, scored by the accuracy
    reward; unreadable items are noted as skipped and left out of the counts."""
    from types import SimpleNamespace

    from stages.data.video import VideoDecodeError
    from stages.mrsp.dist import Grid
    from stages.mrsp.rollout import Rollout
    from stages.rl import held_out_accuracy

    replies = ["<think>x</think><answer>B</answer>", "<think>x</think><answer>A</answer>",
               "The answer is C.", "<think>x</think><answer>D</answer>"]
    options = ["red", "blue", "green", "black"]
    records = [{"problem_id": "t1", "category": "temporal", "answer": "B", "options": options, "reply": 0},
               {"problem_id": "t2", "category": "temporal", "answer": "B", "options": options, "reply": 1},
               {"problem_id": "g1", "category": "goal", "answer": "C", "options": options, "reply": 2},
               {"problem_id": "bad", "category": "goal", "answer": "D", "options": options, "reply": 3}]

    class Replay:  # the runtime's three calls, replaying fixed replies
        def sample(self, rec, video_dir):
            if rec["problem_id"] == "bad":
                raise VideoDecodeError("bad.mp4", "not a video")
            return rec

        def generate(self, samples, n, sampling):
            assert n == 1 and sampling.greedy and len(samples) == 1
            return [[Rollout(samples[0]["problem_id"], [samples[0]["reply"]], [0.0], True, "")]]

        def response_text(self, ids):
            return replies[ids[0]]

    recipe = SimpleNamespace(eval=SimpleNamespace(input="held/eval.jsonl"), rollout=SimpleNamespace(max_new_tokens=8))
    noted = {}
    skipped = SimpleNamespace(skip=lambda key, why: noted.setdefault(key, why))
    got = held_out_accuracy(Replay(), records, recipe, Grid(), skipped)
    assert got == {"eval_accuracy": round(2 / 3, 6), "eval_accuracy/temporal": 0.5, "eval_accuracy/goal": 1.0}
    assert list(noted) == ["eval:bad"] and "not a video" in noted["eval:bad"]
    # no item scored: no accuracy at all (never 0.0)
    assert held_out_accuracy(Replay(), records[3:], recipe, Grid(), skipped) == {}
