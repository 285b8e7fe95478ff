"""Rollout engines: G sampled continuations of each prompt, with their log-probs.

Every engine implements one interface, so `stages/rl.py` does not care which one runs:

    engine.generate(prompts: list[RolloutPrompt], n: int, sampling: Sampling | list[Sampling])
        -> list[list[Rollout]]          # outer: per prompt, inner: its n rollouts
    engine.sync_weights()               # after each optimizer step

A `RolloutPrompt` carries the full prompt ids (video tokens expanded), its whole-sequence
multimodal RoPE positions and the cached video embeddings, so no engine runs the vision
tower (MR-SP's embedding reuse). A vLLM engine takes the same embeddings as video-embedding
inputs and copies the policy weights in `sync_weights`.

`HFEngine` (CPU and GPU) prefills each prompt ONCE and decodes the n continuations of every
prompt of the call together (one batch of prompts x n rows): the long video prompt is
processed once per group, not once per rollout, and a decode step serves all groups. Text
positions after the prompt are `index + rope_delta` on all three mRoPE axes, which is what
the model's own `get_rope_index` gives the same tokens in a teacher-forced forward over
prompt + response.

By default (`share_prefix_kv=True`) the prompt's KV cache is kept ONCE per group, not copied
into its n rows: the decode steps run `shared_kv.py`'s attention, a prompt's n rows against
its one prefix copy, each row against its own generated tokens, the two partial softmaxes
merged by log-sum-exp. For the 7B RL recipe that is 2.2 GiB of rollout KV instead of 14.5 GiB
(`lvr plan`); on the tiny bench model on CPU (512-frame prompt, n = 8, 1 thread) a decode
token took 8.6 ms instead of 11.3 ms, 15.8 instead of 31.8 ms with 4 prompts, whose peak
resident-set growth fell from 91.7 to 29.4 MiB (README, `benchmarks/rollout_decode.py`).
`share_prefix_kv=False` copies the cache into each row (`merge_caches`, shorter prompts
left-padded under an attention mask): the path the shared one is tested against (same greedy
tokens and seeded samples, log-probs within 1e-5; not bitwise, the attention rounds differently).

Log-probs are those of the model's untempered distribution (log_softmax of the raw
logits, before temperature, top-p or the vision-token ban): the quantity the old-policy
forward of GRPO recomputes by teacher forcing, so the two can be compared directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from stages.models.adapter import VideoEmbedding, VLAdapter
from stages.mrsp.shared_kv import SharedPrefixCache, shared_prefix_decoding


@dataclass
class RolloutPrompt:
    """One prompt ready for generation (no vision tower needed).

    input_ids: `[L]`, the full prompt with expanded video tokens.
    position_ids: `[3, L]`, mRoPE positions from `adapter.positions` on the whole prompt.
    rope_delta: the prompt's `rope_deltas` from `adapter.positions`: text token at index i
        after the prompt has position `i + rope_delta` on every axis.
    videos: cached embeddings, in order of the video tokens.
    """

    key: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    rope_delta: int
    videos: list[VideoEmbedding] = field(default_factory=list)

    @classmethod
    def build(cls, adapter: VLAdapter, key: str, input_ids: torch.Tensor | list[int],
              videos: list[VideoEmbedding], seconds_per_grid: list[float] | None = None,
              grids: list[torch.Tensor] | None = None) -> "RolloutPrompt":
        """Return the prompt of `input_ids` with its positions computed by the adapter
        (`grids`: the videos' `grid_thw`, when the embeddings are not there yet)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        grids = grids if grids is not None else [v.grid_thw for v in videos]
        pos, deltas = adapter.positions(ids[None], grids, seconds_per_grid)
        return cls(key, ids, pos[:, 0], int(deltas.reshape(-1)[0]), list(videos))


@dataclass
class Sampling:
    """How to sample: temperature 0 is greedy; `stop_token_ids=None` means the model's EOS ids."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One sampled response.

    token_ids: response tokens, including the stop token if one was emitted.
    logprobs: per response token, log-prob under the untempered model (see module docstring).
    finished: True if it ended on a stop token, False if it hit `max_new_tokens`.
    """

    prompt_key: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    text: str

    def __len__(self) -> int:
        return len(self.token_ids)


def default_stop_ids(adapter: VLAdapter) -> list[int]:
    """Return the EOS ids of the model's generation config and tokenizer, deduplicated."""
    ids: list[int] = []
    for eos in (getattr(adapter.model.generation_config, "eos_token_id", None), adapter.tokenizer.eos_token_id):
        for t in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Return next tokens `[B]` drawn from `logits [B, V]` (float; banned entries already -inf).

    Greedy at temperature 0; otherwise softmax(logits / temperature) restricted to the
    smallest set of top tokens whose mass reaches `top_p` (always at least the top one).
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # the top token has mass_before 0 < top_p, so it always survives
        sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HFEngine:
    """Rollouts with the live transformers model: one prefill per prompt, G rows decoded together."""

    def __init__(self, adapter: VLAdapter, banned_token_ids: list[int] | None = None,
                 share_prefix_kv: bool = True):
        self.adapter = adapter
        # True: decode over one copy of each prompt's KV cache (`shared_kv.py`); False: copy
        # it into each of the prompt's n rows (`merge_caches`), the reference the tests compare to.
        self.share_prefix_kv = share_prefix_kv
        # Vision special tokens must never be sampled: a response holding one would make
        # positions over prompt + response (get_rope_index) look for a video that is not there.
        if banned_token_ids is None:
            banned_token_ids = [adapter.video_token_id, adapter.image_token_id,
                                adapter.vision_start_id, adapter.vision_end_id]
        self.banned_token_ids = sorted({int(t) for t in banned_token_ids if t is not None})
        self.reset_counters()

    def reset_counters(self) -> None:
        self.prefills = 0  # prefill forward calls (one per prompt)
        self.prefill_tokens = 0
        self.decode_steps = 0  # batched one-token forward calls
        self.generated_tokens = 0  # response tokens kept in rollouts

    def sync_weights(self) -> None:
        """Do nothing: the hf engine runs the policy module itself, so it always has the
        latest weights. A vLLM engine copies the policy weights in here."""

    def _next_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head(hidden_last).float()

    def generate(self, prompts: list[RolloutPrompt], n: int, sampling: Sampling | list[Sampling]
                 ) -> list[list[Rollout]]:
        """Return `n` rollouts of every prompt (outer list: prompts, inner: rollouts), all
        prompts decoded together (`_generate_batch`).

        `sampling`: one for every prompt (prompt k's rows draw from a generator seeded
        `seed * 1_000_003 + k`), or one per prompt (prompt k's generator seeded
        `sampling[k].seed * 1_000_003`, so a prompt's samples do not depend on the others in
        the call); a list must agree on everything but the seed."""
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(samplings) != len(prompts):
            raise ValueError(f"{len(samplings)} samplings for {len(prompts)} prompts")
        if not prompts:
            return []
        first = samplings[0]
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if first.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {first.max_new_tokens}")
        if first.temperature < 0 or not 0 < first.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {first.temperature}, {first.top_p}")
        shape = (first.temperature, first.top_p, first.max_new_tokens, first.stop_token_ids)
        if any((s.temperature, s.top_p, s.max_new_tokens, s.stop_token_ids) != shape for s in samplings):
            raise ValueError("the prompts' samplings differ in more than their seeds")
        streams = [0] * len(prompts) if isinstance(sampling, (list, tuple)) else list(range(len(prompts)))
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._generate_batch(prompts, n, samplings, streams)
        finally:
            model.train(was_training)

    def _generate_batch(self, prompts: list[RolloutPrompt], n: int, samplings: list[Sampling],
                        streams: list[int]) -> list[list[Rollout]]:
        """Prefill every prompt once (alone, batch 1) and decode the `n` rows of all prompts as
        one batch, over one shared copy of each prompt's KV cache (`share_prefix_kv`) or over
        the cache copied into each row.

        Prompts of different lengths are padded in the cache (right-padded under an additive
        mask in the shared prefix; left-padded under an attention mask in the copy); each
        row's positions continue its own prompt's (`L_k + step + rope_delta_k` on every mRoPE
        axis), so padding moves no position.
        A prompt's rows draw from its own generator, in one `sample_next` call over its `n`
        rows per step as a prompt alone does: with bitwise-equal logits the samples are
        those of decoding the prompt alone (the batched matmuls may round differently)."""
        a = self.adapter
        device = a.lm_head.weight.device
        sampling = samplings[0]
        stop_ids = sampling.stop_token_ids if sampling.stop_token_ids is not None else default_stop_ids(a)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        pad_id = a.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)
        banned = torch.tensor(self.banned_token_ids, dtype=torch.long, device=device)
        generators = [self._generator(s, k, device) for s, k in zip(samplings, streams)]

        caches, logits, lengths = [], [], []
        for p in prompts:
            ids = p.input_ids.reshape(-1)
            L = ids.shape[0]
            if p.position_ids.shape != (3, L):
                raise ValueError(f"prompt {p.key!r}: position_ids {tuple(p.position_ids.shape)} != (3, {L})")
            h, cache = a.hidden_states(ids[None].to(device), p.position_ids[:, None, :].to(device), p.videos,
                                       use_cache=True)
            self.prefills += 1
            self.prefill_tokens += L
            logits.append(self._next_logits(h[:, -1]).expand(n, -1))
            caches.append(cache)
            lengths.append(L)
        logits = torch.cat(logits)
        B = len(prompts) * n
        # row r of prompt k: position of decode step s is L_k + s + rope_delta_k
        start = torch.tensor([L + p.rope_delta for L, p in zip(lengths, prompts)],
                             dtype=torch.long, device=device).repeat_interleave(n)

        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        with self._decode_cache(caches, lengths, n, sampling.max_new_tokens - 1) as (cache, attention):
            for step in range(sampling.max_new_tokens):
                logp = torch.log_softmax(logits, dim=-1)  # untempered, unbanned: what training recomputes
                if banned.numel():
                    logits = logits.index_fill(-1, banned, float("-inf"))
                if sampling.greedy or len(prompts) == 1:
                    nxt = sample_next(logits, sampling, generators[0])
                else:
                    nxt = torch.full((B,), pad_id, dtype=torch.long, device=device)
                    for k, g in enumerate(generators):
                        rows = slice(k * n, (k + 1) * n)
                        if not bool(done[rows].all()):  # a finished prompt draws no more
                            nxt[rows] = sample_next(logits[rows], sampling, g)
                chosen = logp.gather(-1, nxt[:, None]).squeeze(-1)
                step_tokens, step_logps = nxt.tolist(), chosen.tolist()  # one transfer, not one per row
                for r in (~done).nonzero().flatten().tolist():
                    tokens[r].append(step_tokens[r])
                    logps[r].append(step_logps[r])
                done |= torch.isin(nxt, stop)
                if bool(done.all()) or step + 1 == sampling.max_new_tokens:
                    break
                feed = nxt.masked_fill(done, pad_id)  # finished rows are fed pad; their outputs are ignored
                pos = (start + step)[None, :, None].expand(3, B, 1)
                if attention is not None:
                    attention = torch.cat([attention, attention.new_ones(B, 1)], dim=1)
                h, cache = a.hidden_states(feed[:, None], pos, cache=cache, use_cache=True, attention_mask=attention)
                self.decode_steps += 1
                logits = self._next_logits(h[:, -1])

        stop_set = set(stop_ids)
        out = []
        for k, p in enumerate(prompts):
            group = []
            for r in range(k * n, (k + 1) * n):
                self.generated_tokens += len(tokens[r])
                finished = bool(tokens[r]) and tokens[r][-1] in stop_set
                text = a.tokenizer.decode(tokens[r], skip_special_tokens=False)
                group.append(Rollout(p.key, tokens[r], logps[r], finished, text))
            out.append(group)
        return out

    @contextlib.contextmanager
    def _decode_cache(self, caches: list, lengths: list[int], n: int, max_steps: int):
        """Yield `(cache, attention_mask)` to decode the prompts' `n` rows from their one-row
        prefill caches: one shared copy of each prompt's K/V under shared-prefix attention
        (`share_prefix_kv`), else the copy into every row of `merge_caches`."""
        if not self.share_prefix_kv:
            yield merge_caches(caches, lengths, n)
            return
        cache = SharedPrefixCache.from_prompt_caches(caches, lengths, n, max_steps)
        with shared_prefix_decoding(self.adapter.model, cache):
            yield cache, None

    @staticmethod
    def _generator(sampling: Sampling, stream: int, device) -> torch.Generator | None:
        """The prompt's own random stream (None when greedy)."""
        if sampling.greedy:
            return None
        generator = torch.Generator(device=device)
        if sampling.seed is None:
            generator.seed()
        else:  # distinct, reproducible stream per prompt of the batch
            generator.manual_seed((sampling.seed * 1_000_003 + stream) % (2 ** 63))
        return generator


