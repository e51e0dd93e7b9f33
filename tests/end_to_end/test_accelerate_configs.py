"""accelerate_configs/*.yaml: valid accelerate 1.x files that `accelerate launch` resolves as documented.

No GPU is needed: the files are parsed with accelerate's own config classes and the
launcher's argument handling turns them into the environment a launched script sees.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from conftest import REPO, free_port

CONFIG_DIR = REPO / "accelerate_configs"

EXPECTED = {
    # name: (distributed_type, num_machines, num_processes, mixed_precision)
    "cpu": (DistributedType.MULTI_GPU, 1, 1, "no"),  # the type for which the launcher starts N processes
    "single_gpu": (DistributedType.NO, 1, 1, "bf16"),
    "multi_gpu": (DistributedType.MULTI_GPU, 1, 8, "bf16"),
    "fsdp": (DistributedType.FSDP, 1, 8, "bf16"),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 1, 8, "bf16"),
    "deepspeed_zero3": (DistributedType.DEEPSPEED, 1, 8, "bf16"),
    "multi_node": (DistributedType.MULTI_GPU, 2, 16, "bf16"),
}
NAMES = sorted(EXPECTED)


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def header(path: Path) -> list[str]:
    """The comment block the file opens with, without the '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def launch_commands(path: Path) -> list[list[str]]:
    commands = []
    for line in header(path):
        if "accelerate launch" in line:
            tokens = shlex.split(line)
            commands.append(tokens[tokens.index("launch") - 1 :])
    return commands


