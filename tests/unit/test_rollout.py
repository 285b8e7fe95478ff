import pytest
import torch

from stages.models.adapter import load_adapter
from stages.models.patchify import patchify
from stages.mrsp.rollout import HFEngine, RolloutPrompt, Sampling, default_stop_ids, sample_next

FPS = 2.0


@pytest.fixture(scope="module")
def adapters():
    return {}


def get_adapter(adapters, family):
    if family not in adapters:
        adapters[family] = load_adapter("tiny:" + family)
    return adapters[family]


def make_prompt(a, key="p0", question="What colour is the ball?", seed=0):
    """Return `(RolloutPrompt, pixels, grid, seconds_per_grid)` for a random 4-frame video."""
    f = a.patch_spec.factor
    frames = torch.randint(0, 256, (4, 3, 2 * f, 2 * f), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    pixels, grid = patchify(frames, a.patch_spec)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    ids = a.prompt_ids(messages, [(grid, [i / FPS for i in range(4)])])
    sec = [a.second_per_grid(FPS)]
    with torch.no_grad():
        video = a.encode_video(pixels, grid)
    return RolloutPrompt.build(a, key, ids, [video], sec), pixels, grid, sec


def hf_greedy(a, prompt, pixels, grid, sec, max_new_tokens, stop_ids, banned):
    """Return the response ids of transformers' own `generate` (greedy, pixel path)."""
    ids = prompt.input_ids[None]
    kw = {"second_per_grid_ts": torch.tensor(sec)} if a.family == "qwen2_5_vl" else {}
    a.backbone.rope_deltas = None
    with torch.no_grad():
        out = a.model.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,
                               mm_token_type_ids=a.mm_token_type_ids(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, bad_words_ids=[[t] for t in banned],
                               eos_token_id=stop_ids, pad_token_id=a.tokenizer.pad_token_id, **kw)
    return out[0, ids.shape[1]:].tolist()


def teacher_forced_logprobs(a, prompt, sec, response):
    """Return log-probs of `response` from one forward over prompt + response (positions on
    the full sequence, as the training forward computes them)."""
    ids = torch.cat([prompt.input_ids, torch.tensor(response)])[None]
    pos, _ = a.positions(ids, [v.grid_thw for v in prompt.videos], sec)
    with torch.no_grad():
        h, _ = a.hidden_states(ids, pos, prompt.videos)
        logp = torch.log_softmax(a.lm_head(h[0]).float(), dim=-1)
    L = prompt.input_ids.shape[0]
    return logp[L - 1:-1].gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("family,n", [("qwen2.5-vl", 2), ("qwen3-vl", 1)])
def test_greedy_equals_transformers_generate(adapters, family, n):
    a = get_adapter(adapters, family)
    prompt, pixels, grid, sec = make_prompt(a)
    engine = HFEngine(a)
    assert set(engine.banned_token_ids) == {a.video_token_id, a.image_token_id, a.vision_start_id, a.vision_end_id}
    K = 20
    stops = default_stop_ids(a)
    ours = engine.generate([prompt], n, Sampling(temperature=0, max_new_tokens=K))[0]
    ref = hf_greedy(a, prompt, pixels, grid, sec, K, stops, engine.banned_token_ids)
    assert len(ours) == n
    for r in ours:
        assert r.token_ids == ref
        assert r.prompt_key == "p0"
        assert r.finished == (ref[-1] in stops)
        assert r.text == a.tokenizer.decode(ref, skip_special_tokens=False)
    # the same with a stop token that greedy emits mid-way: both stop there, stop token included
    cut = next(i for i in range(3, K) if ref[i] not in ref[:i])
    stop = [ref[cut]]
    short = engine.generate([prompt], n, Sampling(temperature=0, max_new_tokens=K, stop_token_ids=stop))[0]
    ref_short = hf_greedy(a, prompt, pixels, grid, sec, K, stop, engine.banned_token_ids)
    assert ref_short == ref[:cut + 1]
    assert all(r.token_ids == ref_short and r.finished for r in short)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_untempered_and_match_teacher_forcing(adapters, temperature):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompt, _, _, sec = make_prompt(a)
    rollouts = HFEngine(a).generate([prompt], 3, Sampling(temperature=temperature, max_new_tokens=12, seed=1))[0]
    for r in rollouts:
        assert len(r.logprobs) == len(r.token_ids) > 0
        ref = teacher_forced_logprobs(a, prompt, sec, r.token_ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-5, rtol=0)
    if temperature != 1.0:  # the check above tells tempered from untempered log-probs apart
        ids = torch.cat([prompt.input_ids, torch.tensor(rollouts[0].token_ids)])[None]
        pos, _ = a.positions(ids, [prompt.videos[0].grid_thw], sec)
        with torch.no_grad():
            h, _ = a.hidden_states(ids, pos, prompt.videos)
        L = prompt.input_ids.shape[0]
        tempered = torch.log_softmax(a.lm_head(h[0, L - 1:-1]) / temperature, -1)
        tempered = tempered.gather(-1, torch.tensor(rollouts[0].token_ids)[:, None]).squeeze(-1)
        assert (tempered - torch.tensor(rollouts[0].logprobs)).abs().max() > 1e-3


def test_sampling_is_reproducible_per_seed_and_differs_across_rows_and_prompts(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompt, _, _, _ = make_prompt(a)
    twin = RolloutPrompt("p1", prompt.input_ids, prompt.position_ids, prompt.rope_delta, prompt.videos)
    engine = HFEngine(a)

    def run(seed):
        groups = engine.generate([prompt, twin], 3, Sampling(temperature=1.5, max_new_tokens=16, seed=seed))
        return [[r.token_ids for r in g] for g in groups]

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other and all(x != y for x, y in zip(first[0], other[0]))
    assert len({tuple(t) for t in first[0]}) == 3  # rows of a group draw their own tokens
    assert first[0] != first[1]  # the same prompt twice in a batch still gets its own samples


def test_one_prefill_per_prompt_shared_by_the_group(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    p0, _, _, _ = make_prompt(a, "p0", "What colour is the ball?", seed=0)
    p1, _, _, _ = make_prompt(a, "p1", "Where does the red circle move after the first second?", seed=1)
    calls = []  # (batch, tokens, training) of every language-model forward

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        calls.append((x.shape[0], x.shape[1], module.training))

    a.model.train()  # training code calls generate between updates
    handle = a.backbone.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine = HFEngine(a)
        groups = engine.generate([p0, p1], 4, Sampling(temperature=1.0, max_new_tokens=10, seed=0))
    finally:
        handle.remove()
    assert a.model.training  # mode restored
    a.model.eval()
    assert not any(training for _, _, training in calls)  # ... but generation ran in eval mode

    L0, L1 = p0.input_ids.shape[0], p1.input_ids.shape[0]
    assert L0 != L1
    prefills = [(b, t) for b, t, _ in calls if t > 1]
    assert prefills == [(1, L0), (1, L1)]
    assert engine.prefills == 2 and engine.prefill_tokens == L0 + L1
    decodes = [(b, t) for b, t, _ in calls if t == 1]
    assert decodes and all(d == (8, 1) for d in decodes)  # both groups' rows decode as one batch
    assert engine.decode_steps == len(decodes) == max(len(r) for g in groups for r in g) - 1
    assert [len(g) for g in groups] == [4, 4]
    assert [g[0].prompt_key for g in groups] == ["p0", "p1"]
    assert engine.generated_tokens == sum(len(r) for g in groups for r in g)
    assert all(len(r) == 10 or (r.finished and len(r) < 10) for g in groups for r in g)
    engine.reset_counters()
    assert (engine.prefills, engine.prefill_tokens, engine.decode_steps, engine.generated_tokens) == (0, 0, 0, 0)


def test_banned_vision_tokens_are_never_sampled_even_when_favoured(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompt, _, _, _ = make_prompt(a)
    favoured = [a.video_token_id, a.vision_start_id]

    def boost(module, args, out):
        out = out.clone()
        out[..., favoured] += 50.0
        return out

    handle = a.lm_head.register_forward_hook(boost)
    try:
        # without the ban the boosted vision token is what greedy picks ...
        unbanned = HFEngine(a, banned_token_ids=[]).generate([prompt], 1, Sampling(temperature=0, max_new_tokens=1))
        assert unbanned[0][0].token_ids[0] in favoured
        engine = HFEngine(a)
        greedy = engine.generate([prompt], 2, Sampling(temperature=0, max_new_tokens=8))[0]
        hot = engine.generate([prompt], 8, Sampling(temperature=2.0, max_new_tokens=16, seed=0))[0]
    finally:
        handle.remove()
    tokens = [t for r in greedy + hot for t in r.token_ids]
    assert len(tokens) > 100  # many draws, each of which would be a vision token if not banned
    assert not set(tokens) & set(engine.banned_token_ids)


def test_stop_token_ends_a_row_and_includes_it(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompt, _, _, _ = make_prompt(a)
    engine = HFEngine(a)
    free = engine.generate([prompt], 1, Sampling(temperature=0, max_new_tokens=6))[0][0]
    assert not free.finished and len(free) == 6  # the random model does not emit EOS here
    assert free.token_ids[2] not in free.token_ids[:2]
    stopped = engine.generate([prompt], 1, Sampling(temperature=0, max_new_tokens=6,
                                                    stop_token_ids=[free.token_ids[2]]))[0][0]
    assert stopped.token_ids == free.token_ids[:3] and stopped.finished
    assert stopped.logprobs == pytest.approx(free.logprobs[:3], abs=1e-6)


def test_finished_rows_add_nothing_while_others_decode(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompt, _, _, _ = make_prompt(a)
    engine = HFEngine(a)
    free = engine.generate([prompt], 6, Sampling(temperature=1.5, max_new_tokens=12, seed=3))[0]
    # stop on a token some rows emit early: they end there, the others run on unchanged
    stop = free[0].token_ids[1]
    stopped = engine.generate([prompt], 6, Sampling(temperature=1.5, max_new_tokens=12, seed=3, stop_token_ids=[stop]))[0]
    for f, s in zip(free, stopped):
        cut = f.token_ids.index(stop) + 1 if stop in f.token_ids else len(f.token_ids)
        # a row's draws do not depend on the others, so it is the free row cut at its stop token
        assert s.token_ids == f.token_ids[:cut]
        assert s.finished == (stop in f.token_ids)
    assert stopped[0].finished and len(stopped[0]) == 2
    assert any(not s.finished and len(s) == 12 for s in stopped)


def test_tiny_top_p_is_greedy_and_nucleus_keeps_the_top_mass():
    a_logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(a_logits, Sampling(top_p=0.7), g) for _ in range(400)]).flatten()
    assert set(draws.tolist()) == {1, 3}  # mass before token 2 is 0.8 >= 0.7: it is cut
    assert 0.55 < (draws == 1).float().mean() < 0.70  # renormalised 0.5 / 0.8
    draws = torch.stack([sample_next(a_logits, Sampling(top_p=0.5), g) for _ in range(50)]).flatten()
    assert set(draws.tolist()) == {1}


def test_tiny_top_p_equals_greedy_on_the_model(adapters):
    a = get_adapter(adapters, "qwen2.5-vl")
    prompt, _, _, _ = make_prompt(a)
    engine = HFEngine(a)
    greedy = engine.generate([prompt], 1, Sampling(temperature=0, max_new_tokens=12))[0][0]
    nucleus = engine.generate([prompt], 3, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=12, seed=5))[0]
    assert all(r.token_ids == greedy.token_ids for r in nucleus)
    assert len(set(greedy.token_ids)) > 3  # not a degenerate repeat that any sampler would hit
