"""Shared-prefix decoding: a prompt's KV cache stored once, read by all G rows of its group.

The rollout of a group decodes G continuations of one long (video) prompt. Copying the
prompt's keys and values into each row (`repeat_interleave`) costs G times the prompt's KV
memory, and each decode step reads G copies of it. Here the cache holds, per layer,

    prefix:  [P, Hkv, Lmax, D]   one copy of each of the P prompts' K/V (right-padded to the
                                 longest, padding masked), whatever n is
    suffix:  [P, Hkv, n, S, D]   each row's own generated tokens (S = decode steps so far)

and each decode step's attention is computed in two parts and merged exactly:

    prefix:  the n rows' queries of a prompt, all query heads of a KV head together
             ([Hkv, n*g, D], g = Hq / Hkv), against that prompt's one K/V copy
    suffix:  each row's query against its own generated K/V
    merge:   out = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse),  lse = logaddexp(lse1, lse2)

the log-sum-exp combination of two partial softmaxes (flash-decoding's split-K merge), equal
to one softmax over prefix + suffix up to rounding.

It plugs in like `ulysses.py`: `shared_prefix_decoding(model, cache)` switches the language
model's attention to the function registered as `lvr_shared_prefix` for the decode steps; the
model's attention layers call `cache.update(k, v, layer_idx)` as they would a
`DynamicCache`'s, which appends the step's K/V to the suffix and returns it, and the
attention function reads the prefix of the same layer from the cache. Positions are the
caller's (`position_ids` given), so no cache length is ever asked for; a custom attention
name makes transformers' `create_causal_mask` return no mask, and none is needed: the
prefix padding is masked here, and every row has the same number of suffix tokens.
"""

from __future__ import annotations

import contextlib
import threading

import torch

NAME = "lvr_shared_prefix"
_state = threading.local()


def decode_attention(query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                     prefix_bias: torch.Tensor | None, suffix_keys: torch.Tensor, suffix_values: torch.Tensor,
                     scaling: float, fused: bool = True) -> torch.Tensor:
    """Return one decode step's attention output `[B, 1, Hq, D]` over each row's prompt prefix
    (shared by the prompt's rows) followed by the row's own suffix.

    query: `[B, Hq, 1, D]`, B = P * n rows, prompt-major (rows k*n .. k*n+n-1 belong to prompt k).
    prefix_keys / prefix_values: `[P, Hkv, Lmax, D]`; prefix_bias: `[P, Lmax]` float32, 0 at a
        prompt's tokens and -inf at its padding; None when no prompt is padded.
    suffix_keys / suffix_values: `[P, Hkv, n, S, D]` (row k*n + i of the batch is `[k, :, i]`), S >= 1.
    fused: compute the prefix part with torch's fused CPU flash-attention kernel, which also
        returns the log-sum-exp (float32 CPU tensors only; elsewhere the matmul/softmax path runs).
    Query head h reads KV head h // (Hq / Hkv), as transformers' `repeat_kv` lays them out.
    Scores and softmax statistics are float32; the output has the query's dtype. Laid out
    this way, the prefix part is one attention per prompt and KV head for all n x g queries,
    the suffix part needs no copy of the suffix, and only the query and output are reshaped.
    """
    B, Hq, one, D = query.shape
    P, Hkv, Lmax, _ = prefix_keys.shape
    if one != 1:
        raise ValueError(f"shared-prefix attention decodes one token per row, got {one}")
    if B % P or Hq % Hkv:
        raise ValueError(f"{B} rows for {P} prompts, {Hq} query heads for {Hkv} KV heads")
    n, g = B // P, Hq // Hkv
    # [B, Hq, 1, D] -> [P, Hkv, n * g, D]: a prompt's n rows x g heads of a KV head together
    q = (query.float() * scaling).view(P, n, Hkv, g, D).transpose(1, 2).reshape(P, Hkv, n * g, D)
    bias = None if prefix_bias is None else prefix_bias[:, None, None, :]

    if fused and _FLASH_CPU is not None and q.device.type == "cpu" and prefix_keys.dtype == torch.float32:
        out_prefix, lse_prefix = _FLASH_CPU(q, prefix_keys, prefix_values, 0.0, False, attn_mask=bias, scale=1.0)
    else:
        scores = torch.matmul(q, prefix_keys.float().transpose(-1, -2))  # [P, Hkv, n*g, Lmax]
        if bias is not None:
            scores.add_(bias)
        out_prefix, lse_prefix = _partial_softmax(scores, prefix_values)

    q = q.view(P, Hkv, n, g, D)
    scores = torch.matmul(q, suffix_keys.float().transpose(-1, -2))  # [P, Hkv, n, g, S]
    out_suffix, lse_suffix = _partial_softmax(scores, suffix_values)

    # exp(lse_p - logaddexp(lse_p, lse_s)) = sigmoid(lse_p - lse_s): the prefix's share of the mass
    share = torch.sigmoid(lse_prefix.reshape(P, Hkv, n, g, 1) - lse_suffix)
    out = torch.lerp(out_suffix, out_prefix.reshape(P, Hkv, n, g, D), share)  # [P, Hkv, n, g, D]
    return out.transpose(1, 2).reshape(B, 1, Hq, D).to(query.dtype)


