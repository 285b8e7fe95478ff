"""The optimizer side of training: DeepSpeed ZeRO (or plain AdamW), schedule, checkpoints.

Gradients under sequence parallelism: every rank of an SP group computes the same loss,
and its backward yields the gradient of its own token slice only; the SP group's sum is
the full gradient. DeepSpeed (and the plain path) average gradients over the whole world,
so the loss is multiplied by the SP size before backward: the world average of the
partial gradients times SP is the data-parallel average of full gradients.

A checkpoint `checkpoints/step_N/` holds the model in Hugging Face format
(`save_pretrained`, safetensors, with tokenizer and processor files) that
`AutoModelForImageTextToText.from_pretrained` loads, and beside it `trainer/` with the
optimizer, scheduler, step and data position, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from stages.mrsp.dist import Grid
from stages.mrsp.lora import apply_lora, has_lora, load_adapter_weights, save_pretrained


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Return the multiplier of the base lr at optimizer step s (linear warmup, then decay)."""
    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay
    return f


def average_gradients(params, grid: Grid) -> None:
    """Average gradients over the whole world (a parameter without one counts as zero)."""
    if grid.world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= grid.world_size


def trainable_parameters(model, freeze_vision: bool, freeze_llm_layers: int) -> list[torch.nn.Parameter]:
    """Freeze the vision tower and/or the first decoder layers; return what still trains."""
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    layers = model.model.language_model.layers
    for layer in list(layers)[:freeze_llm_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def enable_checkpointing(model, context: bool = True) -> None:
    """Gradient checkpointing of every layer; with `context` (always, but in the test's
    control) a layer's recompute runs under the SP attention it ran forward with."""
    from stages.mrsp.ulysses import checkpoint_contexts

    kwargs = {"use_reentrant": False, **({"context_fn": checkpoint_contexts} if context else {})}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model) -> None:
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


