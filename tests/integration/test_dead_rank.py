"""A rank that dies or stalls mid-run makes the others fail with a one-line reason, never hang."""

import os
import queue
import time

import pytest
import torch.multiprocessing as mp

from tests.integration.mp import free_port

TIMEOUT_S = 10


def _worker(rank: int, port: int, out, how: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    from stages.mrsp.dist import CollectiveError, all_gather_rows, init_grid

    grid = init_grid(2, backend="gloo", timeout_s=TIMEOUT_S)
    ok = all_gather_rows(torch.full((2, 3), float(rank)), grid.sp_group, [2, 2])  # both alive: works
    assert ok[:2].eq(0).all() and ok[2:].eq(1).all()
    if rank == 1:
        if how == "stalls":  # alive, but never joins the next collective
            time.sleep(TIMEOUT_S + 40)
        os._exit(3)  # a crash: no clean-up, no goodbye to the group
    start = time.monotonic()
    try:
        all_gather_rows(torch.ones(2, 3), grid.sp_group, [2, 2])
        out.put(("no error", time.monotonic() - start))
    except CollectiveError as e:
        out.put((str(e), time.monotonic() - start))
    out.close()
    out.join_thread()  # flush the result before leaving
    os._exit(0)  # skip destroy_process_group, which would wait for the dead rank


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_survivor_fails_with_a_clear_message_within_the_timeout(how):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out, how)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S + 60
    try:
        while True:
            try:
                message, waited = out.get(timeout=1.0)
                break
            except queue.Empty:
                if procs[0].exitcode is not None and out.empty():
                    raise AssertionError(f"rank 0 exited with code {procs[0].exitcode} without a result") from None
                if time.monotonic() > deadline:
                    raise AssertionError("the surviving rank neither finished nor failed: it hangs") from None
    finally:
        for p in procs:
            p.join(30 if how == "dies" else 0)
            if p.is_alive():
                p.kill()
                p.join(10)
    print(f"rank 1 {how}; after {waited:.2f} s: {message}")  # pytest -s shows it
    assert procs[1].exitcode == (3 if how == "dies" else -9)
    assert "\n" not in message and message.startswith("rank 0: all_gather over 2 ranks failed"), message
    assert "died or did not answer" in message and f"{TIMEOUT_S} s" in message, message
    assert waited <= TIMEOUT_S + 30, waited
    if how == "stalls":
        assert waited >= TIMEOUT_S - 1, waited  # it waited out the timeout, no longer
