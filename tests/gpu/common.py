"""Bodies of the GPU tests, each taking `device` and `dtype`, so the same code runs on CUDA
under `tests/gpu` and can be run on CPU (fp32 and bf16) to check the bodies themselves.

Tolerances, absolute on per-token log-probs (natural log) unless said otherwise:

- fp32: `FP32_LOGP_ATOL` = 1e-5, gradients `FP32_GRAD_RTOL` = 1e-4 relative (norm of the
  difference over the norm of the reference), the bounds the CPU integration tests hold
  MR-SP to. TF32 is switched off while they run (`exact_fp32`): with it, fp32 matmuls and
  convolutions round their inputs to 10 mantissa bits and fp32 would not mean fp32.
- bf16: `BF16_LOGP_ATOL` = 1e-2. bf16 keeps 8 significant bits, so a logit of size
  |z| < 2 (the tiny models' logits lie well inside that) is rounded by up to 2^-8 * 2 / 2
  ~= 0.004 each time it is stored; a log-prob `z_t - logsumexp(z)` moves by about one such
  rounding when two paths take different kernels (measured on CPU: bf16 against fp32 on
  the same pixel path, 0.002). 1e-2 leaves room for two or three roundings and is still
  well below what a wrong video or plain causal attention over a packed row does to the
  tiny models (0.045 to 0.14 on CPU): every parity check asserts such a control lands at
  least 3x its bound away, so a check that cannot fail fails.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

FP32_LOGP_ATOL = 1e-5
FP32_GRAD_RTOL = 1e-4
BF16_LOGP_ATOL = 1e-2
FPS = 2.0


def logp_atol(dtype: torch.dtype) -> float:
    return FP32_LOGP_ATOL if dtype == torch.float32 else BF16_LOGP_ATOL


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason=f"needs CUDA (torch {torch.__version__} sees no GPU): run on a GPU machine")


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 while the block runs (restored after)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tiny_adapter(family: str, device, dtype: torch.dtype):
    from stages.models.adapter import load_adapter

    torch.manual_seed(0)
    return load_adapter("tiny:" + family, dtype=dtype, device=device)


def random_video(adapter, frames: int, seed: int, width_patches: int = 2):
    """`(pixels, grid_thw)` of `frames` random frames, patchified on CPU (as stages do)."""
    from stages.models.patchify import patchify

    f = adapter.patch_spec.factor
    g = torch.Generator().manual_seed(seed)
    frames_u8 = torch.randint(0, 256, (frames, 3, 2 * f, width_patches * f), dtype=torch.uint8, generator=g)
    return patchify(frames_u8, adapter.patch_spec)


def video_prompt(adapter, grid, frames: int, question: str) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return adapter.prompt_ids(messages, [(grid, [i / FPS for i in range(frames)])])


def encode(adapter, pixels, grid, device):
    """The video embedding, computed on `device` in the model's dtype, without gradients."""
    dtype = next(adapter.vision_tower.parameters()).dtype
    with torch.no_grad():
        return adapter.encode_video(pixels.to(device, dtype), grid.to(device))


def pixel_logprobs(adapter, ids: torch.Tensor, pixels, grid, seconds_per_grid: float, start: int) -> torch.Tensor:
    """Log-probs of `ids[start:]` from transformers' own forward on the pixels (the reference):
    `ids [L]` on the model's device."""
    device = ids.device
    dtype = next(adapter.vision_tower.parameters()).dtype
    kw = {"second_per_grid_ts": torch.tensor([seconds_per_grid], device=device)} if adapter.family == "qwen2_5_vl" else {}
    adapter.backbone.rope_deltas = None
    with torch.no_grad():
        logits = adapter.model(input_ids=ids[None], pixel_values_videos=pixels.to(device, dtype),
                               video_grid_thw=grid.to(device), mm_token_type_ids=adapter.mm_token_type_ids(ids[None]),
                               **kw).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[start - 1:-1].gather(-1, ids[start:, None]).squeeze(-1)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


# -- 1. cached embedding against the pixel path ------------------------------------------------
ANSWER = "<think>red then blue</think><answer>A</answer>"


