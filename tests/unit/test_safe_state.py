"""Training state on disk without pickle, weights under their saved names, one-line messages."""

import json
import os
import pickle

import pytest
import torch

from stages.mrsp.state_files import StateFileError, load_tree, save_tree


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_optimizer_state_of_deepspeed_round_trips_without_pickle(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    dynamic = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=10, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False, dtype=torch.float16)
    dynamic.cur_iter = 7
    tree = {"loss_scaler": LossScaler(4.0), "dynamic": dynamic, "zero_stage": ZeroStageEnum.gradients,
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(5.0)}},
                                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0],
                                                       "foreach": None}]},
            "single_partition_of_fp32_groups": [torch.ones(5, dtype=torch.float32)],
            "param_slice_mappings": [{"lm_head.weight": fragment_address(numel=5, start=0)}],
            "__clash__": 1, "nan": float("inf")}
    save_tree(tree, tmp_path / "optimizer.rank1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.rank1.json", "optimizer.rank1.safetensors"]
    back = load_tree(tmp_path / "optimizer.rank1")
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 4.0
    assert back["dynamic"].cur_iter == 7 and back["dynamic"].dtype == torch.float16
    assert back["zero_stage"] is ZeroStageEnum.gradients
    state = back["base_optimizer_state"]
    assert list(state["state"]) == [0] and torch.equal(state["state"][0]["exp_avg"], torch.arange(5.0))
    assert state["param_groups"][0]["betas"] == (0.9, 0.999) and state["param_groups"][0]["foreach"] is None
    assert back["param_slice_mappings"][0]["lm_head.weight"] == fragment_address(numel=5, start=0)
    assert back["__clash__"] == 1 and back["nan"] == float("inf")
    with pytest.raises(TypeError, match="not a type a checkpoint may hold"):
        save_tree({"x": object()}, tmp_path / "bad")


def test_pickles_and_unlisted_types_in_state_files_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    save_tree({"a": torch.zeros(2)}, tmp_path / "good")
    # a pickle where the tensors or the JSON should be
    for suffix in (".safetensors", ".json"):
        stem = tmp_path / f"pickled{suffix[1:]}"
        save_tree({"a": torch.zeros(2)}, stem)
        (tmp_path / f"{stem.name}{suffix}").write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(StateFileError, match=f"{stem.name}{suffix}"):
            load_tree(stem)
    # JSON naming a type off the allow-list (a callable, a builtins "enum", any class) is refused by name
    for forged in ({"__object__": "posix.system", "fields": {}}, {"__enum__": "builtins.eval", "value": "1"},
                   {"__object__": "argparse.Namespace", "fields": {"x": 1}},  # harmless, but not listed
                   {"__object__": "deepspeed.runtime.fp16.loss_scaler.LossScaler", "fields": {"__class__": 1}}):
        (tmp_path / "good.json").write_text(json.dumps({"x": forged}))
        with pytest.raises(StateFileError, match="good.json: not a state file lvr wrote"):
            load_tree(tmp_path / "good")
    (tmp_path / "good.json").unlink()
    with pytest.raises(StateFileError, match="good.json: missing"):
        load_tree(tmp_path / "good")
    assert not marker.exists()


def test_full_weights_load_back_under_the_names_save_pretrained_wrote(tmp_path):
    """transformers 5 saves Qwen2.5-VL's `model.visual.*` as `visual.*` and
    `model.language_model.*` as `model.*`: the loader maps them back, and refuses strangers."""
    from safetensors.torch import load_file, save_file

    from stages.models.adapter import load_model
    from stages.mrsp.checkpoint import CheckpointError, load_model_weights, saved_names

    model = load_model("tiny:qwen2.5-vl")
    model.save_pretrained(tmp_path / "ck")
    names = saved_names(model)
    on_disk = load_file(tmp_path / "ck" / "model.safetensors")
    assert set(names.values()) >= set(on_disk) and names["model.visual.blocks.0.attn.proj.bias"] in on_disk
    assert any(k != v for k, v in names.items())  # renamed ones exist: the bug this guards against
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_model_weights(model, tmp_path / "ck")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    on_disk["stranger.weight"] = torch.zeros(1)
    save_file(on_disk, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected weights \['stranger.weight'\]"):
        load_model_weights(model, tmp_path / "ck")
    del on_disk["stranger.weight"], on_disk[names["model.visual.blocks.0.attn.proj.bias"]]
    save_file(on_disk, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="weights missing.*attn.proj.bias"):
        load_model_weights(model, tmp_path / "ck")


def test_truncate_keeps_the_steps_up_to_the_checkpoint_and_none_without_one(tmp_path):
    from stages.mrsp.checkpoint import truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s}) for s in (0, 1, 2, 3)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')  # a line torn by a kill
    truncate_jsonl(log, 2)
    assert log.read_text() == "\n".join(lines[:3]) + "\n"
    truncate_jsonl(log, -1)  # no checkpoint: the rerun starts over, step 0 included
    assert log.read_text() == ""


def test_one_line_messages_stay_one_line_off_a_terminal(tmp_path, capsys):
    """A skipped input's note and `fail()` print one line however long, and a message of
    several lines (an exception's) joined; markup-like brackets print as they are."""
    import typer

    from lvr_cli.main import fail
    from lvr_cli.recipes import load_recipe
    from lvr_cli.rundir import RunDir

    (tmp_path / "in.jsonl").write_text("")
    recipe_path = tmp_path / "sft.toml"
    recipe_path.write_text(f'stage = "sft"\n[data]\ninput = "{tmp_path / "in.jsonl"}"\n')
    run = RunDir(tmp_path / "run", load_recipe(recipe_path)).open()
    key = "synth-" + "x" * 150
    run.error(key, "VideoDecodeError: /very/long/" + "y" * 150 + "/video.mp4: [red]no such file[/]\nsecond line")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"skipped {key}: ") and "[red]no such file[/] second line" in err
    with pytest.raises(typer.Exit) as exit_:
        fail(f"{'z' * 200}: first\n\n  second  ", 1)
    assert exit_.value.exit_code == 1 and capsys.readouterr().err == f"error: {'z' * 200}: first second\n"
