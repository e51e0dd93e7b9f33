"""Entry point for reward-model training on preference pairs (Bradley-Terry loss):
`llm_rl.training.reward_trainer.train_reward_model` on a YAML config, launched like recipes/ppo.py:

    accelerate launch --config_file accelerate_configs/cpu.yaml reward_models/train.py --config reward_models/configs/addition_rm.yaml

The output folder loads with `AutoModelForSequenceClassification.from_pretrained` and is what a PPO
config's `reward_model_name_or_path` takes. Keys: `llm-rl reward train --help`; without the launcher:
`llm-rl reward train --config FILE [--key value ...]`.
"""

import sys

from llm_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", "train", *sys.argv[1:]]))