def embedding_vs_pixel(family: str, device, dtype) -> dict:
    """MR-SP's teacher-forced log-probs (`token_logprobs` fed the cached embedding) against the
    pixel path on the same prompt + response; `control`: the same with another video's
    embedding (how far a wrong embedding lands)."""
    from stages.mrsp.dist import Grid
    from stages.mrsp.logprobs import TokenBatch, token_logprobs

    a = tiny_adapter(family, device, dtype)
    frames = 8
    pixels, grid = random_video(a, frames, seed=0)
    other_pixels, _ = random_video(a, frames, seed=1)
    prompt = video_prompt(a, grid, frames, "Which colour comes first?")
    response = a.tokenizer.encode(ANSWER, add_special_tokens=False)
    ids_cpu = torch.tensor(prompt + response)
    sec = a.second_per_grid(FPS)
    pos, _ = a.positions(ids_cpu[None], [grid], [sec])  # on CPU ids, as the stages compute them
    ids = ids_cpu.to(device)
    mask = torch.zeros(len(ids), dtype=torch.bool, device=device)
    mask[len(prompt):] = True

    def ours(emb):
        batch = TokenBatch.from_rows([(ids, pos[:, 0].to(device), [emb], mask)], a.tokenizer.pad_token_id)
        with torch.no_grad():
            logp, _ = token_logprobs(a, batch, Grid(device=torch.device(device)), chunk_tokens=8)
        return logp[0][batch.score_mask[0]]

    ref = pixel_logprobs(a, ids, pixels, grid, sec, len(prompt))
    got = ours(encode(a, pixels, grid, device))
    control = ours(encode(a, other_pixels, grid, device))
    return {"err": max_abs(got, ref), "control": max_abs(control, ref), "tokens": got.numel(),
            "ref_mean": ref.mean().item()}


def runtime_vs_pixel(family: str, device, dtype) -> dict:
    """The MR-SP runtime as the stages drive it (a `VideoInput` patchified on CPU, mode `mrsp`,
    one process): log-probs of two responses, asked twice in one step, against the pixel path;
    with the encode/cache counters (one encode, one hit)."""
    from stages.mrsp.dist import Grid
    from stages.mrsp.runtime import Mode, VideoInput
    from tests.helpers import make_runtime

    a = tiny_adapter(family, device, dtype)
    rt = make_runtime(a, Grid(device=torch.device(device)), Mode.named("mrsp"), chunk_tokens=8)
    frames = 8
    pixels, grid = random_video(a, frames, seed=0)
    sec = a.second_per_grid(FPS)
    video = VideoInput("v0", pixels, grid, [i / FPS for i in range(frames)], sec)
    sample = rt.sample_of({"problem_id": "q0", "problem": "Which colour comes first?\nA. red\nB. blue"}, video, "q0")
    responses = [a.tokenizer.encode(ANSWER, add_special_tokens=False) + [rt.eos_id],
                 a.tokenizer.encode("<think>blue</think><answer>B</answer>", add_special_tokens=False)]
    rt.new_step()
    with torch.no_grad():
        first, _ = rt.logprobs(sample, responses)
        again, _ = rt.logprobs(sample, responses)
    P = sample.prompt.input_ids.shape[0]
    errs, repeat = [], []
    for resp, lp, lp2 in zip(responses, first, again):
        ids = torch.cat([sample.prompt.input_ids, torch.tensor(resp)]).to(device)
        ref = pixel_logprobs(a, ids, pixels, grid, sec, P)
        errs.append(max_abs(lp, ref))
        repeat.append(max_abs(lp2, lp))
    counters = rt.counters()
    # the control: the step's cached embedding is another video's
    other, _ = random_video(a, frames, seed=1)
    rt.new_step()
    rt.cache.get(video.key, lambda: encode(a, other, grid, device))
    with torch.no_grad():
        wrong, _ = rt.logprobs(sample, responses[:1])
    ids = torch.cat([sample.prompt.input_ids, torch.tensor(responses[0])]).to(device)
    control = max_abs(wrong[0], pixel_logprobs(a, ids, pixels, grid, sec, P))
    return {"err": max(errs), "repeat": max(repeat), "control": control, "lengths": [len(x) for x in first],
            "vision_encodes": counters["vision_encodes"], "hits": counters["embedding_cache_hits"]}


