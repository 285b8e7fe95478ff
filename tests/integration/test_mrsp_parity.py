"""MR-SP against the unsharded model, on real gloo process groups (CPU, fp32)."""

import pytest
import torch

from tests.integration.mp import run_workers

FAMILIES = ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"]


def _video(adapter, frames, seed=0):
    from stages.models.patchify import patchify

    f = adapter.patch_spec.factor
    g = torch.Generator().manual_seed(seed)
    px, grid = patchify(torch.randint(0, 256, (frames, 3, f * 2, f * 2), dtype=torch.uint8, generator=g),
                        adapter.patch_spec)
    return px, grid


def _odd_heads_adapter(family):
    """The tiny model with 6 query heads and 2 KV heads: not divisible by SP 4, KV < SP."""
    from transformers import AutoModelForImageTextToText

    from stages.models.adapter import VLAdapter, load_patch_spec, load_tokenizer, resolve_model_path
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_model_path("tiny:" + family))
    t = cfg.get_text_config()
    t.hidden_size, t.num_attention_heads, t.num_key_value_heads = 96, 6, 2
    if hasattr(t, "head_dim"):
        t.head_dim = 16
    t.rope_parameters["mrope_section"] = [2, 3, 3]
    cfg.vision_config.out_hidden_size = 96
    if family == "qwen2-vl":
        cfg.vision_config.hidden_size = 96
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    return VLAdapter(model, load_tokenizer("tiny:" + family), load_patch_spec("tiny:" + family))


def _parity_worker(rank, world, families):
    from stages.models.adapter import load_adapter
    from stages.mrsp.dist import all_reduce_grads, init_grid
    from stages.mrsp.logprobs import TokenBatch, token_logprobs
    from stages.mrsp.positions import pad_sequence_dim, padded_length, shard_range
    from stages.mrsp.vision import encode_sharded

    report = {}
    grids = {sp: init_grid(sp, backend="gloo", timeout_s=120) for sp in (1, 2, 4) if world % sp == 0}
    for family in families:
        torch.manual_seed(0)
        for variant, adapter in (("tiny", load_adapter("tiny:" + family)), ("odd-heads", _odd_heads_adapter(family))):
            # 1. sharded vision encoding equals the single-process embedding (within float
            #    rounding: a slice's patch-embedding matmul may take another sgemm kernel)
            px, grid_thw = _video(adapter, frames=30)
            with torch.no_grad():
                ref = adapter.encode_video(px, grid_thw)
                levels = len(getattr(adapter.model.config.vision_config, "deepstack_visual_indexes", None) or [])
                assert len(ref.deepstack) == levels and (levels > 0) == (family == "qwen3-vl"), (family, levels)
                for sp, g in grids.items():
                    if sp == 1:  # encode_sharded is encode_video itself there
                        continue
                    emb = encode_sharded(adapter, px, grid_thw, g)
                    assert emb.embeds.shape == ref.embeds.shape and len(emb.deepstack) == levels
                    assert [a.shape for a in emb.deepstack] == [b.shape for b in ref.deepstack]
                    report[(family, variant, "vision", sp)] = (
                        (emb.embeds - ref.embeds).abs().max().item(),
                        max([(a - b).abs().max().item() for a, b in zip(emb.deepstack, ref.deepstack)] or [0.0]))

            # 2. SP forward log-probs and gradients equal the unsharded forward
            px, grid_thw = _video(adapter, frames=6, seed=1)
            times = [i * 0.5 for i in range(6)]
            rows = []
            for q, answer in (("Which colour comes first?", "<think>red then blue</think><answer>A</answer>"),
                              ("Where is it?", "<think>left</think><answer>B</answer><|im_end|>")):
                prompt = adapter.prompt_ids([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}],
                                            [(grid_thw, times)])
                resp = adapter.tokenizer.encode(answer, add_special_tokens=False)
                ids = torch.tensor(prompt + resp)
                pos, _ = adapter.positions(ids[None], [grid_thw], [adapter.second_per_grid(2.0)])
                mask = torch.zeros(len(ids), dtype=torch.bool)
                mask[len(prompt):] = True
                rows.append((ids, pos[:, 0], mask))
            with torch.no_grad():
                emb = adapter.encode_video(px, grid_thw)
            batch = TokenBatch.from_rows([(i, p, [emb], m) for i, p, m in rows], adapter.tokenizer.pad_token_id)
            weights = torch.linspace(-1, 1, batch.input_ids.numel()).view_as(batch.input_ids)
            params = [p for p in adapter.model.model.language_model.parameters()] + list(adapter.lm_head.parameters())

            def loss_and_grads(g):
                adapter.model.zero_grad(set_to_none=True)
                logp, ent = token_logprobs(adapter, batch, g, chunk_tokens=5, entropy=True)
                (logp * weights).sum().backward()
                all_reduce_grads(params, g.sp_group)
                return logp.detach(), ent.detach(), [p.grad.clone() for p in params]

            ref_logp, ref_ent, ref_grads = loss_and_grads(grids[1])
            for sp, g in grids.items():
                if sp == 1:
                    continue
                logp, ent, grads = loss_and_grads(g)
                rel = max(((a - b).norm() / (b.norm() + 1e-12)).item() for a, b in zip(grads, ref_grads))
                report[(family, variant, "logp", sp)] = ((logp - ref_logp).abs().max().item(),
                                                         (ent - ref_ent).abs().max().item(), rel)
            # 3. the positions the model gets on each shard of the SP 4 forward are this rank's
            # slice of the whole sequence's positions (the model's own get_rope_index above)
            seen, plain = [], adapter.hidden_states
            adapter.hidden_states = lambda ids, pos, *a, **k: seen.append(pos.clone()) or plain(ids, pos, *a, **k)
            with torch.no_grad():
                token_logprobs(adapter, batch, grids[4], chunk_tokens=5)
            del adapter.hidden_states
            L = padded_length(batch.input_ids.shape[1], 4)
            s0, s1 = shard_range(L, 4, grids[4].sp_rank)
            whole = pad_sequence_dim(batch.position_ids, L, None)
            report[(family, variant, "positions")] = (len(seen) == 1 and 0 < s1 - s0 < L
                                                      and torch.equal(seen[0], whole[:, :, s0:s1]))
            report[(family, variant, "scored")] = int(batch.score_mask.sum())
            assert torch.count_nonzero(ref_logp) == batch.score_mask.sum()  # only scored tokens carry values
    return report


@pytest.mark.slow
def test_mrsp_sharded_vision_and_sp_forward_match_unsharded():
    results = run_workers(_parity_worker, 4, FAMILIES, timeout=600)
    for rank, report in results.items():
        for key, value in report.items():
            family, variant, what = key[:3]
            if what == "vision":
                assert max(value) <= 1e-6, (rank, key, value)  # deepstack included
            elif what == "logp":
                logp_err, ent_err, grad_rel = value
                assert logp_err <= 1e-5 and ent_err <= 1e-5, (rank, key, value)
                assert grad_rel <= 1e-4, (rank, key, value)
            elif what == "positions":
                assert value is True, (rank, key)
    assert all(("qwen3-vl", "tiny", "logp", 4) in r and ("qwen3-vl", "odd-heads", "vision", 4) in r
               for r in results.values())
    for sp in (2, 4):  # the worst case over ranks, families and head layouts (pytest -s shows it)
        worst = [max(v[k] for r in results.values() for key, v in r.items() if key[2:] == ("logp", sp))
                 for k in range(3)]
        print(f"SP {sp}: log-prob |diff| {worst[0]:.2e}, entropy |diff| {worst[1]:.2e}, grad rel {worst[2]:.2e}")
