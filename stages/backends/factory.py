"""The text-generation backend a recipe's `[backend]` section names (heavy imports happen here)."""

from __future__ import annotations

from typing import Any

from stages.backends.base import Backend, BackendError

BACKEND_KINDS = ("openai", "transformers", "vllm")


def make_backend(cfg: Any) -> Backend:
    """The backend `cfg.kind` names, built from `cfg` (heavy imports happen here)."""
    kind = cfg.kind
    if kind == "openai":
        from stages.backends.openai_http import OpenAIBackend

        return OpenAIBackend(cfg)
    if kind == "transformers":
        from stages.backends.transformers_backend import TransformersBackend

        return TransformersBackend(cfg)
    if kind == "vllm":
        from stages.backends.vllm_backend import VLLMBackend

        return VLLMBackend(cfg)
    raise BackendError(f"backend.kind: unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