def grpo_loss_on(device) -> tuple[float, float]:
    """The GRPO loss of one group as `stages/rl.py` builds it (`pad_rows` of per-response
    log-probs on `device`, advantages from rewards made on CPU): `(loss, d loss / d logp sum)`."""
    from stages.algo.grpo import group_advantages, grpo_loss, pad_rows

    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 2]
    rows = [(-2 + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)).to(device).requires_grad_() for T in lengths]
    old = [(r.detach() + 0.2 * torch.randn(r.shape, generator=g, dtype=torch.float64).to(device)) for r in rows]
    ref = [(r.detach() - 0.1 * torch.randn(r.shape, generator=g, dtype=torch.float64).to(device)) for r in rows]
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, len(lengths))
    lp, mask = pad_rows(rows)
    loss, _ = grpo_loss(lp, pad_rows(old)[0], pad_rows(ref)[0], adv, mask, 0.2, 0.28, None, "token-mean", 0.1, "k3")
    loss.backward()
    return loss.item(), sum(r.grad.sum().item() for r in rows)


# -- 2. shared-prompt forwards against unshared ones -------------------------------------------
# two prompts in one packed row (different videos and questions), ragged response lengths
SHARED_GROUPS = [(6, "Which colour comes first?", [5, 9, 1, 7]), (4, "Where is the circle?", [3, 8, 8])]


def _prompt_groups(a, device, embeddings, grad: bool):
    """PromptGroups whose rows are the unshared sequences on `device`, positions from the
    model's own rope index on each of them; the embeddings as fresh leaves (`grad`)."""
    from stages.models.adapter import VideoEmbedding
    from stages.mrsp.shared import PromptGroup

    groups = []
    for gi, (frames, question, lengths) in enumerate(SHARED_GROUPS):
        grid = embeddings[gi].grid_thw.cpu()
        prompt = video_prompt(a, grid, frames, question)
        emb = embeddings[gi]
        leaf = VideoEmbedding(emb.embeds.detach().clone().requires_grad_(grad), emb.grid_thw,
                              [d.detach().clone() for d in emb.deepstack])
        g = torch.Generator().manual_seed(100 + gi)
        rows = []
        for T in lengths:
            ids = torch.cat([torch.tensor(prompt), torch.randint(10, 300, (T,), generator=g)])
            pos, _ = a.positions(ids[None], [grid], [a.second_per_grid(FPS)])
            rows.append((ids.to(device), pos[:, 0].to(device)))
        groups.append(PromptGroup(len(prompt), rows, [leaf]))
    return groups


def _unshared(a, groups, grid):
    from stages.mrsp.logprobs import TokenBatch, token_logprobs

    lps, ents = [], []
    for g in groups:
        rows = []
        for ids, pos in g.rows:
            mask = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            mask[g.prompt_len:] = True
            rows.append((ids, pos, list(g.videos), mask))
        batch = TokenBatch.from_rows(rows, a.tokenizer.pad_token_id)
        lp, en = token_logprobs(a, batch, grid, chunk_tokens=4, entropy=True)
        lps.append([lp[b][batch.score_mask[b]] for b in range(len(rows))])
        ents.append([en[b][batch.score_mask[b]] for b in range(len(rows))])
    return lps, ents


def _weights(groups, device):
    """Fixed random per-token weights of a loss over log-probs and entropies."""
    g = torch.Generator().manual_seed(7)
    out = []
    for grp in groups:
        out.append([(torch.randn(len(ids) - grp.prompt_len, generator=g).to(device),
                     torch.randn(len(ids) - grp.prompt_len, generator=g).to(device)) for ids, _ in grp.rows])
    return out


