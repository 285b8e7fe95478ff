"""On CUDA: the hf rollout engine's greedy rollouts equal transformers' `generate` (fp32)."""

import pytest

from tests.gpu.common import FP32_LOGP_ATOL, exact_fp32, greedy_vs_generate, needs_cuda

pytestmark = needs_cuda


@pytest.mark.parametrize("family,n", [("qwen2.5-vl", 2), ("qwen3-vl", 1)])
def test_greedy_engine_equals_generate(family, n):
    """Cached embedding, one prefill, n rows decoded together against `generate` on the
    pixels: the same 20 tokens in every row; the engine's log-probs equal a teacher-forced
    pixel-path forward within 1e-5."""
    with exact_fp32():
        r = greedy_vs_generate(family, n, "cuda")
    assert len(r["ours"]) == n
    assert all(row == r["ref"] for row in r["ours"]), r
    assert r["finished"] == [r["ref_finished"]] * n, r
    assert r["distinct"] > 3, r  # not a degenerate repeat any decoder would match
    assert r["logp_err"] <= FP32_LOGP_ATOL, r
