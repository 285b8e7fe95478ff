"""Parameters sharded across ranks: torch's FSDP2 (`fully_shard`), `train.engine = "fsdp2"`.

What is sharded. Each decoder layer of the language model is one FSDP unit; the rest of the
model (embeddings, final norm, LM head: weights the runtime reaches outside a decoder layer)
is the root unit (tied input and output embeddings stay one weight there). Weights, gradients and AdamW state of the language model live 1/world on
each rank, as under ZeRO-3. The vision tower stays whole on every rank: MR-SP encodes a
different slice of frames on each rank of an SP group and may encode a video on one rank
alone, which a sharded tower (an all-gather per block, in the same order on every rank)
cannot do; it is ~9% of Qwen2.5-VL-7B and usually frozen. When it trains, its gradients are
averaged over the ranks at the optimizer step, as without sharding.

The one rule a sharded model imposes: every rank runs the same sequence of sharded forwards
(each gathers its unit's weights, in order, from every rank), and the same backwards.
- Every language-model forward of the runtime runs through `VLAdapter.lm` (`lvr_call` here,
  registered as an FSDP forward method of the root), so the root's weights are gathered for
  the whole call (the hidden states and the chunked LM head) and its gradients reduced once.
- Phases without gradients (rollouts, old-policy and reference log-probs, held-out metrics)
  run inside `gathered(units)`: every weight is gathered once at the start and
  freed at the end, and the forwards in between are local, so ranks may run different numbers
  of them (decode steps until each rank's own rows stop, uneven held-out shares). This is
  how generation under ZeRO-3 is done (parameters gathered for generation, not a standing
  full copy); its peak is the full weights of one model for the phase.
- Training forwards stay per unit; a rank with fewer forwards in a micro-batch (a video that
  failed to load) runs `padding_calls` of one token, which touch every unit as a real
  forward does, with zero weight in the loss.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from stages.mrsp.dist import Grid, all_reduce_sum


def sharded(model) -> bool:
    """Whether `shard_model` sharded `model`."""
    return hasattr(model, "lvr_call")


def lm_call(fn, *args, **kwargs):
    """Run `fn`: bound to a sharded model as `lvr_call`, it runs as one FSDP forward of the root."""
    return fn(*args, **kwargs)


def shard_model(model, trains: bool) -> list[FSDPModule]:
    """Shard `model`'s language model over the default process group (module docstring);
    return its FSDP units, root last. A model that `trains` in 16 bits keeps its shards in fp32
    (the master weights AdamW updates) and gathers them in its own dtype for the forwards,
    gradients reduced in fp32 (FSDP2's mixed precision, as DeepSpeed's bf16 mode does)."""
    lm = model.model.language_model
    dtype = lm.embed_tokens.weight.dtype
    model._lvr_dtype = dtype
    policy = MixedPrecisionPolicy()
    if trains and dtype != torch.float32:
        lm.float()
        model.lm_head.float()
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    units = []
    for layer in lm.layers:
        fully_shard(layer, mp_policy=policy)
        units.append(layer)
    # the root too frees its gathered weights after each forward (FSDP keeps a root's by default)
    fully_shard(model, ignored_params=set(model.model.visual.parameters()), reshard_after_forward=True,
                mp_policy=policy)
    model.lvr_call = lm_call
    register_fsdp_forward_method(model, "lvr_call")
    units.append(model)
    with torch.no_grad():  # FSDP sets its units up at the root's first forward: make that one the first
        model.lvr_call(lambda: None)
    model.reset_iter_state()  # a forward without a backward (see `gathered`)
    return units


@contextmanager
def gathered(units: list[FSDPModule]):
    """Every unit's full weights, gathered once (a collective on every rank) for the block,
    local forwards inside, freed at the end. For forwards without gradients only."""
    if not units:
        yield
        return
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)
        # FSDP records every forward's unit order to prefetch the backward's all-gathers from it;
        # these forwards have no backward and differ between ranks: forget them
        units[-1].reset_iter_state()


def padding_calls(model, calls: int) -> torch.Tensor:
    """`calls` forwards of one token through every unit (every layer), summed times zero: what
    a rank with fewer real forwards in a micro-batch runs (`TrainEngine.padding_loss`)."""
    device = model.lm_head.weight.device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(3, 1, 1, dtype=torch.long, device=device)

    def one():
        h = model.model(input_ids=ids, position_ids=pos).last_hidden_state
        return model.lm_head(h).sum()

    call = getattr(model, "lvr_call", lm_call)  # one root forward when sharded
    total = torch.zeros((), device=device)
    for _ in range(calls):
        total = total + call(one) * 0.0
    return total


def padding_encode(model) -> torch.Tensor:
    """The vision tower run on one blank temporal patch of the smallest frame it takes (one
    merged token), summed times zero: a rank without a video backwards through the tower in
    the order a real encode does (`TrainEngine.padding_loss`)."""
    vc = model.config.vision_config
    side = vc.spatial_merge_size  # patches per side: one merged token
    tower = model.model.visual
    weight = next(tower.parameters())
    pixels = torch.zeros(side * side, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                         dtype=weight.dtype, device=weight.device)
    grid = torch.tensor([[1, side, side]], device=weight.device)
    out = model.model.get_video_features(pixels, grid, return_dict=True)
    deep = getattr(out, "deepstack_features", None) or []  # Qwen3-VL's per-level features
    flat = [*out.pooler_output, *(t for d in deep for t in (d if isinstance(d, (tuple, list)) else (d,)))]
    return sum(t.sum() for t in flat) * 0.0


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's full weights on rank 0, in the model's dtype (every rank must call: a
    collective; `{}` on the others), under its `state_dict` names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.to(model._lvr_dtype) if v.is_floating_point() else v for k, v in full.items()}


def master_shards(model) -> dict[str, torch.Tensor]:
    """This rank's fp32 shards of a model that computes in 16 bits (the Hugging Face folder
    holds 16-bit weights: a resume needs these to continue exactly); `{}` otherwise."""
    return {n: p.to_local() for n, p in model.named_parameters()
            if isinstance(p, DTensor) and p.dtype != model._lvr_dtype}


@torch.no_grad()
def load_master_shards(model, shards: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in shards.items():
        params[name].to_local().copy_(value)


@torch.no_grad()
def load_full_state(model, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy full weights (`state_dict` names) into the model's shards, each rank its own rows
    (no communication: every rank holds `state`); return (missing, unexpected) names."""
    current = model.state_dict()
    for name, value in state.items():
        if name not in current:
            continue
        target = current[name]
        if isinstance(target, DTensor):
            shard = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(value)
    return sorted(set(current) - set(state)), sorted(set(state) - set(current))


def local_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with each sharded tensor replaced by this rank's shard."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: local(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def load_local_optimizer_state(optimizer, saved: dict) -> None:
    """Put a `local_optimizer_state` back: shards become DTensors laid out like their parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in saved["state"].items():
        p = params[int(i)]
        state[int(i)] = {k: (DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())
                             if isinstance(p, DTensor) and v.dim() > 0 else v) for k, v in s.items()}
    optimizer.load_state_dict({**saved, "state": state})


def grad_norm_and_clip(sharded: list[torch.nn.Parameter], replicated: list[torch.nn.Parameter],
                       max_norm: float, grid: Grid) -> float:
    """The global gradient norm over sharded (summed over the ranks, a collective) and
    replicated (already averaged, equal on every rank) parameters; clip to `max_norm`."""
    def squares(params, shards: bool) -> float:
        return sum(float((local(p.grad) if shards else p.grad).double().pow(2).sum()) for p in params
                   if p.grad is not None)

    sq = all_reduce_sum([squares(sharded, True)], grid)[0] + squares(replicated, False)
    norm = sq ** 0.5
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in sharded + replicated:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
