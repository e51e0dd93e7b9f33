"""The Hub hand-off: what is uploaded reloads with plain transformers, the card says what was trained, a push
that cannot happen is refused before any model loads, and a failed upload after training keeps the folder
and names the command that uploads it. huggingface_hub's real client talks to a local stand-in for the Hub
(tests/local_hub.py); nothing reaches the network."""

from __future__ import annotations

import shlex
import subprocess
import time

import pytest
import torch
from conftest import addition_prompts, free_port, ppo_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.reporting.hub import HubError, check_push_access
from llm_rl.training.pipeline import run_ppo


def tiny_push_config(tiny_model_dir, tmp_path, out, **values):
    return ppo_config(tiny_model_dir, addition_prompts(tmp_path), out, **{
        "reward_funcs": ["llm_rl.tasks.arithmetic:reward"], "batch_size": 4, "max_new_tokens": 3,
        "max_updates": 1, "save_steps": 1, "push_to_hub": True, "hub_model_id": "me/tiny-ppo", **values,
    })


def test_push_to_hub_uploads_a_loadable_folder_with_a_card(tiny_model_dir, tmp_path, local_hub, hub_card):
    out = tmp_path / "out"
    trainer, history = run_ppo(tiny_push_config(tiny_model_dir, tmp_path, out, hub_private_repo=True))

    assert local_hub.created == [{"name": "tiny-ppo", "organization": "me", "visibility": "private",
                                  "type": "model"}] * 2  # before training (the check) and at the upload
    uploaded = set(local_hub.uploaded["me/tiny-ppo"])
    assert not [name for name in uploaded if name.startswith("checkpoint-")]  # resumable state stays local
    assert (out / "checkpoint-1").is_dir()
    # the folder uploaded: a plain causal LM, its tokenizer and generation config, the value head, a card
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "value_head.safetensors", "README.md", "config.yaml"} <= uploaded
    assert local_hub.contents["model.safetensors"] == (out / "model.safetensors").read_bytes()
    lm = AutoModelForCausalLM.from_pretrained(out)
    live = trainer.accelerator.unwrap_model(trainer.model).pretrained_model
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("12+3=").input_ids])
    torch.testing.assert_close(lm(ids).logits, live(ids).logits)

    card = hub_card(out / "README.md")
    assert card.data.library_name == "transformers"
    # a local base model and a local data file are not Hub ids: the Hub rejects them as metadata
    assert card.data.base_model is None and card.data.datasets is None
    assert "llm_rl" in card.data.tags and "gae" in card.data.tags
    assert "me/tiny-ppo" in card.text and "llm_rl.tasks.arithmetic:reward" in card.text
    assert f"| `score/mean` | {history[-1]['score/mean']:.4g} |" in card.text
    assert "GAE" in card.text and "value_head.safetensors" in card.text
    assert "learning_rate" in card.text  # the config used


# ---------------------------------------------------------------- a push that cannot happen: before any model loads
READ_ONLY = {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "read"}}}


@pytest.mark.parametrize("case, message", [
    ("offline", "push_to_hub to 'me/x': HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or set "
                "push_to_hub: false and upload the output folder later with `hf upload`"),
    ("no token", "push_to_hub to 'me/x': no Hugging Face token found; set HF_TOKEN or run `hf auth login` with a "
                 "write token, or set push_to_hub: false"),
    ("invalid token", "push_to_hub to 'me/x': the token could not be checked at {url}: HTTP 401: Invalid user "
                      "token. The token from HF_TOKEN environment variable is invalid."),
    ("read-only token", "push_to_hub to 'me/x': the token of 'me' is read-only; use a token with write access "
                        "(https://huggingface.co/settings/tokens)"),
    ("repo refused", "push_to_hub to 'me/x': the Hub refused to create or open the repo: HTTP 403: 403 Forbidden: "
                     "You don't have the rights to create a model."),
    ("no network", "push_to_hub to 'me/x': the token could not be checked at http://127.0.0.1:{dead_port}: "
                   "ConnectError: "),
])
def test_a_push_that_cannot_happen_is_one_line(local_hub, monkeypatch, case, message):
    import huggingface_hub.constants as constants

    dead_port = free_port()  # nothing listens there
    if case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "no network":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{dead_port}")
    local_hub.whoami = {"invalid token": 401, "read-only token": READ_ONLY}.get(case, local_hub.whoami)
    local_hub.create_status = 403 if case == "repo refused" else 200
    with pytest.raises(HubError) as raised:
        check_push_access("me/x")
    expected = message.format(url=local_hub.url, dead_port=dead_port)
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    assert local_hub.created == []
    if case in ("offline", "no token", "no network"):
        assert local_hub.requests == []


