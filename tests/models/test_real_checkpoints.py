"""What real checkpoints bring that the tiny GPT-2 did not: a reward model without a trained head,
half-precision weights, a tokenizer with BOS and a chat template, prompts cut to max_prompt_length.
Each test failed before the package handled that case."""

from __future__ import annotations

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

from llm_rl.config.errors import ConfigError
from llm_rl.config.reward_training import RewardTrainingConfig
from llm_rl.config.sections import Config
from llm_rl.data.prompts import PromptData
from llm_rl.models.loading import load_policy, load_tokenizer
from llm_rl.rewards.functions import RewardError
from llm_rl.rewards.model import RewardModel, sequence_scores
from llm_rl.training.ppo_trainer import PPOTrainer
from llm_rl.training.reward_trainer import tokenize_pairs

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}={% else %}"
    "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Character tokenizer that adds <bos> to plain text (like Llama's) and has a chat template writing it too."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3}
    for ch in "0123456789+=":
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", bos_token="<bos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def reward_model_dir(tmp_path):
    tokenizer = bos_tokenizer()
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2,
                                                     n_head=2, num_labels=1, pad_token_id=0))
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


# ---------------------------------------------------------------- a causal LM is not a reward model
def test_causal_lm_refused_as_reward_model(tiny_model_dir):
    with pytest.raises(RewardError, match=r"not a trained reward model.*score\.weight.*llm-rl reward train"):
        RewardModel.from_pretrained(str(tiny_model_dir))


def test_trained_reward_model_loads(reward_model_dir):
    reward = RewardModel.from_pretrained(str(reward_model_dir))
    assert len(reward(["1+2="], ["3"])) == 1


