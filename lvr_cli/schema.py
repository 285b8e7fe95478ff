"""Recipe schemas: one pydantic model per stage, made of the sections of `lvr_cli/sections.py`.

Defaults live in the schemas and nowhere else. Every model is frozen, forbids unknown keys
and is strict about types, so a typo is an error, never a silent default. A key a stage
would not read is not in its schema; one that names a feature lvr does not have yet is
refused by a validator that says why.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from stages.data.records import CATEGORIES
from stages.evalkit.formats.base import FORMATS
from stages.evalkit.scoring import PREDICTION_FIELDS
from lvr_cli.bench_sections import (BenchMrspSection, BenchRolloutSection, BenchSpec, ComponentsLaunchSection,
                                    ComponentsMrspSection, ComponentsSpec)
from lvr_cli.sections import (SCHEMA_VERSION, BackendSection, CheckpointSection, DataLogSection,  # noqa: F401
                              DataSection, DeepspeedSection, Fraction, HubSection, LaunchSection, LogSection,
                              ModelSection, MrspSection, NonNegInt, OptimSection, OutputSection, PosFloat, PosInt,
                              PromptSection, RecipeError, RolloutSection, Section, ShardedDataSection,
                              TrainedModelSection, TrainSection,
                              VideoSection)


# -- stage recipes -------------------------------------------------------------------------------
class Recipe(Section):
    stage: str
    seed: int = 0
    output: OutputSection = OutputSection()
    log: LogSection = LogSection()

    def world_size(self) -> int:
        """Processes the recipe launches (1 for a stage without `[launch]` or that launches
        its own workers, as bench-components does)."""
        launch = getattr(self, "launch", None)
        return launch.nproc_per_node * launch.nnodes if isinstance(launch, LaunchSection) else 1

    @model_validator(mode="after")
    def _sp_divides_world(self):
        mrsp = getattr(self, "mrsp", None)
        if isinstance(mrsp, (MrspSection, BenchMrspSection)) and self.world_size() % mrsp.sp_size:
            raise ValueError(f"mrsp.sp_size: {mrsp.sp_size} does not divide the world size {self.world_size()}")
        launch = getattr(self, "launch", None)
        if isinstance(mrsp, (MrspSection, BenchMrspSection)) and isinstance(launch, LaunchSection) \
                and launch.nnodes > 1 and launch.nproc_per_node % mrsp.sp_size:
            raise ValueError(f"mrsp.sp_size: {mrsp.sp_size} does not divide launch.nproc_per_node = "
                             f"{launch.nproc_per_node} (an SP group's all-to-alls stay within a node)")
        return self

    @model_validator(mode="after")
    def _shards_are_not_pushed(self):
        hub = getattr(self, "hub", None)
        if getattr(getattr(self, "data", None), "shard", None) and isinstance(hub, HubSection) and hub.push:
            raise ValueError("hub.push: a shard is part of a dataset: `lvr merge` the shards, "
                             "then `lvr push` the merged run")
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

    @model_validator(mode="after")
    def _scenes(self):
        from stages.data.synth import scene_problem

        problem = scene_problem(self)
        if problem:
            raise ValueError(problem)
        return self


class SynthRecipe(Recipe):
    stage: Literal["synth"] = "synth"
    seed: NonNegInt = 0  # the video scripts' random streams need a non-negative seed
    synth: SynthSpec = SynthSpec()


class CaptionSpec(Section):
    clip_seconds: PosFloat = 10.0
    min_last_clip_s: Annotated[float, Field(ge=0)] = 1.0  # a shorter last clip joins the one before
    frames_per_clip: PosInt = 8
    prompt: str = "Describe what happens in this video clip in one or two sentences."
    prompt_file: str | None = None


class CaptionRecipe(Recipe):
    stage: Literal["caption"] = "caption"
    log: DataLogSection = DataLogSection()
    data: ShardedDataSection
    video: VideoSection = VideoSection()
    caption: CaptionSpec = CaptionSpec()
    backend: BackendSection = BackendSection()
    hub: HubSection = HubSection()


Category = Literal[CATEGORIES]


class QASpec(Section):
    categories: list[Category] = list(CATEGORIES)
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
    log: DataLogSection = DataLogSection()
    data: ShardedDataSection
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
    log: DataLogSection = DataLogSection()
    data: ShardedDataSection
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
    def _engine(self):
        if self.train.engine == "fsdp2" and self.deepspeed.enabled and "enabled" in self.deepspeed.model_fields_set:
            raise ValueError("train.engine: fsdp2 shards the model with torch's FSDP2, not DeepSpeed; "
                             "set deepspeed.enabled = false or leave it out")
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


class LossSection(Section):  # the GRPO loss (stages/algo/grpo.py); bench-mrsp's [algo]
    clip_low: Fraction = 0.2
    clip_high: Fraction = 0.2
    dual_clip: Annotated[float, Field(gt=1)] | None = None
    kl_coef: Annotated[float, Field(ge=0)] = 0.01
    kl_kind: Literal["k1", "k2", "k3"] = "k3"  # stages.algo.grpo.KL_KINDS
    # k3 computed as verl's/Long-RL's low_var_kl: log ratio clamped to [-20, 20], value to [-10, 10]
    kl_clamp: bool = True
    # stages.algo.grpo.AGG_MODES; reduced over the whole mini-batch of an optimizer step
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = "token-mean"
    scale_by_std: bool = True


class AlgoSection(LossSection):  # rl
    kl_in_reward: bool = False
    ppo_epochs: PosInt = 1
    mini_batches: PosInt = 1
    drop_zero_variance_groups: bool = False
    # on-policy steps (ppo_epochs = mini_batches = 1, no kl_in_reward) take the old log-probs from
    # the update forward, detached, instead of a separate forward (stages/rl.py, step 4)
    reuse_old_logprobs: bool = True


class RewardSection(Section):
    format_weight: Annotated[float, Field(ge=0)] = 0.5
    accuracy_weight: Annotated[float, Field(ge=0)] = 1.0
    judge: BackendSection | None = None

    @model_validator(mode="after")
    def _judge(self):
        if self.judge is not None:  # named in the schema so the refusal says why, not "unknown key"
            raise ValueError("judge: an LLM judge is not wired into RL rewards yet; answers are scored as "
                             "multiple-choice letters, numbers or normalised text without one")
        return self


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
    # the layout (stages/evalkit/formats/); auto: told per record by its fields
    format: Literal[("auto", *FORMATS)] = "auto"


class EvalFields(Section):  # [eval.fields]: which field holds what, in a layout lvr does not know
    question: str
    answer: str  # holds a letter, the right option's text, its 0-based index, or the name of its option field
    video: str  # holds a path relative to data.video_dir, or a file name found below it
    # one field holding a list or a dict, one field per option, or None: `A. ...` lines in the question
    options: str | list[str] | None = None
    key: str | None = None  # None: file:line
    groups: list[str] = []  # fields reported as by_<field>

    @model_validator(mode="after")
    def _groups(self):
        taken = [g for g in self.groups if g in PREDICTION_FIELDS]
        if taken:
            raise ValueError(f"groups: {', '.join(taken)} would overwrite a prediction row's own field of that name")
        return self


class EvalSection(Section):
    blind: bool = False  # also decode every item with the video left out: same model and prompt, a baseline
    subtitles: bool = False  # VideoMME: also ask every item with its subtitle lines (the w_subtitle protocol)
    fields: EvalFields | None = None


class EvalRecipe(Recipe):
    stage: Literal["eval"] = "eval"
    log: DataLogSection = DataLogSection()
    data: EvalDataSection
    eval: EvalSection = EvalSection()
    model: ModelSection = ModelSection()
    video: EvalVideoSection = EvalVideoSection()
    prompt: PromptSection = PromptSection()
    generation: GenerationSection = GenerationSection()
    mrsp: MrspSection = MrspSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _fields_format(self):
        fmt = self.data.format
        if self.eval.fields is None and fmt == "fields":
            raise ValueError("data.format: 'fields' reads a layout through [eval.fields], which the recipe lacks")
        if self.eval.fields is not None and fmt not in ("auto", "fields"):
            raise ValueError(f"eval.fields: maps a layout lvr does not know; data.format {fmt!r} reads its own "
                             "fields (set data.format = 'fields')")
        return self


class BenchRecipe(Recipe):
    stage: Literal["bench-mrsp"] = "bench-mrsp"
    model: ModelSection = ModelSection(path="tiny:qwen2.5-vl-bench")
    bench: BenchSpec = BenchSpec()
    rollout: BenchRolloutSection = BenchRolloutSection()
    algo: LossSection = LossSection()
    prompt: PromptSection = PromptSection()
    mrsp: BenchMrspSection = BenchMrspSection()
    launch: LaunchSection = LaunchSection()


class BenchComponentsRecipe(Recipe):
    stage: Literal["bench-components"] = "bench-components"
    model: ModelSection = ModelSection(path="tiny:qwen2.5-vl-bench", dtype="float32")
    components: ComponentsSpec = ComponentsSpec()
    prompt: PromptSection = PromptSection()
    mrsp: ComponentsMrspSection = ComponentsMrspSection()
    launch: ComponentsLaunchSection = ComponentsLaunchSection()


STAGES: dict[str, type[Recipe]] = {
    "synth": SynthRecipe, "caption": CaptionRecipe, "generate-qa": GenerateQARecipe,
    "filter": FilterRecipe, "sft": SFTRecipe, "rl": RLRecipe, "eval": EvalRecipe,
    "bench-mrsp": BenchRecipe, "bench-components": BenchComponentsRecipe,
}


