"""How lvr joins a launcher's processes or starts its node's share (no processes started here)."""

import pytest

from lvr_cli.launch import adopt_slurm, relaunch_needed, torchrun_command
from lvr_cli.recipes import RecipeError, load_recipe

RL = "recipes/demo/rl.toml"


def test_srun_with_one_task_per_rank_becomes_torch_distributed_env():
    recipe = load_recipe(RL, ["launch.nproc_per_node=4", "launch.nnodes=2", "launch.master_port=29511",
                              "launch.master_addr=\"node-a\""])
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert adopt_slurm(recipe, env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29511"}
    # the scheduler's rendezvous wins over the recipe's
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "1234"}
    assert adopt_slurm(recipe, env) and (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.9", "1234")


def test_srun_with_one_task_per_node_leaves_the_launch_to_lvr():
    recipe = load_recipe(RL, ["launch.nproc_per_node=4", "launch.nnodes=2", "launch.master_port=29511"])
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert not adopt_slurm(recipe, env) and "RANK" not in env


def test_torchrun_command_carries_the_nodes_share(monkeypatch):
    recipe = load_recipe(RL, ["launch.nproc_per_node=8", "launch.nnodes=2", "launch.node_rank=1", "train.global_batch=16",
                              "launch.master_port=29500", "launch.master_addr=\"head\""])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert relaunch_needed(recipe)
    cmd = torchrun_command(recipe, ["rl", RL], 29500)
    assert cmd[1:] == ["-m", "lvr_cli.torchrun", "--nproc_per_node=8", "--nnodes=2", "--node_rank=1",
                       "--master_addr=head", "--master_port=29500", "--module", "lvr_cli.main", "rl", RL]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a rank of torchrun's
    assert not relaunch_needed(recipe)


@pytest.mark.parametrize("overrides,message", [
    (["launch.nnodes=2"], "launch.master_port: required when nnodes > 1"),
    (["launch.nnodes=2", "launch.master_port=1", "launch.node_rank=2"], "launch.node_rank: 2 is not below nnodes = 2"),
    (["launch.nnodes=2", "launch.master_port=1", "launch.nproc_per_node=2", "mrsp.sp_size=4"],
     "mrsp.sp_size: 4 does not divide launch.nproc_per_node = 2"),
    (["launch.nnodes=2", "launch.master_port=1", "train.global_batch=3"], "train.global_batch: 3 is not divisible"),
])
def test_grids_that_cannot_work_are_refused_before_any_node_starts(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RL, overrides)