def test_every_documented_config_is_there():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} >= set(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_parses_with_accelerate_config_classes(name):
    path = config_path(name)
    config = ClusterConfig.from_yaml_file(str(path))  # raises on keys accelerate does not know
    assert isinstance(load_config_from_file(str(path)), ClusterConfig)
    distributed_type, num_machines, num_processes, mixed_precision = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_machines == num_machines
    assert config.num_processes == num_processes
    assert config.mixed_precision == mixed_precision
    assert config.use_cpu is (name == "cpu")
    assert config.dynamo_config == {}  # no torch.compile surprise


@pytest.mark.parametrize("name", NAMES)
def test_nested_keys_are_launch_options(name):
    """Keys inside fsdp_config / deepspeed_config are silently ignored by the parser if misspelled:
    each must be an option of `accelerate launch` (fsdp_config keys with their fsdp_ prefix)."""
    raw = yaml.safe_load(config_path(name).read_text())
    options = set(vars(launch_command_parser().parse_args(["script.py"])))
    for section in ("fsdp_config", "deepspeed_config", "dynamo_config"):
        for key in raw.get(section) or {}:
            assert key in options, f"{name}.yaml: {section}.{key} is not an accelerate launch option"


@pytest.mark.parametrize("name", NAMES)
def test_header_comment_gives_a_launch_command_with_existing_paths(name):
    path = config_path(name)
    lines = header(path)
    assert len(lines) >= 3, f"{path.name} must open with a comment: what it is for and how to launch it"
    commands = launch_commands(path)
    assert commands, f"{path.name}: no `accelerate launch` command in the opening comment"
    own = f"accelerate_configs/{path.name}"
    with_file = [c for c in commands if "--config_file" in c]
    assert with_file, f"{path.name}: no launch command uses --config_file"
    for command in with_file:
        assert command[command.index("--config_file") + 1] == own
    for command in commands:
        for token in command:
            if re.fullmatch(r"[\w./-]+\.(ya?ml|py)", token):
                assert (REPO / token).is_file(), f"{path.name}: the launch command names {token}, which does not exist"
        assert "recipes/ppo.py" in command


def resolve_launch(argv: list[str], any_port: bool = True):
    """What `accelerate launch` makes of a command line: its args and the environment of the launched script.

    Mirrors accelerate.commands.launch.launch_command up to the point where it would start processes.
    `any_port`: use a free port, as the launcher checks that the main process's port is not in use.
    """
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    if any_port:
        argv = ["--main_process_port", str(free_port()), *argv]
    args = launch_command_parser().parse_args(argv)
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


@pytest.mark.parametrize("name", NAMES)
def test_launcher_resolves_the_file(name):
    command = launch_commands(config_path(name))[0]
    args, env = resolve_launch(command[2:])  # drop "accelerate launch"
    _, num_machines, num_processes, mixed_precision = EXPECTED[name]
    assert args.num_processes == num_processes and args.num_machines == num_machines
    assert env["ACCELERATE_MIXED_PRECISION"] == mixed_precision
    assert args.training_script == "recipes/ppo.py"
    assert args.training_script_args[:1] == ["--config"]
    assert args.use_fsdp is (name == "fsdp")
    assert args.use_deepspeed is name.startswith("deepspeed")
    assert args.multi_gpu is (name in ("multi_gpu", "multi_node", "cpu"))
    if name == "cpu":
        # the launcher sets CUDA_VISIBLE_DEVICES to gpu_ids (where torch is built with CUDA): no GPU visible
        assert args.gpu_ids == "-1,-1" and env.get("CUDA_VISIBLE_DEVICES", "-1,-1") == "-1,-1"


def test_fsdp_settings():
    _, env = resolve_launch(["--config_file", str(config_path("fsdp")), "recipes/ppo.py"])
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "1"  # the trainer gathers FSDP1 (FullyShardedDataParallel) for generation
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # accelerator.get_state_dict gathers full weights
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # the optimizer is built before accelerator.prepare
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # the reference is a copy of the loaded policy


def test_fsdp_wrap_class_exists_in_the_policy():
    """The block class named for auto wrap is found inside CausalLMWithValueHead(GPT-2) (addition.yaml's model)."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    from llm_rl.models.value_head import CausalLMWithValueHead
    from llm_rl.tasks import arithmetic

    raw = yaml.safe_load(config_path("fsdp").read_text())
    tokenizer = arithmetic.build_tokenizer()
    policy = CausalLMWithValueHead(arithmetic.build_model(tokenizer, n_layer=1, n_embd=16, n_head=2))
    for class_name in raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert get_module_class_from_name(policy, class_name.strip()) is not None, class_name


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_settings(stage):
    _, env = resolve_launch(["--config_file", str(config_path(f"deepspeed_zero{stage}")), "recipes/ppo.py"])
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    assert float(env["ACCELERATE_GRADIENT_CLIPPING"]) == 1.0  # max_grad_norm's default
    if stage == 3:
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"  # get_state_dict needs it


def test_multi_node_settings():
    config = ClusterConfig.from_yaml_file(str(config_path("multi_node")))
    assert config.main_process_ip and config.main_process_port
    assert config.machine_rank == 0 and config.same_network
    commands = launch_commands(config_path("multi_node"))
    ranks = sorted(int(c[c.index("--machine_rank") + 1]) for c in commands if "--machine_rank" in c)
    assert ranks == [0, 1], "the comment shows the command of each machine"
    # --machine_rank on the command line beats the file's value; torchrun gets 8 processes per node
    args, _ = resolve_launch(["--config_file", str(config_path("multi_node")), "--machine_rank", "1",
                              "recipes/ppo.py"], any_port=False)
    assert args.machine_rank == 1 and args.node_rank == 1
    assert args.nnodes == "2" and args.nproc_per_node == "8"
    # torchrun meets the main node at main_process_ip:main_process_port (static rendezvous)
    endpoint = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
    assert endpoint == f"{config.main_process_ip}:{config.main_process_port}"


def test_cpu_file_honours_num_processes(tmp_path, tiny_model_dir):
    """`--num_processes 2` with cpu.yaml starts two processes that train together (it used to start one);
    the startup summary, printed by the main process only, says so once. One tiny update."""
    import subprocess
    import sys

    from conftest import explain, offline_env, write_jsonl, write_sevens_reward

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{a}="} for a in range(8)])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("cpu")),
        "--num_processes", "2", "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        "-m", "llm_rl.cli", "ppo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(prompts),
        "--reward_funcs", write_sevens_reward(tmp_path), "--batch_size", "2", "--max_new_tokens", "2",
        "--max_updates", "1", "--output_dir", str(tmp_path / "out"), "--no_progress_bar",
    ]
    proc = subprocess.run(command, cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.count("[llm_rl] ppo:") == 1, explain(proc)
    assert "[llm_rl] ppo: 2 processes (MULTI_CPU), device cpu" in proc.stdout, explain(proc)
