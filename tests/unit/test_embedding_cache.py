"""EmbeddingCache: one encode per video per step; a capacity keeps the most recently used."""

from stages.mrsp.cache import EmbeddingCache


def getter(cache, encoded):
    def get(key):
        return cache.get(key, lambda: encoded.append(key) or f"emb-{key}")
    return get


def test_a_capacity_keeps_the_most_recently_used_embeddings():
    encoded = []
    cache = EmbeddingCache(capacity=2)
    get = getter(cache, encoded)
    for key in ["a", "b", "a", "c", "b", "a", "a"]:
        assert get(key) == f"emb-{key}"
    # "a" was used again before "c" came, so "c" pushed out "b"; "b" back pushed out "a", "a" back
    # pushed out "c", and the last "a" is a hit (first-in-first-out would have kept "b" instead)
    assert encoded == ["a", "b", "c", "b", "a"]
    assert (cache.vision_encodes, cache.embedding_cache_hits) == (5, 2)


def test_without_a_capacity_a_step_keeps_every_embedding_until_the_next():
    encoded = []
    cache = EmbeddingCache()
    get = getter(cache, encoded)
    for key in ["a", "b", "c", "a", "b", "c"]:
        get(key)
    assert encoded == ["a", "b", "c"]
    cache.new_step()
    get("a")
    assert encoded == ["a", "b", "c", "a"]
