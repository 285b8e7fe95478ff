"""Recipes: one pydantic schema per stage, TOML loading and dotted `key=value` overrides.

Defaults live here and nowhere else. Every model is frozen and forbids unknown keys, so a
typo is an error, never a silent default. `load_recipe` returns a validated recipe or
raises `RecipeError`, whose message is one line: the file, the dotted key and the reason.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


class RecipeError(Exception):
    """A recipe that cannot be used: the message is one line naming the key and the reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


# -- shared sections ---------------------------------------------------------------------------
class ModelSection(Section):
    path: str = "tiny:qwen2.5-vl"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class TrainedModelSection(ModelSection):  # sft and rl: what trains
    freeze_vision: bool = True
    freeze_llm_layers: NonNegInt = 0  # freeze the first N decoder layers


class VideoSection(Section):
    max_frames: PosInt = 32
    fps: PosFloat | None = None  # None: max_frames spread uniformly over the video
    max_pixels: PosInt = 112 * 112  # per frame, after resizing to the patch grid


class OutputSection(Section):
    dir: str | None = None  # default runs/<stage>/<recipe name>
    overwrite: bool = False


class LaunchSection(Section):
    nproc_per_node: PosInt = 1
    nnodes: PosInt = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: PosFloat = 300.0  # every collective


class MrspSection(Section):
    enabled: bool = True  # false: the vanilla way, the baseline of bench-mrsp and the parity tests
    sp_size: PosInt = 1
    shared_prompt: bool = True  # training forwards run a group's prompt once (stages/mrsp/shared.py)
    logprob_chunk_tokens: PosInt = 1024


class HubSection(Section):
    repo_id: str | None = None  # ORG/NAME
    private: bool = True
    push: bool = False  # push the run when the stage finishes (a dry run without a token)

    @model_validator(mode="after")
    def _push_needs_repo(self):
        if self.push and not self.repo_id:
            raise ValueError("repo_id: required when hub.push = true")
        return self


class BackendSection(Section):
    kind: Literal["openai", "transformers", "vllm"] = "transformers"
    model: str = "tiny:qwen2.5-vl"
    base_url: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    max_concurrency: PosInt = 4
    timeout_s: PosFloat = 120.0
    max_retries: NonNegInt = 4
    backoff_s: PosFloat = 1.0
    temperature: Annotated[float, Field(ge=0)] = 0.0
    max_tokens: PosInt = 512
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _openai_needs_url(self):
        if self.kind == "openai" and not self.base_url:
            raise ValueError("base_url: required when backend.kind = 'openai'")
        return self


class DataSection(Section):
    input: str
    video_dir: str | None = None  # where relative video paths resolve (default: input's folder)
    limit: PosInt | None = None


class RolloutSection(Section):
    n: PosInt = 8
    engine: Literal["hf", "vllm"] = "hf"
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_new_tokens: PosInt = 256

    @model_validator(mode="after")
    def _engine(self):
        if self.engine == "vllm":  # named in the schema so the refusal says why, not "unknown value"
            raise ValueError("rollout.engine: 'vllm' is not wired into the MR-SP rollouts yet (no GPU "
                             "to check it on); use 'hf', which runs on CPU and GPU")
        return self


class OptimSection(Section):
    lr: PosFloat = 1e-5
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: NonNegInt = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: Fraction = 0.0
    max_grad_norm: PosFloat = 1.0


class TrainSection(Section):
    steps: PosInt = 100
    micro_batch_per_rank: PosInt = 1
    global_batch: PosInt = 8
    # recompute each decoder layer's activations in the backward: memory for long videos, ~1/3 more compute
    gradient_checkpointing: bool = False


class DeepspeedSection(Section):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2


class CheckpointSection(Section):
    every_steps: PosInt = 50
    keep_last: PosInt = 2


class PromptSection(Section):
    system: str | None = None
    think: bool = True  # ask for <think>...</think><answer>...</answer>


