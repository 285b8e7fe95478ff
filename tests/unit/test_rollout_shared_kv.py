"""Shared-prefix decoding (one copy of each prompt's KV cache) against the copy path (the
prompt's KV repeated into each of its n rows).

What is bit-identical and what is not: the two paths run the same prefill, the same decode
projections and MLPs, and the same samplers on the same generator streams; only attention
differs (two partial softmaxes merged by log-sum-exp against one SDPA over prefix + suffix),
so the logits differ by rounding (log-probs by up to ~5e-7 here) and are NOT bitwise equal,
even for one prompt. Greedy tokens are identical unless two logits tie within rounding; sampled
tokens are identical unless a draw lands within rounding of a bin edge. Neither happens for
the prompts and seeds below.
"""

import pytest
import torch
import torch.nn.functional as F

from stages.mrsp import rollout as rollout_module
from stages.mrsp.rollout import HFEngine, Sampling
from stages.mrsp.shared_kv import SharedPrefixCache, decode_attention
from tests.unit.test_rollout import get_adapter, make_prompt
from tests.unit.test_rollout_batched import QUESTIONS

G = 4


@pytest.fixture(scope="module")
def adapters():
    return {}


def _prompts(a, count):
    return [make_prompt(a, key=f"p{k}", question=q, seed=k)[0] for k, q in enumerate(QUESTIONS[:count])]


def _both(a, prompts, n, sampling):
    copy = HFEngine(a, share_prefix_kv=False).generate(prompts, n, sampling)
    shared_engine = HFEngine(a)
    assert shared_engine.share_prefix_kv  # the default
    return copy, shared_engine.generate(prompts, n, sampling)


