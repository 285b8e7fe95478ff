"""`lvr sft` and `lvr rl` end to end on real processes: SP 2 against SP 1, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_lvr

KEYS = ("grad_norm", "loss", "reward/total", "reward/accuracy", "reward/format", "kl", "entropy", "clip_frac", "response_length")

RL = """stage = "rl"
seed = 3
[data]
input = "{data}/train.jsonl"
[video]
max_frames = 8
max_pixels = 12544
[rollout]
n = 4
max_new_tokens = 12
[train]
steps = 4
global_batch = 2
micro_batch_per_rank = 1
[optim]
lr = 1e-3
schedule = "constant"
[algo]
# A random tiny model earns no reward, so advantages are 0; the k1 KL term still has a
# non-zero gradient (d logp), so the weights move and later steps test something.
kl_coef = 1.0
kl_kind = "k1"
[checkpoint]
every_steps = 2
keep_last = 1
[output]
dir = "{out}"
"""

SFT = """stage = "sft"
seed = 3
[data]
input = "{data}/train.jsonl"
[video]
max_frames = 8
max_pixels = 12544
[train]
steps = 3
global_batch = 2
micro_batch_per_rank = 1
[optim]
lr = 1e-3
[eval]
input = "{data}/eval.jsonl"
every_steps = 3
limit = 2
[checkpoint]
every_steps = 3
[output]
dir = "{out}"
"""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lvr_ok(*args, timeout=600):
    r = run_lvr(*args, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def rl_runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("rl")
    recipe = base / "rl.toml"
    recipe.write_text(RL.format(data=tiny_data, out=base / "sp1"))
    lvr_ok("rl", recipe)
    lvr_ok("rl", recipe, f"output.dir={json.dumps(str(base / 'sp2'))}", "launch.nproc_per_node=2", "mrsp.sp_size=2")
    return base, recipe


def _same_training(one: list[dict], two: list[dict], keys=("loss", "reward/total", "kl", "entropy", "grad_norm")):
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for k in keys:
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])


def test_rl_data_parallel_and_vanilla_sp_match_one_process(rl_runs):
    """DP 2 (a question per rank) trains as one process with 2 micro-batches: the mini-batch's
    token count is summed over the ranks and the gradient scaled back by the DP size.
    Vanilla mode with mrsp.sp_size = 2 runs no SP (both ranks do the whole sequence): its loss
    must not be scaled by 2, so it trains as vanilla on one process."""
    base, recipe = rl_runs
    lvr_ok("rl", recipe, f"output.dir={json.dumps(str(base / 'dp2'))}", "launch.nproc_per_node=2")
    _same_training(metrics(base / "sp1"), metrics(base / "dp2"))
    lvr_ok("rl", recipe, f"output.dir={json.dumps(str(base / 'van1'))}", "mrsp.enabled=false")
    lvr_ok("rl", recipe, f"output.dir={json.dumps(str(base / 'van2'))}", "mrsp.enabled=false",
           "launch.nproc_per_node=2", "mrsp.sp_size=2")
    vanilla, vanilla_sp2 = metrics(base / "van1"), metrics(base / "van2")
    assert vanilla[3]["grad_norm"] > 0
    # vanilla encodes at every use and nowhere else: per question G rollouts, G reference rows
    # and G update rows (2 questions, G = 4; the on-policy step runs no old-policy pass)
    assert [m["vision_encodes"] for m in vanilla] == [2 * 4 * 3] * 4
    _same_training(vanilla, vanilla_sp2)


def test_rl_on_two_nodes_matches_one_node_of_two_processes(rl_runs):
    """Two "nodes" on localhost (node ranks 0 and 1, one process each, one rendezvous port),
    each started as a user would on its node, train as one node with two processes."""
    from stages.mrsp.dist import free_port

    base, recipe = rl_runs
    if not (base / "dp2" / "summary.json").exists():
        lvr_ok("rl", recipe, f"output.dir={json.dumps(str(base / 'dp2'))}", "launch.nproc_per_node=2")
    port, out = free_port(), base / "nodes2"
    exe = Path(sys.executable).with_name("lvr")
    nodes = [subprocess.Popen([str(exe), "rl", str(recipe), f"output.dir={json.dumps(str(out))}", "launch.nnodes=2",
                               f"launch.node_rank={r}", f"launch.master_port={port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    _same_training(metrics(base / "dp2"), metrics(out))
    assert json.loads((out / "env.json").read_text())["world_size"] == 2


def test_rl_sp2_matches_sp1(rl_runs):
    base, _ = rl_runs
    one, two = metrics(base / "sp1"), metrics(base / "sp2")
    assert [m["step"] for m in one] == [1, 2, 3, 4] == [m["step"] for m in two]
    # Same seed, same rollouts; the SP forward equals the unsharded one, so the loss agrees.
    assert one[1]["kl"] != 0 and one[3]["grad_norm"] > 0  # the weights moved after step 1
    _same_training(one, two)
    for a, b in zip(one, two):
        assert a["response_length"] == b["response_length"]
    # Frozen vision tower: one encode per distinct video of the step, reused by the rollouts and
    # 2 forwards (reference and update: an on-policy step runs no old-policy forward).
    assert one[0]["old_logprobs_reused"] == 1
    assert 1 <= one[0]["vision_encodes"] <= 2 and one[0]["embedding_cache_hits"] >= 3 * one[0]["vision_encodes"]
    assert one[0]["prefills"] == 2  # one prefill per question, not per rollout
    # SP 2 deals the 2 questions out to its 2 ranks (rank 0 reports its own work) and
    # all-gathers the rollouts: the same rollouts (response lengths and rewards above)
    assert two[0]["prefills"] == 1
    rollouts = [[(x["step"], x["problem_id"], x["rollout"], x["response"])
                 for x in map(json.loads, (base / r / "samples.jsonl").read_text().splitlines())]
                for r in ("sp1", "sp2")]
    assert rollouts[0] == rollouts[1] and len(rollouts[0]) == 4 * 2 * 4
    # shared-prompt forwards (the default): ref and update run each prompt once, not 4 times
    for a, b in zip(one, two):
        shared, unshared = a["train_forward_tokens"], a["train_forward_tokens_unshared"]
        # 2 forwards: unshared = 2 sum_q (4 P_q + T_q), shared = 2 sum_q (P_q + T_q), T_q = the
        # q-th group's response tokens; so 4 shared - unshared = 6 T over the step's 8 responses
        assert 0 < shared < unshared and 4 * shared - unshared == round(6 * 8 * a["response_length"]), a["step"]
        assert (shared, unshared) == (b["train_forward_tokens"], b["train_forward_tokens_unshared"])


def test_rl_checkpoint_loads_in_transformers(rl_runs):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    base, _ = rl_runs
    final = base / "sp1" / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "qwen2_5_vl" and tok.convert_tokens_to_ids("<think>") != tok.unk_token_id
    ck = base / "sp1" / "checkpoints"
    assert [p.name for p in ck.iterdir()] == ["step_4"]  # keep_last = 1
    assert json.loads((ck / "step_4" / "trainer" / "state.json").read_text())["step"] == 4
    samples = [json.loads(x) for x in (base / "sp1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 2 * 4 and {s["step"] for s in samples} == {1, 2, 3, 4}


def test_rl_resume_after_sigkill_equals_uninterrupted(rl_runs):
    base, recipe = rl_runs
    out = base / "killed"
    exe = Path(sys.executable).with_name("lvr")
    proc = subprocess.Popen([str(exe), "rl", str(recipe), f"output.dir={json.dumps(str(out))}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_2" / "trainer" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    lvr_ok("rl", recipe, f"output.dir={json.dumps(str(out))}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["resumed_from"] == 2
    whole, resumed = metrics(base / "sp1"), metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # no duplicates, no gaps
    for a, b in zip(whole, resumed):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_sft_sp2_matches_sp1_and_checkpoint_loads(tiny_data, tmp_path, freeze_vision):
    """A trainable vision tower gets its gradient through the sharded encode's all-gather:
    SP 2 must match SP 1 with it too, and its weights must move (and stay put when frozen).
    With it, SP 2 also runs with gradient checkpointing (recompute under Ulysses attention)."""
    from transformers import AutoModelForImageTextToText

    from stages.models.tiny import resolve_tiny

    recipe = tmp_path / "sft.toml"
    recipe.write_text(SFT.format(data=tiny_data, out=tmp_path / "sp1"))
    vision = f"model.freeze_vision={str(freeze_vision).lower()}"
    lvr_ok("sft", recipe, vision)
    lvr_ok("sft", recipe, vision, f"output.dir={json.dumps(str(tmp_path / 'sp2'))}", "launch.nproc_per_node=2",
           "mrsp.sp_size=2", f"train.gradient_checkpointing={str(not freeze_vision).lower()}")
    one, two = metrics(tmp_path / "sp1"), metrics(tmp_path / "sp2")
    checkpointing = [json.loads((tmp_path / r / "summary.json").read_text())["gradient_checkpointing"]
                     for r in ("sp1", "sp2")]
    assert checkpointing == [False, not freeze_vision]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
    assert abs(one[-1]["eval_loss"] - two[-1]["eval_loss"]) <= 1e-4
    assert one[-1]["loss"] < one[0]["loss"]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "sp1" / "final")
    init = AutoModelForImageTextToText.from_pretrained(resolve_tiny("tiny:qwen2.5-vl"))
    trained, start = model.model.visual.state_dict(), init.model.visual.state_dict()
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    assert (moved == 0.0) if freeze_vision else (moved > 1e-4), moved
    if not freeze_vision:  # SP 2's vision tower trained to the same weights
        two_visual = AutoModelForImageTextToText.from_pretrained(tmp_path / "sp2" / "final").model.visual.state_dict()
        assert max(float((two_visual[k] - trained[k]).abs().max()) for k in trained) < 1e-4


@pytest.mark.parametrize("deepspeed", [True, False])
def test_sft_lora_trains_adapters_merges_into_final_and_resumes(tiny_data, tmp_path, deepspeed):
    """LoRA: only the adapters train; `final/` holds the merged weights under the base names
    (logits equal to base + the saved adapter loaded by peft itself); a run stopped after a
    checkpoint resumes to the uninterrupted run's metrics."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from stages.models.tiny import resolve_tiny

    recipe = tmp_path / "sft.toml"
    recipe.write_text(SFT.format(data=tiny_data, out=tmp_path / "whole"))
    args = ["lora.enabled=true", "lora.r=4", "lora.target_modules=['q_proj','v_proj','down_proj']",
            "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "eval.every_steps=2",
            f"deepspeed.enabled={str(deepspeed).lower()}"]
    lvr_ok("sft", recipe, *args)
    whole = tmp_path / "whole"
    summary = json.loads((whole / "summary.json").read_text())
    init = AutoModelForImageTextToText.from_pretrained(resolve_tiny("tiny:qwen2.5-vl"))
    layers = init.model.language_model.layers
    expected = sum(4 * (m.in_features + m.out_features) for layer in layers
                   for m in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj))
    assert summary["trainable_params"] == expected
    runs = metrics(whole)
    assert runs[-1]["loss"] < runs[0]["loss"]

    model, info = AutoModelForImageTextToText.from_pretrained(whole / "final", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys")), info
    before, after = init.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed), changed
    assert not any(".visual." in k for k in changed)
    base = AutoModelForImageTextToText.from_pretrained(resolve_tiny("tiny:qwen2.5-vl"))
    peft_model = PeftModel.from_pretrained(base, whole / "final" / "lora").eval()
    ids = torch.tensor([[5, 40, 41, 300, 7, 99]])
    with torch.no_grad():
        merged, unmerged = model.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert (merged - unmerged).abs().max() < 1e-5

    # the same run as if stopped right after the step 2 checkpoint: no summary, no later
    # checkpoint, no final (metrics of steps 3-4 stay: resuming drops them)
    shutil.copytree(whole, tmp_path / "uninterrupted")
    for p in ("summary.json", "final", "checkpoints/step_4"):
        shutil.rmtree(whole / p) if (whole / p).is_dir() else (whole / p).unlink()
    lvr_ok("sft", recipe, *args)
    resumed = json.loads((whole / "summary.json").read_text())
    assert resumed["resumed"] and resumed["resumed_from"] == 2
    again = metrics(whole)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(runs, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a["step"], a["loss"], b["loss"])