# -- stage recipes -------------------------------------------------------------------------------
class Recipe(Section):
    stage: str
    seed: int = 0
    output: OutputSection = OutputSection()

    def world_size(self) -> int:
        launch = getattr(self, "launch", None)
        return launch.nproc_per_node * launch.nnodes if launch else 1

    @model_validator(mode="after")
    def _sp_divides_world(self):
        mrsp = getattr(self, "mrsp", None)
        if mrsp is not None and self.world_size() % mrsp.sp_size:
            raise ValueError(f"mrsp.sp_size: {mrsp.sp_size} does not divide the world size {self.world_size()}")
        return self


class SynthSpec(Section):
    videos: PosInt = 24
    seconds: PosFloat = 64.0
    fps: PosFloat = 2.0
    width: PosInt = 112
    height: PosInt = 112
    object_size_px: Annotated[int, Field(ge=14)] = 56
    event_seconds: PosFloat = 8.0
    distractors: NonNegInt = 0
    option_order: Literal["fixed", "shuffled"] = "fixed"
    # reasoning: relational questions (before/after the flash, position at mm:ss);
    # perception: one question per category with evidence over most of the video (the demo)
    question_set: Literal["reasoning", "perception"] = "reasoning"
    questions_per_category: PosInt = 1
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    clip_seconds: PosFloat = 10.0

    @model_validator(mode="after")
    def _sizes(self):
        for name in ("width", "height"):
            if getattr(self, name) % 28:
                raise ValueError(f"{name}: must be a multiple of 28 (the Qwen patch grid), got {getattr(self, name)}")
        if self.object_size_px > min(self.width, self.height):
            raise ValueError("object_size_px: larger than the frame")
        return self


class SynthRecipe(Recipe):
    stage: Literal["synth"] = "synth"
    synth: SynthSpec = SynthSpec()


class CaptionSpec(Section):
    clip_seconds: PosFloat = 10.0
    min_last_clip_s: Annotated[float, Field(ge=0)] = 1.0  # a shorter last clip joins the one before
    frames_per_clip: PosInt = 8
    prompt: str = "Describe what happens in this video clip in one or two sentences."
    prompt_file: str | None = None


class CaptionRecipe(Recipe):
    stage: Literal["caption"] = "caption"
    data: DataSection
    video: VideoSection = VideoSection()
    caption: CaptionSpec = CaptionSpec()
    backend: BackendSection = BackendSection()
    hub: HubSection = HubSection()


Category = Literal["temporal", "goal", "spatial", "plot"]


class QASpec(Section):
    categories: list[Category] = ["temporal", "goal", "spatial", "plot"]
    questions_per_category: PosInt = 1
    max_attempts: PosInt = 3
    refine: bool = True
    grounding: bool = False  # spatial: object boxes from grounding_backend go into the prompt
    grounding_max_clips: PosInt = 8  # clips grounded per video, evenly spaced
    grounding_max_pixels: PosInt = 448 * 448  # per grounded frame
    prompts_dir: str = "recipes/prompts"
    dedup_threshold: Fraction = 0.85


class GenerateQARecipe(Recipe):
    stage: Literal["generate-qa"] = "generate-qa"
    data: DataSection
    qa: QASpec = QASpec()
    backend: BackendSection = BackendSection()
    grounding_backend: BackendSection | None = None
    hub: HubSection = HubSection()

    @model_validator(mode="after")
    def _grounding(self):
        if self.qa.grounding and self.grounding_backend is None:
            raise ValueError("grounding_backend: required when qa.grounding = true (a VLM that can see frames)")
        return self


class FilterSpec(Section):
    samples: PosInt = 10
    temperature: Annotated[float, Field(ge=0)] = 1.0
    band_low: Fraction = 0.0  # keep for RL: band_low < pass rate < band_high
    band_high: Fraction = 1.0
    max_new_tokens: PosInt = 256

    @model_validator(mode="after")
    def _band(self):
        if self.band_low >= self.band_high:
            raise ValueError("band_low: must be below band_high")
        return self


class FilterRecipe(Recipe):
    stage: Literal["filter"] = "filter"
    data: DataSection
    model: ModelSection = ModelSection()
    video: VideoSection = VideoSection()
    filter: FilterSpec = FilterSpec()
    prompt: PromptSection = PromptSection()
    mrsp: MrspSection = MrspSection()
    launch: LaunchSection = LaunchSection()
    hub: HubSection = HubSection()


