"""Model adapters: what is specific to a Qwen VL family, and nothing else.

An adapter knows how to find the vision tower, how a video is spelled in the prompt, how
multimodal RoPE positions are computed (always with the model's own `get_rope_index`, on
the whole sequence) and how precomputed video embeddings are fed back into the model
(`mm_encoder_outputs`, the model's own entry point, so no model code is forked).
Everything above it (sharding, caching, sequence parallelism, rollouts) is family-agnostic.

A local folder, a hub id and `tiny:<family>` all load through `load_model` /
`load_tokenizer`: the tiny ones are built once into a cache folder first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType, SimpleNamespace

import torch

from stages.models.patchify import PatchSpec, video_token_count
from stages.models.tiny import family_of, resolve_tiny

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def resolve_model_path(path: str) -> str:
    """Return a local folder or hub id for `path`, building `tiny:<family>` models on first use."""
    return str(resolve_tiny(path)) if family_of(path) is not None else path


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype `model.dtype` names (`auto`: fp32 on CPU, bf16 on CUDA)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa"):
    """Return the `AutoModelForImageTextToText` at `path` in eval mode."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(path), dtype=dtype, attn_implementation=attn_implementation)
    if model.config.model_type not in SUPPORTED:
        raise ValueError(f"model {path!r} is a {model.config.model_type}: lvr supports {', '.join(SUPPORTED)}")
    patch_embed_as_matmul(model.model.visual.patch_embed.proj)
    return model.to(device).eval()


