"""Gradient checkpointing (`train.gradient_checkpointing`) under the MR-SP forwards, on real
gloo processes (CPU, fp32): the recompute in the backward must run the same SP attention as
the forward, or the gradients are wrong. Checked for the unshared SP forward and the
shared-prompt forward at SP 1 and 2, against the same forward without checkpointing."""

import torch

from tests.integration.mp import run_workers
from tests.integration.test_shared_prompt import _groups, _grpo_loss, _unshared


def _worker(rank, world):
    from torch.utils.checkpoint import CheckpointError

    from lvr_cli.sections import DeepspeedSection, OptimSection
    from lvr_cli.schema import LoraSection
    from stages.models.adapter import load_adapter
    from stages.mrsp.dist import all_reduce_grads, init_grid
    from stages.mrsp.shared import shared_logprobs
    from stages.mrsp.engine import TrainEngine, disable_checkpointing, enable_checkpointing
    from stages.mrsp.ulysses import checkpoint_contexts

    grids = {sp: init_grid(sp, backend="gloo", timeout_s=120) for sp in (1, 2)}
    torch.manual_seed(0)
    adapter = load_adapter("tiny:qwen2.5-vl")
    model = adapter.model.train()
    params = list(model.model.language_model.parameters()) + list(adapter.lm_head.parameters())
    forwards = {"unshared": _unshared,
                "shared": lambda a, gs, g: shared_logprobs(a, gs, g, chunk_tokens=4, entropy=True)}

    def run(forward, grid):
        model.zero_grad(set_to_none=True)
        lps, _ = forward(adapter, _groups(adapter, emb_grad=False), grid)
        _grpo_loss(lps).backward()
        all_reduce_grads(params, grid.sp_group)
        return [x.detach() for r in lps for x in r], [p.grad.clone() for p in params]

    def compare(a, b):
        (lp_a, g_a), (lp_b, g_b) = a, b
        assert [x.shape for x in lp_a] == [x.shape for x in lp_b]
        return (max((x - y).abs().max().item() for x, y in zip(lp_a, lp_b)),
                max(((x - y).norm() / (y.norm() + 1e-12)).item() for x, y in zip(g_a, g_b)))

    report = {}
    for name, forward in forwards.items():
        for sp, grid in grids.items():
            disable_checkpointing(model)
            plain = run(forward, grid)
            # as the trainer switches it on (train.gradient_checkpointing = true)
            TrainEngine(model, grid, OptimSection(), DeepspeedSection(enabled=False), LoraSection(), kind="deepspeed",
                        total_steps=1,
                        accum_steps=1, sp_size=grid.sp_size, freeze_vision=True, freeze_llm_layers=0,
                        gradient_checkpointing=True)
            assert model.model.language_model.gradient_checkpointing
            report[(name, sp)] = compare(run(forward, grid), plain)
            # control: the same recompute without checkpoint_contexts runs the model's own
            # attention on this rank's shard, and the gradients (or the recompute) go wrong
            enable_checkpointing(model, context=False)
            try:
                report[(name, sp, "control")] = compare(run(forward, grid), plain)[1]
            except (CheckpointError, RuntimeError) as e:
                report[(name, sp, "control")] = f"{type(e).__name__}"
            disable_checkpointing(model)
    assert checkpoint_contexts()[1].__class__.__name__ == "nullcontext"  # nothing active outside a forward
    return report


def test_checkpointed_sp_forwards_equal_plain_ones():
    results = run_workers(_worker, 2, timeout=300)
    for rank, report in results.items():
        for name in ("unshared", "shared"):
            for sp in (1, 2):
                lp_err, grad_rel = report[(name, sp)]
                assert lp_err <= 1e-6 and grad_rel <= 1e-5, (rank, name, sp, lp_err, grad_rel)
                if (name, sp) == ("unshared", 1):
                    continue  # no SP attention there: the model's own attention is the right one
                control = report[(name, sp, "control")]
                assert isinstance(control, str) or control > 1e-3, (rank, name, sp, control)
    worst = max(report[(n, sp)][1] for report in results.values() for n in ("unshared", "shared") for sp in (1, 2))
    controls = sorted({str(v) for r in results.values() for k, v in r.items() if k[-1] == "control"})
    print(f"gradient checkpointing: worst grad rel diff {worst:.2e}; without the recompute context: {controls}")
