"""Run a function on N real processes (torch.distributed, gloo) and collect what rank 0 returns."""

import os
import queue as queue_mod
import time
import traceback

import torch.multiprocessing as mp


from stages.mrsp.dist import free_port  # noqa: F401 (the tests' one free-port helper)


def _entry(rank, world, port, fn, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 300):
    """Start `world` processes running `fn(rank, world, *args)`; return {rank: result}.
    A worker that dies without reporting (signal, os._exit) or a run past `timeout` seconds
    fails the test instead of hanging it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors, reported, exited = {}, [], set(), set()
    deadline = time.monotonic() + timeout

    def take(rank, status, value):
        reported.add(rank)
        (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))

    try:
        while len(reported) < world:
            try:
                take(*queue.get(timeout=1.0))
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in reported and p.exitcode is not None:
                    if r in exited:  # gone for a whole poll: its report is not coming
                        errors.append(f"rank {r} exited with code {p.exitcode} without a result")
                        reported.add(r)
                    exited.add(r)
            if time.monotonic() > deadline:
                errors.append(f"no result from ranks {sorted(set(range(world)) - reported)} in {timeout:g} s")
                break
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                errors.append(f"pid {p.pid}: a worker did not exit")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results
