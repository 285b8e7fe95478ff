"""Positions before sharding: multimodal RoPE positions are computed on the whole
sequence with the model's own function (`VLAdapter.positions`), then padded and sliced
with the tokens, so every rank sees exactly the positions the unsharded model would."""

from __future__ import annotations

import torch


def padded_length(length: int, sp_size: int) -> int:
    return -(-length // sp_size) * sp_size


def pad_sequence_dim(x: torch.Tensor, length: int, value: int = 0, dim: int = -1) -> torch.Tensor:
    """Right-pad `x` along `dim` to `length` with `value` (positions continue past the end
    when padding position ids: pass `value=None`)."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    if value is None:  # position ids: keep counting from the last one
        last = x.narrow(dim, x.shape[dim] - 1, 1)
        steps = torch.arange(1, missing + 1, device=x.device).view([-1 if d == (dim % x.ndim) else 1
                                                                     for d in range(x.ndim)])
        return torch.cat([x, last + steps], dim=dim)
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def shard_range(length: int, sp_size: int, sp_rank: int) -> tuple[int, int]:
    """`[start, stop)` of this rank's tokens in a sequence padded to a multiple of sp_size."""
    per = length // sp_size
    return sp_rank * per, (sp_rank + 1) * per


def shard(x: torch.Tensor, sp_size: int, sp_rank: int, dim: int = -1) -> torch.Tensor:
    """This rank's contiguous slice of `x` along `dim` (length already a multiple of sp_size)."""
    start, stop = shard_range(x.shape[dim], sp_size, sp_rank)
    return x.narrow(dim, start, stop - start)
