"""Checkpoints: write and restore a training run's state, keep the last few.

A checkpoint `checkpoints/step_N/` holds:
- the model in Hugging Face format (`save_pretrained`: safetensors, config, tokenizer and
  processor files) that `AutoModelForImageTextToText.from_pretrained` loads; with LoRA the
  merged weights, and the adapter in `lora/` (peft's format, safetensors);
- `trainer/state.json`: the step, the number of processes and the optimizer kind;
- `trainer/optimizer.safetensors` + `optimizer.json` (plain AdamW, written by rank 0), or
  with DeepSpeed one pair per rank, `optimizer.rank<R>.*` (its ZeRO partition of the optimizer
  state and fp32 master weights, the schedule and DeepSpeed's step counters), or with FSDP2
  (`train.engine = "fsdp2"`) one pair per rank holding its shard of AdamW's state. A sharded
  model's weights are gathered to rank 0 for the Hugging Face folder.
A killed run resumes from the newest one (the data order follows from the step:
`data_order.step_records`). Loading runs no code from the folder: weights and optimizer
tensors are safetensors, everything else JSON (`stages/mrsp/state_files.py`); DeepSpeed's
own pickled checkpoint files are neither written nor read. A file that cannot be read stops
the run with one line naming it (`CheckpointError`).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch

from stages.mrsp.dist import Grid, all_gather_objects, barrier
from stages.mrsp.engine import TrainEngine
from stages.mrsp.fsdp import (full_state_dict, load_full_state, load_local_optimizer_state, load_master_shards,
                              local_optimizer_state, master_shards, sharded)
from stages.mrsp.lora import LORA_DIR, has_lora, load_adapter_weights, save_pretrained
from stages.mrsp.state_files import StateFileError, load_tree, save_tree

FORMAT = 2  # of trainer/: 1 was torch.save / DeepSpeed pickles, never read now


class CheckpointError(Exception):
    """A checkpoint a run cannot resume from: one line naming the file and the reason."""


def save_state(engine: TrainEngine, folder: Path, tokenizer, state: dict) -> None:
    """Write `folder` (HF model + tokenizer) and `folder/trainer` (optimizer, scheduler,
    `state`); the folder appears atomically (written under a temporary name first)."""
    grid = engine.grid
    tmp = folder.with_name(folder.name + ".tmp")
    weights = full_weights(engine.model)  # a collective when the weights are sharded
    if grid.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_pretrained(engine.model, tmp, weights)
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer").mkdir()
        meta = {**state, "format": FORMAT, "world_size": grid.world_size, "optimizer": engine.kind}
        (tmp / "trainer" / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    barrier(grid)
    if engine.ds is not None:  # every rank holds its own ZeRO partition
        save_tree(deepspeed_state(engine), tmp / "trainer" / f"optimizer.rank{grid.rank}")
    elif engine.sharded:  # every rank holds its shard of the optimizer state
        save_tree({"optimizer": local_optimizer_state(engine.optimizer), "scheduler": engine.scheduler.state_dict(),
                   "master": master_shards(engine.model)}, tmp / "trainer" / f"optimizer.rank{grid.rank}")
    elif grid.is_main:
        save_tree({"optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict()},
                  tmp / "trainer" / "optimizer")
    barrier(grid)
    if grid.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    barrier(grid)


def full_weights(model) -> dict[str, torch.Tensor] | None:
    """A sharded model's full weights on rank 0 (every rank must call; `{}` on the others);
    None when the model is not sharded (`save_pretrained` reads the model itself)."""
    return full_state_dict(model) if sharded(model) else None


def deepspeed_state(engine: TrainEngine) -> dict:
    """This rank's DeepSpeed optimizer state (its ZeRO partition), the schedule and the step counters."""
    ds = engine.ds
    return {"optimizer": ds.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict(),
            "counters": {"global_steps": ds.global_steps, "global_samples": ds.global_samples,
                         "skipped_steps": ds.skipped_steps}}


