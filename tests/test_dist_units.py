"""The distributed pieces one at a time: launch environments, DeepSpeed configs, teacher
placement, config errors, and global-batch batch norm across two real processes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gwtn_dist.cli import _without_local_rank
from gwtn_dist.config import ConfigError, load_config
from gwtn_dist.distributed import setup
from gwtn_dist.distributed.ds_config import deepspeed_config
from gwtn_dist.distributed.env import DistEnv, LaunchError, discover, expand_hostlist
from gwtn_dist.distributed.sync_bn import GlobalBatchNorm2d, use_global_batchnorm
from gwtn_dist.distributed.teacher import choose_mode
from gwtn_dist.models.family import build_wide


def test_torchrun_and_deepspeed_variables():
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "node7", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2,
                          launcher="torchrun", master_addr="node7", master_port=1234)


def test_srun_variables_give_the_first_node_as_rendezvous():
    env = discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_STEP_NODELIST": "gpu[07-09,12]", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
                    "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 2)
    assert env.launcher == "srun" and env.master_addr == "gpu07"
    assert env.master_port == 20000 + 4242


def test_no_launcher_is_one_process_and_nonsense_is_an_error():
    assert discover({}) == DistEnv()
    with pytest.raises(LaunchError, match="inconsistent"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match="not an integer"):
        discover({"RANK": "zero", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("hostlist, hosts", [
    ("node1", ["node1"]),
    ("a[1-3]", ["a1", "a2", "a3"]),
    ("gpu[007-008,10],cpu2", ["gpu007", "gpu008", "gpu10", "cpu2"]),
    ("r[1-2]-ib", ["r1-ib", "r2-ib"]),
])
def test_slurm_host_lists(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_deepspeed_config_from_ours_with_overrides_merged_last():
    config = deepspeed_config(micro_batch=16, world_size=4, zero_stage=3, grad_clip=1.0,
                              bf16=True, overrides={"zero_optimization": {"overlap_comm": True},
                                                    "gradient_clipping": 2.0})
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert config["gradient_clipping"] == 2.0 and config["bf16"] == {"enabled": True}
    assert "optimizer" not in config and "scheduler" not in config


@pytest.mark.parametrize("override, message", [
    ("dist.wide_zero_stage=4", "dist.wide_zero_stage"),
    ("dist.student_zero_stage=3", "dist.student_zero_stage"),
    ("dist.teacher=everywhere", "dist.teacher"),
    ("dist.deepspeed={optimizer: {type: Adam}}", "dist.deepspeed.optimizer"),
    ("dist.deepspeed=7", "dist.deepspeed"),
    ("dist.teacher_memory_fraction=0", "dist.teacher_memory_fraction"),
])
def test_dist_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_global_batch_the_ranks_do_not_divide_is_an_error():
    cfg = load_config(None, ["data.batch_size=64"])
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks"):
        setup.setup(cfg, DistEnv(rank=0, world_size=3, local_world_size=3))
    with pytest.raises(ConfigError, match="dist.engine"):
        setup.setup(load_config(None, ["dist.engine=torch"]),
                      DistEnv(rank=0, world_size=2, local_world_size=2))
    assert not dist.is_initialized()  # a failed setup joins no process group


def test_teacher_placement_choice_and_reason():
    assert choose_mode("auto", 10, 100, 0.25, world_size=1)[0] == "replicate"
    mode, reason = choose_mode("auto", 20, 100, 0.25, world_size=2)
    assert mode == "replicate" and "20.0% <= 25%" in reason
    mode, reason = choose_mode("auto", 30, 100, 0.25, world_size=2)
    assert mode == "shard" and "30.0% > 25%" in reason
    assert choose_mode("shard", 1, 100, 0.25, world_size=2) == ("shard", "dist.teacher=shard")


def test_deepspeed_launcher_local_rank_argument_is_dropped():
    assert _without_local_rank(["--local_rank=1", "-q", "run", "c.yaml"]) == ["-q", "run", "c.yaml"]
    assert _without_local_rank(["run", "c.yaml", "--local_rank", "0"]) == ["run", "c.yaml"]


def _global_bn_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = build_wide(load_config(None, ["model.blocks=[1,1,1]", "model.inner_widths=[2,4,4]",
                                        "model.stem_width=4"]).model)
    x = torch.randn(12, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (12,))
    reference = copy.deepcopy(net)
    nn.functional.cross_entropy(reference(x), y).backward()  # one process, the whole batch
    use_global_batchnorm(net, torch.device("cpu"))
    b = 12 // world
    nn.functional.cross_entropy(net(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b]) \
        .backward()
    worst_grad = 0.0
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        g = p.grad.clone()
        dist.all_reduce(g)  # what data parallelism does: the mean of the ranks' gradients
        worst_grad = max(worst_grad, ((g / world - q.grad).abs().max() / q.grad.abs().max()).item())
    worst_stat = max((a - b).abs().max().item()
                     for a, b in zip(net.buffers(), reference.buffers(), strict=True))
    if rank == 0:
        queue.put((worst_grad, worst_stat))
    dist.destroy_process_group()


def test_global_batch_norm_on_two_processes_matches_one_process_on_the_whole_batch():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_global_bn_worker, args=(3, port, queue), nprocs=3)
    worst_grad, worst_stat = queue.get(timeout=10)
    assert worst_grad < 1e-5  # relative to each parameter's largest gradient
    assert worst_stat < 1e-5  # running mean/var and counts


def test_global_batch_norm_is_plain_batch_norm_outside_a_process_group():
    bn = nn.BatchNorm2d(3)
    use_global_batchnorm(bn, torch.device("cpu"))
    assert type(bn) is GlobalBatchNorm2d
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
