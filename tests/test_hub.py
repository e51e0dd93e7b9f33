"""The Hub hand-off: what would be uploaded reloads with plain transformers, the card says what was
trained, and the Hub client gets the right arguments (no network: the client is replaced)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_rl.config import Config, ConfigError
from llm_rl.pipeline import run_ppo
from llm_rl.tasks import arithmetic


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


def test_push_to_hub_uploads_a_loadable_folder_with_a_card(tiny_model_dir, tmp_path, fake_hub):
    train, _ = arithmetic.make_splits(1, 16, 2, seed=0)
    data = arithmetic.write_jsonl(train, tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    config = Config.from_dict({
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(data), "output_dir": str(out),
        "reward_funcs": ["llm_rl.tasks.arithmetic:reward"], "batch_size": 4, "max_new_tokens": 3,
        "max_updates": 1, "save_steps": 1, "progress_bar": False,
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

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["base_model"] == str(tiny_model_dir)
    assert "llm_rl" in front["tags"] and "datasets" not in front  # a local file is not a Hub dataset
    assert "someone/tiny-ppo" in card and "llm_rl.tasks.arithmetic:reward" in card
    assert f"| `score/mean` | {history[-1]['score/mean']:.4g} |" in card
    assert "learning_rate" in card  # the config used


def test_push_to_hub_needs_a_repo_id():
    with pytest.raises(ConfigError, match="hub_model_id"):
        Config.from_dict({"push_to_hub": True}).validate()
