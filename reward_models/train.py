"""Train a reward model on preference pairs (Bradley-Terry loss), from a YAML config.

One process (CPU or one GPU):
    accelerate launch --config_file accelerate_configs/cpu.yaml reward_models/train.py --config reward_models/configs/addition_rm.yaml
Many GPUs (DDP), FSDP or DeepSpeed: pick the matching file in accelerate_configs/, e.g.
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml reward_models/train.py --config reward_models/configs/X.yaml
Any config key can be overridden on the command line:
    ... reward_models/train.py --config reward_models/configs/addition_rm.yaml --learning_rate 1e-4 --output_dir outputs/rm2
All keys with their help: `llm-rl reward train --help`.

The same run without accelerate launch: `llm-rl reward train --config reward_models/configs/addition_rm.yaml`.
The output folder loads with `AutoModelForSequenceClassification.from_pretrained` and is what a
PPO config's `reward_model_name_or_path` takes.
"""

import sys

from llm_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", "train", *sys.argv[1:]]))