def test_rl_with_lora_moves_only_the_adapted_layers(tiny_data, tmp_path):
    """GRPO through LoRA: rollouts, old/ref/update forwards run on the injected model; the
    merged `final/` differs from the start only in the adapted layers. With `[eval]`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from stages.models.tiny import resolve_tiny

    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=tiny_data, out=tmp_path / "rl"))
    lvr_ok("rl", recipe, "lora.enabled=true", "lora.r=2", "lora.target_modules=['o_proj','up_proj']",
           "train.steps=2", "checkpoint.every_steps=2", f"eval.input={json.dumps(str(tiny_data / 'eval.jsonl'))}",
           "eval.every_steps=1", "eval.limit=2")
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    init = AutoModelForImageTextToText.from_pretrained(resolve_tiny("tiny:qwen2.5-vl"))
    layers = init.model.language_model.layers
    assert summary["trainable_params"] == sum(2 * (m.in_features + m.out_features) for layer in layers
                                              for m in (layer.self_attn.o_proj, layer.mlp.up_proj))
    steps = metrics(tmp_path / "rl")
    # [eval] during RL: held-out greedy accuracy before training (step 0) and after each step
    assert [m["step"] for m in steps] == [0, 1, 2] and steps[2]["kl"] != 0  # the policy left the reference
    assert all(0 <= m["eval_accuracy"] <= 1 for m in steps) and "reward/total" not in steps[0]
    assert summary["eval_accuracy_last"] == steps[-1]["eval_accuracy"]
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "rl" / "final").state_dict()
    changed = {k for k, v in init.state_dict().items() if not torch.equal(v, final[k])}
    assert changed and all(k.endswith(("o_proj.weight", "up_proj.weight")) for k in changed), changed


def test_rl_with_a_trainable_vision_tower_sp2_matches_sp1(tiny_data, tmp_path):
    """`model.freeze_vision = false` in GRPO: the update forward re-encodes with gradients, the
    reference encodes with its own tower; SP 2 gives SP 1's losses and the tower trains."""
    from transformers import AutoModelForImageTextToText

    from stages.models.tiny import resolve_tiny

    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=tiny_data, out=tmp_path / "sp1"))
    args = ["model.freeze_vision=false", "train.steps=2", "checkpoint.every_steps=2"]
    lvr_ok("rl", recipe, *args)
    lvr_ok("rl", recipe, *args, f"output.dir={json.dumps(str(tmp_path / 'sp2'))}", "launch.nproc_per_node=2",
           "mrsp.sp_size=2")
    one, two = metrics(tmp_path / "sp1"), metrics(tmp_path / "sp2")
    for a, b in zip(one, two):
        for k in ("loss", "kl", "entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
        # 2 questions on 2 videos per step: per video one encode for the rollouts and the old
        # forward and one by the reference's own tower, plus one with gradients per update
        # micro-batch (1 question each): 2 + 2 + 2 (a frozen tower: 2)
        assert a["vision_encodes"] == b["vision_encodes"] == 6, (a["vision_encodes"], b["vision_encodes"])
    assert one[0]["kl"] == 0 and one[1]["kl"] != 0  # step 1 updates from the reference itself
    init = AutoModelForImageTextToText.from_pretrained(resolve_tiny("tiny:qwen2.5-vl")).model.visual.state_dict()
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "sp1" / "final").model.visual.state_dict()
    assert max(float((trained[k] - init[k]).abs().max()) for k in init) > 1e-5
