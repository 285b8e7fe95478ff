"""Local generation with a transformers model in this process (CPU or one GPU).

A Qwen VL checkpoint (or `tiny:<family>`) loads through `stages.models.adapter`, so a video
part `{"type": "video", "frames": [HxWx3 uint8], "fps": float}` is patchified exactly as
the training stages do it: frames resized to the model's patch grid (multiples of 28 for
Qwen2/2.5-VL, 32 for Qwen3-VL), the last frame repeated to fill the temporal patch, and fed
as `pixel_values_videos` + `video_grid_thw` with `mm_token_type_ids` (without which
transformers 5 silently drops multimodal RoPE). Any other checkpoint loads as a text-only
`AutoModelForCausalLM`, for generate-qa with a local reasoning LLM.

Requests are batched `cfg.max_concurrency` at a time with left padding and decoded by
`model.generate`: greedy at temperature 0, else sampled (`seed` of the first request of a
batch seeds it). Vision special tokens are banned from the output. A request that cannot
be prepared fails alone; a batch whose `generate` raises is re-run one request at a time,
so one bad item never sinks the others. `json_schema` is not enforced here (no constrained
decoding): the stages parse and validate what comes back.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stages.backends.base import BackendError, GenRequest, GenResult, one_line, release_memory

# Per-frame pixel cap when a caller hands frames larger than this (Qwen2.5-VL's processor
# default for video, 768 * 28 * 28); the caption stage already sizes frames by `video.max_pixels`.
VIDEO_MAX_PIXELS = 768 * 28 * 28


class TransformersBackend:
    """`cfg.model` loaded with transformers; `generate` runs `cfg.max_concurrency` requests per forward."""

    def __init__(self, cfg: Any):
        import torch

        if not cfg.model:
            raise BackendError("backend.model: the model to load is required")
        self.model_name: str = cfg.model
        self.batch_size = cfg.max_concurrency
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            self.adapter, self.model, self.tokenizer = _load(cfg.model, dtype, self.device)
        except BackendError:
            raise
        except Exception as exc:  # a missing checkpoint, an unsupported architecture
            raise BackendError(f"backend.model: cannot load {cfg.model!r}: {one_line(exc)}") from None
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.stop_ids = _stop_ids(self.model, self.tokenizer)
        self.banned = []
        if self.adapter is not None:
            a = self.adapter
            self.banned = [[t] for t in (a.video_token_id, a.image_token_id, a.vision_start_id, a.vision_end_id)]

    def __repr__(self) -> str:
        kind = self.adapter.family if self.adapter is not None else "text"
        return f"TransformersBackend(model={self.model_name!r}, kind={kind}, device={self.device})"

    def close(self) -> None:
        self.model = self.adapter = None
        release_memory()

    # -- public ------------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult | None] = [None] * len(requests)
        ready: dict[tuple, list[tuple[int, _Prepared]]] = {}
        for index, req in enumerate(requests):
            try:
                prepared = self._prepare(req)
            except Exception as exc:  # a malformed item fails alone
                results[index] = GenResult(req.key, None, one_line(f"bad request: {exc}"), 0.0, 0)
                continue
            group = (req.max_tokens, float(req.temperature), float(req.top_p))
            ready.setdefault(group, []).append((index, prepared))
        for items in ready.values():
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                for (index, _), result in zip(batch, self._run_batch(requests, batch)):
                    results[index] = result
        return [r for r in results if r is not None]

    # -- preparation ---------------------------------------------------------------------------
    def _prepare(self, req: GenRequest) -> "_Prepared":
        """Token ids and video tensors of one request."""
        messages, videos = [], []
        for message in req.messages:
            content = message.get("content")
            if not isinstance(content, list):
                messages.append({"role": message["role"], "content": str(content or "")})
                continue
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "video":
                    if self.adapter is None:
                        raise ValueError(f"{self.model_name} is a text-only model and cannot take a video")
                    videos.append(self._video(part))
                    parts.append({"type": "video"})
                elif kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    raise ValueError(f"unsupported content part {kind!r}")
            messages.append({"role": message["role"], "content": parts})
        if self.adapter is not None:
            ids = self.adapter.prompt_ids(messages, [(v.grid, v.timestamps_s) for v in videos])
        else:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        return _Prepared(list(ids), videos)

    def _video(self, part: dict) -> "_Video":
        from stages.data.video import fit_size, resize_frames
        from stages.models.patchify import patchify

        frames = part.get("frames")
        if frames is None or len(frames) == 0:
            raise ValueError("video part has no frames")
        arr = np.stack([np.asarray(f) for f in frames])
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"video frames must be HxWx3 uint8 arrays, got {arr.shape[1:]} {arr.dtype}")
        spec = self.adapter.patch_spec
        h, w = fit_size(arr.shape[1], arr.shape[2], spec.factor, VIDEO_MAX_PIXELS)
        pixels, grid = patchify(resize_frames(arr, h, w), spec)
        fps = float(part.get("fps") or 1.0)
        if fps <= 0:
            raise ValueError(f"video fps must be positive, got {fps}")
        timestamps = [i / fps for i in range(len(arr))]
        return _Video(pixels.to(self.model.dtype), grid, timestamps, self.adapter.second_per_grid(fps))

    # -- generation ------------------------------------------------------------------------------
    def _run_batch(self, requests: list[GenRequest], batch: list[tuple[int, "_Prepared"]]) -> list[GenResult]:
        start = time.monotonic()
        first = requests[batch[0][0]]
        try:
            outputs = self._generate([p for _, p in batch], first)
        except Exception as exc:
            if len(batch) == 1:
                reason = one_line(f"{type(exc).__name__}: {exc}")
                return [GenResult(first.key, None, reason, time.monotonic() - start, 1)]
            return [r for item in batch for r in self._run_batch(requests, [item])]
        latency = time.monotonic() - start
        results = []
        for (index, prepared), tokens in zip(batch, outputs):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            usage = {"prompt_tokens": len(prepared.ids), "completion_tokens": len(tokens)}
            results.append(GenResult(requests[index].key, text, None, latency, 1, usage))
        return results

    def _generate(self, batch: list["_Prepared"], first: GenRequest) -> list[list[int]]:
        """Response token ids of each prompt (stop and pad tokens removed)."""
        import torch

        length = max(len(p.ids) for p in batch)
        ids = torch.tensor([[self.pad_id] * (length - len(p.ids)) + p.ids for p in batch], device=self.device)
        mask = torch.tensor([[0] * (length - len(p.ids)) + [1] * len(p.ids) for p in batch], device=self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        videos = [v for p in batch for v in p.videos]
        if self.adapter is not None:
            kwargs["mm_token_type_ids"] = self.adapter.mm_token_type_ids(ids)
            if videos:
                kwargs["pixel_values_videos"] = torch.cat([v.pixels for v in videos]).to(self.device)
                kwargs["video_grid_thw"] = torch.cat([v.grid for v in videos]).to(self.device)
                if self.adapter.family == "qwen2_5_vl":
                    kwargs["second_per_grid_ts"] = torch.tensor([v.seconds_per_grid for v in videos])
            self.adapter.backbone.rope_deltas = None  # never reuse positions of an earlier call
        if first.temperature > 0:
            if first.seed is not None:
                torch.manual_seed(first.seed)
            kwargs.update(do_sample=True, temperature=float(first.temperature), top_p=float(first.top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.banned:
            kwargs["bad_words_ids"] = self.banned
        with torch.no_grad():
            out = self.model.generate(**kwargs, max_new_tokens=first.max_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.pad_id)
        responses = []
        for row in out[:, length:].tolist():
            tokens = []
            for t in row:
                if t in self.stop_ids:
                    break
                tokens.append(t)
            responses.append(tokens)
        return responses


class _Video:
    def __init__(self, pixels, grid, timestamps_s: list[float], seconds_per_grid: float):
        self.pixels, self.grid = pixels, grid
        self.timestamps_s, self.seconds_per_grid = timestamps_s, seconds_per_grid


class _Prepared:
    def __init__(self, ids: list[int], videos: list[_Video]):
        self.ids, self.videos = ids, videos


def _load(path: str, dtype, device: str):
    """`(adapter or None, model, tokenizer)`: a VL adapter for Qwen VL checkpoints, else a causal LM."""
    from transformers import AutoConfig

    from stages.models.adapter import SUPPORTED, load_adapter, resolve_model_path

    local = resolve_model_path(path)
    config = AutoConfig.from_pretrained(local)
    if config.model_type in SUPPORTED:
        adapter = load_adapter(path, dtype=dtype, device=device)
        return adapter, adapter.model, adapter.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(device).eval()
    return None, model, AutoTokenizer.from_pretrained(local)


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config and the tokenizer, deduplicated."""
    ids: list[int] = []
    for eos in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for t in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids
