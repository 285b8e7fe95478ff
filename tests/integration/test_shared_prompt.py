"""Shared-prompt training forwards against the unshared forward, on real gloo process groups
(CPU, fp32, SP 1 and 2): per-token log-probs, GRPO-loss gradients, the runtime's switch."""

import torch

from tests.integration.mp import run_workers

FAMILIES = ["qwen2.5-vl", "qwen2-vl"]
# two prompts per micro-batch (different videos and questions), ragged response lengths
GROUPS = [(6, "Which colour comes first?", [5, 9, 1, 7]), (4, "Where is the circle?", [3, 8, 8])]


def _video(adapter, frames, seed):
    from stages.models.patchify import patchify

    f = adapter.patch_spec.factor
    g = torch.Generator().manual_seed(seed)
    return patchify(torch.randint(0, 256, (frames, 3, f * 2, f * 2), dtype=torch.uint8, generator=g),
                    adapter.patch_spec)


def _groups(adapter, emb_grad: bool):
    """PromptGroups whose rows are whole unshared sequences with positions from the model's
    own rope index on each of them, plus the video embeddings (leaves, to check their grads)."""
    from stages.mrsp.shared import PromptGroup

    groups = []
    for gi, (frames, question, lengths) in enumerate(GROUPS):
        px, grid = _video(adapter, frames, seed=gi)
        times = [i * 0.5 for i in range(frames)]
        prompt = adapter.prompt_ids([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
                                    [(grid, times)])
        with torch.no_grad():
            emb = adapter.encode_video(px, grid)
        emb.embeds.requires_grad_(emb_grad)
        g = torch.Generator().manual_seed(100 + gi)
        rows = []
        for T in lengths:
            ids = torch.cat([torch.tensor(prompt), torch.randint(10, 300, (T,), generator=g)])
            pos, _ = adapter.positions(ids[None], [grid], [adapter.second_per_grid(2.0)])
            rows.append((ids, pos[:, 0]))
        groups.append(PromptGroup(len(prompt), rows, [emb]))
    return groups


def _unshared(adapter, groups, grid):
    """Per group, per response: log-probs and entropies of the existing unshared SP forward."""
    from stages.mrsp.logprobs import TokenBatch, token_logprobs

    lps, ents = [], []
    for g in groups:
        rows = []
        for ids, pos in g.rows:
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[g.prompt_len:] = True
            rows.append((ids, pos, list(g.videos), mask))
        batch = TokenBatch.from_rows(rows, adapter.tokenizer.pad_token_id)
        lp, en = token_logprobs(adapter, batch, grid, chunk_tokens=4, entropy=True)
        lps.append([lp[b][batch.score_mask[b]] for b in range(len(rows))])
        ents.append([en[b][batch.score_mask[b]] for b in range(len(rows))])
    return lps, ents


def _grpo_loss(lps):
    from stages.algo.grpo import grpo_loss, pad_rows

    total = 0.0
    for gi, lp_list in enumerate(lps):
        lp, mask = pad_rows(lp_list)
        g = torch.Generator().manual_seed(gi)
        old = lp.detach() + 0.3 * torch.randn(lp.shape, generator=g)  # ratios off 1: some tokens clipped
        ref = lp.detach() - 0.2 * torch.randn(lp.shape, generator=g)
        adv = torch.randn(lp.shape[0], generator=g)
        loss, _ = grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, None, "token-mean", 0.1, "k3")
        total = total + loss
    return total


