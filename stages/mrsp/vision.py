"""Sharded vision encoding: each rank of an SP group encodes a slice of a video's frames.

The Qwen vision towers attend only within one temporal patch (two frames), so a video cut
on temporal-patch boundaries and encoded slice by slice gives the embedding of the whole
video: the same arithmetic on every patch, up to the GEMM kernel a slice's shape selects (on
CPU, a slice of fewer than ~16 patches takes another sgemm path for the patch embedding,
1e-7 apart; larger slices matched bitwise on the one machine measured). Slices may be uneven (30 frames = 15 temporal patches over 4 ranks is
4, 4, 4, 3); a variable-size all-gather rebuilds the full embedding, and Qwen3-VL's
deepstack levels, on every rank of the group.
"""

from __future__ import annotations

import torch

from stages.models.adapter import VideoEmbedding, VLAdapter
from stages.mrsp.dist import Grid, all_gather_rows, even_splits


def temporal_slices(grid_t: int, sp_size: int) -> list[tuple[int, int]]:
    """`[t0, t1)` temporal-patch ranges of each SP rank, in rank order."""
    sizes = even_splits(grid_t, sp_size)
    starts = [sum(sizes[:r]) for r in range(sp_size)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def encode_sharded(adapter: VLAdapter, pixels: torch.Tensor, grid_thw: torch.Tensor, grid: Grid) -> VideoEmbedding:
    """Return the full embedding of one video, each rank having encoded only its slice."""
    if grid.sp_group is None:
        return adapter.encode_video(pixels, grid_thw)
    t, h, w = (int(v) for v in grid_thw.reshape(-1))
    rows_per_t = h * w
    tokens_per_t = rows_per_t // adapter.merge_size ** 2
    slices = temporal_slices(t, grid.sp_size)
    t0, t1 = slices[grid.sp_rank]
    if t1 > t0:
        local = adapter.encode_video(pixels[t0 * rows_per_t:t1 * rows_per_t],
                                     torch.tensor([[t1 - t0, h, w]], device=grid_thw.device))
    else:  # more ranks than temporal patches: this rank contributes nothing
        local = _empty_embedding(adapter, pixels)
    sizes = [(b - a) * tokens_per_t for a, b in slices]
    embeds = all_gather_rows(local.embeds, grid.sp_group, sizes)
    deep = [all_gather_rows(d, grid.sp_group, sizes) for d in local.deepstack]
    return VideoEmbedding(embeds, grid_thw, deep)


def _empty_embedding(adapter: VLAdapter, like: torch.Tensor) -> VideoEmbedding:
    hidden = adapter.text_config.hidden_size
    levels = len(getattr(adapter.model.config.vision_config, "deepstack_visual_indexes", []) or [])
    dtype = next(adapter.vision_tower.parameters()).dtype
    empty = torch.zeros(0, hidden, dtype=dtype, device=like.device)
    return VideoEmbedding(empty, torch.zeros(1, 3, dtype=torch.long), [empty.clone() for _ in range(levels)])
