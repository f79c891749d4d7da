"""The shipped accelerate configs (configs/accelerate/) parse the way `accelerate launch` parses them."""
import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def launch_env(name: str) -> tuple[object, dict]:
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if name.startswith("deepspeed"):
        # what `accelerate launch` does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def test_ddp():
    args, env = launch_env("ddp")
    assert args.multi_gpu and args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env.get("ACCELERATE_USE_FSDP", "false") == "false"


@pytest.mark.parametrize("name, strategy", [("ddp", "ddp"), ("fsdp", "fsdp"), ("deepspeed_zero2", "deepspeed")])
def test_each_config_selects_onestep_s_own_strategy(name, strategy):
    """train.distributed=auto follows the launch config; the Accelerator is then built without accelerate's own
    FSDP / DeepSpeed plugin (which would shard a second time on GPUs and fall back to DDP on CPUs)."""
    from onestep import parallel

    _, env = launch_env(name)
    launched = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    with mock.patch.dict(os.environ, launched):
        assert parallel.requested_strategy("auto") == strategy
        assert parallel.requested_strategy("ddp") == "ddp"       # an explicit setting wins
        with parallel.accelerate_without_sharding():
            assert os.environ.get("ACCELERATE_USE_FSDP", "false") == "false"
            assert os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "false"
        assert os.environ.get("ACCELERATE_USE_FSDP", "false") == launched.get("ACCELERATE_USE_FSDP", "false")


def test_deepspeed_zero2():
    args, env = launch_env("deepspeed_zero2")
    assert args.use_deepspeed and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_configs_load_as_cluster_configs(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
                "deepspeed_zero2": DistributedType.DEEPSPEED}
    assert cfg.distributed_type == expected[name]
