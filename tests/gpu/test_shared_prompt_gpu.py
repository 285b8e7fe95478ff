"""On CUDA: shared-prompt forwards (stages/mrsp/shared.py) against the unshared forward.

Responses attend through `causal_lower_right`, which torch sends to its GPU kernels here
(flash attention in bf16, memory-efficient attention in fp32, forward and backward); the
unshared reference runs transformers' own sdpa attention. Untested on GPU before this."""

import pytest
import torch

from tests.gpu.common import (BF16_LOGP_ATOL, FP32_GRAD_RTOL, FP32_LOGP_ATOL, exact_fp32, needs_cuda,
                              shared_vs_unshared)

pytestmark = needs_cuda
FAMILIES = ["qwen2.5-vl", "qwen2-vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_equals_unshared_fp32(family):
    """Log-probs and entropies within 1e-5; gradients of a loss over both (language model,
    LM head, video embeddings) within 1e-4 relative; plain causal attention over the packed
    row (the bug the layout prevents) must be far off."""
    with exact_fp32():
        r = shared_vs_unshared(family, "cuda", torch.float32, grads=True)
    assert r["shapes_ok"] and r["scored"] == 41, r
    assert r["lp_err"] <= FP32_LOGP_ATOL and r["ent_err"] <= FP32_LOGP_ATOL, r
    assert r["grads_nonzero"] and r["grad_rel"] <= FP32_GRAD_RTOL, r
    assert r["control"] > 100 * FP32_LOGP_ATOL, r


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_equals_unshared_bf16(family):
    """bf16 log-probs within 1e-2 (common.py: about two bf16 roundings of a logit), entropies
    too; the plain-causal control must be at least 3x that away."""
    r = shared_vs_unshared(family, "cuda", torch.bfloat16, grads=False)
    assert r["shapes_ok"] and r["scored"] == 41, r
    assert r["lp_err"] <= BF16_LOGP_ATOL and r["ent_err"] <= BF16_LOGP_ATOL, r
    assert r["control"] > 3 * BF16_LOGP_ATOL, r
