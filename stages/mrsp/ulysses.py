"""Ulysses sequence-parallel attention, plugged into transformers' attention interface.

Each rank of an SP group holds a contiguous slice of the sequence. Inside attention,
an all-to-all turns `[B, heads, L/sp, D]` (sequence-sharded) into `[B, heads/sp, L, D]`
(head-sharded), plain causal attention runs over the whole sequence for the local heads,
and a second all-to-all turns the output back. Both exchanges are autograd functions, so
the backward is exact. Grouped KV heads fewer than (or not divisible by) the SP size are
replicated to one per query head; query head counts not divisible by the SP size are
padded with zero heads whose outputs are dropped (28 heads at SP 8 work).

The function is registered as attention implementation `lvr_ulysses`; `sp_attention()`
switches a model's language model to it for the duration of a forward (vision keeps its
own implementation), so no model code is forked. Padding tokens appended to reach a
multiple of the SP size sit at the end of the sequence: causal attention keeps them out of
every real token's view.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from stages.mrsp.dist import all_to_all

NAME = "lvr_ulysses"
_state = threading.local()


def _group():
    return getattr(_state, "group", None)


def ulysses_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """Attention over the whole sequence for sequence-sharded q/k/v.

    query: `[B, Hq, Ls, D]`, key/value: `[B, Hkv, Ls, D]` (this rank's Ls tokens).
    Returns `(out [B, Ls, Hq, D], None)` like transformers' sdpa function.
    """
    group = _group()
    if group is None:
        raise RuntimeError("lvr_ulysses attention used outside sp_attention()")
    if attention_mask is not None:
        raise ValueError("lvr_ulysses supports causal attention without padding masks only")
    sp = torch.distributed.get_world_size(group)
    B, Hq, Ls, D = query.shape
    Hkv = key.shape[1]
    if Hkv % sp or Hq % sp:
        # replicate KV heads to one per query head, so heads can be padded and split freely
        key = key.repeat_interleave(Hq // Hkv, dim=1)
        value = value.repeat_interleave(Hq // Hkv, dim=1)
        Hkv = Hq
    pad = (-Hq) % sp
    if pad:
        zeros = query.new_zeros(B, pad, Ls, D)
        query, key, value = (torch.cat([t, zeros], dim=1) for t in (query, key, value))
    # sequence-sharded -> head-sharded: scatter heads (dim 1), gather sequence (dim 2)
    q = all_to_all(query, group, scatter_dim=1, gather_dim=2)
    k = all_to_all(key, group, scatter_dim=1, gather_dim=2)
    v = all_to_all(value, group, scatter_dim=1, gather_dim=2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0)
    # head-sharded -> sequence-sharded
    out = all_to_all(out, group, scatter_dim=2, gather_dim=1)
    if pad:
        out = out[:, :Hq]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, ulysses_attention)


@contextlib.contextmanager
def sp_attention(model, group):
    """Run the language model of `model` with Ulysses attention over `group` (no-op if None)."""
    if group is None:
        yield
        return
    register()
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    text_config._attn_implementation = NAME
    _state.group = group
    try:
        yield
    finally:
        text_config._attn_implementation = previous
        _state.group = None