def shared_vs_unshared(family: str, device, dtype, grads: bool) -> dict:
    """`shared_logprobs` against `token_logprobs` on the unshared rows (one process): log-probs,
    entropies and, with `grads`, the gradients of a weighted sum of both with respect to the
    language model, the LM head and the video embeddings. `control`: the packed row under
    plain causal attention (responses seeing the responses before them)."""
    from stages.mrsp.dist import Grid
    from stages.mrsp.logprobs import token_logprobs
    from stages.mrsp.shared import pack, shared_logprobs

    a = tiny_adapter(family, device, dtype)
    grid = Grid(device=torch.device(device))
    embeddings = []
    for gi, (frames, _, _) in enumerate(SHARED_GROUPS):
        pixels, g = random_video(a, frames, seed=gi)
        embeddings.append(encode(a, pixels, g, device))
    params = list(a.backbone.language_model.parameters()) + list(a.lm_head.parameters())

    def run(fn):
        a.model.zero_grad(set_to_none=True)
        groups = _prompt_groups(a, device, embeddings, grad=grads)
        with torch.set_grad_enabled(grads):
            lps, ents = fn(groups)
            if grads:
                w = _weights(groups, device)
                loss = sum((lp.float() * wl).sum() + (en.float() * we).sum()
                           for lr, er, wr in zip(lps, ents, w) for lp, en, (wl, we) in zip(lr, er, wr))
                loss.backward()
        grad_list = ([p.grad.clone() for p in params] + [g.videos[0].embeds.grad.clone() for g in groups]) if grads else []
        return [x.detach() for r in lps for x in r], [x.detach() for r in ents for x in r], grad_list

    ref_lp, ref_ent, ref_grads = run(lambda gs: _unshared(a, gs, grid))
    lp, ent, got_grads = run(lambda gs: shared_logprobs(a, gs, grid, chunk_tokens=4, entropy=True))
    out = {"shapes_ok": [x.shape for x in lp] == [x.shape for x in ref_lp],
           "lp_err": max(max_abs(x, y) for x, y in zip(lp, ref_lp)),
           "ent_err": max(max_abs(x, y) for x, y in zip(ent, ref_ent)),
           "scored": sum(x.numel() for x in lp)}
    if grads:
        out["grad_rel"] = max(((x - y).norm() / (y.norm() + 1e-12)).item() for x, y in zip(got_grads, ref_grads))
        out["grads_nonzero"] = all(y.norm() > 0 for y in ref_grads)
    with torch.no_grad():
        batch, _, spans = pack(_prompt_groups(a, device, embeddings, grad=False))
        plain, _ = token_logprobs(a, batch, grid)
        ref_rows = iter(ref_lp)
        out["control"] = max(max_abs(plain[0, s0:s1], next(ref_rows)) for resp in spans for s0, s1 in resp)
    return out


# -- 3. greedy rollouts against transformers' generate -----------------------------------------
def greedy_vs_generate(family: str, n: int, device, max_new_tokens: int = 20) -> dict:
    """The hf rollout engine (cached embedding, one prefill, n rows decoded together) at
    temperature 0 against `model.generate` on the pixels, token for token; and the engine's
    log-probs against a teacher-forced forward over prompt + response."""
    from stages.mrsp.rollout import HFEngine, RolloutPrompt, Sampling, default_stop_ids

    a = tiny_adapter(family, device, torch.float32)
    frames = 4
    pixels, grid = random_video(a, frames, seed=0)
    ids = video_prompt(a, grid, frames, "What colour is the ball?")
    sec = a.second_per_grid(FPS)
    prompt = RolloutPrompt.build(a, "p0", ids, [encode(a, pixels, grid, device)], [sec])
    engine = HFEngine(a)
    stops = default_stop_ids(a)
    ours = engine.generate([prompt], n, Sampling(temperature=0, max_new_tokens=max_new_tokens))[0]

    input_ids = prompt.input_ids[None].to(device)
    kw = {"second_per_grid_ts": torch.tensor([sec], device=device)} if a.family == "qwen2_5_vl" else {}
    a.backbone.rope_deltas = None
    with torch.no_grad():
        out = a.model.generate(input_ids=input_ids, pixel_values_videos=pixels.to(device), video_grid_thw=grid.to(device),
                               mm_token_type_ids=a.mm_token_type_ids(input_ids), do_sample=False,
                               max_new_tokens=max_new_tokens, bad_words_ids=[[t] for t in engine.banned_token_ids],
                               eos_token_id=stops, pad_token_id=a.tokenizer.pad_token_id, **kw)
    ref = out[0, input_ids.shape[1]:].tolist()
    full = torch.cat([prompt.input_ids, torch.tensor(ours[0].token_ids)]).to(device)
    teacher = pixel_logprobs(a, full, pixels, grid, sec, prompt.input_ids.shape[0])
    return {"ours": [r.token_ids for r in ours], "ref": ref, "finished": [r.finished for r in ours],
            "ref_finished": bool(ref) and ref[-1] in stops,
            "logp_err": max_abs(torch.tensor(ours[0].logprobs), teacher.cpu()),
            "distinct": len(set(ref))}