class TrainEngine:
    """Backward, optimizer step, schedule and state of one model on one process grid."""

    def __init__(self, model, grid: Grid, optim, deepspeed_cfg, total_steps: int, accum_steps: int,
                 freeze_vision: bool = True, freeze_llm_layers: int = 0, gradient_checkpointing: bool = False,
                 lora=None):
        self.model, self.grid, self.accum_steps = model, grid, accum_steps
        self.max_grad_norm = optim.max_grad_norm
        if lora is not None and lora.enabled:
            apply_lora(model, lora)  # only the adapters train from here on
        params = trainable_parameters(model, freeze_vision, freeze_llm_layers)
        self.trainable_params = sum(p.numel() for p in params)
        if gradient_checkpointing:
            enable_checkpointing(model)
        # what the layers report, for the stage summary (not the recipe flag)
        self.checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(optim.schedule, optim.warmup_steps, total_steps, optim.min_lr_ratio))
        self.ds = None
        self.micro = 0
        self.last_grad_norm = 0.0
        if deepspeed_cfg.enabled:
            if deepspeed_cfg.zero_stage == 3:
                raise ValueError("deepspeed.zero_stage: 3 is not supported yet (checkpoints gather full weights); use 2")
            import deepspeed

            ensure_process_group(grid)
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accum_steps,
                      "train_batch_size": accum_steps * grid.world_size,
                      "zero_optimization": {"stage": deepspeed_cfg.zero_stage},
                      "gradient_clipping": optim.max_grad_norm, "zero_allow_untested_optimizer": True,
                      "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
                      "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=config,
                dist_init_required=False)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (the mean over this micro-batch)."""
        scaled = loss * self.grid.sp_size
        if self.ds is not None:
            self.ds.backward(scaled)
        else:
            (scaled / self.accum_steps).backward()

    def step(self) -> bool:
        """End one micro-batch; at the accumulation boundary, step the optimizer (return True)."""
        self.micro += 1
        boundary = self.micro % self.accum_steps == 0
        if self.ds is not None:
            self.ds.step()
            if boundary:
                norm = self.ds.get_global_grad_norm()
                self.last_grad_norm = float(norm) if norm is not None else 0.0
            return boundary
        if not boundary:
            return False
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        average_gradients(params, self.grid)
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, folder: Path, tokenizer, state: dict) -> None:
        """Write `folder` (HF model + tokenizer) and `folder/trainer` (optimizer, scheduler,
        `state`); the folder appears atomically (written under a temporary name first)."""
        tmp = folder.with_name(folder.name + ".tmp")
        if self.grid.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_pretrained(self.model, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "trainer").mkdir()
            (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        self._barrier()
        if self.ds is not None:
            self.ds.save_checkpoint(str(tmp / "trainer"), tag="ds")
        elif self.grid.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "trainer" / "optim.pt")
        self._barrier()
        if self.grid.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        self._barrier()

    def load(self, folder: Path) -> dict:
        """Restore weights, optimizer and scheduler from `folder`; return its saved state."""
        from safetensors.torch import load_file

        state = json.loads((folder / "trainer" / "state.json").read_text())
        if self.ds is not None:
            self.ds.load_checkpoint(str(folder / "trainer"), tag="ds")
        else:
            if has_lora(self.model):  # the base weights are model.path's: only the adapters trained
                load_adapter_weights(self.model, folder)
            else:
                weights = {}
                for f in sorted(folder.glob("*.safetensors")):
                    weights.update(load_file(f))
                missing, unexpected = self.model.load_state_dict(weights, strict=False)
                if unexpected:
                    raise RuntimeError(f"{folder}: unexpected weights {unexpected[:3]}")
            saved = torch.load(folder / "trainer" / "optim.pt", weights_only=False)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        return state

    def _barrier(self) -> None:
        if self.grid.distributed:
            dist.barrier()


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


def ensure_process_group(grid: Grid) -> None:
    """DeepSpeed needs a process group even for one process: make a one-rank gloo group."""
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def step_records(n_records: int, step: int, global_batch: int, seed: int, dp_rank: int, dp_size: int) -> list[int]:
    """Indices of the records this data-parallel rank trains on at `step` (0-based).

    Epochs are seeded permutations of the data, so the order depends only on `seed` and
    `step`: a resumed run sees exactly the records an uninterrupted one would.
    """
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    perms: dict[int, torch.Tensor] = {}
    out = []
    for k in range(first, first + per_rank):
        epoch, pos = divmod(k, n_records)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


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


def dp_mean(values: dict[str, float], grid: Grid) -> dict[str, float]:
    """Average scalar metrics over the data-parallel ranks (identical within an SP group)."""
    if grid.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / grid.world_size for k, v in zip(keys, t)}


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resume(engine: TrainEngine, run) -> int:
    """Load the run's newest checkpoint, if any; drop log lines written after it; return its step."""
    ck = latest_checkpoint(run.path)
    if ck is None:
        return 0
    step = engine.load(ck)["step"]
    if engine.grid.is_main:
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(run.file(name), step)
    return step


def _copy_processor_files(model_path: str, folder: Path) -> None:
    from stages.models.adapter import resolve_model_path

    src = Path(resolve_model_path(model_path))
    if not src.is_dir():
        return
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (src / name).exists() and not (folder / name).exists():
            shutil.copy(src / name, folder / name)


def save_checkpoint(engine: TrainEngine, adapter, run_path: Path, recipe, step: int) -> None:
    """`checkpoints/step_N` every `checkpoint.every_steps` and at the end; keep the last few."""
    if step % recipe.checkpoint.every_steps and step != recipe.train.steps:
        return
    folder = run_path / "checkpoints" / f"step_{step}"
    engine.save(folder, adapter.tokenizer, {"step": step})
    if engine.grid.is_main:
        _copy_processor_files(recipe.model.path, folder)
        prune_checkpoints(run_path, recipe.checkpoint.keep_last)


def save_final(adapter, run_path: Path, model_path: str, grid: Grid) -> Path:
    """`final/`: the trained model in Hugging Face format with its tokenizer and processor."""
    final = run_path / "final"
    if grid.is_main:
        save_pretrained(adapter.model, final)
        adapter.tokenizer.save_pretrained(final)
        _copy_processor_files(model_path, final)
    return final
