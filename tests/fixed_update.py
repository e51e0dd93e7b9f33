"""One PPO update (`PPOTrainer.optimize`) on a fixed rollout, for the invariance tests.

Imported by tests/training/test_update_invariance.py (one process) and run as an `accelerate launch` script
(two processes, each taking its half of the same rollout): the parameters after the update must not depend
on how the rollout is split into micro-batches or processes.

    python tests/fixed_update.py MODEL_DIR OUT_DIR CASES_JSON

CASES_JSON maps a case name to config overrides; rank 0 writes OUT_DIR/<name>.safetensors (parameters after
one update) and <name>.json (its logged stats), or for a name starting with "lr_" the lr of every update of a
short run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from llm_rl.algorithms.targets import Targets
from llm_rl.config.sections import Config
from llm_rl.data.prompts import load_prompts
from llm_rl.models.loading import load_policy, load_tokenizer
from llm_rl.sampling.rollout import Rollout, logprobs_and_values
from llm_rl.training.ppo_trainer import PPOTrainer

PROMPTS = ["1+2=", "17+5=", "123+45=", "7+77=", "30+3=", "999+1=", "4+56=", "78+9="]
RESPONSE_LENGTHS = [1, 12, 2, 9, 3, 12, 1, 6]  # very different lengths: micro-batches hold unequal token counts
ENDED = [True, False, True, True, True, False, True, True]


def make_trainer(model_dir: Path, out_dir: Path, num_processes: int = 1, accelerator=None, **overrides) -> PPOTrainer:
    """A trainer over the 8 prompts above, split over `num_processes`, with a constant reward."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    values = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(out_dir / "run"),
        overwrite_output_dir=True, batch_size=len(PROMPTS) // num_processes, max_new_tokens=12,
        learning_rate=1e-3, max_updates=1, progress_bar=False, seed=0, ppo_epochs=2,
        ent_coef=0.01, kl_placement="loss", kl_coef=0.1, kl_estimator="k2",
    )
    values.update(overrides)
    config = Config.from_dict(values)
    tokenizer = load_tokenizer(str(model_dir))
    return PPOTrainer(config, load_policy(config, tokenizer), tokenizer, load_prompts(config, tokenizer),
                      [lambda prompts, completions, **_: [0.0] * len(completions)], accelerator=accelerator)


@torch.no_grad()
def fixed_rollout(trainer: PPOTrainer, seed: int = 0) -> tuple[Rollout, Targets]:
    """The same 8-row rollout on every process: log-probs and values from the initial policy (ratio 1),
    random reference log-probs, advantages and returns from a seeded generator."""
    tokenizer, device = trainer.tokenizer, trainer.accelerator.device
    g = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(len(ids) for ids in encoded)
    prompt_ids = torch.full((len(PROMPTS), width), tokenizer.pad_token_id)
    prompt_mask = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        prompt_ids[row, width - len(ids):], prompt_mask[row, width - len(ids):] = torch.tensor(ids), 1
    resp_len = max(RESPONSE_LENGTHS)
    response_ids = torch.randint(3, 13, (len(PROMPTS), resp_len), generator=g)  # digits
    positions = torch.arange(resp_len)[None, :]
    lengths = torch.tensor(RESPONSE_LENGTHS)[:, None]
    response_mask = (positions < lengths).long()
    ended = torch.tensor(ENDED)
    response_ids[ended, lengths[ended, 0] - 1] = tokenizer.eos_token_id
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    rollout = Rollout(prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                      response_mask.to(device), ended.to(device))
    logprobs, values = logprobs_and_values(trainer.model, rollout, 1.0, len(PROMPTS))
    noise = torch.randn(logprobs.shape, generator=g).to(device)
    mask = rollout.response_mask
    rollout = dataclasses.replace(rollout, logprobs=logprobs, values=values, ref_logprobs=(logprobs + 0.3 * noise) * mask)
    advantages = torch.randn(mask.shape, generator=g).to(device) * mask
    returns = (values + torch.randn(mask.shape, generator=g).to(device)) * mask
    zeros = torch.zeros_like(advantages)
    return rollout, Targets(loss_mask=mask, kl=zeros, token_rewards=zeros, advantages=advantages, returns=returns)


def trainable_parameters(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().float().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def launched_accelerator(overrides: dict) -> Accelerator:
    """The Accelerator of this launch, built before the trainer because the rows per process depend on the
    process count. (A bare PartialState would not read ACCELERATE_USE_CPU: every process would run alone.)"""
    return Accelerator(gradient_accumulation_steps=overrides.get("gradient_accumulation_steps", 1))


def one_update(model_dir: Path, out_dir: Path, **overrides) -> tuple[dict, dict, dict]:
    """(initial parameters, parameters after one update, logged stats); this process takes its share of rows."""
    acc = launched_accelerator(overrides)
    trainer = make_trainer(model_dir, out_dir, acc.num_processes, accelerator=acc, **overrides)
    before = trainable_parameters(trainer)
    rollout, targets = fixed_rollout(trainer)
    share = len(rollout) // acc.num_processes
    rows = torch.arange(acc.process_index * share, (acc.process_index + 1) * share, device=acc.device)
    stats = trainer.optimize(rollout.select(rows), targets.select(rows))
    return before, trainable_parameters(trainer), stats


def logged_lrs(model_dir: Path, out_dir: Path, **overrides) -> list[float]:
    """The `lr` logged by every update of a short run (sampled rollouts, every process its share of prompts)."""
    acc = launched_accelerator(overrides)
    values = dict(max_new_tokens=4, kl_placement="reward", kl_estimator=None, ent_coef=0.0, ppo_epochs=1)
    trainer = make_trainer(model_dir, out_dir, acc.num_processes, accelerator=acc, **{**values, **overrides})
    return [row["lr"] for row in trainer.train()]


def relative_difference(a: dict, b: dict, reference: dict) -> float:
    """||a - b|| / ||a - reference|| over all parameters: how far two updates are apart, relative to the update."""
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in a)
    size = sum(float((a[k] - reference[k]).double().square().sum()) for k in a)
    return (diff / size) ** 0.5


def main() -> None:
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import save_file

    model_dir, out_dir, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    for name, overrides in cases.items():
        if name.startswith("lr_"):  # {"lr_linear": {...}}: the lr logged by every update
            report = logged_lrs(model_dir, out_dir / name, **overrides)
        else:
            _, after, report = one_update(model_dir, out_dir / name, **overrides)
            if AcceleratorState().is_main_process:
                save_file(after, str(out_dir / f"{name}.safetensors"))
        if AcceleratorState().is_main_process:
            (out_dir / f"{name}.json").write_text(json.dumps(report))
        AcceleratorState._reset_state()  # the next case builds its own Accelerator, in the same process group
        GradientState._reset_state()


if __name__ == "__main__":
    main()