def read_state(folder: Path) -> dict:
    """`folder/trainer/state.json`, checked; `CheckpointError` when it is not one lvr wrote."""
    path = folder / "trainer" / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: no step number")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: written by an earlier lvr, whose optimizer files only unpickling reads "
                              "(lvr never unpickles): start over with output.overwrite=true")
    return state


def load_state(engine: TrainEngine, folder: Path) -> dict:
    """Restore weights, optimizer and scheduler from `folder`; return its saved state.
    Raise `CheckpointError` (one line) when a file is missing or not what lvr writes."""
    from safetensors import SafetensorError

    state = read_state(folder)
    world = engine.grid.world_size
    if state.get("optimizer") != engine.kind:
        raise CheckpointError(f"{folder}: its optimizer state is {state.get('optimizer')!r}; this run's is "
                              f"{engine.kind!r} (train.engine or deepspeed.enabled changed?)")
    if engine.kind != "plain" and state.get("world_size") != world:
        raise CheckpointError(f"{folder}: written by {state.get('world_size')} processes, resumed by {world}: "
                              f"{engine.kind}'s optimizer state is partitioned over the processes; use the same launch")
    try:
        if has_lora(engine.model):  # the base weights are model.path's: only the adapters trained
            load_adapter_weights(engine.model, folder)
        else:
            load_model_weights(engine.model, folder)
        if engine.ds is not None:
            load_deepspeed_state(engine, load_tree(folder / "trainer" / f"optimizer.rank{engine.grid.rank}"))
        elif engine.sharded:
            saved = load_tree(folder / "trainer" / f"optimizer.rank{engine.grid.rank}")
            load_master_shards(engine.model, saved["master"])
            load_local_optimizer_state(engine.optimizer, saved["optimizer"])
            engine.scheduler.load_state_dict(saved["scheduler"])
        else:
            saved = load_tree(folder / "trainer" / "optimizer")
            engine.optimizer.load_state_dict(saved["optimizer"])
            engine.scheduler.load_state_dict(saved["scheduler"])
    except StateFileError as e:
        raise CheckpointError(str(e)) from None
    except SafetensorError as e:  # lora/adapter_model.safetensors
        path = folder / LORA_DIR / "adapter_model.safetensors"
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # files that do not fit this model
        raise CheckpointError(f"{folder}: does not fit this run ({str(e).strip().splitlines()[0][:200]})") from None
    return state


def load_deepspeed_state(engine: TrainEngine, saved: dict) -> None:
    """Put this rank's saved optimizer partition, schedule and counters back into DeepSpeed."""
    ds, opt = engine.ds, engine.ds.optimizer
    if "state_dict_list" in inspect.signature(opt.load_state_dict).parameters:
        # ZeRO (and DeepSpeed's bf16 optimizer) read this rank's entry of a per-rank list
        group = getattr(opt, "dp_process_group", None)
        distributed = torch.distributed.is_initialized()
        ranks = torch.distributed.get_world_size(group) if distributed else 1
        mine = torch.distributed.get_rank(group) if distributed else 0
        partitions = [None] * ranks
        partitions[mine] = saved["optimizer"]
        opt.load_state_dict(state_dict_list=partitions, load_optimizer_states=True,
                            load_from_fp32_weights=ds.zero_load_from_fp32_weights())
    else:
        opt.load_state_dict(saved["optimizer"])
    engine.scheduler.load_state_dict(saved["scheduler"])
    for name, value in saved["counters"].items():
        setattr(ds, name, int(value))


