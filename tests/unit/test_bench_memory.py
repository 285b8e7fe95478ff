"""The bench's CPU peak memory: a measured step starts on a trimmed heap and is sampled; an
unmeasured one (a cell's later timed steps) is neither trimmed nor sampled."""

import time

import torch

from stages import bench_mrsp
from stages.bench_mrsp import PeakMemory


def test_unmeasured_step_neither_trims_nor_samples(monkeypatch):
    trims = []
    monkeypatch.setattr(bench_mrsp, "trim_heap", lambda device: trims.append(device))
    memory = PeakMemory(torch.device("cpu"))
    try:
        memory.reset()
        assert len(trims) == 1
        held = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, every page touched
        time.sleep(0.1)
        measured = memory.gb()
        assert measured >= 60 / 1024, measured  # the sampler saw the growth

        memory.reset(measure=False)
        assert len(trims) == 1  # the heap is left as the last step left it
        peak = memory._peak
        more = torch.ones(64 * 2 ** 20 // 4)
        time.sleep(0.1)
        assert memory._peak == peak  # no sample taken while not measuring
        del held, more

        memory.reset()
        assert len(trims) == 2
        assert memory.gb() < measured  # a new measurement, from this step's start
    finally:
        memory.close()