def _worker(rank, world, families):
    import torch.distributed as dist

    from stages.models.adapter import load_adapter
    from stages.mrsp.dist import all_reduce_grads, init_grid
    from stages.mrsp.logprobs import token_logprobs
    from stages.mrsp.runtime import Mode, VideoInput
    from tests.helpers import make_runtime
    from stages.mrsp.shared import pack, shared_logprobs

    report = {}
    grids = {sp: init_grid(sp, backend="gloo", timeout_s=120) for sp in (1, 2)}
    for family in families:
        torch.manual_seed(0)
        adapter = load_adapter("tiny:" + family)
        params = list(adapter.model.model.language_model.parameters()) + list(adapter.lm_head.parameters())

        def grads(fn, grid):
            """Log-probs, entropies, parameter and video-embedding gradients of the GRPO loss."""
            adapter.model.zero_grad(set_to_none=True)
            groups = _groups(adapter, emb_grad=True)
            lps, ents = fn(adapter, groups, grid)
            _grpo_loss(lps).backward()
            all_reduce_grads(params, grid.sp_group)
            emb_grads = [g.videos[0].embeds.grad.clone() for g in groups]
            if grid.sp_group is not None:
                for e in emb_grads:
                    dist.all_reduce(e, group=grid.sp_group)
            return ([[x.detach() for x in r] for r in lps], [[x.detach() for x in r] for r in ents],
                    [p.grad.clone() for p in params], emb_grads)

        ref = grads(_unshared, grids[1])
        report[(family, "grads_nonzero")] = all(b.norm() > 0 for b in ref[2] + ref[3])
        for sp, grid in grids.items():
            got = grads(lambda a, gs, g: shared_logprobs(a, gs, g, chunk_tokens=4, entropy=True), grid)
            expected = [[(T,) for T in lengths] for _, _, lengths in GROUPS]  # zip below would hide a lost row
            shapes_ok = all([[tuple(x.shape) for x in r] for r in out] == expected
                            for out in (got[0], ref[0], got[1], ref[1]))
            lp_err = max((x - y).abs().max().item() for r, s in zip(got[0], ref[0]) for x, y in zip(r, s))
            ent_err = max((x - y).abs().max().item() for r, s in zip(got[1], ref[1]) for x, y in zip(r, s))
            rel = max(((a - b).norm() / (b.norm() + 1e-12)).item() for a, b in zip(got[2] + got[3], ref[2] + ref[3]))
            report[(family, "shared", sp)] = (shapes_ok, lp_err, ent_err, rel)

        # the check can fail: the packed row under plain causal attention (responses seeing
        # the responses before them) is far from the unshared log-probs
        with torch.no_grad():
            groups = _groups(adapter, emb_grad=False)
            batch, _, spans = pack(groups)
            lp, _ = token_logprobs(adapter, batch, grids[2])
            report[(family, "control")] = max((lp[0, a:b] - y).abs().max().item()
                                              for resp, r in zip(spans, ref[0]) for (a, b), y in zip(resp, r))

        # the runtime: mode mrsp-shared against mrsp on two samples of one micro-batch
        samples, responses = [], []
        for gi, (frames, question, lengths) in enumerate(GROUPS):
            px, grid_thw = _video(adapter, frames, seed=gi)
            video = VideoInput(f"v{gi}", px, grid_thw, [i * 0.5 for i in range(frames)], adapter.second_per_grid(2.0))
            samples.append(make_runtime(adapter).sample_of({"problem_id": f"q{gi}", "problem": f"{question}\nA. x\nB. y"},
                                                      video, f"q{gi}"))
            g = torch.Generator().manual_seed(200 + gi)
            responses.append([torch.randint(10, 300, (T,), generator=g).tolist() for T in lengths])
        res = {}
        for name in ("mrsp", "mrsp-shared"):
            rt = make_runtime(adapter, grids[2], Mode.named(name), chunk_tokens=4)
            with torch.no_grad():
                lps, _ = rt.group_logprobs(samples, responses)
            res[name] = (lps, rt.counters())
        prompts = [s.prompt.input_ids.shape[0] for s in samples]
        resp_tokens = sum(len(r) for rs in responses for r in rs)
        assert [[len(x) for x in r] for r in res["mrsp-shared"][0]] == [[len(x) for x in r] for r in res["mrsp"][0]] \
            == [lengths for _, _, lengths in GROUPS], family
        report[(family, "runtime")] = (
            max((x - y).abs().max().item() for r, s in zip(res["mrsp-shared"][0], res["mrsp"][0]) for x, y in zip(r, s)),
            res["mrsp-shared"][1]["train_forward_tokens"] == sum(prompts) + resp_tokens,
            res["mrsp-shared"][1]["train_forward_tokens_unshared"] == res["mrsp"][1]["train_forward_tokens"]
            == sum(p * len(rs) for p, rs in zip(prompts, responses)) + resp_tokens,
            res["mrsp-shared"][1]["vision_encodes"])
    return report


def test_shared_prompt_forward_equals_unshared():
    results = run_workers(_worker, 2, FAMILIES, timeout=300)
    for rank, report in results.items():
        for family in FAMILIES:
            for sp in (1, 2):
                shapes_ok, lp_err, ent_err, rel = report[(family, "shared", sp)]
                assert shapes_ok, (rank, family, sp)
                assert lp_err <= 1e-5 and ent_err <= 1e-5, (rank, family, sp, lp_err, ent_err)
                assert rel <= 1e-4, (rank, family, sp, rel)
            assert report[(family, "grads_nonzero")], (rank, family)
            assert report[(family, "control")] > 1e-3, (rank, family, report[(family, "control")])
            err, shared_count_ok, unshared_count_ok, encodes = report[(family, "runtime")]
            assert err <= 1e-5 and shared_count_ok and unshared_count_ok, (rank, family, report[(family, "runtime")])
            assert encodes == len(GROUPS)  # one encode per video, scattered into its prompt once
    for sp in (1, 2):  # the worst case over ranks and families (pytest -s shows it)
        worst = [max(r[(f, "shared", sp)][k] for r in results.values() for f in FAMILIES) for k in (1, 2, 3)]
        print(f"shared prompt, SP {sp}: log-prob |diff| {worst[0]:.2e}, entropy |diff| {worst[1]:.2e}, "
              f"grad rel {worst[2]:.2e}")
