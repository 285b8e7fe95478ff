"""FLOP counting for the bench's MFU: the config formula, and torch's own count of the same forwards."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.flops import ModelShape, bench_step_flops, causal_keys


@pytest.fixture(scope="module")
def bench_model():
    from stages.models.adapter import load_adapter

    return load_adapter("tiny:qwen2.5-vl-bench")


def test_matmul_weights_equal_the_config_formula(bench_model):
    s = ModelShape.of(bench_model)
    t = bench_model.model.config.get_text_config()
    H, I, L, heads, kv = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, \
        t.num_key_value_heads
    d = H // heads
    assert s.lm_matmul == L * (2 * H * heads * d + 2 * H * kv * d + 3 * H * I) == 3_801_088
    assert (s.layers, s.attn_width, s.head) == (4, 256, 256 * 1028)
    # patch embedding 96 x (3 x 2 x 14 x 14) + 4 blocks of qkv, proj and a gated MLP; the merger
    assert s.vision_matmul == 96 * 1176 + 4 * (96 * 288 + 96 * 96 + 3 * 96 * 192) == 481_536
    assert s.vision_merger == 384 * 384 + 384 * 256 and s.merge == 4


def test_causal_keys_and_the_shared_prompt_saving():
    assert causal_keys(0, 3) == 1 + 2 + 3 and causal_keys(5, 2) == 6 + 7
    s = ModelShape(lm_matmul=1000, layers=2, attn_width=8, head=50, vision_matmul=10, vision_merger=4, vision_depth=1,
                   vision_width=3, merge=4)
    kw = dict(prompt=100, response=7, G=4, questions=3, grid_thw=[2, 4, 4], encodes_per_video=1.0,
              prefills_per_question=1)
    two = bench_step_flops(s, shared_prompt=False, old_pass=True, **kw)
    shared = bench_step_flops(s, shared_prompt=True, old_pass=False, **kw)
    assert shared["old"] == 0 and two["old"] == two["ref"] and two["update"] == 3 * two["ref"]
    # a group's responses attend to the same keys either way: sharing saves the G - 1 repeated prompts
    assert two["ref"] - shared["ref"] == 3 * (4 - 1) * s.lm(100, causal_keys(0, 100), 0)
    assert two["rollout"] == shared["rollout"] and two["vision"] == shared["vision"]
    alone = bench_step_flops(s, shared_prompt=False, old_pass=True, **{**kw, "prefills_per_question": 4})
    assert alone["rollout"] - two["rollout"] == 3 * 3 * s.lm(100, causal_keys(0, 100), 1)


def test_counts_equal_torch_flop_counter():
    """torch counts the matmuls of eager attention, unmasked (full, not causal): our formula with
    every key attended gives the same total for a language-model forward and a vision encode,
    within 1 %."""
    from stages.models.adapter import load_adapter

    a = load_adapter("tiny:qwen2.5-vl-bench", attn_implementation="eager")
    s = ModelShape.of(a)
    L = 300
    ids = torch.randint(10, 900, (1, L))
    pos = torch.arange(L).expand(3, 1, L)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        a.hidden_states(ids, pos)
    assert fc.get_total_flops() == pytest.approx(s.lm(L, L * L, 0), rel=0.01)

    from stages.models.patchify import patchify

    frames = torch.randint(0, 256, (8, 3, 56, 56), dtype=torch.uint8)
    pixels, grid = patchify(frames, a.patch_spec)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        a.encode_video(pixels, grid)
    assert fc.get_total_flops() == pytest.approx(s.vision(grid), rel=0.01)
