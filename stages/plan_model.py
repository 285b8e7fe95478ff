"""The memory formulas `lvr plan` adds up: bytes per rank of one training or bench step.

Symbols. b: bytes of the model dtype (2 for bf16/fp16, 4 for fp32). Language model: h hidden
size, i MLP intermediate size, L decoder layers, kv KV heads of d dims (d = h / query heads),
V vocabulary. Vision tower: hv hidden, iv intermediate, `depth` blocks, p patch, tp temporal
patch, m spatial merge, C = 3 channels. Sequence: P prompt tokens (video tokens + text), T
response tokens, G rollouts per question, SP the sequence-parallel size, N the world size
(nproc_per_node x nnodes: DeepSpeed partitions over every rank). Phi: parameters, Phi_t the
trainable ones.

Parameters, gradients, optimizer state (the ZeRO paper's accounting, per rank):

    weights     Phi * b                           ZeRO-3: / N
    gradients   Phi_t * b                         ZeRO-2 and 3: / N
    optimizer   Phi_t * 12 with 16-bit weights    fp32 master 4 + Adam m 4 + v 4; ZeRO-1..3: / N
                Phi_t * 8 with fp32 weights       Adam m + v, no master copy
                Phi_t * 2b without DeepSpeed      torch AdamW keeps m, v in the weights' dtype
    DeepSpeed   reduce bucket 5e8 elements        ZeRO 1..3 (DeepSpeed's default, which lvr keeps):
                * 4 at ZeRO-1, * b above          its fp32 accumulator at ZeRO-1
    ZeRO-3      the largest layer gathered + the 5e7-element prefetch bucket, * b

Activations saved for the backward, per token of a rank's shard, per decoder layer, as
autograd holds them in transformers' Qwen2.5-VL layer (counted with saved-tensor hooks,
torch 2.13 / transformers 5.24):

    RMSNorm x 2   2 * (4 + 2b) * h     the input as fp32, the normalised value, the scaled output
    attention     b * (2h + 2 kv d)    q, k, v, output (SDPA with grouped KV heads; no SP)
                  5 * b * h            Ulysses SP or the shared-prompt layout: q, k and v
                                       repeated to the query heads, the output, o_proj's input
    MLP           4 * b * i            gate, SiLU(gate), up, their product
    + the final norm, (4 + b) * h per token.

Gradient checkpointing keeps b * h per layer (its input) and recomputes one layer's set in
the backward. The backward itself adds b * i per token (one layer's gradient buffers) plus
the gradients. The shared-prompt layout (`stages/mrsp/shared.py`) has each response attend
over `torch.cat([prompt K/V, its own K/V])`: 2 * G * (P + T) * (h / SP) * b more per layer
held (and on CPU a `[T, P + T]` fp32 mask per response and layer).

Forwards without gradients (rollout prefill, old-policy and reference log-probs) hold
(4h + 3i) * b per token at their peak (the residual, the normed input, SiLU(gate), up and
their product). Log-probs are computed `chunk` tokens at a time: c * V * (b + 8) in the
forward (logits, their fp32 copy, log-softmax), c * V * (2b + 12) in the backward, with c =
min(chunk, scored tokens on the rank).

Rollout KV cache: 2 * kv * d * b * L per token. Sharing the prompt's cache across the G
rollouts holds P + G * T tokens; lvr's hf engine today expands the prefilled cache to the G
rows (`DynamicCache.batch_repeat_interleave`, a copy per row): G * (P + T) tokens.

Video: (frame pixels / (p m)^2) / tp LLM tokens per frame, m^2 patches per token. A cached
embedding is tokens * h * b; encoding without gradients holds C tp p^2 * b (the patch
pixels) + (4 hv + 3 iv) * b per patch of the rank's frame slice; a trainable tower saves
depth * (2 (4 + 2b) hv + 5 b hv + 4 b iv) per patch for its backward.

The model's sizes come from its config (`load_dims`: transformers' AutoConfig from a local
folder, the hub cache or a `tiny:` build, never the network; a hub id not cached here falls
back to `KNOWN_MODELS`, its published config) and its parameter counts from the model built on
the meta device. Everything else here is arithmetic; `stages/plan.py` turns a recipe into calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

GIB = 2 ** 30
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's reduce_bucket_size default
DEEPSPEED_PREFETCH_BUCKET = 50_000_000  # elements: stage3_prefetch_bucket_size default
ADAM_MASTER_BYTES = 12  # fp32 master weights + Adam m + v, per trainable parameter (16-bit weights)


class PlanError(Exception):
    """A recipe or option the planner cannot plan: one line, for exit code 2."""


# Published configs (config.json on the Hub) of models whose config may not be cached here,
# with their parameter counts (checked against the model built on the meta device in tests).
KNOWN_MODELS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "text": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064),
        "vision": dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                       temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=3584, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
        "params": dict(total=8_292_166_656, vision=676_550_144, largest=544_997_376),
    },
}


@dataclass(frozen=True)
class Dims:
    """What the formulas need of a model (read from its config by `stages/plan.py`)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    v_hidden: int
    v_depth: int
    v_intermediate: int
    patch: int
    temporal_patch: int
    merge: int
    params_total: int
    params_vision: int
    largest_layer_params: int  # the biggest single module ZeRO-3 gathers at once (embedding or layer)
    channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_language(self) -> int:
        return self.params_total - self.params_vision


