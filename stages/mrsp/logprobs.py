"""Sequence-parallel forward and token log-probs without full-vocabulary logits.

A batch of right-padded sequences is padded to a multiple of the SP size and split by
token position; each rank runs the language model on its slice (Ulysses attention joins
the slices inside every layer), with the positions of the whole sequence and the video
embedding rows that fall in its slice. Log-probs (and entropies) are computed only where
a token is scored, in chunks of `chunk_tokens` rows of the LM head (checkpointed under
autograd, so neither the forward nor the backward holds `[sequence, vocab]` logits), and
the per-rank pieces are summed into one `[B, L]` tensor on every rank.

Gradients: every rank computes the same loss from the combined tensor; each rank's
backward carries the gradient of its own token slice (and, through the all-to-alls, of
the keys and values it owns). Summing parameter gradients over the SP group
(`dist.all_reduce_grads`) gives the gradient of the unsharded forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.models.adapter import VideoEmbedding, VLAdapter
from stages.mrsp.dist import Grid, sum_disjoint
from stages.mrsp.positions import pad_sequence_dim, padded_length, shard_range
from stages.mrsp.ulysses import sp_attention


@dataclass
class TokenBatch:
    """Right-padded sequences: `input_ids [B, L]`, `position_ids [3, B, L]`, per-row video
    embeddings in order of appearance, and `score_mask [B, L]` (True where token t is scored
    by the log-prob of position t-1). `score_source [B, L]`, when given, names the position
    whose hidden state scores token t instead of t-1 (a packed layout where several
    responses continue the same prompt, `stages/mrsp/shared.py`)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    videos: list[list[VideoEmbedding]]
    score_mask: torch.Tensor
    score_source: torch.Tensor | None = None

    @classmethod
    def from_rows(cls, rows: list[tuple[torch.Tensor, torch.Tensor, list[VideoEmbedding], torch.Tensor]],
                  pad_id: int) -> "TokenBatch":
        """rows: `(input_ids [L_i], position_ids [3, L_i], videos, score_mask [L_i])`."""
        L = max(r[0].shape[0] for r in rows)
        ids = torch.stack([pad_sequence_dim(r[0], L, pad_id) for r in rows])
        pos = torch.stack([pad_sequence_dim(r[1], L, None) for r in rows], dim=1)
        mask = torch.stack([pad_sequence_dim(r[3].bool(), L, False) for r in rows])
        return cls(ids, pos, [list(r[2]) for r in rows], mask)


def _rows_for_slice(adapter: VLAdapter, ids: torch.Tensor, videos: list[list[VideoEmbedding]],
                    start: int, stop: int) -> list[VideoEmbedding]:
    """The video embedding rows whose tokens lie in `[start, stop)`, row after row."""
    pieces = []
    is_video = ids == adapter.video_token_id
    for b, row_videos in enumerate(videos):
        if not row_videos:
            continue
        before = int(is_video[b, :start].sum())
        inside = int(is_video[b, start:stop].sum())
        if inside == 0:
            continue
        whole = row_videos[0] if len(row_videos) == 1 else VideoEmbedding(
            torch.cat([v.embeds for v in row_videos]), row_videos[0].grid_thw,
            [torch.cat([v.deepstack[k] for v in row_videos]) for k in range(len(row_videos[0].deepstack))])
        pieces.append(whole.rows(before, before + inside))
    return pieces


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias,
                    want_entropy: bool) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not want_entropy:
        return logp[:, None]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.stack([logp, ent], dim=-1)


def token_logprobs(adapter: VLAdapter, batch: TokenBatch, grid: Grid | None = None, chunk_tokens: int = 1024,
                   entropy: bool = False, attend=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return `(logp [B, L], entropy [B, L] or None)`: at scored positions t, the log-prob of
    `input_ids[:, t]` given the tokens before it (zeros elsewhere). `attend`: the attention
    over the whole sequence for the local heads (`ulysses.sp_attention`), default causal.
    One language-model forward (`VLAdapter.lm`)."""
    return adapter.lm(_token_logprobs, adapter, batch, grid, chunk_tokens, entropy, attend)


def _token_logprobs(adapter: VLAdapter, batch: TokenBatch, grid: Grid | None, chunk_tokens: int,
                    entropy: bool, attend) -> tuple[torch.Tensor, torch.Tensor | None]:
    grid = grid or Grid()
    sp, group = grid.sp_size, grid.sp_group
    dev = adapter.lm_head.weight.device  # rows are built on the CPU
    ids, pos, mask = batch.input_ids.to(dev), batch.position_ids.to(dev), batch.score_mask.to(dev)
    B, L0 = ids.shape
    L = padded_length(L0, sp)
    pad_id = adapter.tokenizer.pad_token_id or 0
    ids = pad_sequence_dim(ids, L, pad_id)
    pos = pad_sequence_dim(pos, L, None)
    mask = pad_sequence_dim(mask, L, False)
    start, stop = shard_range(L, sp, grid.sp_rank)
    pieces = _rows_for_slice(adapter, ids, batch.videos, start, stop)
    with sp_attention(adapter.model, group, attend):
        hidden, _ = adapter.hidden_states(ids[:, start:stop], pos[:, :, start:stop], pieces or None)

    # scored token t is predicted by the hidden state of position source[t] (t - 1 by default);
    # this rank scores the tokens whose source lies in its slice
    if batch.score_source is None:
        source = (torch.arange(L, device=ids.device) - 1).expand(B, L)
    else:
        source = pad_sequence_dim(batch.score_source.to(dev), L, -1)
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    s_idx = source[b_idx, t_idx]
    local = (s_idx >= start) & (s_idx < stop)
    b_idx, t_idx, s_idx = b_idx[local], t_idx[local], s_idx[local]
    targets = ids[b_idx, t_idx]
    h = hidden[b_idx, s_idx - start]
    head = adapter.lm_head
    outs = []
    # At least one (possibly empty) chunk: a rank with no scored token must still be part of
    # the graph, or its backward would skip the all-to-alls the other ranks wait on.
    for c in range(0, max(h.shape[0], 1), chunk_tokens):
        args = (h[c:c + chunk_tokens], targets[c:c + chunk_tokens], head.weight, head.bias, entropy)
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(*args))
    width = 2 if entropy else 1
    vals = torch.cat(outs)
    flat = b_idx * L + t_idx
    dense = vals.new_zeros(B * L, width).index_put((flat,), vals).view(B, L, width)
    if group is not None and torch.is_grad_enabled():
        # A trainable vision tower's embedding was all-gathered over the SP group: a rank whose
        # slice holds none of its rows must still run that gather's backward (a collective),
        # or the ranks that hold them wait forever. A zero-valued term puts it in the graph.
        tied = [t for row in batch.videos for v in row for t in (v.embeds, *v.deepstack) if t.requires_grad]
        if tied:
            dense = dense + sum(t.sum() for t in tied) * 0.0
    dense = sum_disjoint(dense, group)[:, :L0]
    return dense[..., 0], (dense[..., 1] if entropy else None)