def saved_names(model) -> dict[str, str]:
    """The name `save_pretrained` writes each weight under, by its name in `model.state_dict()`:
    transformers renames some (Qwen2.5-VL: `model.visual.*` is saved as `visual.*`,
    `model.language_model.*` as `model.*`). Found by running its own save-side renaming on
    index-marked tensors."""
    keys = list(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings saves the in-memory names
        return {k: k for k in keys}
    marks = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    out = {}
    for saved, mark in revert_weight_conversion(model, marks).items():
        if not isinstance(mark, torch.Tensor) or mark.numel() != 1:
            raise CheckpointError(f"{type(model).__name__}: transformers merges or splits weights on save; "
                                  "lvr resumes only renamed ones")
        out[keys[int(mark.item())]] = saved
    return out


def load_model_weights(model, folder: Path) -> None:
    """Load the full weights `save_pretrained` wrote in `folder` into `model`, mapping the saved
    names back; every weight must be restored (tied ones through their source)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a safetensors file ({str(e).strip().splitlines()[0][:120]})") from None
    by_saved = {saved: name for name, saved in saved_names(model).items()}
    unexpected = sorted(k for k in weights if k not in by_saved)
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected weights {unexpected[:3]}")
    named = {by_saved[k]: v for k, v in weights.items()}
    if sharded(model):  # each rank copies in its rows
        missing, _ = load_full_state(model, named)
        if missing:
            raise CheckpointError(f"{folder}: weights missing {missing[:3]}")
        return
    missing, _ = model.load_state_dict(named, strict=False)
    current = model.state_dict()
    restored = {current[by_saved[k]].data_ptr() for k in weights}
    missing = [k for k in missing if current[k].data_ptr() not in restored]  # tied weights come with their source
    if missing:
        raise CheckpointError(f"{folder}: weights missing {missing[:3]}")


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete `checkpoints/step_N` of a run, or None."""
    ck = run_path / "checkpoints"
    steps = sorted((int(p.name.split("_")[1]), p) for p in ck.glob("step_*")
                   if p.name.split("_")[1].isdigit() and (p / "trainer" / "state.json").exists())
    return steps[-1][1] if steps else None


def prune_checkpoints(run_path: Path, keep_last: int) -> None:
    ck = run_path / "checkpoints"
    steps = sorted((int(p.name.split("_")[1]), p) for p in ck.glob("step_*") if p.name.split("_")[1].isdigit())
    for _, p in steps[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps up to `last_step` (-1: none), as a resumed run's log must be
    (each step once: what came after the checkpoint is done again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def resume(engine: TrainEngine, run_path: Path, logs: list[Path]) -> int:
    """Load the run's newest checkpoint, if any; drop the lines of `logs` written after it
    (all of them without one); return its step. Every rank raises the same `CheckpointError`
    when any rank cannot read its files."""
    grid = engine.grid
    ck = latest_checkpoint(run_path)
    step, error = 0, None
    if ck is not None:
        try:
            step = load_state(engine, ck)["step"]
        except CheckpointError as e:
            error = f"{e} (remove checkpoints/{ck.name} to resume from an earlier checkpoint)"
    errors = all_gather_objects(error, None) if grid.distributed else [error]
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))
    if grid.is_main:
        for path in logs:
            truncate_jsonl(path, step if ck is not None else -1)
    return step


def copy_processor_files(source: Path, folder: Path) -> None:
    """The processor configs of the model folder `source` (if any) into `folder`."""
    if not source.is_dir():
        return
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (source / name).exists() and not (folder / name).exists():
            shutil.copy(source / name, folder / name)


def save_checkpoint(engine: TrainEngine, tokenizer, run_path: Path, step: int, *, every_steps: int,
                    last_step: int, keep_last: int, processor_source: Path) -> None:
    """`checkpoints/step_N` every `every_steps` and at `last_step`; keep the last `keep_last`."""
    if step % every_steps and step != last_step:
        return
    folder = run_path / "checkpoints" / f"step_{step}"
    save_state(engine, folder, tokenizer, {"step": step})
    if engine.grid.is_main:
        copy_processor_files(processor_source, folder)
        prune_checkpoints(run_path, keep_last)


def save_final(model, tokenizer, run_path: Path, grid: Grid, processor_source: Path) -> Path:
    """`final/`: the trained model in Hugging Face format with its tokenizer and processor."""
    final = run_path / "final"
    weights = full_weights(model)  # a collective when the weights are sharded
    if grid.is_main:
        save_pretrained(model, final, weights)
        tokenizer.save_pretrained(final)
        copy_processor_files(processor_source, final)
    return final