# -- parameters, gradients, optimizer ---------------------------------------------------------
def fsdp2_state(params: int, trainable: int, b: int, *, world: int, vision: int, largest_layer: int
                ) -> dict[str, float]:
    """Bytes per rank under `train.engine = "fsdp2"` (`stages/mrsp/fsdp.py`): the language
    model's weights 1/world each, in fp32 when the model computes in 16 bits (FSDP2's mixed
    precision gathers them in the model dtype); the vision tower whole; gradients and AdamW's
    moments of the trainable weights 1/world (counted as sharded: a trainable tower's are
    whole, ~9% of the 7B model); a unit gathered for its forward and the next one prefetched."""
    shard = 4 if b < 4 else b
    return {"weights": vision * b + (params - vision) * shard / world, "gradients": trainable * shard / world,
            "optimizer": trainable * 2 * shard / world, "fsdp2 gathered units": 2 * largest_layer * b}


def training_state(params: int, trainable: int, b: int, *, zero_stage: int | str | None, world: int,
                   largest_layer: int = 0, cpu: bool = False, vision: int = 0) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state.

    `zero_stage` None: no DeepSpeed (torch AdamW, state in the weights' dtype, all replicated);
    "fsdp2": `fsdp2_state` (`vision`: the vision tower's parameters, kept whole);
    0..3: DeepSpeed ZeRO at that stage, partitioned over `world` ranks (mixed precision when
    b < 4: fp32 master weights + Adam moments, 12 bytes per trainable parameter). The reduce
    bucket is fp32 at ZeRO-1 (DeepSpeed stages its fp32 accumulator there), the gradients'
    dtype above; on CPU only the part the gradients fill is ever touched, so resident."""
    if zero_stage is None:
        return {"weights": params * b, "gradients": trainable * b, "optimizer": trainable * 2 * b}
    if zero_stage == "fsdp2":
        return fsdp2_state(params, trainable, b, world=world, vision=vision, largest_layer=largest_layer)
    optimizer = trainable * (ADAM_MASTER_BYTES if b < 4 else 8)
    out = {"weights": params * b / (world if zero_stage >= 3 else 1),
           "gradients": trainable * b / (world if zero_stage >= 2 else 1),
           "optimizer": optimizer / (world if zero_stage >= 1 else 1)}
    if zero_stage >= 1:
        bucket = min(DEEPSPEED_REDUCE_BUCKET, trainable) if cpu else DEEPSPEED_REDUCE_BUCKET
        out["deepspeed reduce bucket"] = bucket * (4 if zero_stage == 1 else b)
    if zero_stage >= 3:
        out["zero-3 gathered layer + prefetch"] = (largest_layer + DEEPSPEED_PREFETCH_BUCKET) * b
    return out


# -- activations ----------------------------------------------------------------------------------
def layer_saved_per_token(d: Dims, b: int, ulysses: bool) -> int:
    """Bytes one decoder layer saves for the backward per token (see the module docstring)."""
    norms = 2 * (4 + 2 * b) * d.hidden
    attention = 5 * b * d.hidden if ulysses else b * (2 * d.hidden + 2 * d.kv_heads * d.head_dim)
    return norms + attention + 4 * b * d.intermediate


def saved_per_token(d: Dims, b: int, ulysses: bool, checkpointing: bool) -> int:
    """Bytes saved for the backward per token of a rank's shard, the whole model; with
    checkpointing the layer inputs only (one layer's set comes back in the backward:
    `recompute_per_token`)."""
    final_norm = (4 + b) * d.hidden
    if checkpointing:
        return d.layers * b * d.hidden + final_norm
    return d.layers * layer_saved_per_token(d, b, ulysses) + final_norm


def recompute_per_token(d: Dims, b: int, ulysses: bool, checkpointing: bool) -> int:
    """Bytes per token a checkpointed layer holds again while its backward runs (0 without)."""
    return layer_saved_per_token(d, b, ulysses) if checkpointing else 0


def backward_per_token(d: Dims, b: int) -> int:
    """Bytes per token of the backward's own buffers (one layer's activation gradients)."""
    return b * d.intermediate


def nograd_per_token(d: Dims, b: int) -> int:
    """Bytes per token a forward without gradients holds at its peak (inside one MLP)."""
    return (4 * d.hidden + 3 * d.intermediate) * b


def logits_bytes(d: Dims, b: int, scored_tokens: int, chunk: int, backward: bool) -> int:
    """Bytes of one log-prob chunk's logits and their fp32 working copies."""
    c = max(0, min(chunk, scored_tokens))
    return c * d.vocab * ((2 * b + 12) if backward else (b + 8))


def shared_kv_per_layer(d: Dims, b: int, G: int, P: int, T: int, sp: int) -> float:
    """Bytes per layer the shared-prompt attention holds: each response's concatenated
    [prompt; response] keys and values, on this rank's heads."""
    return 2 * G * (P + T) * (d.hidden / sp) * b


def shared_masks_per_layer(G: int, P: int, T: int) -> int:
    """Bytes per layer of the shared-prompt attention's masks on CPU (`[T, P + T]` fp32 each)."""
    return G * T * (P + T) * 4


# -- rollouts, embeddings, vision -------------------------------------------------------------
def kv_per_token(d: Dims, b: int) -> int:
    """Bytes of KV cache per token, all layers."""
    return 2 * d.kv_heads * d.head_dim * b * d.layers


def kv_cache_bytes(d: Dims, b: int, G: int, P: int, T: int, prompt_shared: bool) -> int:
    """Bytes of one group's rollout KV cache at the end of decoding."""
    tokens = P + G * T if prompt_shared else G * (P + T)
    return tokens * kv_per_token(d, b)


def embedding_bytes(d: Dims, b: int, video_tokens: int) -> int:
    """Bytes of one video's LLM-ready embedding (what the MR-SP cache keeps)."""
    return video_tokens * d.hidden * b


def patch_pixels(d: Dims) -> int:
    """Pixel values in one vision patch (C x tp x p x p)."""
    return d.channels * d.temporal_patch * d.patch ** 2


def vision_nograd_bytes(d: Dims, b: int, patches: int) -> int:
    """Bytes an encode without gradients holds for `patches` patches at its peak."""
    return patches * (patch_pixels(d) + 4 * d.v_hidden + 3 * d.v_intermediate) * b


def vision_saved_bytes(d: Dims, b: int, patches: int) -> int:
    """Bytes a trainable vision tower saves for its backward over `patches` patches."""
    per_block = 2 * (4 + 2 * b) * d.v_hidden + 5 * b * d.v_hidden + 4 * b * d.v_intermediate
    return patches * d.v_depth * per_block


def tokens_per_temporal_patch(d: Dims, pixels_per_frame: int) -> int:
    """LLM video tokens per temporal patch of frames within a pixel budget (sides multiples of p*m)."""
    return pixels_per_frame // (d.patch * d.merge) ** 2


def video_tokens(d: Dims, frames: int, pixels_per_frame: int) -> int:
    """LLM video tokens of `frames` frames (padded to whole temporal patches, as the processor does)."""
    return math.ceil(frames / d.temporal_patch) * tokens_per_temporal_patch(d, pixels_per_frame)


def video_patches(d: Dims, frames: int, pixels_per_frame: int) -> int:
    """Vision patches of `frames` frames."""
    return video_tokens(d, frames, pixels_per_frame) * d.merge ** 2


def per_rank(tokens: int, sp: int) -> int:
    """A sequence's tokens on one rank of an SP group (padded to a multiple of SP)."""
    return -(-tokens // sp)


# -- the model -----------------------------------------------------------------------------------
def known_config(name: str):
    from transformers import Qwen2_5_VLConfig

    k = KNOWN_MODELS[name]
    return Qwen2_5_VLConfig(text_config=k["text"], vision_config=k["vision"], tie_word_embeddings=False)


def count_params(config) -> dict[str, int]:
    """Parameters of the model `config` describes, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    lm = model.model.language_model
    largest = max([sum(p.numel() for p in layer.parameters()) for layer in lm.layers]
                  + [lm.embed_tokens.weight.numel(), model.lm_head.weight.numel()])
    return {"total": sum(p.numel() for p in model.parameters()),
            "vision": sum(p.numel() for p in model.model.visual.parameters()), "largest": largest}


def dims_of(config, params: dict[str, int]) -> Dims:
    t, v = config.get_text_config(), config.vision_config
    v_hidden = getattr(v, "embed_dim", None) or v.hidden_size  # qwen2_vl names it embed_dim
    v_inter = getattr(v, "intermediate_size", None) or int(v_hidden * v.mlp_ratio)
    return Dims(hidden=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                kv_heads=t.num_key_value_heads, intermediate=t.intermediate_size, vocab=t.vocab_size,
                v_hidden=v_hidden, v_depth=v.depth, v_intermediate=v_inter, patch=v.patch_size,
                temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size,
                params_total=params["total"], params_vision=params["vision"],
                largest_layer_params=params["largest"])


def load_dims(path: str) -> tuple[Dims, str]:
    """The model's dims and a line saying where its config came from (never the network)."""
    from transformers import AutoConfig

    from stages.models.adapter import resolve_model_path
    from stages.models.tiny import family_of

    if family_of(path) is not None:
        try:
            folder = resolve_model_path(path)
        except ValueError as e:
            raise PlanError(f"model.path: {e}") from None
        config, source = AutoConfig.from_pretrained(folder), f"{path}: tiny model built locally ({folder})"
    elif Path(path).is_dir():
        if not (Path(path) / "config.json").exists():
            raise PlanError(f"model {path}: no config.json in that folder")
        config, source = AutoConfig.from_pretrained(path), f"{path}: config of the local folder"
    else:
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            source = f"{path}: config from the hub cache"
        except (OSError, ValueError):
            if path not in KNOWN_MODELS:
                raise PlanError(f"model {path!r}: no config.json in a local folder or the hub cache, and not "
                                f"among the known models ({', '.join(KNOWN_MODELS)}); plan another model's config "
                                "with --model HUB_ID_OR_FOLDER") from None
            k = KNOWN_MODELS[path]
            d = dims_of(known_config(path), k["params"])
            return d, (f"{path}: not in the local cache, so the published config of {path.split('/')[-1]} "
                       "(lvr plan's known-model table)")
    if config.model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise PlanError(f"model {path}: a {config.model_type}; lvr plans qwen2_vl, qwen2_5_vl and qwen3_vl")
    return dims_of(config, count_params(config)), source
