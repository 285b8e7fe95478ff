"""On CUDA: MR-SP's log-probs from the cached video embedding equal transformers' pixel path,
through the log-prob code alone and through the runtime as the stages drive it."""

import pytest
import torch

from tests.gpu.common import (BF16_LOGP_ATOL, FP32_LOGP_ATOL, embedding_vs_pixel, exact_fp32, grpo_loss_on,
                              logp_atol, needs_cuda, runtime_vs_pixel)

pytestmark = needs_cuda
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_cached_embedding_logprobs_equal_pixel_path(family, dtype):
    """fp32 within 1e-5, bf16 within 1e-2 (tests/gpu/common.py says why); a wrong video's
    embedding must land at least 3x the bound away, or the check proves nothing."""
    with exact_fp32():
        r = embedding_vs_pixel(family, "cuda", dtype)
    tol = logp_atol(dtype)
    assert r["tokens"] > 5 and r["ref_mean"] < -1, r
    assert r["err"] <= tol, r
    assert r["control"] > 3 * BF16_LOGP_ATOL, r


@pytest.mark.parametrize("dtype", DTYPES)
def test_runtime_logprobs_from_cache_equal_pixel_path(dtype):
    """The runtime (mode `mrsp`, one process, pixels prepared on CPU as `prepare_video` gives
    them) encodes the video once for two log-prob calls and matches the pixel path."""
    with exact_fp32():
        r = runtime_vs_pixel("qwen2.5-vl", "cuda", dtype)
    assert (r["vision_encodes"], r["hits"]) == (1, 1), r
    assert r["lengths"] == [10, 7], r
    assert r["err"] <= logp_atol(dtype), r
    assert r["repeat"] <= FP32_LOGP_ATOL, r  # the cached embedding gives the same numbers twice
    assert r["control"] > 3 * BF16_LOGP_ATOL, r


def test_grpo_loss_on_cuda_rows_equals_cpu():
    """`pad_rows` + `grpo_loss` as stages/rl.py calls them, log-probs on the GPU and rewards
    made on CPU: the loss and its gradient equal the all-CPU computation (float64, 1e-9)."""
    cpu = grpo_loss_on("cpu")
    cuda = grpo_loss_on("cuda")
    assert abs(cpu[0]) > 1e-4 and abs(cpu[1]) > 1e-3  # not a vacuous zero
    assert cuda == pytest.approx(cpu, abs=1e-9)