# -- 4. SP parity on real process groups -------------------------------------------------------
def sp_parity_worker(rank: int, world: int, backend: str, families: list[str]) -> dict:
    """On every rank (one GPU each with NCCL): the sharded vision encode against one process's,
    and at SP = world the SP forward's log-probs, entropies and gradients, and the shared-prompt
    forward's log-probs, against the unsharded forward on the same device. fp32."""
    from stages.mrsp.dist import all_reduce_grads, init_grid
    from stages.mrsp.logprobs import TokenBatch, token_logprobs
    from stages.mrsp.shared import shared_logprobs
    from stages.mrsp.vision import encode_sharded

    sp = init_grid(world, backend=backend, timeout_s=120)
    one = init_grid(1, backend=backend, timeout_s=120)
    device = sp.device
    report = {"device": str(device), "backend": torch.distributed.get_backend()}
    with exact_fp32():
        for family in families:
            a = tiny_adapter(family, device, torch.float32)
            pixels, grid = random_video(a, 30, seed=0)  # 15 temporal patches: uneven over the ranks
            with torch.no_grad():
                whole = a.encode_video(pixels.to(device), grid.to(device))
                sharded = encode_sharded(a, pixels.to(device), grid.to(device), sp)
            assert [x.shape for x in sharded.deepstack] == [y.shape for y in whole.deepstack], family
            assert (len(whole.deepstack) > 0) == (family == "qwen3-vl"), family
            report[(family, "vision")] = max([max_abs(sharded.embeds, whole.embeds)]
                                             + [max_abs(x, y) for x, y in zip(sharded.deepstack, whole.deepstack)])
            report[(family, "vision_rows")] = (sharded.embeds.shape[0], whole.embeds.shape[0])

            pixels, grid = random_video(a, 6, seed=1)
            emb = encode(a, pixels, grid, device)
            sec = a.second_per_grid(FPS)
            rows = []
            for q, answer in (("Which colour comes first?", ANSWER), ("Where is it?", "<think>left</think><answer>B</answer>")):
                prompt = video_prompt(a, grid, 6, q)
                resp = a.tokenizer.encode(answer, add_special_tokens=False)
                ids = torch.tensor(prompt + resp)
                pos, _ = a.positions(ids[None], [grid], [sec])
                mask = torch.zeros(len(ids), dtype=torch.bool)
                mask[len(prompt):] = True
                rows.append((ids.to(device), pos[:, 0].to(device), [emb], mask.to(device)))
            batch = TokenBatch.from_rows(rows, a.tokenizer.pad_token_id)
            weights = torch.linspace(-1, 1, batch.input_ids.numel(), device=device).view_as(batch.input_ids)
            params = list(a.backbone.language_model.parameters()) + list(a.lm_head.parameters())

            def loss_and_grads(g):
                a.model.zero_grad(set_to_none=True)
                logp, ent = token_logprobs(a, batch, g, chunk_tokens=5, entropy=True)
                (logp * weights).sum().backward()
                all_reduce_grads(params, g.sp_group)
                return logp.detach(), ent.detach(), [p.grad.clone() for p in params]

            ref_lp, ref_ent, ref_grads = loss_and_grads(one)
            lp, ent, grads = loss_and_grads(sp)
            report[(family, "logp")] = (max_abs(lp, ref_lp), max_abs(ent, ref_ent),
                                        max(((x - y).norm() / (y.norm() + 1e-12)).item() for x, y in zip(grads, ref_grads)),
                                        int((ref_lp != 0).sum()), int(batch.score_mask.sum()))

            if family in ("qwen2.5-vl", "qwen2-vl"):
                embeddings = [encode(a, *random_video(a, frames, seed=gi), device)
                              for gi, (frames, _, _) in enumerate(SHARED_GROUPS)]
                with torch.no_grad():
                    ref_s, _ = _unshared(a, _prompt_groups(a, device, embeddings, grad=False), one)
                    got_s, _ = shared_logprobs(a, _prompt_groups(a, device, embeddings, grad=False), sp, chunk_tokens=4)
                assert [[x.shape for x in r] for r in got_s] == [[y.shape for y in r] for r in ref_s], family
                assert len(ref_s) == len(SHARED_GROUPS), family
                report[(family, "shared")] = max(max_abs(x, y) for r, s in zip(got_s, ref_s) for x, y in zip(r, s))
    return report