def merge_caches(caches: list, lengths: list[int], n: int):
    """One KV cache of `len(caches) * n` rows from the prompts' one-row caches (each repeated
    `n` times, left-padded with zeros to the longest prompt), and the `[rows, longest]` 0/1
    attention mask over it (None when no row is padded)."""
    from transformers.cache_utils import DynamicLayer

    first = caches[0]
    if len(caches) == 1:
        if n > 1:
            first.batch_repeat_interleave(n)
        return first, None
    if any(type(layer) is not DynamicLayer for c in caches for layer in c.layers):
        raise NotImplementedError("batched rollouts need full (not sliding-window) KV cache layers")
    longest = max(lengths)

    def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:  # each [1, H, L_k, D]
        return torch.cat([torch.nn.functional.pad(t, (0, 0, longest - t.shape[2], 0)).repeat_interleave(n, dim=0)
                          for t in tensors])

    for i, layer in enumerate(first.layers):
        layer.keys = stacked([c.layers[i].keys for c in caches])
        layer.values = stacked([c.layers[i].values for c in caches])
    if all(L == longest for L in lengths):
        return first, None
    device = first.layers[0].keys.device
    attention = torch.stack([torch.arange(longest, device=device) >= longest - L for L in lengths])
    return first, attention.long().repeat_interleave(n, dim=0)
