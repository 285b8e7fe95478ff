"""The reference model's video embedding when the policy's vision tower trains."""

import torch

from stages.models.adapter import VLAdapter, load_adapter, load_model
from stages.models.patchify import patchify
from stages.models.tiny import resolve_tiny
from stages.mrsp.runtime import Runtime, VideoInput


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

    alone = Runtime(ref)  # the reference on its own: its tower, its embedding
    want, _ = alone.group_logprobs([_sample(alone)], responses)

    rt = Runtime(policy)
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
