"""The `llm-rl` command.

    llm-rl --version
    llm-rl demo [--seed 0] [--output_dir outputs/demo] [--max_updates N] [--warm_start_steps N] [--warm_start_accuracy A]
                [--overwrite] [--prepare_only] [--any_config_key value ...]
    llm-rl demo --task dialogue [--seed 0] [--output_dir outputs/demo_dialogue] [--max_updates N] [--overwrite]
    llm-rl ppo --config recipes/configs/X.yaml [--any_config_key value ...]
    llm-rl grpo --config recipes/configs/grpo_trl.yaml [--any_GRPOConfig_key value ...]   (TRL's names and defaults)
    llm-rl reward train --config reward_models/configs/X.yaml [--any_config_key value ...]
    llm-rl reward score (--model PATH_OR_ID | --reward module:function) --input FILE.jsonl --output OUT.jsonl

--config may stand anywhere. A mistake in the config, data, rewards, a checkpoint or a model path
prints one line and exits 2; --debug (or LLM_RL_DEBUG=1) shows the traceback instead.
They run under `accelerate launch` too (`accelerate launch -m llm_rl.cli ppo ...`, `... grpo ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from llm_rl.config.errors import ConfigError, UserError
from llm_rl.config.grpo import GRPOArguments
from llm_rl.config.grpo import format_help as grpo_help
from llm_rl.config.loading import split_config_arg
from llm_rl.config.sections import Config, format_help
from llm_rl.version import __version__


def ppo_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llm-rl ppo --config FILE.yaml [--key value ...]\n\nkeys:" + format_help())
        return 0
    config = Config.from_yaml(*split_config_arg(argv))  # before torch is imported: a config error is instant
    from llm_rl.training.pipeline import run_ppo

    with resume_hint_on_interrupt(config.train.output_dir):
        run_ppo(config)
    return 0


def grpo_main(argv: list[str]) -> int:
    """`llm-rl grpo`: a flat file of TRL GRPOConfig names (llm_rl.config.grpo), run by the same trainer as ppo."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llm-rl grpo --config FILE.yaml [--key value ...]\n\nTRL GRPOConfig's keys and defaults, and "
              "the script's:" + grpo_help())
        return 0
    config = GRPOArguments.from_yaml(*split_config_arg(argv)).to_config()  # before torch is imported
    from llm_rl.training.pipeline import run_ppo

    with resume_hint_on_interrupt(config.train.output_dir):
        run_ppo(config)
    return 0


def demo_main(argv: list[str]) -> int:
    from llm_rl.demos.options import DemoOptions, demo_config

    parser = argparse.ArgumentParser(
        prog="llm-rl demo",
        description="PPO teaches a tiny model addition (--task addition), or to chat far-sightedly over several "
                    "turns (--task dialogue); CPU, offline.",
    )
    parser.add_argument("--task", choices=("addition", "dialogue"), default="addition")
    if "dialogue" in argv:
        return dialogue_demo_main(parser, argv)
    defaults = DemoOptions()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output_dir", default=defaults.output_dir)
    parser.add_argument("--max_updates", type=int, default=None, help="PPO updates (default: the recipe's)")
    parser.add_argument("--warm_start_steps", type=int, default=defaults.warm_start_steps,
                        help="most supervised warm-start steps")
    parser.add_argument("--warm_start_accuracy", type=float, default=defaults.warm_start_accuracy,
                        help="stop the warm start at this greedy exact match on training problems")
    parser.add_argument("--overwrite", action="store_true", help="reuse an output_dir that holds a run")
    parser.add_argument("--prepare_only", action="store_true", help="only build the warm-started model and data")
    args, overrides = parser.parse_known_args(argv)
    options = DemoOptions(output_dir=args.output_dir, seed=args.seed, warm_start_steps=args.warm_start_steps,
                          warm_start_accuracy=args.warm_start_accuracy,
                          max_updates=args.max_updates, overwrite=args.overwrite, prepare_only=args.prepare_only)
    demo_config(options, overrides)  # a mistake in the overrides is reported before torch is imported
    from llm_rl.demos.addition import run_demo

    run_demo(options, overrides)
    return 0


