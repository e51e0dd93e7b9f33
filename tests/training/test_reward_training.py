"""Reward-model training: the pairwise loss by hand, padding and pad tokens, config, data, save/load, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_jsonl, sequence_classifier, write_addition_pairs

from llm_rl.algorithms.losses import pairwise_loss
from llm_rl.config.errors import ConfigError
from llm_rl.config.reward_training import RewardTrainingConfig
from llm_rl.data.prompts import DataError
from llm_rl.models.loading import ensure_distinct_pad
from llm_rl.rewards.model import sequence_scores
from llm_rl.tasks import addition_preferences, arithmetic
from llm_rl.cli import reward_train_main as main
from llm_rl.training.reward_trainer import collate_pairs, load_reward_model, tokenize_pairs, train_reward_model


# ---------------------------------------------------------------- the loss, by hand
# -log sigmoid(x) = log(1 + e^-x): x = 1 -> 0.3132617, 0 -> 0.6931472, -2 -> 2.1269280
def test_pairwise_loss_and_stats_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.5, 1.0])  # gaps 1, 0 (a tie), -2
    loss, stats = pairwise_loss(chosen, rejected)
    assert float(loss) == pytest.approx((0.3132617 + 0.6931472 + 2.1269280) / 3, abs=1e-6)  # 1.0444456
    assert float(stats["accuracy"]) == pytest.approx(1 / 3)  # the tie counts as wrong
    assert float(stats["margin"]) == pytest.approx(-1 / 3)


def test_pairwise_loss_with_margins_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.5, 1.0])
    # one margin for all: gaps - 1 = 0, -1, -3 -> log 2, log(1 + e), log(1 + e^3)
    loss, stats = pairwise_loss(chosen, rejected, margin=1.0)
    assert float(loss) == pytest.approx((0.6931472 + 1.3132617 + 3.0485874) / 3, abs=1e-6)  # 1.6849987
    assert float(stats["accuracy"]) == pytest.approx(1 / 3)  # accuracy and margin stat ignore the margin term
    # one margin per pair: 1 - 0.5, 0 - 0, -2 - 1 -> log(1 + e^-0.5), log 2, log(1 + e^3)
    loss, _ = pairwise_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0, 1.0]))
    assert float(loss) == pytest.approx((0.4740770 + 0.6931472 + 3.0485874) / 3, abs=1e-6)  # 1.4052705


def test_pairwise_loss_centering_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.5, 1.0])
    # r_c + r_r = 3, 1, 0 -> mean square 10 / 3; times 0.1 added to the Bradley-Terry term
    loss, _ = pairwise_loss(chosen, rejected, center_coef=0.1)
    assert float(loss) == pytest.approx(1.0444456 + 0.1 * 10 / 3, abs=1e-6)


def test_pairwise_loss_gradient_and_stability():
    chosen = torch.tensor([0.0, 1000.0, -1000.0], requires_grad=True)
    rejected = torch.zeros(3, requires_grad=True)
    loss, stats = pairwise_loss(chosen, rejected)
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx((math.log(2) + 0 + 1000) / 3)
    loss.backward()
    # d/dr_c of -log sigmoid(r_c - r_r) = -(1 - sigmoid(gap)) / batch: -0.5/3 at a tie, 0 and -1/3 at the extremes
    assert chosen.grad.tolist() == pytest.approx([-0.5 / 3, 0.0, -1 / 3])
    assert rejected.grad.tolist() == pytest.approx([0.5 / 3, 0.0, 1 / 3])
    with pytest.raises(ValueError, match="must both be"):
        pairwise_loss(torch.zeros(2, 1), torch.zeros(2, 1))


# ---------------------------------------------------------------- padding and pad tokens
@pytest.fixture
def tiny_classifier(tiny_model_dir):
    from transformers import AutoTokenizer

    model = sequence_classifier(tiny_model_dir)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far from 0, so differences show
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


TEXTS = ["12+34=46", "1+2=3<eos>", "99+99=198", "7+0=7"]


def scores_of(model, ids: list[list[int]], padding_side: str, pad_id: int) -> torch.Tensor:
    pairs = [type("P", (), {"chosen_ids": i, "rejected_ids": i, "margin": 0.0}) for i in ids]
    batch = collate_pairs(pairs, pad_id, padding_side)
    with torch.no_grad():
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])[: len(ids)]


def test_left_and_right_padding_give_the_same_scores(tiny_classifier):
    model, tokenizer = tiny_classifier
    ids = [tokenizer(t).input_ids for t in TEXTS]
    alone = torch.cat([scores_of(model, [i], "right", tokenizer.pad_token_id) for i in ids])
    right = scores_of(model, ids, "right", tokenizer.pad_token_id)
    left = scores_of(model, ids, "left", tokenizer.pad_token_id)
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert alone.std() > 0.01  # a real test: the texts do score differently
    # transformers' own pooling (what a plain user and llm_rl.rewards.model.RewardModel run) agrees on right padding
    batch = tokenizer(TEXTS, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits[:, 0], alone, atol=1e-5)


def test_pad_equal_to_eos_still_scores_the_final_eos(tiny_classifier):
    model, tokenizer = tiny_classifier
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t).input_ids for t in TEXTS]
    assert ids[1][-1] == eos
    alone = torch.cat([scores_of(model, [i], "right", eos) for i in ids])
    for side in ("right", "left"):  # padding with EOS ids: the mask, not the ids, says where the text ends
        assert torch.allclose(scores_of(model, ids, side, eos), alone, atol=1e-5)


def save_tokenizer_without_pad(tiny_model_dir, tmp_path, unk_is_eos: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    if unk_is_eos:  # like GPT-2: one <|endoftext|> for bos, eos and unk, and no pad
        tokenizer.unk_token = tokenizer.eos_token
    folder = tmp_path / "no_pad"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tokenizer_without_pad_gets_a_distinct_one(tiny_model_dir, tmp_path):
    folder = save_tokenizer_without_pad(tiny_model_dir, tmp_path, unk_is_eos=True)
    model, tokenizer, resized = load_reward_model(RewardTrainingConfig(model_name_or_path=str(folder)))
    assert resized and tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 16
    model.eval()
    ids = [tokenizer(t).input_ids for t in TEXTS]
    alone = torch.cat([scores_of(model, [i], "right", tokenizer.pad_token_id) for i in ids])
    assert torch.allclose(scores_of(model, ids, "left", tokenizer.pad_token_id), alone, atol=1e-5)
    batch = tokenizer(TEXTS, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():  # the distinct pad lets transformers' pooling find the EOS that ends TEXTS[1]
        assert torch.allclose(model(**batch).logits[:, 0], alone, atol=1e-5)


def test_unk_serves_as_pad_when_it_is_not_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tokenizer_without_pad(tiny_model_dir, tmp_path, unk_is_eos=False))
    assert not ensure_distinct_pad(tokenizer) and tokenizer.pad_token == "<unk>"


# ---------------------------------------------------------------- config
def test_config_from_yaml_with_overrides_and_clear_errors(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl", "batch_size": 8,
                                    "lora_target_modules": ["c_attn"]}))
    config = RewardTrainingConfig.from_yaml(path, ["--learning_rate", "3e-4", "--margin_column=gap", "--use_peft"])
    assert (config.batch_size, config.learning_rate, config.margin_column, config.use_peft) == (8, 3e-4, "gap", True)
    assert config.lora_target_modules == ["c_attn"]
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*Did you mean: learning_rate"):
        RewardTrainingConfig.from_yaml(path, ["--learning_rat", "1"])
    with pytest.raises(ConfigError, match="'batch_size' expects int"):
        RewardTrainingConfig.from_yaml(path, ["--batch_size", "many"])
    with pytest.raises(ConfigError, match="eval_split or eval_fraction, not both"):
        RewardTrainingConfig.from_yaml(path, ["--eval_split", "test", "--eval_fraction", "0.1"])
    with pytest.raises(ConfigError, match="model_name_or_path is not set"):
        RewardTrainingConfig.from_yaml(None, ["--dataset_name", "x"])


def test_every_field_has_help_text():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(RewardTrainingConfig))


# ---------------------------------------------------------------- data formats
def tokenized_texts(rows: list[dict], tokenizer, **options) -> list[tuple[str, str]]:
    import datasets

    config = RewardTrainingConfig(model_name_or_path="m", dataset_name="d", **options)
    pairs = tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer, config)
    return [(tokenizer.decode(p.chosen_ids), tokenizer.decode(p.rejected_ids)) for p in pairs]


def test_full_texts_prompt_columns_and_chat_messages(tiny_tokenizer):
    assert tokenized_texts([{"chosen": "1+1=2", "rejected": "1+1=3"}], tiny_tokenizer) == [("1+1=2", "1+1=3")]
    assert tokenized_texts([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}], tiny_tokenizer) == [("1+1=2", "1+1=3")]
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "3"}]}]
    assert tokenized_texts(rows, tiny_tokenizer) == [("1+1=2<eos>", "1+1=3<eos>")]


def test_long_texts_keep_their_end(tiny_tokenizer):
    with pytest.warns(UserWarning, match="lost their start"):
        texts = tokenized_texts([{"chosen": "123+456=579", "rejected": "1+1=3"}], tiny_tokenizer, max_length=4)
    assert texts == [("=579", "1=3")] or texts == [("=579", "+1=3")]


def test_missing_columns_are_listed(tiny_tokenizer):
    with pytest.raises(DataError, match=r"no column 'rejected' \(columns: \['prompt', 'chosen', 'worse'\]\)"):
        tokenized_texts([{"prompt": "1+1=", "chosen": "2", "worse": "3"}], tiny_tokenizer)
    with pytest.raises(DataError, match=r"no column 'question'"):
        tokenized_texts([{"chosen": "2", "rejected": "3"}], tiny_tokenizer, prompt_column="question")
    with pytest.raises(DataError, match="row 0: 'chosen' .* must be strings, or lists of chat messages"):
        tokenized_texts([{"chosen": 2, "rejected": "3"}], tiny_tokenizer)


# ---------------------------------------------------------------- built-in addition pairs
def test_each_kind_of_mistake():
    import random

    rng = random.Random(0)
    for _ in range(20):
        assert addition_preferences.wrong_answer(arithmetic.Problem(58, 67), "carry_error", rng) in (
            "115", "25", "135", "225", "1125")
        assert addition_preferences.wrong_answer(arithmetic.Problem(12, 34), "off_by_one", rng) in ("45", "47")
        assert 0 <= int(addition_preferences.wrong_answer(arithmetic.Problem(12, 34), "random", rng)) <= 93
    assert addition_preferences.wrong_answer(arithmetic.Problem(12, 34), "digit_swap", rng) == "64"
    assert addition_preferences.wrong_answer(arithmetic.Problem(1, 10), "digit_swap", rng) is None  # 11


def test_wrong_answers_are_not_simply_smaller_or_larger():
    # otherwise "prefer the larger number" would pass for addition, and PPO would inflate answers
    pairs = addition_preferences.load_splits()["train"]
    for kind in addition_preferences.MISTAKES:
        rows = [(c, r) for c, r, k in zip(pairs["chosen"], pairs["rejected"], pairs["mistake"]) if k == kind]
        assert 0.45 < sum(int(r) > int(c) for c, r in rows) / len(rows) < 0.55


def test_addition_pairs_are_correct_and_split_like_the_demo():
    splits = addition_preferences.load_splits()
    train, heldout = arithmetic.make_splits(2, 10**4 - 500, 500, seed=0)  # what `llm-rl demo` uses
    assert set(splits["train"]["prompt"]) == {p.prompt for p in train}
    assert set(splits["test"]["prompt"]) == {p.prompt for p in heldout}
    for row in splits["test"]:
        a, b = map(int, row["prompt"][:-1].split("+"))
        assert row["chosen"] == str(a + b) and row["rejected"] != row["chosen"] and row["rejected"].isdigit()
    mistakes = splits["test"]["mistake"]
    assert all(mistakes.count(kind) > 80 for kind in addition_preferences.MISTAKES)


# ---------------------------------------------------------------- training, saving, loading
@pytest.fixture
def rm_yaml(tmp_path, tiny_model_dir) -> Path:
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(write_addition_pairs(tmp_path / "pairs.jsonl", 60)),
        "eval_fraction": 0.25, "batch_size": 8, "learning_rate": 1e-3, "max_steps": 3, "eval_steps": 2,
        "logging_steps": 1, "max_length": 16, "progress_bar": False, "output_dir": str(tmp_path / "rm"),
    }))
    return path


def test_train_saves_a_model_transformers_loads(rm_yaml, tmp_path, capsys, hub_card):
    from transformers import AutoModelForSequenceClassification

    from llm_rl.rewards.model import RewardModel

    assert main(["--config", str(rm_yaml)]) == 0
    out = tmp_path / "rm"
    assert {"model.safetensors", "config.json", "tokenizer.json", "reward_config.yaml", "metrics.jsonl",
            "eval_results.json", "README.md"} <= {p.name for p in out.iterdir()}
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "eval/accuracy" in metrics[1] and "eval/accuracy" in metrics[2] and "eval/accuracy" not in metrics[0]
    assert metrics[2]["eval/pairs"] == 15  # 25% of 60, every held-out pair counted once
    assert yaml.safe_load((out / "reward_config.yaml").read_text())["max_steps"] == 3
    card = hub_card(out / "README.md")
    assert card.data.base_model is None and card.data.datasets is None  # local paths are not Hub ids
    assert "reward-model" in card.data.tags and "| `eval/accuracy` |" in card.text
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    prompts, completions = ["1+2=", "35+47=", "9+9="], ["3", "82", "81"]
    ours = RewardModel.from_pretrained(str(out))(prompts, completions)
    ppo_path = RewardModel.from_pretrained(str(out))(prompts, completions)  # what reward_model_name_or_path runs
    assert ours == pytest.approx(ppo_path, abs=1e-5)
    with pytest.raises(ConfigError, match="already holds a run"):
        main(["--config", str(rm_yaml)])


def test_lora_adapter_or_merged_model(rm_yaml, tmp_path, hub_card):
    from transformers import AutoModelForSequenceClassification

    from llm_rl.rewards.model import RewardModel

    base = ["--max_steps", "2", "--use_peft", "--lora_r", "4", "--learning_rate", "1e-2", "--eval_fraction", "0"]
    train_reward_model(RewardTrainingConfig.from_yaml(rm_yaml, base + ["--output_dir", str(tmp_path / "adapter")]))
    train_reward_model(RewardTrainingConfig.from_yaml(rm_yaml, base + ["--output_dir", str(tmp_path / "merged"),
                                                                       "--merge_adapter"]))
    assert hub_card(tmp_path / "adapter" / "README.md").data.library_name == "peft"
    assert hub_card(tmp_path / "merged" / "README.md").data.library_name == "transformers"
    adapter_files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter_files and "model.safetensors" not in adapter_files
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    prompts, completions = ["1+2=", "35+47="], ["3", "81"]
    from_adapter = RewardModel.from_pretrained(str(tmp_path / "adapter"))(prompts, completions)
    from_merged = RewardModel.from_pretrained(str(tmp_path / "merged"))(prompts, completions)
    assert from_adapter == pytest.approx(from_merged, abs=1e-4)  # same seed, same data: the same training


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(rm_yaml, tmp_path, local_hub):
    """huggingface_hub's client against a local stand-in for the Hub (tests/local_hub.py)."""
    config = RewardTrainingConfig.from_yaml(rm_yaml, ["--max_steps", "1", "--push_to_hub", "--hub_model_id",
                                                      "me/addition-rm", "--hub_private_repo"])
    train_reward_model(config)
    assert [(c["organization"], c["name"], c["visibility"]) for c in local_hub.created] == [
        ("me", "addition-rm", "private")] * 2  # checked before the model loaded, and at the upload
    uploaded = local_hub.uploaded["me/addition-rm"]
    assert {"model.safetensors", "README.md", "reward_config.yaml"} <= set(uploaded)
    assert local_hub.contents["model.safetensors"] == (tmp_path / "rm" / "model.safetensors").read_bytes()
    assert "me/addition-rm" in (tmp_path / "rm" / "README.md").read_text()
    with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
        RewardTrainingConfig.from_yaml(rm_yaml, ["--push_to_hub"])


