"""The RL side of the runtime: the reference model's video embedding when the policy's vision
tower trains, and the held-out accuracy logged during RL."""

import pytest
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


def test_pixels_are_released_only_where_the_cached_embedding_serves_the_step():
    """MR-SP with a frozen tower: after the step's encode, log-probs come from the cache with the
    frames gone, equal to those computed with them; vanilla and a trained tower keep the frames;
    an encode that would need released frames fails with the video's name."""
    from stages.mrsp.runtime import Mode

    adapter = load_adapter("tiny:qwen2.5-vl")
    responses = [[[40, 41, 42, 300], [300, 301]]]
    rt = make_runtime(adapter)
    sample = _sample(rt)
    want, _ = rt.group_logprobs([sample], responses)
    assert rt.release_pixels(sample) and sample.video.pixels is None
    got, _ = rt.group_logprobs([sample], responses)  # the step's cached embedding
    assert all(torch.equal(x, y) for x, y in zip(got[0], want[0]))
    rt.new_step()  # the embedding is gone too: nothing to encode from
    with pytest.raises(RuntimeError, match="v0: its pixels were released"):
        rt.group_logprobs([sample], responses)

    for keep in (make_runtime(adapter, mode=Mode.named("vanilla")), make_runtime(adapter)):
        keep.vision_trains = keep.mode.reuse_embeddings  # the second: MR-SP with a trained tower
        s = _sample(keep)
        assert not keep.release_pixels(s) and s.video.pixels is not None


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

    class Replay:  # the runtime's four calls, replaying fixed replies
        cleared = 0  # cached embeddings dropped (new_step): one per scored item, none kept over the set

        def new_step(self):
            self.cleared += 1

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
    rt = Replay()
    got = held_out_accuracy(rt, records, recipe, Grid(), skipped)
    assert got == {"eval_accuracy": round(2 / 3, 6), "eval_accuracy/temporal": 0.5, "eval_accuracy/goal": 1.0}
    assert rt.cleared == 3
    assert list(noted) == ["eval:bad"] and "not a video" in noted["eval:bad"]
    # no item scored: no accuracy at all (never 0.0)
    assert held_out_accuracy(Replay(), records[3:], recipe, Grid(), skipped) == {}


def test_rl_step_metrics_are_means_over_rollouts_and_sums_of_loss_shares():
    """Rewards, lengths and advantages are means over the step's rollouts; entropy a mean over
    micro-batches; loss and KL the micro-batches' shares added up per optimizer update."""
    from types import SimpleNamespace

    import torch

    from stages.mrsp.dist import Grid
    from stages.rl import StepBatch, step_metrics

    samples = [SimpleNamespace(record={"category": "temporal"}), SimpleNamespace(record={"category": "goal"})]
    b = StepBatch(samples, responses=[[[1, 2], [3]], [[4], [5, 6, 7]]],
                  rewards=[{"total": t, "format": 1.0, "accuracy": a}
                           for t, a in ((1.5, 1), (0.5, 0), (1.5, 1), (1.5, 1))],
                  advantages=torch.tensor([1.0, -1.0, 0.0, 0.0]), group_std=torch.tensor([0.7, 0.0]),
                  stats={"loss": [0.5, 0.25], "kl": [0.1, 0.1], "entropy": [2.0, 4.0]})
    t = SimpleNamespace(grid=Grid(), algo=SimpleNamespace(ppo_epochs=2, mini_batches=1), reuse_old=False,
                        engine=SimpleNamespace(lr=0.1, last_grad_norm=1.0), rt=SimpleNamespace(counters=dict))
    m = step_metrics(b, t, 2)
    assert m["reward/total"] == 1.25 and m["reward/accuracy"] == 0.75 and m["response_length"] == 1.75
    assert m["advantage/mean"] == 0.0 and m["advantage/abs_mean"] == 0.5 and m["zero_variance_groups"] == 0.5
    assert m["entropy"] == 3.0 and m["loss"] == 0.375 and m["kl"] == 0.1
    assert m["accuracy/temporal"] == 0.5 and m["accuracy/goal"] == 1.0 and m["lr"] == 0.1
