"""Which records a data-parallel rank trains on at each step: seeded epochs, resumable."""

from __future__ import annotations

import torch


def step_records(n_records: int, step: int, global_batch: int, seed: int, dp_rank: int, dp_size: int) -> list[int]:
    """Indices of the records this data-parallel rank trains on at `step` (0-based).

    Epochs are seeded permutations of the data, so the order depends only on `seed` and
    `step`: a resumed run sees exactly the records an uninterrupted one would.
    """
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    perms: dict[int, torch.Tensor] = {}
    out = []
    for k in range(first, first + per_rank):
        epoch, pos = divmod(k, n_records)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out
