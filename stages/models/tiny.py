"""Tiny, randomly initialised models of the real Qwen VL architectures, built offline.

`tiny:<family>` in a recipe's `model.path` resolves here: the model is built once with
transformers' own config classes at small sizes, given a byte-level BPE tokenizer trained
locally (with the chat, vision and reasoning tokens), a Qwen-style chat template and a
video preprocessor config, and saved with `save_pretrained` into a cache folder. From then
on it loads exactly like a hub checkpoint (`AutoModelForImageTextToText.from_pretrained`,
`AutoTokenizer.from_pretrained`).

Families: `qwen2.5-vl` (the default of the demo), `qwen2-vl`, `qwen3-vl`, and
`qwen2.5-vl-bench`, whose vision tower and language model keep Qwen2.5-VL-7B's ratio of
compute per video token (see `BENCH_RATIO`), so that CPU timings of MR-SP against the
vanilla way say something about the 7B on GPUs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

TINY_PREFIX = "tiny:"
# Bump when the builder changes what it writes: cached builds of an older version are rebuilt.
BUILDER_VERSION = 3

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = [
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Plain added tokens (not "special": decoding keeps them) so the reasoning format is cheap to
# learn for a tiny model; real Qwen tokenizers split them into several pieces, which is fine.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an of to in on at by for with from into after before during while then first last "
    "next later finally again once twice screen scene video clip frame second seconds minute "
    "time start end begin beginning middle moment colour color background shape object agent "
    "circle square triangle star ball box button station corner left right top bottom upper "
    "lower half centre center side near far above below between moves moving moved move goes "
    "going reaches reach reached touch touches touched turns turned changes changed appears "
    "appeared shows showed becomes became stays stayed trying wants goal purpose because so "
    "therefore since which what where when who why how is are was were be been it its this that "
    "these those there here red green blue yellow white black orange purple pink grey gray "
    "brown cyan small large big tiny one two three four five six seven eight nine ten zero "
    "question answer options option reasoning think correct happened happens event events cause "
    "consequence result story plot narrative spatial temporal order sequence same different "
    "filled fills covered relative position located location frame frames each every all none "
    "not no yes and or but if only also most least more less many few count number"
).split()


def family_of(path: str) -> str | None:
    """Return the tiny family named by `path` (`tiny:qwen2.5-vl` -> `qwen2.5-vl`), else None."""
    return path[len(TINY_PREFIX):] if path.startswith(TINY_PREFIX) else None


def _text_sizes(family: str) -> dict:
    if family == "qwen2.5-vl-bench":
        # Qwen2.5-VL-7B: LLM width 3584 x 28 layers, vision width 1280 x 32 blocks, 4 patches
        # per video token. Compute per video token ~ depth * width^2: vision 4*32*1280^2 vs
        # LLM 28*3584^2 -> 0.58 (MLP ratios shift it to the 0.39 NOTES.md measured). The tiny
        # bench model keeps that ratio: see BENCH_RATIO and tests/unit/test_tiny_models.py.
        return dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2)
    return dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)


def build_config(family: str, vocab_size: int, token_ids: dict[str, int]):
    """Return a transformers config of `family` at tiny size with our tokenizer's ids."""
    text = _text_sizes(family)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope sections split head_dim/2 rotary frequencies over (t, h, w).
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = dict(
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
    )
    text_common = dict(
        vocab_size=vocab_size, max_position_embeddings=32768, rms_norm_eps=1e-6,
        bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"], **text,
    )
    if family in ("qwen2.5-vl", "qwen2.5-vl-bench"):
        from transformers import Qwen2_5_VLConfig

        vision_width, vision_depth = (96, 4) if family == "qwen2.5-vl-bench" else (64, 2)
        return Qwen2_5_VLConfig(
            text_config=dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                **text_common,
            ),
            vision_config=dict(
                depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                num_heads=2, out_hidden_size=text["hidden_size"], patch_size=14,
                temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2,
            ),
            tie_word_embeddings=False, **ids,
        )
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config=dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                **text_common,
            ),
            vision_config=dict(
                depth=2, embed_dim=64, mlp_ratio=2, num_heads=2, hidden_size=text["hidden_size"],
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
            ),
            tie_word_embeddings=False, **ids,
        )
    if family == "qwen3-vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            text_config=dict(
                head_dim=head_dim,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                 "mrope_section": mrope, "mrope_interleaved": True},
                **text_common,
            ),
            vision_config=dict(
                depth=3, hidden_size=64, intermediate_size=128, num_heads=2,
                out_hidden_size=text["hidden_size"], patch_size=16, temporal_patch_size=2,
                spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
            ),
            tie_word_embeddings=False, **ids,
        )
    raise ValueError(f"unknown tiny model family {family!r}: use one of {', '.join(FAMILIES)}")


