import json

import pytest
import torch

from stages.models.adapter import load_adapter, load_patch_spec, resolve_model_path
from stages.models.patchify import patchify
from stages.models.tiny import FAMILIES, build_tiny, resolve_tiny


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_saved_and_reloaded_model_gives_identical_logits(tmp_path, family):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from stages.models.tiny import build_config, train_tokenizer

    path = build_tiny(family, tmp_path / family, seed=3)
    assert json.loads((path / "lvr_tiny.json").read_text())["family"] == family
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    model.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(path)
    # the model as build_tiny made it in memory, before saving: same seed, same steps
    made = train_tokenizer(seed=3)
    config = build_config(family, vocab_size=len(made), token_ids=made.get_vocab())
    torch.manual_seed(3)
    before = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    saved, loaded = before.state_dict(), model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = torch.tensor([tok.encode("The red circle moves to the left corner.")])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, before(input_ids=ids).logits
    assert a.shape == (1, ids.shape[1], len(tok))
    assert torch.equal(a, b)
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")


def test_tokenizer_has_chat_vision_and_reasoning_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_tiny("tiny:qwen2.5-vl"))
    for t in ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>",
              "<think>", "</think>", "<answer>", "</answer>"]:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")
    s = "<think>red at 00:16</think><answer>B</answer>"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_adapter_embedding_path_equals_pixel_path(family):
    """Feeding a precomputed video embedding reproduces the model's own pixel path exactly."""
    a = load_adapter("tiny:" + family)
    f = a.patch_spec.factor
    frames = torch.randint(0, 256, (5, 3, f * 2, f * 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels, grid = patchify(frames, a.patch_spec)
    times = [i * 0.5 for i in range(5)]
    ids = torch.tensor([a.prompt_ids([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]}],
                                     [(grid, times)])])
    n_video = int((ids == a.video_token_id).sum())
    assert n_video == a.video_tokens(grid) == 3 * 2 * 3
    sec = a.second_per_grid(2.0)
    pos, _ = a.positions(ids, [grid], [sec])
    with torch.no_grad():
        h, _ = a.hidden_states(ids, pos, [a.encode_video(pixels, grid)])
        ours = a.lm_head(h)
        kw = {"second_per_grid_ts": torch.tensor([sec])} if family == "qwen2.5-vl" else {}
        a.backbone.rope_deltas = None
        ref = a.model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,
                      mm_token_type_ids=a.mm_token_type_ids(ids), **kw).logits
    assert torch.equal(ours, ref)


def test_qwen3_prompt_has_timestamps_per_temporal_patch():
    a = load_adapter("tiny:qwen3-vl")
    grid = torch.tensor([[2, 4, 4]])
    text = a.tokenizer.decode(a.video_segment(grid, [0.0, 0.5, 1.0, 1.5]))
    assert text.count("<|video_pad|>") == 8
    assert text.startswith("<0.2 seconds><|vision_start|>") and "<1.2 seconds><|vision_start|>" in text


def test_tiny_paths_resolve_and_unknown_family_errors():
    assert resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert load_patch_spec("tiny:qwen3-vl").patch_size == 16
    with pytest.raises(ValueError, match="unknown tiny model 'tiny:llama'"):
        resolve_tiny("tiny:llama")
    assert "qwen2.5-vl-bench" in FAMILIES


def _resolve_in_child(cache: str, queue) -> None:
    import os
    os.environ["LVR_CACHE"] = cache
    from stages.models.tiny import resolve_tiny as resolve
    path = resolve("tiny:qwen2-vl", seed=5)
    queue.put((str(path), json.loads((path / "lvr_tiny.json").read_text())["built_by_pid"]))


def test_concurrent_first_use_builds_one_complete_folder(tmp_path):
    """Ranks of a launch resolve the same tiny model at once on a cold cache: every process must
    get a complete folder, and no builder may delete a folder another has published."""
    import multiprocessing as mp

    from transformers import AutoConfig

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    seen = {queue.get(timeout=5) for _ in procs}
    assert len(seen) == 1  # one folder, built once: no process saw a copy another later replaced
    paths = {path for path, _ in seen}
    folder = tmp_path / "tiny"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [paths.pop().rsplit("/", 1)[1]]
    built = next(p for p in folder.iterdir() if p.is_dir())
    assert AutoConfig.from_pretrained(built).model_type == "qwen2_vl"