def _partial_softmax(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(softmax(scores) @ values, logsumexp(scores))` of float32 `scores [..., M, L]`
    (overwritten) and `values [..., L, D]`; the log-sum-exp keeps a trailing dim of 1.
    One exp over the scores (`torch.logsumexp` would take a second), normalised after the matmul."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, values.float()).div_(total), top + total.log()


# torch's CPU flash-attention kernel: (out, logsumexp) of non-causal attention, what the
# public scaled_dot_product_attention computes without handing back the log-sum-exp.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class SharedPrefixLayer:
    """One layer's shared prefix K/V and its rows' suffix K/V (preallocated for `max_steps`)."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, n: int, max_steps: int):
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        P, Hkv, _, D = prefix_keys.shape
        # [P, Hkv, n, step, D]: decode_attention reads a prompt's rows per KV head without a copy
        self.suffix_keys = prefix_keys.new_empty(P, Hkv, n, max_steps, D)
        self.suffix_values = prefix_values.new_empty(P, Hkv, n, max_steps, D)
        self.steps = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one step's `[P * n, Hkv, 1, D]` K/V to the suffix; return the suffix so far,
        `[P, Hkv, n, steps, D]`."""
        if keys.shape[2] != 1:
            raise ValueError(f"the shared-prefix cache takes one token per row per step, got {keys.shape[2]}")
        if self.steps == self.suffix_keys.shape[3]:
            raise RuntimeError(f"shared-prefix cache is full ({self.steps} decode steps)")
        P, Hkv, n, _, D = self.suffix_keys.shape
        self.suffix_keys[:, :, :, self.steps] = keys.view(P, n, Hkv, D).transpose(1, 2)
        self.suffix_values[:, :, :, self.steps] = values.view(P, n, Hkv, D).transpose(1, 2)
        self.steps += 1
        return self.suffix_keys[:, :, :, :self.steps], self.suffix_values[:, :, :, :self.steps]


class SharedPrefixCache:
    """KV cache of P prompts x n rows for decoding: each prompt's K/V once (`prefix`), each
    row's generated K/V apart (`suffix`). The model's attention layers call `update` as they
    would a transformers `Cache`'s; only `shared_prefix_decoding` attention can read it."""

    def __init__(self, layers: list[SharedPrefixLayer], prefix_bias: torch.Tensor | None):
        self.layers, self.prefix_bias = layers, prefix_bias

    @classmethod
    def from_prompt_caches(cls, caches: list, lengths: list[int], n: int, max_steps: int) -> "SharedPrefixCache":
        """Build from the prompts' one-row prefill caches (transformers `DynamicCache`s of
        lengths `lengths`): the prompts' K/V are stacked (right-padded to the longest), not
        repeated, and each prompt's own tensors are released layer by layer."""
        from transformers.cache_utils import DynamicLayer

        if any(type(layer) is not DynamicLayer for c in caches for layer in c.layers):
            raise NotImplementedError("shared-prefix decoding needs full (not sliding-window) KV cache layers")
        longest = max(lengths)
        layers = []
        for i in range(len(caches[0].layers)):
            def stacked(name: str) -> torch.Tensor:  # each prompt's [1, Hkv, L_k, D]
                parts = [getattr(c.layers[i], name) for c in caches]
                if len(parts) == 1:
                    return parts[0]
                return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[2])) for t in parts])

            keys, values = stacked("keys"), stacked("values")
            for c in caches:
                c.layers[i].keys = c.layers[i].values = None
            layers.append(SharedPrefixLayer(keys, values, n, max_steps))
        bias = None
        if any(L != longest for L in lengths):
            positions = torch.arange(longest, device=layers[0].prefix_keys.device)
            bias = torch.stack([torch.where(positions < L, 0.0, float("-inf")) for L in lengths])
        return cls(layers, bias)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a decode step's K/V `[P * n, Hkv, 1, D]` of layer `layer_idx`; return that
        layer's suffix K/V so far, `[P, Hkv, n, steps, D]` (the attention function reads the
        prefix from the cache)."""
        return self.layers[layer_idx].update(key_states, value_states)

    def prefix_bytes(self) -> int:
        """Bytes of the prompts' K/V, all layers (one copy per prompt, whatever n is)."""
        return sum(layer.prefix_keys.nbytes + layer.prefix_values.nbytes for layer in self.layers)

    def suffix_bytes(self) -> int:
        """Bytes of the rows' preallocated generated-token K/V, all layers."""
        return sum(layer.suffix_keys.nbytes + layer.suffix_values.nbytes for layer in self.layers)


def shared_prefix_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """Attention of one decode step: `query [B, Hq, 1, D]` against the active cache's prefix of
    `module.layer_idx` and `key`/`value`, the rows' suffix K/V the cache's `update` returned.
    Returns `(out [B, 1, Hq, D], None)` like transformers' sdpa function."""
    cache = getattr(_state, "cache", None)
    if cache is None:
        raise RuntimeError("lvr_shared_prefix attention used outside shared_prefix_decoding()")
    if attention_mask is not None:
        raise ValueError("lvr_shared_prefix attention takes no attention mask (prefix padding is the cache's)")
    if getattr(module, "sliding_window", None):
        raise NotImplementedError("shared-prefix decoding does not support sliding-window attention")
    layer = cache.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = decode_attention(query, layer.prefix_keys, layer.prefix_values, cache.prefix_bias, key, value, scale)
    return out, None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, shared_prefix_attention)


@contextlib.contextmanager
def shared_prefix_decoding(model, cache: SharedPrefixCache):
    """Run the language model of `model` with shared-prefix attention over `cache` (decode
    steps only: one new token per row); restore the previous attention afterwards."""
    register()
    text_config = model.config.get_text_config()
    before = text_config._attn_implementation, getattr(_state, "cache", None)
    text_config._attn_implementation = NAME
    _state.cache = cache
    try:
        yield
    finally:
        text_config._attn_implementation, _state.cache = before
