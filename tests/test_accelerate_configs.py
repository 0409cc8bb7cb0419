"""The launch configs of ``examples/accelerate`` parse with accelerate's own launcher code, into what they claim.

``accelerate launch --config_file X`` reads X with ``load_config_from_file``, merges it into the command line
(``_validate_launch_command``) and turns it into the processes' environment (``prepare_multi_gpu_env``,
``prepare_deepspeed_cmd_env``); these tests run exactly those steps, which need neither GPUs nor DeepSpeed
installed. Runs of the sharded configs are device tests (``tests/gpu/test_sharded.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

EXAMPLES = Path(__file__).parents[1] / "examples" / "accelerate"
README = Path(__file__).parents[1] / "README.md"
CONFIGS = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def launch_env(name: str, *extra: str) -> tuple[object, dict[str, str]]:
    """(resolved launch arguments, the environment every process gets) of ``accelerate launch --config_file``."""
    argv = ["--config_file", str(EXAMPLES / name), *extra, "-m", "otalign.cli", "dpo"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:  # what launch_command sets before calling the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
        _, env = prepare_deepspeed_cmd_env(args)
        return args, env
    return args, prepare_multi_gpu_env(args)


def test_every_config_is_in_the_readme_with_its_command():
    assert set(CONFIGS) == {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "multi_node.yaml"}
    readme = README.read_text(encoding="utf-8")
    for name in CONFIGS:
        assert f"accelerate launch --config_file examples/accelerate/{name}" in readme, name


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_and_its_header_command_names_it(name):
    config = load_config_from_file(str(EXAMPLES / name))
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.num_processes >= 8
    assert f"accelerate launch --config_file examples/accelerate/{name}" in (EXAMPLES / name).read_text()


def test_ddp():
    args, env = launch_env("ddp.yaml")
    assert args.multi_gpu and not (args.use_fsdp or args.use_deepspeed)
    assert (args.num_processes, args.num_machines) == (8, 1)
    assert "ACCELERATE_USE_FSDP" not in env and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_shards_the_trained_model_and_loads_the_others_whole():
    assert load_config_from_file(str(EXAMPLES / "fsdp.yaml")).distributed_type == DistributedType.FSDP
    args, env = launch_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    # true would make transformers load every model (the unprepared reference too) empty on processes > 0
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", "2"), ("deepspeed_zero3.yaml", "3")])
def test_deepspeed(name, stage):
    args, env = launch_env(name)
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    # the trainers accumulate micro-batches themselves; DeepSpeed steps inside backward: keep it at 1
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"
    # false: the reference and reward models load whole, not partitioned by zero.Init
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    if stage == "3":
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


def test_multi_node_machine_rank_and_address_come_from_the_command_line():
    args, _ = launch_env("multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "192.168.1.7")
    assert (args.num_processes, args.num_machines) == (16, 2)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "192.168.1.7:29500"  # torchrun's rendezvous on the main machine