def _assert_same(copy, shared):
    assert [[r.token_ids for r in g] for g in shared] == [[r.token_ids for r in g] for g in copy]
    assert [[r.finished for r in g] for g in shared] == [[r.finished for r in g] for g in copy]
    for gc, gs in zip(copy, shared):
        for rc, rs in zip(gc, gs):
            assert rs.prompt_key == rc.prompt_key and rs.text == rc.text
            torch.testing.assert_close(torch.tensor(rs.logprobs), torch.tensor(rc.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_decode_attention_equals_one_softmax_over_copied_prefix_and_suffix(fused):
    """The merged partial softmaxes equal SDPA over each row's own copy of its prompt's K/V
    followed by its suffix: prompts of different lengths (padding) and grouped KV heads, with
    the prefix part from torch's fused CPU kernel or from matmuls."""
    g = torch.Generator().manual_seed(0)
    P, n, Hq, Hkv, D, S = 3, 4, 8, 2, 16, 5
    lengths = [7, 11, 4]
    Lmax = max(lengths)
    q = torch.randn(P * n, Hq, 1, D, generator=g)
    pk, pv = torch.randn(2, P, Hkv, Lmax, D, generator=g)
    sk, sv = torch.randn(2, P * n, Hkv, S, D, generator=g)
    valid = torch.stack([torch.arange(Lmax) < L for L in lengths])
    bias = torch.zeros(P, Lmax).masked_fill(~valid, float("-inf"))
    pk_poisoned = pk.masked_fill(~valid[:, None, :, None], 1e4)  # padding must not leak in
    # the cache's suffix layout [P, Hkv, n, S, D] of the rows' [P * n, Hkv, S, D]
    suffix = [t.view(P, n, Hkv, S, D).transpose(1, 2) for t in (sk, sv)]
    out = decode_attention(q, pk_poisoned, pv, bias, *suffix, D ** -0.5, fused=fused)
    assert out.shape == (P * n, 1, Hq, D)
    for r in range(P * n):
        k = r // n
        keys = torch.cat([pk[k, :, :lengths[k]], sk[r]], dim=1).repeat_interleave(Hq // Hkv, dim=0)
        values = torch.cat([pv[k, :, :lengths[k]], sv[r]], dim=1).repeat_interleave(Hq // Hkv, dim=0)
        ref = F.scaled_dot_product_attention(q[r], keys, values, scale=D ** -0.5)  # [Hq, 1, D]
        torch.testing.assert_close(out[r, 0], ref[:, 0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("family,count", [("qwen2.5-vl", 1), ("qwen2.5-vl", 3), ("qwen3-vl", 3)])
def test_greedy_equals_the_copy_path(adapters, family, count):
    a = get_adapter(adapters, family)
    prompts = _prompts(a, count)
    if count > 1:
        assert len({p.input_ids.shape[0] for p in prompts}) == count  # padding is exercised
    copy, shared = _both(a, prompts, G, Sampling(temperature=0, max_new_tokens=12))
    _assert_same(copy, shared)
    assert all(len(r) == 12 for g in shared for r in g)  # no early stop hides a later step
    assert a.text_config._attn_implementation == "sdpa"  # the model's attention is restored


@pytest.mark.parametrize("per_prompt_seeds", [False, True])
def test_seeded_samples_equal_the_copy_path(adapters, per_prompt_seeds):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompts = _prompts(a, 3)
    if per_prompt_seeds:
        sampling = [Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=100 + k) for k in range(3)]
    else:
        sampling = Sampling(temperature=1.2, max_new_tokens=10, seed=7)
    copy, shared = _both(a, prompts, G, sampling)
    _assert_same(copy, shared)
    assert len({tuple(r.token_ids) for r in shared[0]}) > 1  # really sampled: the rows differ


def test_rows_that_stop_early_match_the_copy_path(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompts = _prompts(a, 3)
    free = HFEngine(a).generate(prompts, G, Sampling(temperature=1.5, max_new_tokens=12, seed=3))
    stop = free[0][0].token_ids[2]
    copy, shared = _both(a, prompts, G, Sampling(temperature=1.5, max_new_tokens=12, seed=3, stop_token_ids=[stop]))
    _assert_same(copy, shared)
    lengths = [len(r) for g in shared for r in g]
    assert min(lengths) <= 3 and max(lengths) == 12  # some rows stopped, others ran on


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and expands count once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _cache_tensors(cache) -> list[torch.Tensor]:
    found = [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    for layer in cache.layers:
        found += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    return found


@pytest.mark.parametrize("count", [1, 3])
def test_cache_holds_one_copy_of_each_prompt(adapters, monkeypatch, count):
    """Whatever n is, the decode cache holds each prompt's K/V once (padded to the longest
    prompt): only the rows' own generated K/V grow with n. The copy path's cache, counted the
    same way, grows with n: this test would catch the copy coming back."""
    a = get_adapter(adapters, "qwen2.5-vl")
    prompts = _prompts(a, count)
    built = []
    original = SharedPrefixCache.from_prompt_caches.__func__

    def record(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(rollout_module.SharedPrefixCache, "from_prompt_caches", classmethod(record))
    cfg = a.text_config
    steps = 5
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    longest = max(p.input_ids.shape[0] for p in prompts)
    totals = {}
    for n in (1, G, 8):
        HFEngine(a).generate(prompts, n, Sampling(temperature=0, max_new_tokens=steps + 1))
        cache = built[-1]
        suffix = cache.suffix_bytes()
        assert suffix == count * n * steps * per_token  # the rows' own tokens: n x
        assert cache.prefix_bytes() == count * longest * per_token  # one copy per prompt
        totals[n] = _storage_bytes(_cache_tensors(cache)) - suffix
    mask = count * longest * 4 if count > 1 else 0  # the fp32 padding mask
    assert totals[1] == totals[G] == totals[8] == count * longest * per_token + mask

    # the copy path's cache of the same prompts does grow with n
    copied = []
    for n in (1, G):
        caches, lengths = [], []
        for p in prompts:
            with torch.no_grad():
                _, c = a.hidden_states(p.input_ids[None], p.position_ids[:, None], p.videos, use_cache=True)
            caches.append(c)
            lengths.append(p.input_ids.shape[0])
        merged, _ = rollout_module.merge_caches(caches, lengths, n)
        copied.append(_storage_bytes([t for layer in merged.layers for t in (layer.keys, layer.values)]))
    assert copied[1] == G * copied[0] == G * count * longest * per_token
