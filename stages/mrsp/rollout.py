"""Rollout engines: G sampled continuations of each prompt, with their log-probs.

Every engine implements one interface, so `stages/rl.py` does not care which one runs:

    engine.generate(prompts: list[RolloutPrompt], n: int, sampling: Sampling)
        -> list[list[Rollout]]          # outer: per prompt, inner: its n rollouts
    engine.sync_weights()               # after each optimizer step

A `RolloutPrompt` carries the full prompt ids (video tokens expanded), its whole-sequence
multimodal RoPE positions and the cached video embeddings, so no engine runs the vision
tower (MR-SP's embedding reuse). A vLLM engine takes the same embeddings as video-embedding
inputs and copies the policy weights in `sync_weights`.

`HFEngine` (CPU and GPU) prefills each prompt ONCE, expands its KV cache to the n rows of the
group and decodes the n continuations together: the long video prompt is processed once
per group, not once per rollout. Text positions after the prompt are `index + rope_delta`
on all three mRoPE axes, which is what the model's own `get_rope_index` gives the same
tokens in a teacher-forced forward over prompt + response.

Log-probs are those of the model's untempered distribution (log_softmax of the raw
logits, before temperature, top-p or the vision-token ban): the quantity the old-policy
forward of GRPO recomputes by teacher forcing, so the two can be compared directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stages.models.adapter import VideoEmbedding, VLAdapter


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

    def __init__(self, adapter: VLAdapter, banned_token_ids: list[int] | None = None):
        self.adapter = adapter
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

    def generate(self, prompts: list[RolloutPrompt], n: int, sampling: Sampling) -> list[list[Rollout]]:
        """Return `n` rollouts of every prompt (outer list: prompts, inner: rollouts)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {sampling.temperature}, {sampling.top_p}")
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [self._generate_group(p, i, n, sampling) for i, p in enumerate(prompts)]
        finally:
            model.train(was_training)

    def _generate_group(self, prompt: RolloutPrompt, index: int, n: int, sampling: Sampling) -> list[Rollout]:
        a = self.adapter
        ids = prompt.input_ids.reshape(-1)
        L = ids.shape[0]
        if prompt.position_ids.shape != (3, L):
            raise ValueError(f"prompt {prompt.key!r}: position_ids {tuple(prompt.position_ids.shape)} != (3, {L})")
        device = a.lm_head.weight.device
        stop_ids = sampling.stop_token_ids if sampling.stop_token_ids is not None else default_stop_ids(a)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        pad_id = a.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)
        banned = torch.tensor(self.banned_token_ids, dtype=torch.long, device=device)

        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=device)
            if sampling.seed is None:
                generator.seed()
            else:  # distinct, reproducible stream per prompt of the batch
                generator.manual_seed((sampling.seed * 1_000_003 + index) % (2 ** 63))

        h, cache = a.hidden_states(ids[None].to(device), prompt.position_ids[:, None, :].to(device),
                                   prompt.videos, use_cache=True)
        self.prefills += 1
        self.prefill_tokens += L
        logits = self._next_logits(h[:, -1]).expand(n, -1)
        if n > 1:
            cache.batch_repeat_interleave(n)

        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for step in range(sampling.max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)  # untempered, unbanned: what training recomputes
            if banned.numel():
                logits = logits.index_fill(-1, banned, float("-inf"))
            nxt = sample_next(logits, sampling, generator)
            chosen = logp.gather(-1, nxt[:, None]).squeeze(-1)
            for r in (~done).nonzero().flatten().tolist():
                tokens[r].append(int(nxt[r]))
                logps[r].append(float(chosen[r]))
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or step + 1 == sampling.max_new_tokens:
                break
            feed = nxt.masked_fill(done, pad_id)  # finished rows are fed pad; their outputs are ignored
            pos = torch.full((3, n, 1), L + step + prompt.rope_delta, dtype=torch.long, device=device)
            h, cache = a.hidden_states(feed[:, None], pos, cache=cache, use_cache=True)
            self.decode_steps += 1
            logits = self._next_logits(h[:, -1])

        stop_set = set(stop_ids)
        out = []
        for r in range(n):
            self.generated_tokens += len(tokens[r])
            finished = bool(tokens[r]) and tokens[r][-1] in stop_set
            text = a.tokenizer.decode(tokens[r], skip_special_tokens=False)
            out.append(Rollout(prompt.key, tokens[r], logps[r], finished, text))
        return out