def patch_embed_as_matmul(conv: torch.nn.Conv3d) -> None:
    """Run the vision tower's patch embedding as the matmul it is.

    Qwen VL towers embed each patch with a `Conv3d` whose stride equals its kernel, applied
    to inputs of exactly one kernel each (`[patches, C, T, P, P]`): every output is the dot
    product of one flattened patch with one flattened filter, i.e. `F.linear`. On CPU the
    convolution kernel took 18 ms where the matmul takes 2.7 ms (2,048 patches of the bench
    model, 1 thread), 42 ms of a 512-frame mrsp-shared RL step. vLLM and SGLang run this
    layer as a linear for the same reason on GPUs (cuDNN's Conv3d is slow on it too), and
    transformers 5.x has it opt-in (`fusion_config={"patch_embeddings": True}`), which renames
    the weight to `linear_proj` in the loaded model. Here only the conv's `forward` is
    replaced, so its parameters, state-dict keys and module hooks (DeepSpeed ZeRO-3 gathers)
    stay as they were; inputs of another shape take the convolution."""
    shape_ok = (isinstance(conv, torch.nn.Conv3d) and tuple(conv.stride) == tuple(conv.kernel_size)
                and tuple(conv.padding) == (0, 0, 0) and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")
    if shape_ok:
        conv.forward = MethodType(_conv_as_matmul, conv)  # bound: a deep copy rebinds it to the copy


def _conv_as_matmul(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 5 or tuple(x.shape[2:]) != tuple(conv.kernel_size):
        return torch.nn.Conv3d.forward(conv, x)
    w = conv.weight
    out = torch.nn.functional.linear(x.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1), conv.bias)
    return out.view(*out.shape, 1, 1, 1)


def load_patch_spec(path: str, config=None) -> PatchSpec:
    """Return the patch grid of the checkpoint at `path` (its preprocessor config if local,
    else the model config's vision settings)."""
    local = Path(resolve_model_path(path))
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (local / name).exists():
            return PatchSpec.from_dict(json.loads((local / name).read_text()))
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(local))
    v = config.vision_config
    spec = PatchSpec.from_dict({"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                                "merge_size": v.spatial_merge_size})
    if config.model_type == "qwen3_vl":
        spec = PatchSpec(spec.patch_size, spec.temporal_patch_size, spec.merge_size, (0.5,) * 3, (0.5,) * 3)
    return spec


@dataclass
class VideoEmbedding:
    """The LLM-ready embedding of one video: `embeds [tokens, hidden]` and, for Qwen3-VL,
    one `[tokens, hidden]` tensor per deepstack level."""

    embeds: torch.Tensor
    grid_thw: torch.Tensor  # [1, 3]
    deepstack: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    def rows(self, start: int, stop: int) -> "VideoEmbedding":
        """Return the embedding of video tokens [start, stop) (for one sequence shard)."""
        return VideoEmbedding(self.embeds[start:stop], self.grid_thw, [d[start:stop] for d in self.deepstack])


class VLAdapter:
    """Family-specific glue around one loaded model and its tokenizer."""

    def __init__(self, model, tokenizer, patch_spec: PatchSpec):
        self.model, self.tokenizer, self.patch_spec = model, tokenizer, patch_spec
        self.family = model.config.model_type
        if self.family not in SUPPORTED:
            raise ValueError(f"unsupported model type {self.family}")
        cfg = model.config
        self.video_token_id = cfg.video_token_id
        self.image_token_id = cfg.image_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = cfg.vision_end_token_id
        self.merge_size = cfg.vision_config.spatial_merge_size

    # -- parts of the model ------------------------------------------------------------
    @property
    def backbone(self):
        """The multimodal model without the LM head (`model.model`)."""
        return self.model.model

    @property
    def vision_tower(self):
        return self.model.model.visual

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    # -- prompts ---------------------------------------------------------------------------
    def video_segment(self, grid_thw: torch.Tensor, timestamps_s: list[float]) -> list[int]:
        """Return the prompt token ids that stand for one video of `grid_thw`."""
        t, h, w = (int(v) for v in grid_thw.reshape(-1))
        per_t = h * w // (self.merge_size ** 2)
        if self.family != "qwen3_vl":
            return [self.vision_start_id] + [self.video_token_id] * (t * per_t) + [self.vision_end_id]
        # Qwen3-VL: a "<x.x seconds>" stamp before each temporal patch (mean time of its frames).
        tp = self.patch_spec.temporal_patch_size
        stamps = list(timestamps_s) + [timestamps_s[-1]] * (t * tp - len(timestamps_s))
        ids: list[int] = []
        for i in range(t):
            sec = sum(stamps[i * tp:(i + 1) * tp]) / tp
            ids += self.tokenizer.encode(f"<{sec:.1f} seconds>", add_special_tokens=False)
            ids += [self.vision_start_id] + [self.video_token_id] * per_t + [self.vision_end_id]
        return ids

    def prompt_ids(self, messages: list[dict], videos: list[tuple[torch.Tensor, list[float]]],
                   add_generation_prompt: bool = True) -> list[int]:
        """Return token ids of a chat whose `{"type": "video"}` parts are expanded for `videos`
        (each `(grid_thw, timestamps_s)`, in order of appearance)."""
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out: list[int] = []
        it = iter(videos)
        i = 0
        while i < len(ids):
            if (ids[i] == self.vision_start_id and i + 2 < len(ids) and ids[i + 1] == self.video_token_id
                    and ids[i + 2] == self.vision_end_id):
                grid, times = next(it)
                out += self.video_segment(grid, times)
                i += 3
            else:
                out.append(ids[i])
                i += 1
        if next(it, None) is not None:
            raise ValueError("more videos than video placeholders in the prompt")
        return out

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 for text, 1 for image and 2 for video tokens (what transformers 5 needs for mRoPE)."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        return types

    def second_per_grid(self, fps_sampled: float) -> float:
        return self.patch_spec.temporal_patch_size / fps_sampled

    # -- positions -------------------------------------------------------------------------
    def positions(self, input_ids: torch.Tensor, grids: list[torch.Tensor],
                  seconds_per_grid: list[float] | None = None,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(position_ids [3, B, L], rope_deltas [B, 1])` for whole sequences.

        grids: the `[1, 3]` grid of every video in the batch, in order of appearance.
        """
        mm = self.mm_token_type_ids(input_ids)
        if not grids:
            L = input_ids.shape[1]
            pos = torch.arange(L, device=input_ids.device).view(1, 1, L).expand(3, input_ids.shape[0], L)
            if attention_mask is not None:
                p = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                pos = p.unsqueeze(0).expand(3, -1, -1)
            return pos.contiguous(), torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
        grid = torch.cat([g.reshape(1, 3) for g in grids]).to(input_ids.device)
        kwargs = dict(video_grid_thw=grid, attention_mask=attention_mask)
        if self.family == "qwen2_5_vl":
            sec = seconds_per_grid if seconds_per_grid is not None else [1.0] * len(grids)
            kwargs["second_per_grid_ts"] = torch.tensor(sec, dtype=torch.float32)
        pos, deltas = self.backbone.get_rope_index(input_ids, mm, **kwargs)
        return pos, deltas

    # -- vision -------------------------------------------------------------------------------
    def encode_video(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> VideoEmbedding:
        """Run the vision tower on one (slice of a) video; return its LLM-ready embedding.
        Pixels decoded on the CPU move to the tower's device here."""
        tower = next(self.vision_tower.parameters())
        pixels, grid_thw = pixels.to(tower.device, tower.dtype), grid_thw.to(tower.device)
        out = self.backbone.get_video_features(pixels, grid_thw, return_dict=True)
        embeds = torch.cat(out.pooler_output, dim=0)
        deep = getattr(out, "deepstack_features", None) or []
        deep = [torch.cat(d, dim=0) if isinstance(d, (tuple, list)) else d for d in deep]
        return VideoEmbedding(embeds, grid_thw, deep)

    def video_tokens(self, grid_thw: torch.Tensor) -> int:
        return video_token_count(grid_thw, self.merge_size)

    # -- language model -------------------------------------------------------------------------
    def lm(self, fn, *args, **kwargs):
        """Run `fn(*args, **kwargs)`, a piece of work on the language model (`hidden_states`, the
        LM head): as one forward of the model's root when its weights are sharded
        (`stages/mrsp/fsdp.py`), directly otherwise."""
        call = getattr(self.model, "lvr_call", None)
        return call(fn, *args, **kwargs) if call is not None else fn(*args, **kwargs)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      videos: list[VideoEmbedding] | None = None, cache=None, use_cache: bool = False,
                      attention_mask: torch.Tensor | None = None):
        """Return `(last_hidden_state [B, L, H], cache)` with the video embeddings scattered
        into the video-token slots of `input_ids`, in order (no vision tower is run)."""
        mm_outputs = None
        if videos:
            embeds = torch.cat([v.embeds for v in videos], dim=0)
            if self.family == "qwen3_vl":
                levels = len(videos[0].deepstack)
                deep = [(torch.cat([v.deepstack[k] for v in videos], dim=0),) for k in range(levels)]
                mm_outputs = {"video": SimpleNamespace(pooler_output=(embeds,), deepstack_features=deep)}
            else:
                mm_outputs = {"video": SimpleNamespace(pooler_output=(embeds,))}
        self.backbone.rope_deltas = None  # never reuse positions cached by an earlier call
        out = self.backbone(input_ids=input_ids, position_ids=position_ids, mm_encoder_outputs=mm_outputs,
                            cache=cache, use_cache=use_cache, attention_mask=attention_mask)
        new_cache = getattr(out, "cache", None) if use_cache else None
        return out.last_hidden_state, new_cache


def load_adapter(path: str, dtype: torch.dtype = torch.float32, device="cpu",
                 attn_implementation: str = "sdpa") -> VLAdapter:
    """Load model, tokenizer and patch grid of `path` and wrap them in a `VLAdapter`."""
    model = load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    return VLAdapter(model, load_tokenizer(path), load_patch_spec(path, model.config))
