"""`train.engine = "fsdp2"` (issue 16): the language model's weights, gradients and optimizer
state sharded over 2 processes train to DeepSpeed ZeRO-2's numbers, hold half the
language model per rank, write checkpoints `from_pretrained` loads, and resume after SIGKILL
to the uninterrupted run's numbers. Tolerance 1e-4 (float32 on CPU; the engines reduce the
same gradients in a different order)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_resume_safety import _with_missing_videos
from tests.integration.test_train_stages import KEYS, RL, SFT, lvr_ok, metrics

FSDP2 = ("train.engine=fsdp2", "deepspeed.enabled=false")
TWO = ("launch.nproc_per_node=2",)


def same(a_run: Path, b_run: Path, keys, tol=1e-4) -> None:
    a, b = metrics(a_run), metrics(b_run)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k in keys:
            assert (k in x) == (k in y), (x["step"], k)
            if k in x:
                assert x[k] == pytest.approx(y[k], abs=tol), (x["step"], k)


@pytest.fixture(scope="module")
def sft_runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp2_sft")
    recipe = base / "sft.toml"
    recipe.write_text(SFT.format(data=tiny_data, out=base / "zero2"))
    lvr_ok("sft", recipe, *TWO)
    lvr_ok("sft", recipe, *TWO, *FSDP2, f"output.dir={json.dumps(str(base / 'fsdp2'))}")
    return base


def test_sft_fsdp2_equals_zero2_with_half_the_language_model_per_rank(sft_runs):
    same(sft_runs / "zero2", sft_runs / "fsdp2", ("loss", "grad_norm", "eval_loss"))
    z2 = json.loads((sft_runs / "zero2" / "summary.json").read_text())
    f2 = json.loads((sft_runs / "fsdp2" / "summary.json").read_text())
    assert (z2["engine"], f2["engine"]) == ("deepspeed", "fsdp2")
    # What each rank holds, measured from its tensors' storages: ZeRO-2 keeps every weight on
    # every rank; FSDP2 half the language model (each rank its rows) and the whole vision tower.
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(sft_runs / "fsdp2" / "final")
    mib = lambda ps: sum(p.numel() * p.element_size() for p in ps) / 2**20  # noqa: E731
    vision, total = mib(model.model.visual.parameters()), mib(model.parameters())
    assert z2["weights_mib_per_rank"] == pytest.approx(total, rel=1e-3)
    assert f2["weights_mib_per_rank"] == pytest.approx(vision + (total - vision) / 2, rel=1e-2)
    # AdamW's two moments of the trained weights (the language model: the tower is frozen), halved
    assert f2["optimizer_mib_per_rank"] == pytest.approx((total - vision) * 2 / 2, rel=1e-2)


def test_sft_fsdp2_checkpoint_is_the_full_model(sft_runs):
    """`final/` holds whole weights gathered from the shards: `from_pretrained` loads them, and
    they equal ZeRO-2's final weights."""
    from safetensors.torch import load_file

    a = load_file(sft_runs / "zero2" / "final" / "model.safetensors")
    b = load_file(sft_runs / "fsdp2" / "final" / "model.safetensors")
    assert set(a) == set(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    last = load_file(sft_runs / "fsdp2" / "checkpoints" / "step_3" / "model.safetensors")  # the final step
    assert all(torch.equal(last[k], b[k]) for k in b)


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker`, as a node failure would."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace") and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def rl_runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp2_rl")
    recipe = base / "rl.toml"
    recipe.write_text(RL.format(data=tiny_data, out=base / "zero2"))
    held = (f"eval.input={json.dumps(str(tiny_data / 'eval.jsonl'))}", "eval.limit=3", "eval.every_steps=2")
    lvr_ok("rl", recipe, *TWO, *held)
    lvr_ok("rl", recipe, *TWO, *held, *FSDP2, f"output.dir={json.dumps(str(base / 'fsdp2'))}")
    return base, recipe, held


def test_rl_fsdp2_equals_zero2(rl_runs):
    """Rollouts and held-out accuracy on gathered weights (a rank decodes until its own rows
    stop), the sharded frozen reference, the update forward per unit: ZeRO-2's numbers."""
    base, _, _ = rl_runs
    same(base / "zero2", base / "fsdp2", (*KEYS, "eval_accuracy"))
    assert [m["step"] for m in metrics(base / "fsdp2")] == [0, 1, 2, 3, 4]


def test_rl_fsdp2_resume_after_sigkill_equals_uninterrupted(rl_runs):
    base, recipe, held = rl_runs
    out = base / "killed"
    exe = Path(sys.executable).with_name("lvr")
    proc = subprocess.Popen([str(exe), "rl", str(recipe), *TWO, *held, *FSDP2, f"output.dir={json.dumps(str(out))}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_2" / "trainer" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    kill_all(str(out))  # lvr, the launcher and both ranks (torchrun starts each in its own session)
    proc.wait()
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "checkpoints" / "step_2" / "trainer").glob("optimizer.rank*.safetensors")) \
        == ["optimizer.rank0.safetensors", "optimizer.rank1.safetensors"]
    lvr_ok("rl", recipe, *TWO, *held, *FSDP2, f"output.dir={json.dumps(str(out))}")
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2
    same(base / "fsdp2", out, (*KEYS, "eval_accuracy"), tol=1e-6)


def test_rl_fsdp2_with_sp_lora_and_checkpointing_equals_zero2(tiny_data, tmp_path):
    """Ulysses SP 2 (both ranks shard the same question's sequence and the weights), LoRA
    adapters inside the sharded layers, gradient checkpointing recomputing sharded layers."""
    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=tiny_data, out=tmp_path / "zero2"))
    args = (*TWO, "mrsp.sp_size=2", "train.steps=3", "checkpoint.every_steps=3", "lora.enabled=true", "lora.r=2",
            "lora.target_modules=['q_proj','down_proj']")
    lvr_ok("rl", recipe, *args)
    lvr_ok("rl", recipe, *args, *FSDP2, "train.gradient_checkpointing=true", f"output.dir={json.dumps(str(tmp_path / 'f2'))}")
    same(tmp_path / "zero2", tmp_path / "f2", KEYS)
    summary = json.loads((tmp_path / "f2" / "summary.json").read_text())
    assert summary["gradient_checkpointing"] is True and summary["engine"] == "fsdp2"
    assert (tmp_path / "f2" / "final" / "lora" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family,freeze_vision", [("qwen2.5-vl", True), ("qwen2.5-vl", False), ("qwen3-vl", False)],
                         ids=["frozen-tower", "trained-tower", "qwen3-vl-trained-tower"])
def test_a_missing_video_leaves_every_engine_with_the_plain_engines_numbers(tiny_data, tmp_path, family,
                                                                            freeze_vision):
    """A rank whose only question's video is missing runs a one-token forward instead
    (`TrainEngine.padding_loss`; with a trained tower, an encode of one blank temporal patch
    first): under FSDP2 it gathers and reduces every unit as the other rank does, under ZeRO-2
    its gradient hooks fire in a real backward's order. Both end with the numbers of the plain
    engine (torch AdamW, gradients all-reduced at the step), which needs no such care. (ZeRO-2
    with a zero sum over the parameters, the earlier way, drifted from step 2 on: its
    reductions paired gradients of different parameters.) Qwen3-VL too, whose deepstack
    features join the language model's early layers: the tower's nodes were made before the
    language model's, so autograd runs them after the language model's in a real backward as
    well, and the tower's hooks fire last there too."""
    data = _with_missing_videos(tiny_data, tmp_path / "data", train_missing=1, eval_missing=False)
    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=data, out=tmp_path / "plain"))
    args = (*TWO, "rollout.n=2", "rollout.max_new_tokens=6", "train.steps=4", "checkpoint.every_steps=4",
            f"model.freeze_vision={str(freeze_vision).lower()}", f"model.path=tiny:{family}", "--allow-failures")
    lvr_ok("rl", recipe, *args, "deepspeed.enabled=false")
    lvr_ok("rl", recipe, *args, f"output.dir={json.dumps(str(tmp_path / 'zero2'))}")
    lvr_ok("rl", recipe, *args, *FSDP2, f"output.dir={json.dumps(str(tmp_path / 'f2'))}")
    same(tmp_path / "plain", tmp_path / "zero2", KEYS)
    same(tmp_path / "plain", tmp_path / "f2", KEYS)
    failed = [json.loads((tmp_path / d / "summary.json").read_text())["failed"] for d in ("plain", "zero2", "f2")]
    assert failed[0] == failed[1] == failed[2] >= 2
    skipped = [json.loads(line)["key"] for line in (tmp_path / "f2" / "errors.jsonl").read_text().splitlines()]
    assert any(not k.endswith(":17") for k in skipped)  # a question's video, not only the malformed line


def test_sft_fsdp2_in_bf16_keeps_fp32_master_shards_and_resumes_exactly(tiny_data, tmp_path):
    """bf16: FSDP2 keeps fp32 shards and gathers bf16 (as DeepSpeed's bf16 mode keeps fp32
    master weights): the losses follow ZeRO-2's within bf16 rounding (5e-3), each rank's
    checkpoint holds its fp32 shards, and a resume from step 2 continues exactly (the
    Hugging Face folder alone holds bf16-rounded weights)."""
    from tests.integration.test_resume_safety import unfinish

    recipe = tmp_path / "sft.toml"
    recipe.write_text(SFT.format(data=tiny_data, out=tmp_path / "zero2"))
    args = (*TWO, "model.dtype=bfloat16", "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "eval.every_steps=2")
    lvr_ok("sft", recipe, *args)
    f2 = tmp_path / "f2"
    lvr_ok("sft", recipe, *args, *FSDP2, f"output.dir={json.dumps(str(f2))}")
    same(tmp_path / "zero2", f2, ("loss", "eval_loss"), tol=5e-3)
    from safetensors.torch import load_file

    shards = load_file(f2 / "checkpoints" / "step_2" / "trainer" / "optimizer.rank1.safetensors")
    assert {t.dtype for t in shards.values() if t.dim() > 0} == {torch.float32}
    assert load_file(f2 / "final" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    whole = metrics(f2)
    unfinish(f2, keep_checkpoints=(2,))
    lvr_ok("sft", recipe, *args, *FSDP2, f"output.dir={json.dumps(str(f2))}")
    again = metrics(f2)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(whole, again):
        for k in ("loss", "grad_norm", "eval_loss"):
            assert a.get(k) == pytest.approx(b.get(k), abs=1e-6), (a["step"], k)