# ---------------------------------------------------------------- it learns
@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster, and much faster on a busy machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reward_model_beats_chance_on_held_out_addition_pairs(tmp_path, one_thread):
    """A 2-layer GPT-2 trained briefly (200 steps) on the built-in pairs ranks held-out pairs above chance.

    Held-out problems are never trained on. Chance gives 0.5 +- 0.022 on these 500 pairs, so 0.62 is
    over five standard deviations above it.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = arithmetic.build_tokenizer()
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    lm.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = RewardTrainingConfig(
        model_name_or_path=str(tmp_path / "base"), dataset_name="llm_rl.tasks.addition_preferences:load_splits",
        eval_split="test", batch_size=64, learning_rate=2e-3, warmup_steps=20, max_steps=200, eval_steps=0,
        logging_steps=50, max_length=16, seed=0, progress_bar=False, output_dir=str(tmp_path / "rm"),
    )
    metrics = train_reward_model(config)
    assert metrics["eval/pairs"] == 500
    # measured 0.69 (1 or 2 threads); carry errors and digit swaps are learnt first, off-by-one
    # answers need the units digit computed and stay near chance this early
    assert metrics["eval/accuracy"] > 0.62
    assert metrics["eval/margin"] > 0.5 and metrics["train/loss"] < 0.6