# ---------------------------------------------------------------- no AdamW on half-precision weights
def test_bf16_policy_weights_refused(tiny_model_dir, tmp_path):
    config = Config.from_dict(dict(model_name_or_path=str(tiny_model_dir), torch_dtype="bfloat16", batch_size=2,
                                   max_new_tokens=2, output_dir=str(tmp_path / "run"), progress_bar=False))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(config, tokenizer)
    prompts = PromptData(datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4="]}), tokenizer)
    with pytest.raises(ConfigError, match=r"bfloat16.*torch_dtype: float32.*mixed_precision bf16"):
        PPOTrainer(config, policy, tokenizer, prompts, [lambda prompts, completions, **_: [0.0] * len(prompts)])


def test_bf16_base_with_lora_trains_fp32_adapters(tiny_model_dir, tmp_path):
    config = Config.from_dict(dict(model_name_or_path=str(tiny_model_dir), torch_dtype="bfloat16", use_peft=True,
                                   batch_size=2, max_new_tokens=2, max_updates=1, output_dir=str(tmp_path / "run"),
                                   progress_bar=False))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(config, tokenizer)
    assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}
    prompts = PromptData(datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4="]}), tokenizer)
    trainer = PPOTrainer(config, policy, tokenizer, prompts, [lambda prompts, completions, **_: [0.0] * len(prompts)])
    assert len(trainer.train()) == 1


def test_bf16_adamw_loses_most_updates():
    """Why the refusal: one AdamW step at lr 1e-6 changes almost no bf16 weight, nearly every fp32 one."""
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        weight = torch.nn.Parameter((torch.randn(256, 256) * 0.02).to(dtype))
        before = weight.detach().clone()
        optimizer = torch.optim.AdamW([weight], lr=1e-6, weight_decay=0.0)
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        changed[dtype] = (weight.detach() != before).float().mean().item()
    assert changed[torch.float32] > 0.9 and changed[torch.bfloat16] < 0.2, changed


# ---------------------------------------------------------------- PPO scores as the reward model was trained
@pytest.mark.parametrize("chat", [True, False])
def test_reward_model_scores_ppo_samples_as_in_training(reward_model_dir, chat):
    """The same prompt and completion get the same token ids (one BOS) in reward training and in PPO."""
    tokenizer = load_tokenizer(str(reward_model_dir))  # the policy's tokenizer, here the same one
    if chat:
        prompt, chosen, rejected = [{"role": "user", "content": "12+3"}], [{"role": "assistant", "content": "15"}], \
            [{"role": "assistant", "content": "14"}]
    else:
        prompt, chosen, rejected = "12+3=", "15", "14"
    pairs = datasets.Dataset.from_dict({"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]})
    trained_on = tokenize_pairs(pairs, tokenizer, RewardTrainingConfig(max_length=32))[0].chosen_ids
    assert trained_on.count(3) == 1  # one BOS

    reward = RewardModel.from_pretrained(str(reward_model_dir))
    batch = PromptData(datasets.Dataset.from_dict({"prompt": [prompt]}), tokenizer).batch([0])
    ppo_score = reward(batch["prompts"], ["15"], prompt_messages=batch["prompt_messages"])[0]
    ids = torch.tensor([trained_on])
    expected = sequence_scores(reward.model, ids, torch.ones_like(ids)).item()
    assert ppo_score == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- rewards see the prompt the policy saw
def test_truncated_prompt_is_what_rewards_see(tiny_tokenizer):
    data = datasets.Dataset.from_dict({"prompt": ["123+45=", "1+2="], "answer": ["168", "3"]})
    prompts = PromptData(data, tiny_tokenizer, max_prompt_length=4, truncate=True)
    batch = prompts.batch([0, 1])
    assert batch["prompts"] == ["+45=", "1+2="]
    assert tiny_tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True) == ["+45=", "1+2="]
    assert batch["columns"] == {"answer": ["168", "3"]}


def test_reloaded_policy_matches_the_checkpoint(tiny_model_dir):
    """Load check for the policy itself: a folder without lm weights would start random, so it is refused."""
    from llm_rl.config.errors import ModelLoadError
    from llm_rl.models.value_head import CausalLMWithValueHead

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert CausalLMWithValueHead.from_pretrained(str(tiny_model_dir)).pretrained_model.state_dict().keys() == \
        lm.state_dict().keys()
    with pytest.raises(ModelLoadError, match="would start random"):
        CausalLMWithValueHead.from_pretrained(str(tiny_model_dir), config=GPT2Config(
            vocab_size=15, n_positions=32, n_embd=32, n_layer=3, n_head=2))


@pytest.mark.parametrize("family, message", [
    ("bert", "is a 'bert' model (BertForMaskedLM), an encoder (masked LM), not a causal LM"),
    ("bart", "is a 'bart' model (BartForConditionalGeneration), an encoder-decoder, not a causal LM"),
    ("t5", "is a 't5' model (T5ForConditionalGeneration), an encoder-decoder, not a causal LM"),
])
def test_a_checkpoint_that_is_not_a_causal_lm_is_refused_from_its_config(tmp_path, family, message):
    """AutoModelForCausalLM would load a BERT as a fresh BertLMHeadModel decoder: refused before any weights load
    (the folder holds only config.json)."""
    from transformers import BartConfig, BertConfig, T5Config

    from llm_rl.config.errors import ModelLoadError
    from llm_rl.models.value_head import CausalLMWithValueHead

    small = dict(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    config = {"bert": lambda: BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, architectures=["BertForMaskedLM"]),
              "bart": lambda: BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                                         architectures=["BartForConditionalGeneration"]),
              "t5": lambda: T5Config(**small, architectures=["T5ForConditionalGeneration"])}[family]()
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        CausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert message in str(e.value) and "decoder-only causal LM" in str(e.value)


def test_a_bert_trained_as_a_decoder_is_a_causal_lm(tmp_path):
    from transformers import BertConfig

    from llm_rl.models.value_head import check_causal_lm

    BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               is_decoder=True, architectures=["BertLMHeadModel"]).save_pretrained(tmp_path)
    check_causal_lm(str(tmp_path))  # is_decoder: what BertLMHeadModel was trained as