def test_a_repo_under_someone_elses_name_is_refused(local_hub):
    with pytest.raises(HubError, match=r"^hub_model_id 'someone/x': the token of 'me' cannot create repos under "
                                       r"'someone' \(its user and organizations: me, my-org\)$"):
        check_push_access("someone/x")
    assert check_push_access("my-org/x") == "me" and check_push_access("x") == "me"  # no namespace: the user's
    assert [c["organization"] for c in local_hub.created] == ["my-org", None]


def test_a_hub_that_does_not_answer_is_given_up_on_after_the_timeout(local_hub):
    local_hub.delay_s = 3.0
    began = time.monotonic()
    with pytest.raises(HubError, match="the token could not be checked at .*: ReadTimeout"):
        check_push_access("me/x", timeout=0.5)
    assert time.monotonic() - began < 2.5  # one request, no retries


def test_the_check_comes_before_any_model_loads(tiny_model_dir, tmp_path, local_hub):
    local_hub.whoami = READ_ONLY
    out = tmp_path / "out"
    with pytest.raises(HubError, match="read-only"):
        run_ppo(tiny_push_config(tiny_model_dir, tmp_path, out))
    assert not out.exists()  # the run had not even created its output folder


# ---------------------------------------------------------------- an upload that fails after training
def test_a_failed_upload_keeps_the_model_and_names_the_command_that_uploads_it(tiny_model_dir, tmp_path, local_hub):
    out = tmp_path / "out"
    local_hub.upload_status = 500
    with pytest.raises(HubError) as raised:
        run_ppo(tiny_push_config(tiny_model_dir, tmp_path, out))
    message = str(raised.value)
    command = (f"hf upload me/tiny-ppo {out} . --exclude 'checkpoint-*' --exclude '.tmp-*' --exclude '*.tmp' "
               "--exclude 'runs/*'")
    assert message.startswith("upload to 'me/tiny-ppo' failed: HTTP 500: ")
    assert message.endswith(f"; the model is saved in {out}; push it later with: {command}")
    assert {"model.safetensors", "config.json", "README.md", "checkpoint-1"} <= {p.name for p in out.iterdir()}
    assert "me/tiny-ppo" not in local_hub.uploaded

    local_hub.upload_status = 200  # the Hub is back: the printed command uploads what push_to_hub would have
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    uploaded = set(local_hub.uploaded["me/tiny-ppo"])
    assert {"model.safetensors", "config.json", "README.md", "config.yaml"} <= uploaded
    assert not [name for name in uploaded if name.startswith("checkpoint-")]


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


@pytest.mark.parametrize("values, said", [
    ({"kl_coef": 0.0}, None),  # no reference was kept: the card says nothing of a KL
    ({"kl_coef": 0.0, "adaptive_kl": True}, "on every token's reward"),  # the controller raises it from 0
    ({"kl_coef": 0.04, "kl_placement": "loss", "kl_estimator": "k3"}, "KL penalty to the reference in the loss"),
    ({}, "KL penalty to the reference on every token's reward"),
])
def test_the_card_mentions_a_kl_only_when_one_was_used(tmp_path, values, said):
    from llm_rl.reporting.hub import model_card

    config = Config.from_dict({"model_name_or_path": "m", "dataset_name": "d.jsonl", "advantage_estimator": "grpo",
                               "num_generations": 2, "output_dir": str(tmp_path / "run"), **values})
    description = str(model_card(config, {"kl/per_sequence": 0.5} if said else {})).split("## Training configuration")[0]
    if said is None:
        assert "KL" not in description and "kl" not in description.lower()
        assert "with token-level PPO: group-normalised (GRPO) advantages" in description
    else:
        assert said in description
