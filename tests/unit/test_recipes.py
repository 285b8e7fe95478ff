import json
from pathlib import Path

import pydantic
import pytest

from lvr_cli import lock as lockmod
from lvr_cli.recipes import (STAGES, RecipeError, check_paths, load_recipe, parse_override, recipe_hash,
                             resolved)

MINIMAL = {
    "synth": "",
    "caption": '[data]\ninput = "videos"\n',
    "generate-qa": '[data]\ninput = "captions.jsonl"\n',
    "filter": '[data]\ninput = "qa.jsonl"\n',
    "sft": '[data]\ninput = "sft.jsonl"\n',
    "rl": '[data]\ninput = "rl.jsonl"\n',
    "eval": '[data]\ninput = "eval.jsonl"\n',
    "bench-mrsp": "",
    "bench-components": "",
}


def write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_schema_round_trips(tmp_path, stage):
    r = load_recipe(write(tmp_path, f'stage = "{stage}"\n' + MINIMAL[stage]))
    data = resolved(r)
    again = STAGES[stage].model_validate(json.loads(json.dumps(data)))
    assert again == r and recipe_hash(again) == recipe_hash(r)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        r.seed = 3


@pytest.mark.parametrize("text,key,reason", [
    ('stage = "rl"\n[data]\ninput = "x"\n[rollout]\nnn = 3\n', "rollout.nn", "unknown key"),
    ('stage = "rl"\n[data]\ninput = "x"\n[rollout]\nn = "many"\n', "rollout.n", "valid integer"),
    ('stage = "rl"\n[data]\ninput = "x"\n[rollout]\nn = 1\n', "rollout.n", "at least 2"),
    ('stage = "rl"\n', "data", "required key is missing"),
    ('stage = "rl"\n[data]\ninput = "x"\n[rollout]\nengine = "vllm"\n', "rollout.engine",
     "not wired into the MR-SP rollouts yet"),
    ('stage = "sft"\n[data]\ninput = "x"\n[model]\nfreeze_vision = false\n[lora]\nenabled = true\n',
     "lora.enabled", "set model.freeze_vision = true"),
    ('stage = "sft"\n[data]\ninput = "x"\n[lora]\ntarget_modules = []\n', "lora.target_modules",
     "at least one"),
    ('stage = "eval"\n[data]\ninput = "x"\n[model]\nfreeze_vision = false\n', "model.freeze_vision",
     "unknown key"),
    ('stage = "sft"\n[data]\ninput = "x"\n[launch]\nnproc_per_node = 3\n[mrsp]\nsp_size = 2\n',
     "mrsp.sp_size", "does not divide the world size 3"),
    ('stage = "sft"\n[data]\ninput = "x"\n[launch]\nnproc_per_node = 2\n[train]\nglobal_batch = 3\n',
     "train.global_batch", "not divisible"),
    ('stage = "rl"\n[data]\ninput = "x"\n[train]\nengine = "fsdp2"\n[deepspeed]\nenabled = true\n',
     "train.engine", "set deepspeed.enabled = false"),
    ('stage = "sft"\n[data]\ninput = "x"\n[deepspeed]\nzero_stage = 3\n', "deepspeed.zero_stage",
     'train.engine = "fsdp2"'),
    ('stage = "filter"\n[data]\ninput = "x"\n[filter]\nband_low = 0.5\nband_high = 0.5\n',
     "filter.band_low", "below band_high"),
    ('stage = "caption"\n[data]\ninput = "x"\n[backend]\nkind = "openai"\n', "backend.base_url", "required"),
    ('stage = "nope"\n', "stage", "not one of"),
    ('seed = 1\n', "stage", "required key is missing"),
    ('stage = "synth"\n[synth]\nwidth = 100\n', "synth.width", "multiple of 28"),
])
def test_bad_recipe_names_key_and_reason(tmp_path, text, key, reason):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    assert f" {key}: " in msg and reason in msg, msg


