"""sft's StepReader: a step's records decoded once each, a micro-batch at a time, and whether
any is readable known before the first micro-batch."""

from stages.sft import StepReader


class FakeRuntime:
    """`sample` decodes a record (logged in `calls`), or raises ValueError as an unreadable video does."""

    def __init__(self, unreadable: set[int]):
        self.unreadable, self.calls = unreadable, []

    def sample(self, record, video_dir):
        i = record["i"]
        self.calls.append(i)
        if i in self.unreadable:
            raise ValueError(f"video {i}: cannot decode")
        return f"sample{i}"


class Skipped:
    def __init__(self):
        self.keys = []

    def skip(self, key, reason):
        self.keys.append(key)


def reader(unreadable, n=6, micro=2):
    rt, skipped = FakeRuntime(unreadable), Skipped()
    records = [{"problem_id": f"r{i}", "i": i} for i in range(n)]
    # the step's records in the order step_records gives them (not sorted)
    return StepReader(rt, records, [5, 0, 1, 3, 2, 4][:n], micro, "videos", skipped), rt, skipped


def test_the_first_readable_record_is_found_then_the_rest_decoded_with_their_micro_batch():
    r, rt, skipped = reader(unreadable={5, 0, 3})
    assert r.readable and rt.calls == [5, 0, 1]  # tried in order until one decodes
    batches = r.batches()
    assert next(batches) == [] and rt.calls == [5, 0, 1]  # records 5 and 0 failed: nothing to decode again
    assert next(batches) == ["sample1"] and rt.calls == [5, 0, 1, 3]  # the probe's sample, then 3 (unreadable)
    assert next(batches) == ["sample2", "sample4"] and rt.calls == [5, 0, 1, 3, 2, 4]  # decoded only now
    assert next(batches, None) is None
    assert skipped.keys == ["r5", "r0", "r3"]  # each unreadable record noted once


def test_a_readable_first_record_is_decoded_once():
    r, rt, _ = reader(unreadable=set(), micro=4)
    assert [b for b in r.batches()] == [["sample5", "sample0", "sample1", "sample3"], ["sample2", "sample4"]]
    assert rt.calls == [5, 0, 1, 3, 2, 4]


def test_nothing_readable_is_known_before_any_micro_batch():
    r, rt, skipped = reader(unreadable={0, 1, 2, 3, 4, 5})
    assert not r.readable and rt.calls == [5, 0, 1, 3, 2, 4] and len(skipped.keys) == 6
