"""The optimizer side of training: DeepSpeed ZeRO (or plain AdamW), schedule, what trains.

Gradients under sequence parallelism: every rank of an SP group computes the same loss,
and its backward yields the gradient of its own token slice only; the SP group's sum is
the full gradient. DeepSpeed (and the plain path) average gradients over the whole world,
so the loss is multiplied by the SP size the runtime actually shards over (`sp_size`: 1 in
vanilla mode, whatever the grid): the world average of the partial gradients times SP is
the data-parallel average of full gradients.

Two kinds of loss reach `backward`: a mean over its micro-batch (SFT), averaged over the
accumulation steps and the data-parallel ranks; or a share of the mini-batch's loss
(`summed=True`, GRPO: divided by the whole mini-batch's denominator), which the micro-batches
and data-parallel ranks add up to, so it is scaled back by both counts before the averaging.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from stages.mrsp.dist import Grid, all_reduce_sum, average_gradients, ensure_process_group
from stages.mrsp.fsdp import (gathered, grad_norm_and_clip, local, padding_calls, padding_encode,
                              shard_model)
from stages.mrsp.lora import apply_lora


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


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory collectives op.

    DeepSpeed's communication backend (`deepspeed.comm.torch.TorchBackend`, created by
    `deepspeed.initialize`) JIT-builds `deepspeed_shm_comm` on the CPU accelerator whenever
    `deepspeed.ops.__compatible_ops__` calls it compatible: a C++ compiler and ~140 s on two
    cores the first time, "Error building extension" without a compiler. The op only serves
    `inference_all_reduce`, which training never calls; marked incompatible, DeepSpeed uses
    torch.distributed's collectives (gloo), as it does for every collective lvr's training runs.
    No other op is built for lvr's config (torch's AdamW, no offload), on CPU or GPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the dict DeepSpeed reads, cached


class TrainEngine:
    """Backward, optimizer step and schedule of one model on one process grid.

    `optim`, `deepspeed_cfg`, `lora`: the recipe's sections; `kind`: `train.engine`
    ("deepspeed": DeepSpeed ZeRO as `deepspeed_cfg` says, or torch's AdamW when it is disabled;
    "fsdp2": the language model's weights sharded, `stages/mrsp/fsdp.py`); `sp_size`: the SP
    size the runtime shards the forward over; `accum_steps`: micro-batches per optimizer step."""

    def __init__(self, model, grid: Grid, optim, deepspeed_cfg, lora, *, kind: str, total_steps: int,
                 accum_steps: int, sp_size: int, freeze_vision: bool, freeze_llm_layers: int,
                 gradient_checkpointing: bool):
        self.model, self.grid, self.accum_steps, self.sp_size = model, grid, accum_steps, sp_size
        self.max_grad_norm = optim.max_grad_norm
        if lora.enabled:
            apply_lora(model, lora)  # only the adapters train from here on
        params = trainable_parameters(model, freeze_vision, freeze_llm_layers)
        self.trainable_params = sum(p.numel() for p in params)
        if gradient_checkpointing:
            enable_checkpointing(model)
        # what the layers report, for the stage summary (not the recipe flag)
        self.checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        self.units: list = []  # FSDP units, root last (fsdp2 only)
        if kind == "fsdp2":
            ensure_process_group()
            self.units = shard_model(model, trains=True)
            params = [p for p in model.parameters() if p.requires_grad]  # the sharded ones now
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(optim.schedule, optim.warmup_steps, total_steps, optim.min_lr_ratio))
        self.ds = None
        self.micro = 0
        self.last_grad_norm = 0.0
        if kind == "deepspeed" and deepspeed_cfg.enabled:
            import deepspeed

            skip_shm_comm_build()
            ensure_process_group()
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
    def sharded(self) -> bool:
        return bool(self.units)

    @property
    def kind(self) -> str:
        """What holds the optimizer state: "deepspeed", "fsdp2" or "plain" (torch's AdamW, replicated)."""
        return "deepspeed" if self.ds is not None else "fsdp2" if self.units else "plain"

    def gathered(self):
        """A block of forwards without gradients on full weights (`fsdp.gathered`); nothing to
        do when the weights are not sharded."""
        return gathered(self.units)

    def padding_loss(self, calls: int) -> torch.Tensor | None:
        """A zero-valued loss term that keeps this rank's collectives in step with the other
        ranks' in a micro-batch where it runs `calls` language-model forwards (fewer than they
        do when its videos failed to load). Call before the micro-batch's own forwards.
        - Sharded weights (fsdp2): every rank agrees on the most forwards any rank runs, and
          this one runs the ones it lacks as one-token forwards (`fsdp.padding_calls`): every
          unit gathered and reduced alike.
        - DeepSpeed ZeRO: a rank without any forward runs one, so its backward fires the
          gradient hooks in the order a real backward does (ZeRO-2 reduces each parameter's
          slice to its owner in hook order: a backward over the parameters in another order
          paired one rank's gradients with another parameter's on the other ranks). A vision
          tower that trains encodes one temporal patch first (`fsdp.padding_encode`), so its
          hooks fire after the language model's, in its own graph order.
        - Otherwise None: the plain engine averages whatever gradients exist at the step."""
        if self.units:
            most = int(all_reduce_sum([calls], self.grid, op="max")[0])
            return padding_calls(self.model, most - calls)
        if self.ds is None or calls:
            return None
        tower = padding_encode(self.model) if any(p.requires_grad for p in self.model.model.visual.parameters()) \
            else 0.0  # first, so its hooks fire after the language model's, as in a real backward
        return tower + padding_calls(self.model, 1)

    def state_mib(self) -> dict[str, float]:
        """MiB this rank holds for the weights and for the optimizer state (AdamW's moments and,
        under DeepSpeed, its fp32 partition), each storage counted once: what sharding divides.
        Gradients are left out: every engine frees them after each optimizer step."""
        seen: set[int] = set()

        def mib(tensors) -> float:
            total = 0
            for t in tensors:
                storage = local(t).untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return round(total / 2**20, 3)

        weights = mib(self.model.parameters())
        inner = self.ds.optimizer.optimizer if self.ds is not None else self.optimizer
        moments = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        master = getattr(self.ds.optimizer, "single_partition_of_fp32_groups", []) if self.ds is not None else []
        return {"weights_mib_per_rank": weights, "optimizer_mib_per_rank": mib([*moments, *master])}

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor, summed: bool = False) -> None:
        """Accumulate the gradient of `loss`: this micro-batch's mean (default), or with
        `summed` its share of a loss the micro-batches and data-parallel ranks add up to."""
        scale = self.sp_size * (self.accum_steps * self.grid.dp_size if summed else 1)
        if not loss.requires_grad:
            return  # no forward on this rank (and, sharded or under DeepSpeed, on none): nothing to reduce
        if self.ds is not None:
            self.ds.backward(loss * scale)  # DeepSpeed divides by the accumulation steps itself
        else:
            (loss * scale / self.accum_steps).backward()

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
        if self.units:  # FSDP reduced (averaged) the sharded gradients in the backward
            replicated = [p for p in params if not isinstance(p, DTensor)]
            average_gradients(replicated, self.grid)
            sharded = [p for p in params if isinstance(p, DTensor)]
            self.last_grad_norm = grad_norm_and_clip(sharded, replicated, self.max_grad_norm, self.grid)
        else:
            average_gradients(params, self.grid)
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True
