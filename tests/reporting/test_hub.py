"""The Hub hand-off: what would be uploaded reloads with plain transformers, the card says what was
trained, and the Hub client gets the right arguments (no network: the client is replaced)."""

from __future__ import annotations

import pytest
import torch
from conftest import addition_prompts, ppo_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.training.pipeline import run_ppo


class FakeHfApi:
    calls: list = []

    def create_repo(self, **kwargs):
        FakeHfApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_uploads_a_loadable_folder_with_a_card(tiny_model_dir, tmp_path, fake_hub, hub_card):
    out = tmp_path / "out"
    config = ppo_config(tiny_model_dir, addition_prompts(tmp_path), out, **{
        "reward_funcs": ["llm_rl.tasks.arithmetic:reward"], "batch_size": 4, "max_new_tokens": 3,
        "max_updates": 1, "save_steps": 1,
        "push_to_hub": True, "hub_model_id": "someone/tiny-ppo", "hub_private_repo": True,
    })
    trainer, history = run_ppo(config)

    assert [name for name, _ in fake_hub.calls] == ["create_repo", "upload_folder"]
    create, upload = fake_hub.calls[0][1], fake_hub.calls[1][1]
    assert create == {"repo_id": "someone/tiny-ppo", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "someone/tiny-ppo" and upload["folder_path"] == str(out)
    assert "checkpoint-*" in upload["ignore_patterns"]  # resumable state stays local

    # the folder that would be uploaded: a plain causal LM, its tokenizer and generation config,
    # the value head, and a model card
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "value_head.safetensors", "README.md", "config.yaml"} <= names
    lm = AutoModelForCausalLM.from_pretrained(out)
    live = trainer.accelerator.unwrap_model(trainer.model).pretrained_model
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("12+3=").input_ids])
    torch.testing.assert_close(lm(ids).logits, live(ids).logits)

    card = hub_card(out / "README.md")
    assert card.data.library_name == "transformers"
    # a local base model and a local data file are not Hub ids: the Hub rejects them as metadata
    assert card.data.base_model is None and card.data.datasets is None
    assert "llm_rl" in card.data.tags and "gae" in card.data.tags
    assert "someone/tiny-ppo" in card.text and "llm_rl.tasks.arithmetic:reward" in card.text
    assert f"| `score/mean` | {history[-1]['score/mean']:.4g} |" in card.text
    assert "GAE" in card.text and "value_head.safetensors" in card.text
    assert "learning_rate" in card.text  # the config used


def test_push_to_hub_needs_a_repo_id():
    with pytest.raises(ConfigError, match="hub_model_id"):
        Config.from_dict({"push_to_hub": True}).validate()


def test_card_metadata_names_hub_ids_only(tmp_path, hub_card):
    from llm_rl.reporting.hub import model_card

    config = Config.from_dict({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset_name": "openai/gsm8k",
                               "output_dir": str(tmp_path / "run")})
    model_card(config, {}).save(tmp_path / "hub.md")
    card = hub_card(tmp_path / "hub.md")
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.datasets == ["openai/gsm8k"]

    local = Config.from_dict({"model_name_or_path": str(tmp_path), "dataset_name": "data/train.jsonl"})
    model_card(local, {}).save(tmp_path / "local.md")
    card = hub_card(tmp_path / "local.md")
    assert card.data.base_model is None and card.data.datasets is None
    assert str(tmp_path) in card.text  # the text still says where it came from


def test_critic_free_and_lora_cards_describe_what_was_trained_and_saved(tiny_model_dir, tmp_path, hub_card):
    out = tmp_path / "grpo"
    config = ppo_config(tiny_model_dir, addition_prompts(tmp_path), out, **{
        "reward_funcs": ["llm_rl.tasks.arithmetic:reward"], "batch_size": 2, "num_generations": 2,
        "advantage_estimator": "grpo", "max_new_tokens": 3, "max_updates": 1,
        "use_peft": True, "lora_r": 2, "lora_target_modules": ["c_attn"],
    })
    run_ppo(config)
    card = hub_card(out / "README.md")
    assert card.data.library_name == "peft" and "grpo" in card.data.tags
    description = card.text.split("## Training configuration")[0]  # the config dump lists every key
    assert "GAE" not in description and "value_head" not in description and "no value head" in description
    assert not (out / "value_head.safetensors").exists()
    assert "AutoPeftModelForCausalLM" in card.text