class EvalDuringTrain(Section):
    input: str | None = None
    every_steps: PosInt = 50
    limit: PosInt | None = None


class LoraSection(Section):
    enabled: bool = False
    r: PosInt = 16
    alpha: PosFloat = 32.0
    dropout: Fraction = 0.0
    # linear layers of the language model that get adapters (the vision tower gets none)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    @model_validator(mode="after")
    def _targets(self):
        if not self.target_modules:
            raise ValueError("target_modules: name at least one linear layer (e.g. q_proj)")
        return self


class _Trainer(Recipe):
    data: DataSection
    model: TrainedModelSection = TrainedModelSection()
    video: VideoSection = VideoSection()
    prompt: PromptSection = PromptSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    deepspeed: DeepspeedSection = DeepspeedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalDuringTrain = EvalDuringTrain()
    mrsp: MrspSection = MrspSection()
    launch: LaunchSection = LaunchSection()
    hub: HubSection = HubSection()
    lora: LoraSection = LoraSection()

    @model_validator(mode="after")
    def _lora(self):
        if self.lora.enabled and not self.model.freeze_vision:
            raise ValueError("lora.enabled: LoRA trains adapters on the language model only; "
                             "set model.freeze_vision = true")
        return self

    @model_validator(mode="after")
    def _batch(self):
        dp = max(1, self.world_size() // self.mrsp.sp_size)
        if self.train.global_batch % (self.train.micro_batch_per_rank * dp):
            raise ValueError(
                f"train.global_batch: {self.train.global_batch} is not divisible by "
                f"micro_batch_per_rank x data-parallel size = {self.train.micro_batch_per_rank} x {dp}")
        return self


class SFTRecipe(_Trainer):
    stage: Literal["sft"] = "sft"


class AlgoSection(Section):
    clip_low: Fraction = 0.2
    clip_high: Fraction = 0.2
    dual_clip: Annotated[float, Field(gt=1)] | None = None
    kl_coef: Annotated[float, Field(ge=0)] = 0.01
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    scale_by_std: bool = True
    ppo_epochs: PosInt = 1
    mini_batches: PosInt = 1
    drop_zero_variance_groups: bool = False


class RewardSection(Section):
    format_weight: Annotated[float, Field(ge=0)] = 0.5
    accuracy_weight: Annotated[float, Field(ge=0)] = 1.0
    judge: BackendSection | None = None


class RLRecipe(_Trainer):
    stage: Literal["rl"] = "rl"
    rollout: RolloutSection = RolloutSection()
    algo: AlgoSection = AlgoSection()
    reward: RewardSection = RewardSection()

    @model_validator(mode="after")
    def _group(self):
        if self.rollout.n < 2:
            raise ValueError("rollout.n: GRPO needs at least 2 rollouts per question")
        per_rank = self.train.global_batch // max(1, self.world_size() // self.mrsp.sp_size)
        if per_rank % (self.algo.mini_batches * self.train.micro_batch_per_rank):
            raise ValueError(f"algo.mini_batches: {per_rank} questions per rank per step do not split into "
                             f"{self.algo.mini_batches} mini-batches of micro-batches of "
                             f"{self.train.micro_batch_per_rank}")
        return self


class GenerationSection(Section):
    max_new_tokens: PosInt = 256
    temperature: Annotated[float, Field(ge=0)] = 0.0
    batch_per_rank: PosInt = 4


class EvalVideoSection(VideoSection):
    frames: list[PosInt] | None = None  # a list sweeps accuracy vs frames (max_frames is then unused)

    @model_validator(mode="after")
    def _frames(self):
        if self.frames is not None and not self.frames:
            raise ValueError("frames: an empty list; leave it out to evaluate at max_frames")
        return self


class EvalDataSection(DataSection):
    format: Literal["auto", "longvideo-reason", "videomme"] = "auto"


class EvalRecipe(Recipe):
    stage: Literal["eval"] = "eval"
    data: EvalDataSection
    model: ModelSection = ModelSection()
    video: EvalVideoSection = EvalVideoSection()
    prompt: PromptSection = PromptSection()
    generation: GenerationSection = GenerationSection()
    mrsp: MrspSection = MrspSection()
    launch: LaunchSection = LaunchSection()


BenchMode = Literal["vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared"]


class BenchSpec(Section):
    frames: list[PosInt] = [8, 16, 32]
    modes: list[BenchMode] = ["vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared"]
    steps: PosInt = 2
    warmup_steps: NonNegInt = 1
    response_tokens: PosInt = 16
    frame_size: PosInt = 56
    memory_cap_gb: PosFloat | None = None
    name: str = "bench"
    out_dir: str = "benchmarks"


class BenchRecipe(Recipe):
    stage: Literal["bench-mrsp"] = "bench-mrsp"
    model: ModelSection = ModelSection(path="tiny:qwen2.5-vl-bench")
    bench: BenchSpec = BenchSpec()
    rollout: RolloutSection = RolloutSection()
    algo: AlgoSection = AlgoSection()
    mrsp: MrspSection = MrspSection()
    launch: LaunchSection = LaunchSection()


STAGES: dict[str, type[Recipe]] = {
    "synth": SynthRecipe, "caption": CaptionRecipe, "generate-qa": GenerateQARecipe,
    "filter": FilterRecipe, "sft": SFTRecipe, "rl": RLRecipe, "eval": EvalRecipe,
    "bench-mrsp": BenchRecipe,
}

# Paths that must exist before a stage starts (checked by `check_paths`, not by `lock`).
INPUT_PATHS = {"data.input", "data.video_dir", "caption.prompt_file", "eval.input"}


# -- loading ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """Return `(dotted key parts, value)` of `key=value`, the value parsed as a TOML literal
    (a bare word that is not valid TOML is taken as a string)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override {text!r}: bad key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain TOML data
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"{'.'.join(parts)}: {p} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"] if not str(p).startswith("function-after")]
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    # Validators of a section name their own field as "field: reason".
    if ": " in msg and msg.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum() and " " not in msg.split(": ", 1)[0]:
        field, msg = msg.split(": ", 1)
        loc = loc + [field] if "." not in field else field.split(".")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{'.'.join(loc) or '<recipe>'}: {msg}{more}"


