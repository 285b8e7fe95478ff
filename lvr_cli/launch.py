"""Starting a recipe's processes: join what torchrun or srun started, or start them with torchrun.

Three ways a multi-process stage runs, in the order they are recognised:
1. Under `torchrun` (or any launcher that sets `LOCAL_RANK`, `RANK`, `WORLD_SIZE`,
   `MASTER_ADDR`, `MASTER_PORT`): this process is one rank; nothing to do.
2. Under `srun` with one task per rank (`SLURM_NTASKS` = the recipe's world size): torch's
   variables are set from Slurm's (`SLURM_PROCID`, `SLURM_LOCALID`), the rendezvous from
   `MASTER_ADDR`/`MASTER_PORT` if set, else `launch.master_addr`/`launch.master_port`.
3. Otherwise lvr runs this same command under `torch.distributed.run` for this node's share:
   `launch.nproc_per_node` processes, node `launch.node_rank` of `launch.nnodes`, rendezvous
   at `launch.master_addr:launch.master_port` (a free local port on a single node). Run the
   same command on every node with its own `launch.node_rank` (the Slurm script in
   `recipes/slurm/` does, with one task per node).
No launcher or RPC of lvr's own: torchrun's static rendezvous does the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_launcher() -> bool:
    """True when a launcher (torchrun) already made this process one rank of the world."""
    return "LOCAL_RANK" in os.environ


def adopt_slurm(recipe, environ=os.environ) -> bool:
    """Under `srun` with one task per rank, set torch.distributed's variables from Slurm's in
    `environ`; True when this process is now one rank. Raises ValueError when Slurm's task
    count disagrees with the recipe's world size in a way lvr cannot run."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    tasks, world = int(environ["SLURM_NTASKS"]), recipe.world_size()
    if tasks != world:
        return False  # one task per node (or a lone srun): lvr starts the node's share itself
    launch = recipe.launch
    port = environ.get("MASTER_PORT") or (str(launch.master_port) if launch.master_port else None)
    if world > 1 and port is None:
        raise ValueError("launch.master_port: required under srun with one task per rank")
    environ.update({"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
                    "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
                    "MASTER_ADDR": environ.get("MASTER_ADDR", launch.master_addr), "MASTER_PORT": port or "0"})
    return True


def relaunch_needed(recipe) -> bool:
    """True when the recipe asks for several processes and no launcher started this one as a rank."""
    if recipe.world_size() <= 1 or under_launcher():
        return False
    return not adopt_slurm(recipe)


def torchrun_command(recipe, argv: list[str], port: int) -> list[str]:
    """The `torch.distributed.run` command line (through `lvr_cli/torchrun.py`, quiet on the
    console) of this node's share of the recipe's processes."""
    launch = recipe.launch
    return [sys.executable, "-m", "lvr_cli.torchrun", f"--nproc_per_node={launch.nproc_per_node}",
            f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}", f"--master_addr={launch.master_addr}",
            f"--master_port={port}", "--module", "lvr_cli.main", *argv]


def relaunch(recipe) -> int:
    """Run this same command under `torch.distributed.run` for this node; return its exit code."""
    from stages.mrsp.dist import free_port

    port = recipe.launch.master_port or int(os.environ.get("MASTER_PORT") or free_port())
    # torchrun sets 1 thread per process anyway; set here, it skips its banner saying so
    return subprocess.call(torchrun_command(recipe, sys.argv[1:], port), env={"OMP_NUM_THREADS": "1", **os.environ})
