"""The Qwen video patchifier, without torchvision: frames -> `pixel_values_videos`, `video_grid_thw`.

It reproduces the flattening of transformers' Qwen2-VL video processor: frames are
normalised, padded to a multiple of `temporal_patch_size` by repeating the last frame,
and cut into `temporal_patch_size x patch_size x patch_size` patches ordered so that each
`merge_size x merge_size` block of patches (one LLM video token) is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchSpec:
    """The patch grid and normalisation of a model family (read from its preprocessor config)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def factor(self) -> int:
        """Frame sides must be multiples of this many pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict) -> "PatchSpec":
        def one(v):  # hub configs sometimes store [14, 14]
            return int(v[0] if isinstance(v, (list, tuple)) else v)

        return cls(
            patch_size=one(d.get("patch_size", 14)),
            temporal_patch_size=one(d.get("temporal_patch_size", 2)),
            merge_size=one(d.get("merge_size", d.get("spatial_merge_size", 2))),
            image_mean=tuple(d.get("image_mean", cls.image_mean)),
            image_std=tuple(d.get("image_std", cls.image_std)),
        )


def patchify(frames: torch.Tensor, spec: PatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(pixel_values_videos [t*h*w, 3*tp*p*p], video_grid_thw [1, 3])` for one video.

    frames: `[T, 3, H, W]`, uint8 (0..255) or float already in 0..1; H and W multiples of
    `spec.factor`. T need not be a multiple of the temporal patch size: the last frame is
    repeated, as the Qwen processors do.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames.shape)}")
    T, C, H, W = frames.shape
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {p * m}")
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    if T % tp:
        x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)], dim=0)
    gt, gh, gw = x.shape[0] // tp, H // p, W // p
    x = x.view(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = x.reshape(gt * gh * gw, C * tp * p * p)
    return pixels, torch.tensor([[gt, gh, gw]], dtype=torch.long)


def video_token_count(grid_thw: torch.Tensor, merge_size: int) -> int:
    """Return the number of LLM video tokens for a `[3]` or `[1, 3]` grid."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1)[:3])
    return t * h * w // (merge_size * merge_size)
