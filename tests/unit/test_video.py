import numpy as np
import pytest

from stages.data.video import (VideoDecodeError, cut_clips, fit_size, load_video, probe, read_frames,
                               sample_indices)


def write_mp4(path, n=20, fps=4.0, size=(56, 84)):
    import av

    h, w = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=int(fps))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            f = np.zeros((h, w, 3), np.uint8)
            f[:, :, i % 3] = 200  # frame i is red, green or blue
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("v") / "v.mp4")


def test_probe_and_read(mp4):
    info = probe(mp4)
    assert (info.num_frames, info.fps, info.width, info.height) == (20, 4.0, 84, 56)
    assert info.duration_s == 5.0
    frames = read_frames(mp4, [0, 1, 2, 7])
    assert frames.shape == (4, 56, 84, 3)
    assert [int(np.argmax(f[28, 40])) for f in frames] == [0, 1, 2, 1]


def test_sample_indices_uniform_and_fps():
    assert sample_indices(100, 10.0, 4) == [12, 37, 62, 87]
    assert sample_indices(100, 10.0, 64, fps=2.0) == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47, 52, 57, 62, 67, 72,
                                                      77, 82, 87, 92, 97]
    assert len(sample_indices(100, 10.0, 8, fps=2.0)) == 8  # capped by max_frames
    assert sample_indices(100, 10.0, 4, start_s=2.0, end_s=4.0) == [22, 27, 32, 37]
    assert sample_indices(10, 10.0, 4, start_s=5.0) == []


def test_fit_size_is_on_the_grid():
    assert fit_size(56, 84, 28, 10_000) == (56, 84)
    h, w = fit_size(720, 1280, 28, 112 * 112)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 112 * 112 and w > h
    assert fit_size(10, 10, 28, 10_000) == (28, 28)


def test_load_video_resizes_to_grid(mp4):
    v = load_video(mp4, max_frames=6, factor=28, max_pixels=28 * 84)
    assert tuple(v.frames.shape) == (6, 3, 28, 56)
    assert v.timestamps_s == [i / 4.0 for i in sample_indices(20, 4.0, 6)]


@pytest.mark.parametrize("duration,clip,expect", [
    (25.0, 10.0, [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]),
    (5.0, 10.0, [(0.0, 5.0)]),  # shorter than one clip
    (20.0, 10.0, [(0.0, 10.0), (10.0, 20.0)]),  # exact multiple: no empty tail
    (0.0, 10.0, []),
])
def test_cut_clips_edges(duration, clip, expect):
    assert [(c.start_s, c.end_s) for c in cut_clips(duration, clip)] == expect


def test_cut_clips_merges_tiny_tail():
    assert [(c.start_s, c.end_s) for c in cut_clips(20.5, 10.0, min_last_s=1.0)] == [(0.0, 10.0), (10.0, 20.5)]


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"this is not a video at all" * 50, "not a readable video"),
])
def test_bad_files_raise_one_clear_error(tmp_path, content, reason):
    p = tmp_path / "bad.mp4"
    p.write_bytes(content)
    with pytest.raises(VideoDecodeError) as e:
        probe(p)
    assert str(e.value).startswith(str(p)) and reason in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VideoDecodeError):
        read_frames(p, [0])


def test_truncated_and_missing(tmp_path, mp4):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match=str(cut)):
        read_frames(cut, list(range(20)))
    with pytest.raises(VideoDecodeError, match="no such file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoDecodeError, match="is a directory"):
        probe(tmp_path)
    with pytest.raises(VideoDecodeError, match="truncated"):
        read_frames(mp4, [25])
