"""The sections recipes are made of (`[model]`, `[video]`, `[optim]`, ...), with their defaults.

Every section is frozen, forbids unknown keys and is strict about types
(`train.steps = "10"` is an error, not a coercion). The stage recipes that combine them are
in `lvr_cli/schema.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.shards import Shard


SCHEMA_VERSION = 2


class RecipeError(Exception):
    """A recipe that cannot be used: the message is one line naming the key and the reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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
    node_rank: NonNegInt = 0  # this node's place, 0 .. nnodes - 1 (node 0 hosts the rendezvous)
    master_addr: str = "127.0.0.1"  # node 0's address, as the other nodes reach it
    master_port: Annotated[int, Field(ge=1, le=65535)] | None = None  # None: a free port (one node only)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: PosFloat = 300.0  # every collective

    @model_validator(mode="after")
    def _nodes(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank: {self.node_rank} is not below nnodes = {self.nnodes}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("master_port: required when nnodes > 1 (every node must name the same port)")
        return self


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


class ShardedDataSection(DataSection):  # caption, generate-qa, filter: inputs split over jobs
    # "i/N": this job's share of the inputs (stages/shards.py); None: all of them, or the
    # launch's share under torchrun/srun (caption, generate-qa)
    shard: str | None = None

    @model_validator(mode="after")
    def _shard(self):
        if self.shard is not None:
            Shard.parse(self.shard)  # ValueError("shard: expected 'i/N' ...")
        return self


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
    betas: Annotated[tuple[float, float], Field(strict=False)] = (0.9, 0.999)  # a TOML array
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
    # "deepspeed": [deepspeed] (ZeRO-2 by default; torch's AdamW when deepspeed.enabled = false);
    # "fsdp2": the language model's weights, gradients and optimizer state sharded over all ranks
    engine: Literal["deepspeed", "fsdp2"] = "deepspeed"


class DeepspeedSection(Section):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2

    @model_validator(mode="after")
    def _stage(self):
        if self.enabled and self.zero_stage == 3:  # named so the refusal says why
            raise ValueError("zero_stage: 3 is not supported; to shard the weights too, set train.engine = "
                             "\"fsdp2\" (torch's FSDP2: weights, gradients and optimizer state sharded, as ZeRO-3)")
        return self


class CheckpointSection(Section):
    every_steps: PosInt = 50
    keep_last: PosInt = 2


class LogSection(Section):
    """Where a run's metrics go (`lvr_cli/tracking.py`) and how often a log that is not a
    terminal gets a progress line (`lvr_cli/live.py`)."""

    # metrics.jsonl is always written (resume and plots read it); the others are optional extras
    backends: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = ["jsonl"]
    # a progress line every N steps when stdout is not a terminal; a data stage's step is one
    # item of its progress bar (a video, a question), and its recipes default to 10
    every_steps: PosInt = 1
    wandb_project: str = "lvr"
    wandb_entity: str | None = None  # default: the API key's default entity
    wandb_run_name: str | None = None  # default: the run directory's name
    wandb_tags: list[str] = []
    mlflow_tracking_uri: str | None = None  # default: a file store in <run dir>/mlruns
    mlflow_experiment: str = "lvr"

    @model_validator(mode="after")
    def _backends(self):
        if "jsonl" not in self.backends:
            raise ValueError("backends: keep 'jsonl' in the list: metrics.jsonl is what resume and plots read")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends: {self.backends} names a backend twice")
        return self


class DataLogSection(LogSection):  # caption, generate-qa, filter, eval: a step is one item
    every_steps: PosInt = 10


class PromptSection(Section):
    system: str | None = None
    think: bool = True  # ask for <think>...</think><answer>...</answer>


