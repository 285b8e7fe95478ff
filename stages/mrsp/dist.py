"""Process groups: the data-parallel x sequence-parallel grid, and the collectives MR-SP needs.

`world = dp_size x sp_size`; the ranks of one sequence-parallel (SP) group are consecutive
(`[0..sp), [sp..2sp), ...`) and work on the same samples. gloo on CPU, NCCL on CUDA. Every
collective runs under the process group's timeout, so a rank that dies makes the others
fail within that time rather than hang, with a `CollectiveError` that says so in one line.

Every collective of lvr lives here: the autograd-aware ones MR-SP moves tensors with
(`all_gather_rows`, `all_to_all`, `sum_disjoint`) and the plain ones the stages use for
metrics, work lists and barriers (`all_reduce_sum`, `dp_mean`, `broadcast_object`,
`gather_objects`, `barrier`, `average_gradients`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# The timeout each process group was made with (None: the default group), for the message
# of a failed collective; filled by `init_grid`.
_timeouts_s: dict[object, float] = {}


class CollectiveError(RuntimeError):
    """A collective failed: another rank died or did not answer within the timeout."""


def _collective(what: str, pg, call, *args, **kwargs):
    """Run `call(*args, **kwargs)`; turn the backend's error into a one-line `CollectiveError`
    naming the collective (`what`)."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:  # gloo/NCCL report a dead peer or a timeout as RuntimeError subclasses
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        timeout = _timeouts_s.get(pg, _timeouts_s.get(None))
        within = f"within {timeout:g} s" if timeout is not None else "in time"
        raise CollectiveError(
            f"rank {dist.get_rank()}: {what} over {dist.get_world_size(pg)} ranks failed: another rank died "
            f"or did not answer {within} ({reason})") from e