def read_toml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None


def load_recipe(path: str | Path, overrides: list[str] = (), stage: str | None = None) -> Recipe:
    """Return the validated recipe at `path` with `overrides` applied; raise `RecipeError`."""
    path = Path(path)
    data = apply_overrides(read_toml(path), list(overrides))
    name = data.get("stage", stage)
    if stage is not None and name != stage:
        raise RecipeError(f"{path}: stage: recipe is for '{name}', not '{stage}'")
    if name not in STAGES:
        raise RecipeError(f"{path}: stage: {name!r} is not one of {', '.join(STAGES)}" if name
                          else f"{path}: stage: required key is missing")
    data.setdefault("stage", name)
    try:
        recipe = STAGES[name].model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: {_format_error(e)}") from None
    return recipe


def resolved(recipe: Recipe) -> dict:
    """The recipe with every default filled in, as plain JSON data."""
    return recipe.model_dump(mode="json")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical resolved JSON (sorted keys, no whitespace)."""
    text = json.dumps(resolved(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _walk(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, data


def check_paths(recipe: Recipe, base: Path = Path(".")) -> None:
    """Raise `RecipeError` naming the key when an input path of the recipe does not exist."""
    for key, value in _walk(resolved(recipe)):
        if key in INPUT_PATHS and value is not None:
            if any(ch in str(value) for ch in "*?[") and key == "data.input":
                continue  # a glob: resolved by the stage
            if not (base / value).exists():
                raise RecipeError(f"{key}: {value}: no such file or directory")


def default_output_dir(recipe: Recipe, recipe_path: str | Path) -> Path:
    return Path(recipe.output.dir) if recipe.output.dir else Path("runs") / recipe.stage / Path(recipe_path).stem
