"""The video-embedding cache: encode a video once per step, reuse it everywhere.

Entries are keyed by the video's identity and frame sampling (`VideoInput.key`) and by the
version of the vision weights, so an embedding is never reused across a change of the
vision tower. With a frozen tower (the default) one encode serves the G rollouts and the
old-policy, reference and update forwards of a step; with a trainable one the update
forward re-encodes with gradients (`grad=True`) and the version is bumped after each
optimizer step. The counters `vision_encodes` and `embedding_cache_hits` go to metrics.

`capacity` bounds the entries (least recently used out first): `lvr sft`, whose videos each
serve one forward, keeps a micro-batch's worth, so a step does not hold every embedding it
made while a video asked about twice in a row is still encoded once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from stages.models.adapter import VideoEmbedding


class EmbeddingCache:
    def __init__(self, enabled: bool = True, capacity: int | None = None):
        self.enabled, self.capacity = enabled, capacity
        self.vision_version = 0
        self._store: OrderedDict[tuple[str, int], VideoEmbedding] = OrderedDict()
        self.vision_encodes = 0
        self.embedding_cache_hits = 0
        self.encode_seconds = 0.0  # wall time spent in the vision tower

    def get(self, key: str, encode: Callable[[], VideoEmbedding], grad: bool = False) -> VideoEmbedding:
        """Return the cached embedding of `key`, or encode (and cache) it. `grad=True` always
        encodes, for a trainable vision tower's update forward."""
        full = (key, self.vision_version)
        if self.enabled and not grad and full in self._store:
            self.embedding_cache_hits += 1
            self._store.move_to_end(full)
            return self._store[full]
        t = time.perf_counter()
        emb = encode()
        self.encode_seconds += time.perf_counter() - t
        self.vision_encodes += 1
        if self.enabled and not grad:
            self._store[full] = emb
            if self.capacity is not None and len(self._store) > self.capacity:
                self._store.popitem(last=False)
        return emb

    def new_step(self) -> None:
        """Drop the embeddings of the previous step (their memory is the step's to spend)."""
        self._store.clear()

    def vision_changed(self) -> None:
        """The vision weights were updated: older entries must not be reused."""
        self.vision_version += 1
        self._store.clear()

    def counters(self) -> dict:
        return {"vision_encodes": self.vision_encodes, "embedding_cache_hits": self.embedding_cache_hits}

    def reset_counters(self) -> None:
        self.vision_encodes = self.embedding_cache_hits = 0
        self.encode_seconds = 0.0
