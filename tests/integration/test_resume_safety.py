"""`lvr sft` / `lvr rl` after kills and on bad input (issue 12): nothing executes from a
checkpoint, every resume equals the uninterrupted run with each step logged once, unreadable
inputs are counted and reported and never crash a rank."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_lvr
from tests.integration.test_train_stages import RL, SFT, metrics

RL_KEYS = ("grad_norm", "loss", "reward/total", "reward/accuracy", "reward/format", "kl", "entropy",
           "response_length", "eval_accuracy")
SFT_KEYS = ("loss", "grad_norm", "eval_loss")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def lvr_rc(*args, rc=0):
    r = run_lvr(*args)
    assert r.returncode == rc, r.stderr[-3000:]
    return r


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def unfinish(run: Path, *, keep_checkpoints: tuple[int, ...]) -> None:
    """The run as a kill would leave it after the last kept checkpoint: its logs still hold
    every step, later checkpoints, `final/` and `summary.json` are gone."""
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    for ck in (run / "checkpoints").iterdir():
        if int(ck.name.split("_")[1]) not in keep_checkpoints:
            shutil.rmtree(ck)


@pytest.mark.parametrize("deepspeed,lora", [(True, False), (False, True)], ids=["deepspeed", "plain-lora"])
def test_resume_reads_no_pickle_and_refuses_a_planted_one_in_one_line(tiny_data, tmp_path, deepspeed, lora):
    """A pickle payload planted in each file a resume reads never runs: the resume stops with
    one line naming the file (exit 1). Planted in the pickled files older lvr or DeepSpeed
    wrote (never read now), it never runs either, and the resume succeeds."""
    recipe = tmp_path / "sft.toml"
    recipe.write_text(SFT.format(data=tiny_data, out=tmp_path / "run"))
    args = ["train.steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
            f"deepspeed.enabled={str(deepspeed).lower()}"]
    if lora:
        args += ["lora.enabled=true", "lora.r=2", "lora.target_modules=['q_proj']"]
    lvr_rc("sft", recipe, *args)
    run = tmp_path / "run"
    unfinish(run, keep_checkpoints=(1, 2))
    ck = run / "checkpoints" / "step_2"
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Payload(marker))
    optimizer = "trainer/optimizer.rank0" if deepspeed else "trainer/optimizer"
    read = ["trainer/state.json", f"{optimizer}.safetensors", f"{optimizer}.json",
            "lora/adapter_model.safetensors" if lora else "model.safetensors"]
    for name in read:
        original = (ck / name).read_bytes()
        (ck / name).write_bytes(payload)
        r = lvr_rc("sft", recipe, *args, rc=1)
        line = last_line(r.stderr)
        assert line.startswith(f"error: cannot resume: {ck / name}: "), (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and not marker.exists(), name
        (ck / name).write_bytes(original)
    # the files a pickle-reading resume would open: present, poisoned, and never read
    legacy = ["trainer/optim.pt", "trainer/ds/mp_rank_00_model_states.pt", "pytorch_model.bin",
              "trainer/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "lora/adapter_model.bin"]
    for name in legacy:
        (ck / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer": Payload(marker)}, ck / name)
    (ck / "trainer" / "latest").write_text("ds")
    lvr_rc("sft", recipe, *args)
    assert not marker.exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["failed"] == 0


@pytest.mark.parametrize("stage,deepspeed,lora", [
    ("sft", True, False), ("sft", False, False), ("rl", False, False), ("rl", True, True), ("rl", False, True)],
    ids=["sft-deepspeed", "sft-plain", "rl-plain", "rl-deepspeed-lora", "rl-plain-lora"])
def test_resume_equals_the_uninterrupted_run_with_each_step_logged_once(tiny_data, tmp_path, stage, deepspeed, lora):
    """Stopped after the step 2 checkpoint (its logs already past it), the rerun drops the later
    lines and trains to the uninterrupted run's numbers. (The other combinations are in
    test_train_stages.py: rl with DeepSpeed by SIGKILL, sft with LoRA with and without.)"""
    recipe = tmp_path / f"{stage}.toml"
    recipe.write_text((RL if stage == "rl" else SFT).format(data=tiny_data, out=tmp_path / "run"))
    args = ["train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            f"deepspeed.enabled={str(deepspeed).lower()}"]
    if lora:
        args += ["lora.enabled=true", "lora.r=2", "lora.target_modules=['q_proj','down_proj']"]
    if stage == "rl":
        args += [f"eval.input={json.dumps(str(tiny_data / 'eval.jsonl'))}", "eval.limit=2", "eval.every_steps=2"]
    else:
        args += ["eval.every_steps=2"]
    lvr_rc(stage, recipe, *args)
    run = tmp_path / "run"
    whole = metrics(run)
    samples = (run / "samples.jsonl").read_text() if stage == "rl" else ""
    steps = ([0] if stage == "rl" else []) + [1, 2, 3, 4]  # rl: held-out accuracy before training, as step 0
    assert [m["step"] for m in whole] == steps

    def same_as_whole():
        again = metrics(run)
        assert [m["step"] for m in again] == steps  # each step once
        for a, b in zip(whole, again):
            for k in (RL_KEYS if stage == "rl" else SFT_KEYS):
                assert (k in a) == (k in b) and a.get(k) == pytest.approx(b.get(k), abs=1e-6), (a["step"], k)
        if stage == "rl":
            assert (run / "samples.jsonl").read_text() == samples

    unfinish(run, keep_checkpoints=(2,))
    lvr_rc(stage, recipe, *args)
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2
    same_as_whole()
    if (stage, deepspeed, lora) == ("rl", False, False):  # killed before its first checkpoint
        unfinish(run, keep_checkpoints=())
        lvr_rc(stage, recipe, *args)
        assert json.loads((run / "summary.json").read_text())["resumed_from"] == 0
        same_as_whole()


def _with_missing_videos(tiny_data: Path, out: Path, *, train_missing: int, eval_missing: int | None) -> Path:
    """A copy of the tiny data whose first `train_missing` training videos (and all, or none,
    of the held-out ones) do not exist, plus one malformed training line."""
    out.mkdir()
    (out / "videos").symlink_to(tiny_data / "videos")
    train = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    gone = sorted({r["videos"][0] for r in train})[:train_missing]
    for r in train:
        if r["videos"][0] in gone:
            r["videos"] = ["videos/missing.mp4"]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train) + "{not json\n")
    held = [json.loads(line) for line in (tiny_data / "eval.jsonl").read_text().splitlines()]
    for r in held if eval_missing else []:
        r["videos"] = ["videos/missing.mp4"]
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return out


def _failed_keys(run: Path) -> list[str]:
    return [json.loads(line)["key"] for line in (run / "errors.jsonl").read_text().splitlines()]


def test_missing_videos_are_recorded_once_counted_and_keep_zero2_ranks_in_step(tiny_data, tmp_path):
    """One missing training video under DeepSpeed ZeRO-2, at 2 data-parallel ranks (a rank's
    only question gone: its micro-batch is empty) and at 1 (an empty micro-batch slot): the
    run trains to the end, lists each failed input once, counts them in `failed` and exits 1,
    or 0 with --allow-failures. Held-out accuracy over no readable item is absent."""
    data = _with_missing_videos(tiny_data, tmp_path / "data", train_missing=1, eval_missing=True)
    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=data, out=tmp_path / "dp2"))
    args = ["rollout.n=2", "rollout.max_new_tokens=6", "train.steps=6", "checkpoint.every_steps=6"]
    r = lvr_rc("rl", recipe, *args, "launch.nproc_per_node=2", rc=1)
    summary = json.loads((tmp_path / "dp2" / "summary.json").read_text())
    keys = _failed_keys(tmp_path / "dp2")
    assert len(keys) == len(set(keys)) == summary["failed"] >= 2  # the malformed line and a question at least
    assert f"{data / 'train.jsonl'}:17" in keys
    assert f"{summary['failed']} input(s) failed" in r.stderr
    assert [m["step"] for m in metrics(tmp_path / "dp2")] == [1, 2, 3, 4, 5, 6]

    one = tmp_path / "one"
    r = lvr_rc("rl", recipe, *args, f"output.dir={json.dumps(str(one))}", "train.global_batch=4",
               f"eval.input={json.dumps(str(data / 'eval.jsonl'))}", "eval.every_steps=3", "--allow-failures")
    steps = metrics(one)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # no step 0: no held-out item could be read
    assert not any("eval_accuracy" in m for m in steps) and all("reward/total" in m for m in steps)
    summary = json.loads((one / "summary.json").read_text())
    keys = _failed_keys(one)
    assert len(keys) == len(set(keys)) == summary["failed"] and summary["eval_accuracy_last"] is None
    assert sum(k.startswith("eval:") for k in keys) == len((data / "eval.jsonl").read_text().splitlines())
    for key in keys:  # told once on the terminal, however many steps met it
        assert sum(line.startswith(f"skipped {key}: ") for line in r.stderr.splitlines()) == 1, key


def test_sft_counts_missing_videos_and_a_step_with_nothing_readable_is_skipped(tiny_data, tmp_path):
    """sft with missing videos (DeepSpeed, a micro-batch of one: some micro-batches empty) and
    an unreadable held-out set: failed counted, no eval_loss; sft and rl where no video of a
    step can be read skip the step with a message (no update), exit 1."""
    data = _with_missing_videos(tiny_data, tmp_path / "data", train_missing=2, eval_missing=True)
    recipe = tmp_path / "sft.toml"
    recipe.write_text(SFT.format(data=data, out=tmp_path / "sft").replace("limit = 2", "limit = 3"))
    r = lvr_rc("sft", recipe, "train.steps=4", "checkpoint.every_steps=4", "--allow-failures")
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    keys = _failed_keys(tmp_path / "sft")
    assert len(keys) == len(set(keys)) == summary["failed"] > 3 and summary["eval_loss_last"] is None
    steps = metrics(tmp_path / "sft")
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and not any("eval_loss" in m for m in steps)
    assert all(m["loss"] > 0 for m in steps if "loss" in m)

    # sft where no video of a step can be read skips the step: no optimizer step (AdamW's weight
    # decay alone would move every weight), the model ends as it began
    gone = _with_missing_videos(tiny_data, tmp_path / "gone", train_missing=99, eval_missing=False)
    recipe = tmp_path / "sft_gone.toml"
    recipe.write_text(SFT.format(data=gone, out=tmp_path / "sft_gone"))
    r = lvr_rc("sft", recipe, "train.steps=2", "checkpoint.every_steps=2", "optim.weight_decay=0.1", rc=1)
    assert r.stderr.count("no record of the step could be read; skipped") == 2
    steps = metrics(tmp_path / "sft_gone")
    assert [m["step"] for m in steps] == [1, 2] and not any("loss" in m or "grad_norm" in m for m in steps)
    assert all(m["target_tokens"] == 0 for m in steps)
    from safetensors.torch import load_file

    from stages.models.adapter import resolve_model_path
    final = Path(json.loads((tmp_path / "sft_gone" / "summary.json").read_text())["final"])
    before = load_file(Path(resolve_model_path("tiny:qwen2.5-vl")) / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)

    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL.format(data=gone, out=tmp_path / "rl"))
    r = lvr_rc("rl", recipe, "train.steps=2", "checkpoint.every_steps=2", "deepspeed.enabled=false", rc=1)
    assert r.stderr.count("no question of the step could be read; skipped") == 2
    assert [(m["step"], m["questions"]) for m in metrics(tmp_path / "rl")] == [(1, 0), (2, 0)]
