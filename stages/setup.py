"""The setup every model stage shares: process grid, policy, reference, runtime, optimizer.

`sft`, `rl`, `filter`, `eval` and `bench-mrsp` build their pieces here, from their recipe,
and nowhere else: `setup(recipe)` for the whole set, or the pieces (`open_grid`,
`load_policy`, `load_reference`, `make_runtime`, `make_engine`) where a stage needs them at
different times (eval loads no model when everything is already predicted). Everything
below `stages/mrsp/` receives typed sections or plain values from here, never the recipe.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.data.video import VideoDecodeError
from stages.models.adapter import VLAdapter, load_adapter, load_model, model_dtype, resolve_model_path
from stages.mrsp.dist import Grid, init_grid
from stages.mrsp.engine import TrainEngine
from stages.mrsp.fsdp import gathered, shard_model
from stages.mrsp.runtime import Mode, Runtime, Sample
from stages.skipped import SkippedInputs


# What makes a record unreadable for a training stage: its video, a missing field, a bad value.
UNREADABLE = (VideoDecodeError, KeyError, ValueError)


class InputError(Exception):
    """A recipe value the stage cannot use, found before any work: one line naming the key."""


@dataclass
class Setup:
    """What a model stage runs with."""

    grid: Grid
    adapter: VLAdapter
    rt: Runtime
    ref: VLAdapter | None = None  # the frozen reference (rl with a KL term)
    engine: TrainEngine | None = None  # sft and rl
    ref_units: list = field(default_factory=list)  # the reference's FSDP units (train.engine = "fsdp2")

    def ref_gathered(self):
        """A block of reference forwards on its full weights (`fsdp.gathered`; nothing when not sharded)."""
        return gathered(self.ref_units)


def open_grid(recipe) -> Grid:
    """Join the launch's process group (`[launch]`, `mrsp.sp_size`) and seed torch."""
    grid = init_grid(recipe.mrsp.sp_size, recipe.launch.backend, recipe.launch.timeout_s)
    torch.manual_seed(recipe.seed)
    return grid


def load_policy(recipe, grid: Grid) -> VLAdapter:
    """The model `model.path` names, in `model.dtype`, on this rank's device."""
    m = recipe.model
    with model_path_errors(m.path):
        return load_adapter(m.path, model_dtype(m.dtype, grid.device), grid.device, m.attn_implementation)


def load_reference(recipe, grid: Grid, policy: VLAdapter) -> VLAdapter:
    """A frozen copy of `model.path` that shares the policy's tokenizer and patch spec."""
    m = recipe.model
    with model_path_errors(m.path):
        model = load_model(m.path, model_dtype(m.dtype, grid.device), grid.device, m.attn_implementation).eval()
    model.requires_grad_(False)
    return VLAdapter(model, policy.tokenizer, policy.patch_spec)


@contextmanager
def model_path_errors(path: str):
    """Turn a model that cannot be loaded (no such folder or hub id, not a supported model, a
    broken file) into an `InputError` naming `model.path`, in one line."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(f"model.path: {path}: cannot be loaded ({lines[0] if lines else type(e).__name__})") from None


def make_runtime(recipe, adapter: VLAdapter, grid: Grid, mode: Mode | None = None) -> Runtime:
    """The MR-SP runtime of `adapter` on `grid`: `mode` or the recipe's (`mrsp.enabled`,
    `mrsp.shared_prompt`); videos sampled as `[video]` says (none: samples come prepared)."""
    mrsp = recipe.mrsp
    if mode is None:
        mode = Mode(shared_prompt=mrsp.shared_prompt) if mrsp.enabled else Mode.named("vanilla")
    rt = Runtime(adapter, grid, mode, chunk_tokens=mrsp.logprob_chunk_tokens,
                 video=getattr(recipe, "video", None), prompt=recipe.prompt)
    trained = getattr(recipe.model, "freeze_vision", None)  # only sft and rl recipes train a model
    rt.vision_trains = trained is not None and not trained
    return rt


def processor_source(recipe) -> Path:
    """The model folder whose processor configs checkpoints carry along (a hub id's cache)."""
    return Path(resolve_model_path(recipe.model.path))


def make_engine(recipe, adapter: VLAdapter, rt: Runtime, total_steps: int, accum_steps: int) -> TrainEngine:
    """The optimizer engine of a training stage (`[optim]`, `[deepspeed]`, `[lora]`, `[train]`),
    scaling the loss by the SP size the runtime actually shards over."""
    m = recipe.model
    return TrainEngine(adapter.model, rt.grid, recipe.optim, recipe.deepspeed, recipe.lora, kind=recipe.train.engine,
                       total_steps=total_steps, accum_steps=accum_steps, sp_size=rt.sp_grid.sp_size,
                       freeze_vision=m.freeze_vision, freeze_llm_layers=m.freeze_llm_layers,
                       gradient_checkpointing=recipe.train.gradient_checkpointing)


def setup(recipe, grid: Grid | None = None, *, reference: bool = False,
          train: tuple[int, int] | None = None) -> Setup:
    """Grid (unless given), policy, runtime; with `reference` a frozen reference model; with
    `train = (optimizer steps, micro-batches per optimizer step)` the optimizer engine."""
    grid = grid or open_grid(recipe)
    adapter = load_policy(recipe, grid)
    rt = make_runtime(recipe, adapter, grid)
    ref = load_reference(recipe, grid, adapter) if reference else None
    engine = make_engine(recipe, adapter, rt, *train) if train else None
    ref_units = []
    if ref is not None and engine is not None and engine.sharded:  # the frozen reference is sharded too
        ref_units = shard_model(ref.model, trains=False)
    return Setup(grid, adapter, rt, ref, engine, ref_units)


def read_samples(rt: Runtime, records: list[dict], idx: list[int], video_dir: str, skipped: SkippedInputs
                 ) -> list[Sample]:
    """The records `idx` as samples (videos decoded); an unreadable one (`UNREADABLE`) is noted
    in `skipped` and left out."""
    samples = []
    for i in idx:
        try:
            samples.append(rt.sample(records[i], video_dir))
        except UNREADABLE as e:
            skipped.skip(str(records[i].get("problem_id", i)), f"{type(e).__name__}: {e}")
    return samples