def dialogue_demo_main(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from llm_rl.demos.options import DIALOGUE_CONFIG, DialogueOptions

    defaults = DialogueOptions()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output_dir", default=defaults.output_dir)
    parser.add_argument("--max_updates", type=int, default=None, help="PPO updates per gamma (default: the recipe's)")
    parser.add_argument("--warm_start_steps", type=int, default=defaults.warm_start_steps)
    parser.add_argument("--overwrite", action="store_true", help="reuse an output_dir that holds a run")
    parser.add_argument("--prepare_only", action="store_true", help="only build the warm-started model and rows")
    parser.add_argument("--num_heldout", type=int, default=defaults.num_heldout, help="held-out bug reports (<= 20)")
    args, overrides = parser.parse_known_args(argv)  # the rest: the recipe's keys, e.g. --rollout_engine vllm
    Config.from_yaml(DIALOGUE_CONFIG, overrides)  # a mistake in the overrides is reported before torch is imported
    from llm_rl.demos.dialogue import run_dialogue_demo

    run_dialogue_demo(DialogueOptions(output_dir=args.output_dir, seed=args.seed, max_updates=args.max_updates,
                                      warm_start_steps=args.warm_start_steps, overwrite=args.overwrite,
                                      prepare_only=args.prepare_only, num_heldout=args.num_heldout), overrides)
    return 0


def reward_main(argv: list[str]) -> int:
    """`llm-rl reward train --config FILE.yaml ...` or `llm-rl reward score --model PATH --input FILE.jsonl ...`."""
    if argv and argv[0] == "train":
        return reward_train_main(argv[1:])
    if argv and argv[0] == "score":
        from llm_rl.rewards.score_files import main as score_main  # torch is imported after its arguments parse

        return score_main(argv[1:])
    print("usage: llm-rl reward train --config FILE.yaml [--key value ...]\n"
          "       llm-rl reward score (--model PATH_OR_ID | --reward module:function) "
          "(--input FILE.jsonl | --dataset NAME) --output OUT.jsonl [...]\n"
          "add --help after train or score for their options")
    return 0 if argv and argv[0] in ("-h", "--help") else 2


def reward_train_main(argv: list[str]) -> int:
    """`llm-rl reward train`: help and the config read before torch is imported (both answer at once)."""
    from llm_rl.config.reward_training import RewardTrainingConfig
    from llm_rl.config.reward_training import format_help as reward_help

    if argv and argv[0] in ("-h", "--help"):
        print("usage: llm-rl reward train --config FILE.yaml [--key value ...]\n\nkeys:\n" + reward_help())
        return 0
    config = RewardTrainingConfig.from_yaml(*split_config_arg(argv))
    from llm_rl.training.reward_trainer import train_reward_model

    with resume_hint_on_interrupt(config.output_dir):
        train_reward_model(config)
    return 0


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where its last checkpoint is and how to resume."""


@contextlib.contextmanager
def resume_hint_on_interrupt(output_dir: str):
    """Turn Ctrl-C inside a run into `Interrupted` naming the latest checkpoint in `output_dir`."""
    try:
        yield
    except KeyboardInterrupt:
        from llm_rl.training.checkpoint import list_checkpoints

        found = list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
        if found:
            hint = (f"the last checkpoint is {found[-1]}; resume with the same command and "
                    "--resume_from_checkpoint latest")
        else:
            hint = f"no checkpoint in {output_dir} yet (save_steps sets how often one is written)"
        raise Interrupted(f"interrupted; {hint}") from None


COMMANDS = {"ppo": ppo_main, "grpo": grpo_main, "demo": demo_main, "reward": reward_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("LLM_RL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] == "--version":
        print(f"llm-rl {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UserError, OSError) as e:
        if debug:
            raise
        print(f"llm-rl: {one_line_error(e)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:  # Ctrl-C: one line (on the main process), no traceback
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"llm-rl: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 130


def one_line_error(error: Exception) -> str:
    """'<kind> error: message' on one line (a line per problem after the first when it lists several). OSError is how transformers, datasets and the Hub client
    report a model or dataset they cannot find or read: the user's path or id, not a bug here."""
    label = getattr(error, "label", "error")
    # one line per problem when the error lists several (a config with several bad keys)
    text = "\n  ".join(" ".join(line.split()) for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    hint = "" if isinstance(error, ConfigError) else " (--debug or LLM_RL_DEBUG=1 shows the traceback)"
    return f"{label}: {text}{hint}"


if __name__ == "__main__":
    sys.exit(main())
