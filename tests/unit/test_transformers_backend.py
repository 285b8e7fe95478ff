"""TransformersBackend on tiny Qwen VL models: batching, patch grid, per-item failures, sampling."""

import numpy as np
import pytest

from lvr_cli.sections import BackendSection
from stages.backends.base import GenRequest
from stages.backends.factory import make_backend


@pytest.fixture(scope="module")
def backend():
    return make_backend(BackendSection(kind="transformers", model="tiny:qwen2.5-vl", max_concurrency=4))


def video_request(key, n_frames, height, width, text="Describe the clip.", frame_seed=0, **kw):
    rng = np.random.default_rng(frame_seed)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n_frames)]
    content = [{"type": "video", "frames": frames, "fps": 2.0}, {"type": "text", "text": text}]
    return GenRequest(key, [{"role": "user", "content": content}], max_tokens=kw.pop("max_tokens", 12), **kw)


def test_batched_equals_one_by_one_and_bad_items_fail_alone(backend, monkeypatch):
    calls = []  # (batch size, raised): a failed batch falls back to one-by-one, so watch it
    plain = backend._generate

    def watched(batch, first):
        try:
            out = plain(batch, first)
        except Exception:
            calls.append((len(batch), True))
            raise
        calls.append((len(batch), False))
        return out

    monkeypatch.setattr(backend, "_generate", watched)
    requests = [
        video_request("a", 4, 56, 56, frame_seed=1),
        video_request("b", 3, 100, 130, text="What changes over time in this longer clip?", frame_seed=2),
        GenRequest("text", [{"role": "user", "content": "Say something about colours."}], max_tokens=12),
        GenRequest("empty", [{"role": "user", "content": [{"type": "video", "frames": []}]}]),
        GenRequest("float", [{"role": "user", "content": [
            {"type": "video", "frames": [np.zeros((56, 56, 3), np.float32)], "fps": 1.0}]}]),
    ]
    batched = backend.generate(requests)
    assert [r.key for r in batched] == ["a", "b", "text", "empty", "float"]
    assert [r.ok for r in batched] == [True, True, True, False, False]
    assert batched[3].error == "bad request: video part has no frames"
    assert "uint8" in batched[4].error
    assert calls == [(3, False)]  # the three good requests went through one batched generate
    single = [backend.generate([r])[0] for r in requests[:3]]
    assert [r.text for r in batched[:3]] == [r.text for r in single]  # left padding changes nothing
    assert all(1 <= r.usage["completion_tokens"] <= 12 for r in batched[:3])


def test_frames_resized_to_the_patch_grid_and_padded_to_the_temporal_patch(backend):
    a = backend.adapter
    # 3 frames of 100x130 -> 112x140 (multiples of 28), padded to 4 frames: grid (2, 8, 10)
    prepared = backend._prepare(video_request("b", 3, 100, 130))
    (video,) = prepared.videos
    assert video.grid.tolist() == [[2, 8, 10]]
    assert prepared.ids.count(a.video_token_id) == 2 * 8 * 10 // 4
    assert video.seconds_per_grid == 1.0  # temporal patch 2 / 2 fps
    assert video.pixels.shape == (2 * 8 * 10, 3 * 2 * 14 * 14)


def test_sampling_is_seeded(backend):
    req = video_request("s", 2, 56, 56, temperature=1.0, seed=7, max_tokens=16)
    first, second = backend.generate([req])[0], backend.generate([req])[0]
    assert first.ok and first.text == second.text
    greedy = backend.generate([video_request("g", 2, 56, 56, max_tokens=16)])[0]
    assert greedy.text != first.text


def test_qwen3_vl_grid_of_32():
    backend = make_backend(BackendSection(kind="transformers", model="tiny:qwen3-vl", max_concurrency=2))
    a = backend.adapter
    prepared = backend._prepare(video_request("q3", 3, 100, 130))
    # patch 16 x merge 2: 100x130 -> 96x128, grid (2, 6, 8); a time stamp before each temporal patch
    assert prepared.videos[0].grid.tolist() == [[2, 6, 8]]
    assert prepared.ids.count(a.video_token_id) == 2 * 6 * 8 // 4
    results = backend.generate([video_request("q3", 3, 100, 130), video_request("q3b", 2, 64, 64)])
    assert [r.ok for r in results] == [True, True] and all(r.usage["completion_tokens"] >= 1 for r in results)