def test_overrides_change_recipe_and_hash(tmp_path):
    p = write(tmp_path, 'stage = "rl"\n[data]\ninput = "x"\n')
    base = load_recipe(p)
    r = load_recipe(p, ["rollout.n=4", "optim.lr=1e-6", "algo.kl_kind=k1", "model.path=tiny:qwen2-vl"])
    assert (r.rollout.n, r.optim.lr, r.algo.kl_kind, r.model.path) == (4, 1e-6, "k1", "tiny:qwen2-vl")
    assert recipe_hash(r) != recipe_hash(base)
    assert recipe_hash(load_recipe(p, ["rollout.n=8"])) == recipe_hash(base)  # 8 is the default
    assert load_recipe(p, ['video.fps=2', "eval.every_steps=5"]).video.fps == 2.0


def test_parse_override_literals():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override('a="x y"') == (["a"], "x y")
    assert parse_override("a=plain/path") == (["a"], "plain/path")
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        parse_override("novalue")


def test_missing_input_path_named(tmp_path):
    r = load_recipe(write(tmp_path, 'stage = "sft"\n[data]\ninput = "nowhere.jsonl"\n'))
    with pytest.raises(RecipeError, match=r"^data.input: nowhere.jsonl: no such file"):
        check_paths(r, base=tmp_path)
    (tmp_path / "nowhere.jsonl").write_text("")
    check_paths(r, base=tmp_path)


def test_lock_detects_recipe_and_default_changes(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "demo").mkdir(parents=True)
    rp = tmp_path / "recipes" / "demo" / "rl.toml"
    rp.write_text('stage = "rl"\n[data]\ninput = "x"\n')
    (tmp_path / "recipes" / "prompt.toml").write_text('text = "not a recipe"\n')
    lockmod.write(tmp_path)
    assert lockmod.check(tmp_path) == []
    data = json.loads((tmp_path / "recipes.lock").read_text())
    assert list(data["recipes"]) == ["recipes/demo/rl.toml"]
    rp.write_text('stage = "rl"\n[data]\ninput = "x"\n[rollout]\nn = 4\n')
    assert lockmod.check(tmp_path) == ["recipes/demo/rl.toml: resolved recipe changed since it was locked"]
    lockmod.write(tmp_path)
    # defaults are part of the hashed form, so a changed schema default shows up too
    assert resolved(load_recipe(rp))["algo"]["kl_coef"] == 0.01
    from lvr_cli import recipes as rmod
    monkeypatch.setattr(rmod, "SCHEMA_VERSION", rmod.SCHEMA_VERSION + 1)
    monkeypatch.setattr(lockmod, "SCHEMA_VERSION", rmod.SCHEMA_VERSION)
    assert lockmod.check(tmp_path)[0].startswith("schema_version 2 != 3")


def test_project_recipes_are_locked():
    root = Path(__file__).resolve().parents[2]
    assert lockmod.check(root) == []


def test_real_model_training_recipes_carry_the_paper_settings():
    from lvr_cli.recipes import load_recipe

    root = Path(__file__).resolve().parents[2] / "recipes" / "qwen2_5_vl_7b"
    rl = load_recipe(root / "rl.toml", [])
    assert (rl.rollout.n, rl.video.max_frames, rl.mrsp.sp_size, rl.world_size()) == (8, 512, 4, 8)
    assert rl.model.dtype == "bfloat16" and rl.rollout.engine == "hf"
    sft = load_recipe(root / "sft.toml", [])
    assert sft.model.path == "Qwen/Qwen2.5-VL-7B-Instruct" and sft.mrsp.sp_size == 4
    assert sft.train.gradient_checkpointing and rl.train.gradient_checkpointing
    bench = load_recipe(root / "bench.toml", [])
    assert 512 in bench.bench.frames and bench.rollout.n == 5 and bench.mrsp.sp_size == 4
