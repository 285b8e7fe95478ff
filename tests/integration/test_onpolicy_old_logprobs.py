"""On-policy GRPO steps take the old log-probs from the update forward (detached) instead of a
separate old-policy forward: the same loss and gradients, with and without SP and shared prompts."""

from pathlib import Path

import pytest
import torch

from tests.integration.mp import run_workers

RL = """stage = "rl"
seed = 5
[data]
input = "{data}/train.jsonl"
[video]
max_frames = 8
max_pixels = 12544
[rollout]
n = 4
max_new_tokens = 10
[train]
steps = 1
global_batch = 2
micro_batch_per_rank = 1
[algo]
kl_coef = 0.1
[deepspeed]
enabled = false  # gradients in .grad, where the test reads them
[mrsp]
sp_size = {sp}
[launch]
nproc_per_node = {world}
[output]
dir = "{out}"
"""


def _worker(rank, world, recipe_path):
    from lvr_cli.recipes import load_recipe
    from lvr_cli.rundir import RunDir
    from stages.mrsp.runtime import Mode
    from stages.rl import GRPOTrainer

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    trainer = GRPOTrainer(recipe, RunDir(Path(recipe.output.dir), recipe).open())
    # a tiny random model earns no reward: give each response a reward of its own so the policy
    # term (not only the KL term) has a gradient
    trainer.reward = lambda s, text: {"total": (sum(map(ord, text)) % 7) / 7, "format": 0.0, "accuracy": 0.0}
    model = trainer.s.adapter.model
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads: dict = {}

    def capture_and_skip_step():  # the gradient of this rank's micro-batches, no optimizer step
        for n, p in params.items():
            if p.grad is not None:
                grads[n] = grads.get(n, 0) + p.grad.detach().clone()
                p.grad = None
        return False

    trainer.engine.step = capture_and_skip_step
    losses: list = []
    backward = trainer.engine.backward
    trainer.engine.backward = lambda loss, summed=False: (losses.append(float(loss.detach())),
                                                          backward(loss, summed))
    out = {}
    for shared in (True, False):
        trainer.rt.mode = Mode(shared_prompt=shared)
        for reuse in (False, True):
            model.load_state_dict(initial)
            grads.clear()
            losses.clear()
            trainer.reuse_old = reuse
            m = trainer.train_step(0)
            out[(shared, reuse)] = {"metrics": m, "grads": dict(grads), "losses": list(losses)}
        # tensors do not travel back from the worker: compare the gradients here
        one, two = out[(shared, True)], out[(shared, False)]
        assert one["grads"].keys() == two["grads"].keys() and one["grads"]
        for d in (one, two):
            d["grad_scale"] = max(float(g.abs().max()) for g in two["grads"].values())
            d["grad_diff"] = max(float((one["grads"][n] - g).abs().max()) for n, g in two["grads"].items())
        for d in (one, two):
            del d["grads"]
    return out


@pytest.mark.parametrize("world,sp", [(1, 1), (2, 2)])
def test_reused_old_logprobs_give_the_separate_pass_loss_and_gradients(tiny_data, tmp_path, world, sp):
    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=tiny_data, out=tmp_path / "run", sp=sp, world=world))
    results = run_workers(_worker, world, str(recipe), timeout=600)
    for rank, out in results.items():
        for shared in (True, False):
            two, one = out[(shared, False)], out[(shared, True)]
            m1, m2 = one["metrics"], two["metrics"]
            assert (m1["old_logprobs_reused"], m2["old_logprobs_reused"]) == (1, 0)
            assert m1["time/old"] == 0.0 and m2["time/old"] > 0
            assert m1["reward/total"] == m2["reward/total"]  # the same rollouts
            assert m1["advantage/abs_mean"] > 0.1  # the policy term is exercised
            assert m1["ratio_mean"] == 1.0 and m1["clip_frac"] == 0.0 and m1["approx_kl"] == 0.0
            for k in ("kl", "entropy"):  # metrics are rounded to 6 decimals
                assert abs(m1[k] - m2[k]) <= 2e-6 * max(1.0, abs(m2[k])), (rank, shared, k, m1[k], m2[k])
            assert len(one["losses"]) == len(two["losses"]) == 2  # two micro-batches
            for a, b in zip(one["losses"], two["losses"]):  # each micro-batch's loss, unrounded
                assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (rank, shared, a, b)
            scale, worst = one["grad_scale"], one["grad_diff"]
            assert scale > 0 and worst <= 1e-6 * max(1.0, scale), (rank, shared, worst, scale)
