"""Every recipe key is read by its stage or refused with a reason; types are strict; the
schema's lists of GRPO modes are the math module's."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from lvr_cli.recipes import STAGES, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
STAGE_MODULES = {"synth": ["stages/synth.py", "stages/data/synth*.py"],
                 "caption": ["stages/caption.py"], "generate-qa": ["stages/generate_qa.py"],
                 "filter": ["stages/filter.py"], "sft": ["stages/sft.py"], "rl": ["stages/rl.py"],
                 "eval": ["stages/eval.py", "stages/evalkit/*.py"], "bench-mrsp": ["stages/bench_mrsp.py", "stages/bench_report.py"],
                 "bench-components": ["stages/bench_components.py"]}
# what every model stage shares: the setup, the runtime, the CLI (output, launch, hub)
SHARED = ["stages/setup.py", "stages/mrsp/*.py", "lvr_cli/*.py", "stages/backends/*.py", "stages/data/video.py"]
# names a section goes by where a function receives it (`TrainEngine(..., optim, deepspeed_cfg, lora)`)
ALIASES = {"deepspeed": ["deepspeed_cfg"], "backend": ["cfg"], "grounding_backend": ["cfg"], "caption": ["spec"],
           "filter": ["spec"], "video": ["vid", "video"], "bench": ["b"], "components": ["c"], "synth": ["cfg"],
           "model": ["m"], "rollout": ["ro"], "reward": ["w"], "train": ["train"], "lora": ["lora", "cfg"],
           "mrsp": ["mrsp"], "optim": ["optim"], "checkpoint": ["checkpoint"], "eval": ["eval"], "qa": ["qa"],
           "launch": ["launch"], "hub": ["hub"], "generation": ["gen"], "data": ["data"], "prompt": ["prompt"],
           "algo": ["algo"], "output": ["output"]}
# keys whose non-default value the schema refuses, with the reason, instead of being read
REFUSED = {("rl", "reward.judge"): {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
           ("rl", "rollout.engine"): "vllm"}


def leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
        if sub is not None and not prefix:
            yield from leaves(sub, name)
        else:
            yield f"{prefix}.{name}" if prefix else name


def source(stage: str) -> str:
    files = {p for pattern in STAGE_MODULES[stage] + SHARED for p in ROOT.glob(pattern)}
    return "\n".join(p.read_text() for p in sorted(files))


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_key_is_read_or_refused(stage):
    text = source(stage)
    unread = []
    for key in leaves(STAGES[stage]):
        if key in ("stage", "seed") or (stage, key) in REFUSED:
            continue
        section, _, field = key.partition(".")
        names = [section, *ALIASES.get(section, [])] if field else ["recipe"]
        field = field or section
        if not re.search(rf"\b({'|'.join(names)})\.{field}\b", text):
            unread.append(key)
    assert not unread, f"{stage}: keys accepted but read nowhere: {unread}"


@pytest.mark.parametrize("stage,key", list(REFUSED))
def test_unwired_keys_are_refused_with_a_reason(tmp_path, stage, key):
    section, field = key.split(".")
    value = REFUSED[(stage, key)]
    body = (f'[{section}.{field}]\n' + "".join(f'{k} = "{v}"\n' for k, v in value.items())) if isinstance(value, dict) \
        else f'[{section}]\n{field} = "{value}"\n'
    path = tmp_path / "r.toml"
    path.write_text(f'stage = "{stage}"\n[data]\ninput = "x.jsonl"\n' + body)
    with pytest.raises(RecipeError, match=rf"{key}: .*not wired"):
        load_recipe(path)


@pytest.mark.parametrize("key", ["rollout.max_new_tokens=8", "mrsp.enabled=false", "mrsp.shared_prompt=false",
                                 "algo.ppo_epochs=2", "algo.kl_in_reward=true"])
def test_bench_refuses_keys_it_does_not_read(key):
    with pytest.raises(RecipeError, match=rf"{key.split('=')[0]}: unknown key"):
        load_recipe(ROOT / "recipes/demo/bench.toml", [key])


@pytest.mark.parametrize("override,message", [
    ('train.steps="10"', "train.steps: Input should be a valid integer"),
    ('output.overwrite="yes"', "output.overwrite: Input should be a valid boolean"),
    ("optim.lr=true", "optim.lr: Input should be a valid number"),
])
def test_types_are_strict(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(ROOT / "recipes/demo/sft.toml", [override])


def test_zero_3_is_refused_with_its_reason():
    with pytest.raises(RecipeError, match=r'deepspeed.zero_stage: 3 is not supported; .* train.engine = "fsdp2"'):
        load_recipe(ROOT / "recipes/demo/sft.toml", ["deepspeed.zero_stage=3"])


def test_ints_still_fill_float_keys_and_arrays_fill_tuples():
    r = load_recipe(ROOT / "recipes/demo/sft.toml", ["optim.lr=1", "optim.betas=[0.9, 0.95]"])
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float) and r.optim.betas == (0.9, 0.95)


def test_schema_lists_are_the_math_modules():
    from lvr_cli.schema import AlgoSection, Category
    from stages.algo.grpo import AGG_MODES, KL_KINDS
    from stages.data.records import CATEGORIES

    assert AlgoSection.model_fields["loss_agg"].annotation.__args__ == AGG_MODES
    assert AlgoSection.model_fields["kl_kind"].annotation.__args__ == KL_KINDS
    assert Category.__args__ == CATEGORIES
