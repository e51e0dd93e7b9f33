"""Entry point for PPO fine-tuning of a causal LM: `llm_rl.training.pipeline.run_ppo` on a YAML config.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/ppo.py --config recipes/configs/addition.yaml

For DDP, FSDP or DeepSpeed give the matching accelerate_configs/*.yaml instead of cpu.yaml. Keys after
the config file override it (`--learning_rate 1e-5 --output_dir outputs/run2`); `llm-rl ppo --help`
lists them all, and `llm-rl ppo --config FILE` is the same run without the launcher.
"""

import sys

from llm_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
