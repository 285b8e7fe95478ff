"""Checkpoints: write and restore a training run's state, keep the last few.

A checkpoint `checkpoints/step_N/` holds the model in Hugging Face format
(`save_pretrained`, safetensors, with tokenizer and processor files) that
`AutoModelForImageTextToText.from_pretrained` loads, and beside it `trainer/` with the
optimizer, scheduler and step, so a killed run resumes where it stopped (the data order
follows from the step: `data_order.step_records`). The optimizer state is read back with
`torch.load(weights_only=True)`: tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from stages.mrsp.dist import Grid, barrier
from stages.mrsp.engine import TrainEngine
from stages.mrsp.lora import has_lora, load_adapter_weights, save_pretrained


def save_state(engine: TrainEngine, folder: Path, tokenizer, state: dict) -> None:
    """Write `folder` (HF model + tokenizer) and `folder/trainer` (optimizer, scheduler,
    `state`); the folder appears atomically (written under a temporary name first)."""
    grid = engine.grid
    tmp = folder.with_name(folder.name + ".tmp")
    if grid.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_pretrained(engine.model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer").mkdir()
        (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    barrier(grid)
    if engine.ds is not None:
        engine.ds.save_checkpoint(str(tmp / "trainer"), tag="ds")
    elif grid.is_main:
        torch.save({"optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict()},
                   tmp / "trainer" / "optim.pt")
    barrier(grid)
    if grid.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    barrier(grid)


def load_state(engine: TrainEngine, folder: Path) -> dict:
    """Restore weights, optimizer and scheduler from `folder`; return its saved state."""
    from safetensors.torch import load_file

    state = json.loads((folder / "trainer" / "state.json").read_text())
    if engine.ds is not None:
        engine.ds.load_checkpoint(str(folder / "trainer"), tag="ds")
        return state
    if has_lora(engine.model):  # the base weights are model.path's: only the adapters trained
        load_adapter_weights(engine.model, folder)
    else:
        weights = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(f))
        _, unexpected = engine.model.load_state_dict(weights, strict=False)
        if unexpected:
            raise RuntimeError(f"{folder}: unexpected weights {unexpected[:3]}")
    saved = torch.load(folder / "trainer" / "optim.pt", weights_only=True)
    engine.optimizer.load_state_dict(saved["optimizer"])
    engine.scheduler.load_state_dict(saved["scheduler"])
    return state


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
    """Drop lines of steps after `last_step` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line
    path.write_text("".join(k + "\n" for k in keep))


def resume(engine: TrainEngine, run_path: Path, logs: list[Path]) -> int:
    """Load the run's newest checkpoint, if any; drop lines of `logs` written after it;
    return its step."""
    ck = latest_checkpoint(run_path)
    if ck is None:
        return 0
    step = load_state(engine, ck)["step"]
    if engine.grid.is_main:
        for path in logs:
            truncate_jsonl(path, step)
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
    if grid.is_main:
        save_pretrained(model, final)
        tokenizer.save_pretrained(final)
        copy_processor_files(processor_source, final)
    return final
