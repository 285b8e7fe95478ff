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

What runs between the two exchanges is plain causal attention unless `sp_attention` is
given another `attend(q, k, v, scaling, dropout_p)` over the whole sequence for the local
heads: the shared-prompt layout (`stages/mrsp/shared.py`) plugs in there, with or without
an SP group (without one there is no exchange, only `attend`).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from stages.mrsp.dist import all_to_all

NAME = "lvr_ulysses"
_state = threading.local()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                     dropout_p: float) -> torch.Tensor:
    """Plain causal attention over the whole sequence: `[B, H, L, D]` in and out."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout_p)


def ulysses_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """Attention over the whole sequence for sequence-sharded q/k/v.

    query: `[B, Hq, Ls, D]`, key/value: `[B, Hkv, Ls, D]` (this rank's Ls tokens).
    Returns `(out [B, Ls, Hq, D], None)` like transformers' sdpa function.
    """
    if not getattr(_state, "active", False):
        raise RuntimeError("lvr_ulysses attention used outside sp_attention()")
    if attention_mask is not None:
        raise ValueError("lvr_ulysses supports causal attention without padding masks only")
    group, attend = _state.group, _state.attend
    dropout_p = dropout if module.training else 0.0
    if group is None:  # one process: no exchange, only the attention of `attend`
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        return attend(query, key, value, scaling, dropout_p).transpose(1, 2).contiguous(), None
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
    # sequence-sharded -> head-sharded: scatter heads (dim 1), gather sequence (dim 2), q, k
    # and v in one exchange (rank r's part: its query heads, then its key and value heads)
    parts = [t.reshape(B, sp, -1, Ls, D) for t in (query, key, value)]
    qkv = all_to_all(torch.cat(parts, dim=2).flatten(1, 2), group, scatter_dim=1, gather_dim=2)
    q, k, v = qkv.split([t.shape[2] for t in parts], dim=1)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = attend(q, k, v, scaling, dropout_p)
    # head-sharded -> sequence-sharded
    out = all_to_all(out, group, scatter_dim=2, gather_dim=1)
    if pad:
        out = out[:, :Hq]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, ulysses_attention)


@contextlib.contextmanager
def sp_attention(model, group, attend=None):
    """Run the language model of `model` with Ulysses attention over `group`, and `attend`
    (default: `causal_attention`) over the whole sequence in between; a no-op when both are None."""
    if group is None and attend is None:
        yield
        return
    register()
    with _active(model.config.get_text_config(), group, attend or causal_attention):
        yield


@contextlib.contextmanager
def _active(text_config, group, attend):
    """Switch `text_config` to `lvr_ulysses` over `group` with `attend`; restore what was there."""
    before = (text_config._attn_implementation, getattr(_state, "config", None), getattr(_state, "group", None),
              getattr(_state, "attend", None), getattr(_state, "active", False))
    text_config._attn_implementation = NAME
    _state.config, _state.group, _state.attend, _state.active = text_config, group, attend, True
    try:
        yield
    finally:
        text_config._attn_implementation = before[0]
        _state.config, _state.group, _state.attend, _state.active = before[1:]


def checkpoint_contexts():
    """`context_fn` of torch.utils.checkpoint for gradient checkpointing: a layer's recompute in
    the backward runs under the SP attention (group, `attend`) that was active when the layer
    ran forward; `sp_attention` has exited by then, and without this the recompute would run
    the model's own attention on the local shard: wrong gradients, and all-to-alls missing
    from the backward."""
    if not getattr(_state, "active", False):
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), _active(_state.config, _state.group, _state.attend)
