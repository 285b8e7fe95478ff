"""Model FLOPs of a GRPO step's phases, and the machine's matmul peak, for `bench-mrsp`'s MFU.

How FLOPs are counted (multiply-add = 2 FLOPs; a backward pass = 2 x its forward, so an
update's forward + backward = 3 x the forward):

- Language model, per token it runs: 2 x W_lm, W_lm = the matmul weights of the decoder
  layers (q, k, v, o projections and the MLP; from the config: layers x (2 H (heads x
  head_dim) + 2 H (kv heads x head_dim) + 3 H I) for Qwen2/2.5-VL); attention 4 x layers x
  (heads x head_dim) x the keys the token attends to (QK^T and AV). Attention is causal, so
  the token at position i of a sequence attends to i + 1 keys; a decoded token to the prompt
  and the tokens before it; a shared-prompt response token (Prefix Grouper) to its prompt and
  its own earlier tokens. The LM head 2 x H x vocab per token whose logits are computed: the
  last prompt token and every decoded token in rollouts, the scored response tokens in
  training forwards.
- Vision tower, per encode of a video of N = t x h x w patches: 2 x (patch embedding + block
  matmul weights) x N + 2 x merger weights x N / merge^2 + attention 4 x depth x width x N x
  (h x w): a patch attends within its temporal patch; window-attention layers are counted as
  full ones (exact when a frame fits in one window, as the bench's 56 x 56 frames do).
- Not counted: norms, activations, softmax, rotary, embedding lookups, collectives, the
  padding SP adds. These are the FLOPs of the work a mode does: a mode that re-encodes a
  video or re-runs a prompt per rollout does more of them for the same step, so modes compare
  by seconds per step, and each mode to the machine by its MFU.

Matmul weights are read off the model's `Linear`/`Conv3d` modules (equal to the config
formula above, checked in tests for the tiny Qwen2.5-VL), attention widths from its config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """What FLOP counting needs of a model (see the module docstring)."""

    lm_matmul: int  # matmul weights of the decoder layers
    layers: int
    attn_width: int  # heads x head_dim
    head: int  # hidden x vocab (the LM head)
    vision_matmul: int  # patch embedding + blocks
    vision_merger: int  # the patch merger, run on N / merge^2 tokens
    vision_depth: int
    vision_width: int
    merge: int  # spatial_merge_size^2

    @classmethod
    def of(cls, adapter) -> "ModelShape":
        bb = adapter.backbone
        text, vision = adapter.model.config.get_text_config(), adapter.model.config.vision_config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        visual = bb.visual
        return cls(lm_matmul=_matmul_weights(bb.language_model.layers), layers=text.num_hidden_layers,
                   attn_width=heads * head_dim, head=adapter.lm_head.weight.numel(),
                   vision_matmul=_matmul_weights(visual.patch_embed) + _matmul_weights(visual.blocks),
                   vision_merger=_matmul_weights(visual.merger), vision_depth=len(visual.blocks),
                   vision_width=getattr(vision, "hidden_size", None) or vision.embed_dim,
                   merge=vision.spatial_merge_size ** 2)

    def lm(self, tokens: int, keys: int, logits: int) -> float:
        """Forward FLOPs of `tokens` through the language model attending to `keys` keys in all
        (summed over the tokens), with `logits` of them through the LM head."""
        return 2.0 * self.lm_matmul * tokens + 4.0 * self.layers * self.attn_width * keys + 2.0 * self.head * logits

    def vision(self, grid_thw) -> float:
        """Forward FLOPs of one encode of a video of `grid_thw` = (t, h, w) patches."""
        t, h, w = (int(x) for x in torch.as_tensor(grid_thw).reshape(-1)[:3])
        n = t * h * w
        return (2.0 * self.vision_matmul * n + 2.0 * self.vision_merger * n / self.merge
                + 4.0 * self.vision_depth * self.vision_width * n * h * w)


def _matmul_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))


def causal_keys(start: int, length: int) -> int:
    """Keys attended in all by `length` tokens that follow `start` earlier ones (causal)."""
    return length * start + length * (length + 1) // 2


def bench_step_flops(shape: ModelShape, *, prompt: int, response: int, G: int, questions: int, grid_thw,
                     encodes_per_video: float, prefills_per_question: int, shared_prompt: bool,
                     old_pass: bool) -> dict[str, float]:
    """FLOPs of each phase of one bench step over all processes: `questions` questions of
    `prompt` tokens, G rollouts of `response` tokens each (fixed length), `encodes_per_video`
    vision encodes per question, `prefills_per_question` rollout prefills (1, or G when every
    rollout prefills alone), training forwards shared over a group's prompt or per sequence,
    with or without a separate old-policy forward."""
    P, T = prompt, response
    prefill = shape.lm(P, causal_keys(0, P), 1)
    decode = shape.lm(G * (T - 1), G * causal_keys(P, T - 1), G * (T - 1))  # the 1st token is the prefill's
    if shared_prompt:
        forward = shape.lm(P, causal_keys(0, P), 0) + G * shape.lm(T, causal_keys(P, T), T)
    else:
        forward = G * shape.lm(P + T, causal_keys(0, P + T), T)
    return {"vision": questions * encodes_per_video * shape.vision(grid_thw),
            "rollout": questions * (prefills_per_question * prefill + decode),
            "old": questions * forward if old_pass else 0.0,
            "ref": questions * forward,
            "update": questions * 3 * forward}


def gemm_peak(grid, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> dict:
    """The machine's matmul rate in FLOP/s: `size` x `size` x `size` `torch.mm` in `dtype`, the
    best of `repeats` after a warm-up, timed on rank 0 alone (`per_process`) and on every rank
    at once (`all_processes`, the ranks' rates added up)."""
    from stages.mrsp.dist import all_reduce_sum, barrier

    device = grid.device
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def rate() -> float:
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * size ** 3 / best

    barrier(grid)
    alone = rate() if grid.rank == 0 else 0.0
    barrier(grid)
    together = rate()
    alone = all_reduce_sum([alone], grid)[0]
    together = all_reduce_sum([together], grid)[0]
    return {"per_process": alone, "all_processes": together, "dtype": str(dtype).replace("torch.", ""),
            "gemm": f"{size}x{size}x{size}", "processes": grid.world_size}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