FAMILIES = ("qwen2.5-vl", "qwen2-vl", "qwen3-vl", "qwen2.5-vl-bench")


def train_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Return a byte-level BPE `PreTrainedTokenizerFast` trained on a generated corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}")
        if rng.random() < 0.3:
            words.append(f"{rng.choice('ABCD')}.")
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", ",", "!"]))
    lines += [f"{w.capitalize()}" for w in _WORDS]

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CHAT_TOKENS + VISION_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=CHAT_TOKENS[1:] + VISION_TOKENS,
    )
    fast.add_tokens(REASONING_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 131072
    return fast


def vision_preprocessor_config(family: str, config) -> dict:
    """Return the processor settings a hub checkpoint would ship (patch grid, normalisation)."""
    v = config.vision_config
    if family == "qwen3-vl":
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    else:  # CLIP statistics, as Qwen2-VL and Qwen2.5-VL use
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    return {
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size, "image_mean": mean, "image_std": std,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    }


def cache_root() -> Path:
    return Path(os.environ.get("LVR_CACHE", Path.home() / ".cache" / "lvr"))


def build_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build, save and return the folder of a tiny `family` model (overwrites `out_dir`)."""
    import torch
    from transformers import AutoModelForImageTextToText

    tokenizer = train_tokenizer(seed=seed)
    vocab = tokenizer.get_vocab()
    config = build_config(family, vocab_size=len(tokenizer), token_ids=vocab)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").exists():
        raise RuntimeError(f"tiny model build: save_pretrained wrote no config.json to {tmp}")
    pre = vision_preprocessor_config(family, config)
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (tmp / "video_preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (tmp / "lvr_tiny.json").write_text(json.dumps({"family": family, "seed": seed,
                                                    "builder_version": BUILDER_VERSION,
                                                    "built_by_pid": os.getpid()}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic publish: a reader sees all or nothing
    return out_dir


def resolve_tiny(path: str, seed: int = 0) -> Path:
    """Return the cached folder for `tiny:<family>`, building it on first use."""
    family = family_of(path)
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model {path!r}: use one of "
                         + ", ".join(TINY_PREFIX + f for f in FAMILIES))
    tag = hashlib.sha256(f"{family}:{seed}:{BUILDER_VERSION}".encode()).hexdigest()[:10]
    out = cache_root() / "tiny" / f"{family}-{tag}"
    if (out / "lvr_tiny.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time across processes (ranks of a launch, parallel tests): the others
    # wait on the lock, then find the published folder and build nothing.
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "lvr_tiny.json").exists():
                # In a fresh interpreter: inside a launch torch.distributed is initialised, and
                # transformers' save_pretrained then writes weights and config on rank 0 only,
                # so a builder of another rank would publish a folder without them.
                subprocess.run([sys.executable, "-m", "stages.models.tiny", family, str(out), str(seed)],
                               check=True, cwd=Path(__file__).resolve().parents[2])
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


if __name__ == "__main__":  # python -m stages.models.tiny FAMILY OUT_DIR SEED (used by resolve_tiny)
    build_tiny(sys.argv[1], Path(sys.argv[2]), seed=int(sys.argv[3]))
