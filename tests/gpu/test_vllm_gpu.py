"""On CUDA with vLLM installed: the vLLM backend (`backend.kind = "vllm"`) generates.

The MR-SP runtime has no vLLM rollout engine yet (recipes refuse `rollout.engine =
"vllm"`), so this is the repository's only vLLM path."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.common import needs_cuda

pytestmark = [needs_cuda, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                             reason="vllm is not installed (pip install 'lvr[vllm]')")]
ROOT = Path(__file__).resolve().parents[2]


def test_vllm_backend_generates_for_text_and_video(tmp_path):
    """One greedy text request and one video request each come back with 1 to 8 new tokens,
    the text one identically when asked again; a video part without frames fails alone."""
    import torch

    torch.cuda.empty_cache()  # the engine sizes its KV cache from the memory free at start
    out = tmp_path / "vllm.json"
    r = subprocess.run([sys.executable, "-m", "tests.gpu.vllm_smoke", str(out)], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ), timeout=480)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    results = {x["key"]: x for x in data["results"]}
    assert list(results) == ["text", "video", "bad"]
    for key in ("text", "video"):
        x = results[key]
        assert x["error"] is None and isinstance(x["text"], str), x
        assert 1 <= x["usage"]["completion_tokens"] <= 8 and x["usage"]["prompt_tokens"] > 0, x
    assert results["video"]["usage"]["prompt_tokens"] > results["text"]["usage"]["prompt_tokens"]  # frames went in
    assert data["again"]["text"] == results["text"]["text"]  # greedy: the same tokens again
    assert results["bad"]["text"] is None and "no frames" in results["bad"]["error"], results["bad"]
