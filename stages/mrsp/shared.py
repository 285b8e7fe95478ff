"""Shared-prompt training forwards: one pass over a group's prompt, its G responses after it.

GRPO scores G responses to the same prompt, and with a long video the prompt is nearly all
of each sequence. The old-policy, reference and update forwards therefore run a group as
one packed sequence

    [prompt_1][response_1,1]...[response_1,G][prompt_2][response_2,1]...   (+ SP padding)

in which each prompt attends causally to itself, and each response attends to its
prompt's keys/values and causally to itself only (`SharedLayout.attend`, plugged into the
same attention function as Ulysses SP, so it composes with sequence parallelism: after the
all-to-all every rank holds the whole packed sequence for its heads). Every token keeps the
multimodal RoPE position it has in its own unshared sequence: the positions are those of
the unshared rows (computed by the model's own `get_rope_index`, `Runtime.rows`), sliced,
never rebuilt. The first token of every response is scored from the prompt's last hidden
state (`TokenBatch.score_source`).

Equivalence (Prefix Grouper, Liu et al., arXiv 2506.05433, which proposes this for text
GRPO): in a causal decoder the prompt's hidden states do not depend on what follows it,
so they are the same in all G unshared sequences, and a response token sees exactly the
keys/values it would see there, at the same positions. Hence every per-token log-prob
equals the unshared forward's (up to float rounding). In the backward, the prompt's
activations receive the sum of the gradients of all the responses that attend to them,
which is the sum of what the G copies receive in the unshared forward, so parameter
gradients are equal too. The video embedding is scattered into each prompt once.

Cost: a group of G responses of T tokens on a prompt of P tokens runs P + G*T tokens
through the language model instead of G*(P + T). No `[L, L]` mask is built: the prompt
uses causal attention. On CPU a group's responses run as one attention call over
`[prompt; responses]` under a `[G*T, P + G*T]` boolean mask (the CPU kernel takes a mask at
no cost; one call instead of G: 13 instead of 22 ms forward + backward per layer on the
bench model at 512 frames); on GPU, where a mask would take the flash kernels away and
grow with P, each response is one call over `[prompt; itself]` with a bottom-right causal
bias and no mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from stages.models.adapter import VideoEmbedding, VLAdapter
from stages.mrsp.dist import Grid
from stages.mrsp.logprobs import TokenBatch, token_logprobs
from stages.mrsp.ulysses import causal_attention


@dataclass
class PromptGroup:
    """One prompt and its responses, given as the unshared sequences `prompt + response_j`.

    rows: `(input_ids [P + T_j], position_ids [3, P + T_j])` per response, every row starting
        with the same `prompt_len` prompt tokens and positions.
    videos: the prompt's video embeddings, in order of its video tokens.
    """

    prompt_len: int
    rows: list[tuple[torch.Tensor, torch.Tensor]]
    videos: list[VideoEmbedding]

    @property
    def shared_tokens(self) -> int:
        """Tokens of the group in the packed sequence: the prompt once, then every response."""
        return self.prompt_len + sum(int(ids.shape[0]) - self.prompt_len for ids, _ in self.rows)


@dataclass(frozen=True)
class GroupSpan:
    """Where one group lies in the packed sequence: `[start, stop)` of its prompt and of each response."""

    prompt: tuple[int, int]
    responses: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SharedLayout:
    """The packed sequence's groups, in order; positions past the last group (SP padding)
    attend causally among themselves."""

    groups: tuple[GroupSpan, ...]
    length: int  # tokens of the packed sequence before padding
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # per group: built once per forward

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
               dropout_p: float) -> torch.Tensor:
        """Attention over the packed sequence: `q, k, v [B, H, L, D]` -> `[B, H, L, D]`."""
        pieces = []
        for g in self.groups:
            p0, p1 = g.prompt
            pieces.append(causal_attention(q[:, :, p0:p1], k[:, :, p0:p1], v[:, :, p0:p1], scaling, dropout_p))
            spans = [(r0, r1) for r0, r1 in g.responses if r1 > r0]
            if not spans:
                continue
            a, b = spans[0][0], spans[-1][1]  # the responses lie right after their prompt, in order
            if q.device.type == "cpu" and (b - a) * (b - p0) <= MASK_ELEMENTS:
                # all responses in one call: [prompt; responses] keys under a [responses, keys] mask
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, p0:b], v[:, :, p0:b], attn_mask=self.response_mask(g, q.device),
                    scale=scaling, dropout_p=dropout_p))
                continue
            kp, vp = k[:, :, p0:p1], v[:, :, p0:p1]
            for r0, r1 in spans:  # response token i sees the whole prompt and its own tokens 0..i
                bias = causal_lower_right(r1 - r0, p1 - p0 + r1 - r0)
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, r0:r1], torch.cat([kp, k[:, :, r0:r1]], dim=2), torch.cat([vp, v[:, :, r0:r1]], dim=2),
                    attn_mask=bias, scale=scaling, dropout_p=dropout_p))
        end = self.length
        if end < q.shape[2]:
            pieces.append(causal_attention(q[:, :, end:], k[:, :, end:], v[:, :, end:], scaling, dropout_p))
        return torch.cat(pieces, dim=2)


    def response_mask(self, g: GroupSpan, device: torch.device) -> torch.Tensor:
        """`[responses' tokens, prompt + responses' tokens]`: True where a response token may
        look: the whole prompt, and its own response up to itself (built once per forward,
        then reused by every layer)."""
        if (g, device) not in self.masks:
            (p0, p1), spans = g.prompt, [(r0, r1) for r0, r1 in g.responses if r1 > r0]
            a, b = spans[0][0], spans[-1][1]
            owner = torch.cat([torch.full((r1 - r0,), j) for j, (r0, r1) in enumerate(spans)])
            at = torch.arange(a, b)
            own = (owner[:, None] == owner[None, :]) & (at[None, :] <= at[:, None])
            self.masks[(g, device)] = torch.cat([torch.ones(b - a, p1 - p0, dtype=torch.bool), own], dim=1).to(device)
        return self.masks[(g, device)]


# Largest `[response tokens, prompt + response tokens]` mask the CPU path builds for one
# group (16 Mi booleans); past it, and on GPU, each response is its own masked call.
MASK_ELEMENTS = 2 ** 24


def pack(groups: list[PromptGroup]) -> tuple[TokenBatch, SharedLayout, list[list[tuple[int, int]]]]:
    """Return the packed one-row batch of `groups`, its layout, and per group the
    `[start, stop)` of each response's tokens in the packed row."""
    ids, pos, score, source, videos, spans, out = [], [], [], [], [], [], []
    at = 0
    for gi, g in enumerate(groups):
        if not g.rows:
            raise ValueError(f"group {gi}: no responses")
        P = g.prompt_len
        p_ids, p_pos = g.rows[0][0][:P], g.rows[0][1][:, :P]
        for j, (r_ids, r_pos) in enumerate(g.rows):
            if not (torch.equal(r_ids[:P], p_ids) and torch.equal(r_pos[:, :P], p_pos)):
                raise ValueError(f"group {gi}: response {j} does not continue the group's prompt")
        ids.append(p_ids)
        pos.append(p_pos)
        score.append(torch.zeros(P, dtype=torch.bool))
        source.append(torch.full((P,), -1, dtype=torch.long))
        videos += list(g.videos)
        prompt = (at, at + P)
        at += P
        resp = []
        for r_ids, r_pos in g.rows:
            T = r_ids.shape[0] - P
            ids.append(r_ids[P:])
            pos.append(r_pos[:, P:])  # the positions it has in its own sequence
            score.append(torch.ones(T, dtype=torch.bool))
            # token 0 is predicted by the prompt's last position, token i by token i-1
            source.append(torch.cat([torch.tensor([prompt[1] - 1]), torch.arange(at, at + T - 1)])[:T])
            resp.append((at, at + T))
            at += T
        spans.append(GroupSpan(prompt, tuple(resp)))
        out.append(resp)
    batch = TokenBatch(torch.cat(ids)[None], torch.cat(pos, dim=1)[:, None], [videos], torch.cat(score)[None],
                       torch.cat(source)[None])
    return batch, SharedLayout(tuple(spans), at), out


def shared_logprobs(adapter: VLAdapter, groups: list[PromptGroup], grid: Grid | None = None,
                    chunk_tokens: int = 1024, entropy: bool = False
                    ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
    """Per group, per response: log-probs `[T_j]` of its tokens (and entropies), from one
    packed forward over all `groups` (sequence-parallel over `grid`'s SP group); equal to
    `token_logprobs` on the unshared rows. Gradients flow when grad mode is on."""
    batch, layout, spans = pack(groups)
    logp, ent = token_logprobs(adapter, batch, grid, chunk_tokens, entropy, attend=layout.attend)
    lps = [[logp[0, a:b] for a, b in resp] for resp in spans]
    ents = [[ent[0, a:b] for a, b in resp] for resp in spans] if entropy else None
    return lps, ents
