"""Offline generation with a vLLM engine in this process (GPU machines, `lvr[vllm]` extra).

Requests go through `LLM.chat`, which applies the model's chat template. A video part is
handed over as a `video_url` data URL of JPEG frames (`data:video/jpeg;base64,f1,f2,...`),
the form vLLM's chat parser turns back into a frame array without re-sampling; its `fps`
goes to the multimodal processor as `mm_processor_kwargs`, so requests are batched per
fps. `cfg.extra_body` holds extra `SamplingParams` fields (e.g. `top_k`,
`repetition_penalty`), as it would for a vLLM server.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any

from stages.backends.base import BackendError, GenRequest, GenResult, map_video_parts, one_line, release_memory
from stages.backends.openai_http import encode_jpeg_b64


class VLLMBackend:
    """`cfg.model` loaded in a `vllm.LLM`; `generate` runs a whole batch at once."""

    def __init__(self, cfg: Any):
        try:
            import vllm
        except ImportError:
            raise BackendError("backend.kind='vllm' needs the vllm extra: pip install 'lvr[vllm]'") from None
        if not cfg.model:
            raise BackendError("backend.model: the model to load into vLLM is required")
        self._vllm = vllm
        self.model: str = cfg.model
        self.extra_sampling = dict(cfg.extra_body)

        engine_kwargs: dict[str, Any] = {"model": cfg.model}
        engine_fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        if "media_io_kwargs" in engine_fields:
            # Newer vLLM caps JPEG-frame videos at 32 frames unless told otherwise;
            # the caption stage has already chosen the frames it wants seen.
            engine_kwargs["media_io_kwargs"] = {"video": {"num_frames": -1}}
        self.llm = vllm.LLM(**engine_kwargs)
        self._chat_takes_mm_kwargs = "mm_processor_kwargs" in inspect.signature(self.llm.chat).parameters

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        release_memory()

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult | None] = [None] * len(requests)
        by_fps: dict[float | None, list[tuple[int, list[dict], Any]]] = {}
        for index, req in enumerate(requests):
            try:
                messages, fps = _to_vllm_messages(req.messages)
                params = self._sampling_params(req)
            except Exception as exc:  # a malformed item fails alone
                results[index] = GenResult(req.key, None, one_line(f"bad request: {exc}"), 0.0, 0)
                continue
            by_fps.setdefault(fps, []).append((index, messages, params))

        for fps, batch in by_fps.items():
            for index, result in zip([b[0] for b in batch], self._run_batch(requests, batch, fps)):
                results[index] = result
        return [r for r in results if r is not None]

    def _run_batch(self, requests: list[GenRequest], batch: list, fps: float | None) -> list[GenResult]:
        start = time.monotonic()
        try:
            outputs = self._chat([b[1] for b in batch], [b[2] for b in batch], fps)
        except Exception as exc:
            if len(batch) == 1:
                reason = one_line(f"{type(exc).__name__}: {exc}")
                return [GenResult(requests[batch[0][0]].key, None, reason, time.monotonic() - start, 1)]
            # One bad item can sink a batched call: run them one by one to find it.
            return [r for item in batch for r in self._run_batch(requests, [item], fps)]
        latency = time.monotonic() - start
        results = []
        for (index, _, _), out in zip(batch, outputs):
            completion = out.outputs[0]
            usage = {
                "prompt_tokens": len(out.prompt_token_ids or []),
                "completion_tokens": len(completion.token_ids),
            }
            results.append(GenResult(requests[index].key, completion.text, None, latency, 1, usage))
        return results

    def _chat(self, conversations: list[list[dict]], params: list, fps: float | None) -> list:
        kwargs: dict[str, Any] = {"sampling_params": params, "use_tqdm": False}
        if fps is not None and self._chat_takes_mm_kwargs:
            kwargs["mm_processor_kwargs"] = {"fps": fps}
        return self.llm.chat(conversations, **kwargs)

    def _sampling_params(self, req: GenRequest) -> Any:
        kwargs: dict[str, Any] = {
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
        }
        if req.json_schema is not None:
            kwargs.update(_structured_json(req.json_schema))
        kwargs.update(self.extra_sampling)
        return self._vllm.SamplingParams(**kwargs)


def _structured_json(schema: dict) -> dict[str, Any]:
    """SamplingParams kwargs constraining output to `schema`, in this vLLM's spelling."""
    try:  # vLLM >= 0.11
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:  # removed in 0.12, the spelling before
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}


def _to_vllm_messages(messages: list[dict]) -> tuple[list[dict], float | None]:
    """`messages` with video parts as JPEG-frame data URLs, and the videos' fps."""
    fps_seen: set[float] = set()

    def convert(part: dict) -> list[dict]:
        frames = part.get("frames") or []
        if not frames:
            raise ValueError("video part has no frames")
        if part.get("fps"):
            fps_seen.add(float(part["fps"]))
        url = "data:video/jpeg;base64," + ",".join(encode_jpeg_b64(f) for f in frames)
        return [{"type": "video_url", "video_url": {"url": url}}]

    converted = map_video_parts(messages, convert)
    if len(fps_seen) > 1:
        raise ValueError(f"videos of one request have different fps: {sorted(fps_seen)}")
    return converted, (fps_seen.pop() if fps_seen else None)
