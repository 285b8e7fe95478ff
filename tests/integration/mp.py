"""Run a function on N real processes (torch.distributed, gloo) and collect what rank 0 returns."""

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """Start `world` processes running `fn(rank, world, *args)`; return {rank: result}."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    raise_if_any = None
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world):
        rank, status, value = queue.get()
        (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            raise_if_any = "a worker did not exit"
    if errors:
        raise AssertionError("\n".join(errors))
    if raise_if_any:
        raise AssertionError(raise_if_any)
    return results