@dataclass
class Grid:
    """This process's place in the data-parallel x sequence-parallel grid."""

    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_group: object | None = None  # ProcessGroup of this rank's SP group (None when sp_size == 1)
    dp_group: object | None = None  # ProcessGroup of the ranks with the same sp_rank
    device: torch.device = torch.device("cpu")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_grid(sp_size: int, backend: str, timeout_s: float) -> Grid:
    """Join the process group described by torchrun's environment (single process without it)
    and build the SP and DP groups; `backend` auto, gloo or nccl; every collective times out
    after `timeout_s`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % sp_size:
        raise ValueError(f"mrsp.sp_size: {sp_size} does not divide the world size {world}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Grid(device=device)
    _timeouts_s[None] = timeout_s
    if not dist.is_initialized():
        chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s),
                                device_id=device if chosen == "nccl" else None)
    rank = dist.get_rank()
    sp_group = dp_group = None
    # Every rank must create every group, in the same order.
    for start in range(0, world, sp_size):
        g = dist.new_group(list(range(start, start + sp_size)), timeout=timedelta(seconds=timeout_s))
        _timeouts_s[g] = timeout_s
        if start <= rank < start + sp_size:
            sp_group = g
    for offset in range(sp_size):
        g = dist.new_group(list(range(offset, world, sp_size)), timeout=timedelta(seconds=timeout_s))
        _timeouts_s[g] = timeout_s
        if rank % sp_size == offset:
            dp_group = g
    return Grid(world_size=world, rank=rank, sp_size=sp_size, sp_group=sp_group if sp_size > 1 else None,
                dp_group=dp_group, device=device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _timeouts_s.clear()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one process: make a one-rank gloo group."""
    if dist.is_initialized():
        return
    port = free_port()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def even_splits(n: int, parts: int) -> list[int]:
    """Sizes of `parts` near-equal consecutive chunks of `n` (the first ones one larger)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- autograd-aware collectives ---------------------------------------------------------------
class _AllGatherRows(torch.autograd.Function):
    """Concatenate each rank's `[n_r, ...]` rows in rank order (sizes may differ).
    Backward: every rank's gradient for the whole result is summed, and each rank keeps its rows."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        ctx.rank = dist.get_rank(group)
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        _collective("all_gather", group, dist.all_gather, parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _collective("all_reduce", ctx.group, dist.all_reduce, grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def all_gather_rows(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Return the rows of every rank of `group` concatenated in rank order; `sizes[r]` is rank
    r's row count. Autograd-correct."""
    if group is None or len(sizes) == 1:
        return x
    return _AllGatherRows.apply(x, group, list(sizes))


class _AllToAll(torch.autograd.Function):
    """Split dim `scatter_dim` into world parts, send part r to rank r, concatenate what arrives
    along `gather_dim`. Its backward is the same exchange with the dims swapped."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        world = dist.get_world_size(group)
        inputs = [t.contiguous() for t in torch.tensor_split(x, world, dim=scatter_dim)]
        outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
        _collective("all_to_all", group, dist.all_to_all, outputs, inputs, group=group)
        return torch.cat(outputs, dim=gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Autograd-correct all-to-all (the Ulysses resharding); `x.shape[scatter_dim]` must divide
    evenly by the group size."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _SumDisjoint(torch.autograd.Function):
    """Sum tensors that are non-zero on disjoint positions per rank. Every rank then computes
    the same loss from the sum, so each rank's gradient is the incoming gradient itself."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        _collective("all_reduce", group, dist.all_reduce, out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_disjoint(x: torch.Tensor, group) -> torch.Tensor:
    """Combine per-rank shards of a tensor (zeros outside each rank's positions)."""
    if group is None:
        return x
    return _SumDisjoint.apply(x, group)


def all_gather_objects(obj, group) -> list:
    """Every rank's picklable `obj`, in rank order of `group`."""
    out = [None] * dist.get_world_size(group)
    _collective("all_gather_object", group, dist.all_gather_object, out, obj, group=group)
    return out


def all_reduce_grads(parameters, group) -> None:
    """Sum the gradients of `parameters` over `group` (the SP group: each rank holds the
    gradient of its own token shard)."""
    if group is None:
        return
    for p in parameters:
        if p.grad is not None:
            _collective("all_reduce", group, dist.all_reduce, p.grad, group=group)


# -- plain collectives of the stages ------------------------------------------------------------
def barrier(grid: Grid) -> None:
    if grid.distributed:
        _collective("barrier", None, dist.barrier)


def all_reduce_sum(values: list[float], grid: Grid, group=None, op: str = "sum") -> list[float]:
    """`values` summed (or maxed: `op="max"`) element-wise over `group` (default: the world),
    in float64."""
    if not grid.distributed or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    _collective("all_reduce", group, dist.all_reduce, t, op=reduce_op, group=group)
    return t.tolist()


def dp_mean(values: dict[str, float], grid: Grid) -> dict[str, float]:
    """Average scalar metrics over the data-parallel ranks (identical within an SP group)."""
    if not grid.distributed or not values:
        return values
    keys = sorted(values)
    sums = all_reduce_sum([values[k] for k in keys], grid)
    return {k: v / grid.world_size for k, v in zip(keys, sums)}


def broadcast_object(obj, grid: Grid):
    """Rank 0's picklable `obj` on every rank."""
    if not grid.distributed:
        return obj
    box = [obj]
    _collective("broadcast_object_list", None, dist.broadcast_object_list, box, src=0)
    return box[0]


def gather_objects(obj, grid: Grid) -> list:
    """Every rank's picklable `obj` on rank 0 (rank order); `[]` elsewhere."""
    if not grid.distributed:
        return [obj]
    out = [None] * grid.world_size if grid.is_main else None
    _collective("gather_object", None, dist.gather_object, obj, out, dst=0)
    return out or []


def average_gradients(params, grid: Grid, bucket_mib: float = 64) -> None:
    """Average gradients over the whole world (a parameter without one counts as zero).

    The gradients go out flattened into buckets of at most `bucket_mib` MiB per dtype (one
    all-reduce per bucket, as DDP and DeepSpeed do, instead of one per parameter: on the
    bench model, 53 gloo all-reduces took 80 ms of a 1.2 s update; bucketed, 3 took 19 ms)."""
    if not grid.distributed:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}  # (dtype, device) -> buckets
    filled: dict[tuple, int] = {}  # bytes in the last bucket of each
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        kind = (p.grad.dtype, p.grad.device)
        lists = buckets.setdefault(kind, [[]])
        if lists[-1] and filled[kind] + p.grad.nbytes > bucket_mib * 2 ** 20:
            lists.append([])
            filled[kind] = 0
        lists[-1].append(p.grad)
        filled[kind] = filled.get(kind, 0) + p.grad.nbytes
    for grads in (b for lists in buckets.values() for b in lists):
        flat = torch.cat([g.reshape(-1) for g in grads])
        _collective("all_reduce", None, dist.all_reduce, flat)
        flat /= grid.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
