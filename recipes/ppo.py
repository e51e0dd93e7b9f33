"""PPO on a causal LM from a YAML config.

One process (CPU or one GPU):
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/ppo.py --config recipes/configs/addition.yaml
Many GPUs (DDP), FSDP or DeepSpeed: pick the matching file in accelerate_configs/, e.g.
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/ppo.py --config recipes/configs/X.yaml
Any config key can be overridden on the command line:
    ... recipes/ppo.py --config recipes/configs/X.yaml --learning_rate 1e-5 --output_dir outputs/run2

The same run without accelerate launch: `llm-rl ppo --config recipes/configs/X.yaml`.
"""

import sys

from llm_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
