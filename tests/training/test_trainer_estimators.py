"""Advantage estimators inside the trainer, token-level rewards, and skipped invalid rewards."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import addition_prompts, build_trainer, ppo_config, sample_rollout

from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.models.loading import load_tokenizer
from llm_rl.rewards.functions import compute_rewards
from llm_rl.rewards.model import RewardModel, prefix_scores

REWARDS = '''
import math

def sevens(prompts, completions, **_):
    return [c.count("7") / max(len(c), 1) for c in completions]

def per_token(prompts, completions, completion_ids, **_):
    # 1 for every generated '7' (token id 10), aligned to response positions
    return [[float(t == 10) for t in ids] for ids in completion_ids]

def nan_on_first(prompts, completions, **_):
    return [math.nan] + [1.0] * (len(completions) - 1)
'''


@pytest.fixture
def assets(tiny_model_dir, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    return tiny_model_dir, addition_prompts(tmp_path), tmp_path / "my_rewards.py"


def make_trainer(assets, tmp_path, **values):
    model_dir, data, reward_file = assets
    config = ppo_config(model_dir, data, tmp_path / "out", **{
        "batch_size": 4, "max_new_tokens": 4, "learning_rate": 1e-3, "max_updates": 2,
        "reward_funcs": [f"{reward_file}:sevens"], **values,
    })
    config.validate()
    return build_trainer(config)


def finite(history):
    return all(math.isfinite(v) for row in history for v in row.values())


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_train_without_a_value_head(assets, tmp_path, estimator):
    trainer = make_trainer(assets, tmp_path, advantage_estimator=estimator, num_generations=2,
                           kl_placement="loss", kl_estimator="k3")
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert policy.v_head is None
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    history = trainer.train()
    assert finite(history) and not any(k.startswith("value/") for k in history[-1])
    assert history[-1]["response/tokens"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert not (tmp_path / "out" / "value_head.safetensors").exists()


def test_groups_are_consecutive_rows_of_the_same_prompt(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, advantage_estimator="grpo", num_generations=3)
    trainer.fused = False  # the rollout takes the old log-probs itself
    rollout = sample_rollout(trainer, [0, 1])
    assert len(rollout) == 6
    assert rollout.prompts == [rollout.prompts[0]] * 3 + [rollout.prompts[3]] * 3
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[2])
    advantages = trainer.targets(rollout, trainer.scorer.score(rollout)).advantages
    # with the KL in the reward, each group's advantages sum to ~0 (mean-centred per group)
    per_row = (advantages * rollout.response_mask).sum(1) / rollout.response_mask.sum(1)
    sums = per_row.view(2, 3).sum(1)
    assert torch.allclose(sums, torch.zeros(2), atol=1e-4)


def test_grpo_needs_groups():
    with pytest.raises(ConfigError, match="num_generations"):
        Config.from_dict({"advantage_estimator": "grpo"}).validate()
    with pytest.raises(ConfigError, match="reward_model_name_or_path"):
        Config.from_dict({"advantage_estimator": "prefix_diff"}).validate()
    with pytest.raises(ConfigError, match="advantage_estimator"):
        Config.from_dict({"advantage_estimator": "ppo2"}).validate()


def test_token_level_rewards_reach_the_token_rewards(assets, tmp_path):
    _, _, reward_file = assets
    trainer = make_trainer(assets, tmp_path, reward_funcs=[f"{reward_file}:per_token"], kl_coef=0.0)
    trainer.fused = False  # the rollout takes the old log-probs itself
    rollout = sample_rollout(trainer, [0, 1, 2, 3])
    assert rollout.ref_logprobs is None  # kl_coef 0: nothing reads the reference, so it is not run
    targets = trainer.targets(rollout, trainer.scorer.score(rollout))
    expected = (rollout.response_ids == 10).float() * rollout.response_mask
    assert torch.equal(targets.token_rewards, expected)  # beta 0, no sequence score: only the per-token ones
    history = trainer.train()
    assert finite(history)


def test_token_level_reward_validation():
    ids = [[3, 10, 1], [10, 1]]

    def wrong_length(prompts, completions, completion_ids, **_):
        return [[0.0] * (len(c) + 1) for c in completion_ids]

    with pytest.raises(Exception, match="wrong_length.*row 0 has 4 token rewards for a response of 3 tokens"):
        compute_rewards([wrong_length], None, ["a", "b"], ["07", "7"], {}, completion_ids=ids)

    def good(prompts, completions, completion_ids, **_):
        return [[0.5] * len(c) for c in completion_ids]

    result = compute_rewards([good], [2.0], ["a", "b"], ["07", "7"], {}, completion_ids=ids)
    assert result.tokens.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert result.sequence.tolist() == [0.0, 0.0]
    assert result.means == {"good": pytest.approx(1.25)}  # per sequence: 1.5 and 1.0


def test_invalid_rewards_are_skipped_and_counted(assets, tmp_path):
    _, _, reward_file = assets
    trainer = make_trainer(assets, tmp_path, reward_funcs=[f"{reward_file}:nan_on_first"], skip_invalid_rewards=True)
    history = trainer.train()
    assert [row["reward/invalid"] for row in history] == [1.0, 1.0]
    assert [row["score/mean"] for row in history] == [1.0, 1.0]  # over the samples that were kept
    assert finite(history)
    trainer.fused = False  # the rollout takes the old log-probs itself
    rollout = sample_rollout(trainer, [0, 1, 2, 3])
    scores = trainer.scorer.score(rollout)
    assert scores.valid.tolist() == [False, True, True, True]
    loss_mask = trainer.targets(rollout, scores).loss_mask
    assert loss_mask[0].sum() == 0 and loss_mask[1:].sum() > 0


def test_invalid_reward_stops_by_default(assets, tmp_path):
    _, _, reward_file = assets
    trainer = make_trainer(assets, tmp_path, reward_funcs=[f"{reward_file}:nan_on_first"])
    with pytest.raises(Exception, match=r"nan_on_first.*non-finite values \(NaN/inf\) at rows \[0\]"):
        trainer.train()


@pytest.fixture
def shared_vocab_reward_model(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, GPT2ForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(3)
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_prefix_scores_equal_scoring_each_prefix_alone(shared_vocab_reward_model, tiny_model_dir):
    rm = RewardModel.from_pretrained(str(shared_vocab_reward_model))
    tok = load_tokenizer(str(tiny_model_dir))
    prompts, responses = ["12+34=", "5+6="], ["46", "11"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + tok(p).input_ids + tok(r).input_ids for p, r in zip(prompts, responses)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(r)) for p, r in zip(prompts, responses)])
    prompt_score, prefix = prefix_scores(rm, ids, mask, width)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        assert prompt_score[row].item() == pytest.approx(rm([p], [""])[0], abs=1e-5)
        for t in range(len(r)):
            assert prefix[row, t].item() == pytest.approx(rm([p], [r[: t + 1]])[0], abs=1e-5)


def test_prefix_diff_run(assets, tmp_path, shared_vocab_reward_model):
    trainer = make_trainer(assets, tmp_path, advantage_estimator="prefix_diff", reward_funcs=[],
                           reward_model_name_or_path=str(shared_vocab_reward_model), whiten_advantages=False,
                           kl_coef=0.0)
    trainer.fused = False  # the rollout takes the old log-probs itself
    rollout = sample_rollout(trainer, [0, 1, 2, 3])
    scores = trainer.scorer.score(rollout)
    advantages = trainer.targets(rollout, scores).advantages
    # the increments telescope: each row's advantages sum to its sequence score - Q_prompt (TD(0) with the
    # prefix scores as the critic and the score as the terminal reward)
    _, prompt_score = scores.prefix
    expected = scores.sequence - prompt_score
    assert torch.allclose((advantages * rollout.response_mask).sum(1), expected, atol=1e-5)
    assert finite(trainer.train())
