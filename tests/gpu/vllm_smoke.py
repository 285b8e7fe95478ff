"""`python -m tests.gpu.vllm_smoke OUT.json`: the vLLM backend of the data stages on the tiny
Qwen2.5-VL, in a process of its own (vLLM takes most of the GPU's memory and starts workers);
writes what came back for a text, a video and a malformed request as JSON."""

import dataclasses
import json
import sys
from types import SimpleNamespace

import numpy as np


def main(out: str) -> None:
    from stages.backends.base import GenRequest
    from stages.backends.vllm_backend import VLLMBackend
    from stages.models.adapter import resolve_model_path

    backend = VLLMBackend(SimpleNamespace(model=resolve_model_path("tiny:qwen2.5-vl"), extra_body={}))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
    text = GenRequest("text", [{"role": "user", "content": "What colour is the ball?"}], max_tokens=8,
                      temperature=0.0, seed=0)
    video = GenRequest("video", [{"role": "user", "content": [{"type": "video", "frames": frames, "fps": 2.0},
                                                              {"type": "text", "text": "Describe the clip."}]}],
                       max_tokens=8, temperature=0.0, seed=0)
    bad = GenRequest("bad", [{"role": "user", "content": [{"type": "video", "frames": [], "fps": 2.0}]}], max_tokens=8)
    try:
        results = backend.generate([text, video, bad])
        again = backend.generate([text])
    finally:
        backend.close()
    with open(out, "w") as f:
        json.dump({"results": [dataclasses.asdict(r) for r in results], "again": dataclasses.asdict(again[0])}, f)


if __name__ == "__main__":
    main(sys.argv[1])
