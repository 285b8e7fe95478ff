import pytest
import torch

from stages.models.patchify import PatchSpec, patchify, video_token_count


def reference_patchify(frames, spec):
    """Element-by-element form of the Qwen processor's flattening (the formula, as loops)."""
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    x = frames.float() / 255
    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    T = x.shape[0]
    T_pad = -(-T // tp) * tp
    idx = [min(t, T - 1) for t in range(T_pad)]  # the last frame repeated
    gt, gh, gw = T_pad // tp, x.shape[2] // p, x.shape[3] // p
    rows = []
    for t in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        h0, w0 = (bh * m + mh) * p, (bw * m + mw) * p
                        # column order: channel, temporal offset, patch row, patch column
                        patch = torch.stack([x[idx[t * tp + it], :, h0:h0 + p, w0:w0 + p] for it in range(tp)], dim=1)
                        rows.append(patch.reshape(-1))
    return torch.stack(rows), (gt, gh, gw)


@pytest.mark.parametrize("T", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("spec", [PatchSpec(), PatchSpec(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)])
def test_patchify_matches_formula(T, spec):
    g = torch.Generator().manual_seed(T)
    H, W = spec.factor * 2, spec.factor * 3
    frames = torch.randint(0, 256, (T, 3, H, W), dtype=torch.uint8, generator=g)
    pixels, grid = patchify(frames, spec)
    ref, (gt, gh, gw) = reference_patchify(frames, spec)
    assert grid.tolist() == [[gt, gh, gw]]
    assert gt == -(-T // 2)
    assert pixels.shape == (gt * gh * gw, 3 * 2 * spec.patch_size ** 2)
    torch.testing.assert_close(pixels, ref, rtol=0, atol=1e-6)
    assert video_token_count(grid, spec.merge_size) == gt * gh * gw // 4


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(torch.zeros(2, 3, 30, 28, dtype=torch.uint8), PatchSpec())
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        patchify(torch.zeros(2, 28, 28, 3, dtype=torch.uint8), PatchSpec())


def test_patch_spec_from_hub_style_dict():
    spec = PatchSpec.from_dict({"patch_size": [14, 14], "temporal_patch_size": 2, "merge_size": 2,
                                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    assert (spec.patch_size, spec.factor, spec.image_mean) == (14, 28, (0.5, 0.5, 0.5))
