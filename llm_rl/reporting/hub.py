"""Model cards and Hub upload of what the trainer saved.

The output folder already holds what users load: the policy as a plain causal LM (or a peft
adapter), tokenizer, generation config, the value head when one was trained, and the config used.
The card adds what a reader of the Hub page needs: base model, data, reward, method, metrics.
Cards are built with huggingface_hub's `ModelCard`/`ModelCardData`, and their metadata holds
only what the Hub accepts: `base_model` and `datasets` are given only when they are Hub ids
(a local path there makes the Hub reject the upload).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from llm_rl.config.paths import looks_local
from llm_rl.config.sections import Config
from llm_rl.config.variants import ADVANTAGE_ESTIMATORS
from llm_rl.version import __version__

if TYPE_CHECKING:
    from llm_rl.config.reward_training import RewardTrainingConfig

CARD_METRICS = ("score/mean", "kl/per_sequence", "entropy", "response/length", "response/eos_rate")


def hub_id(name: Optional[str], data: bool = False) -> Optional[str]:
    """`name` if it can be a Hub repo id (not a local path, valid id syntax), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or looks_local(name, data) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def build_card(front: dict, body: str):
    """A `ModelCard` from metadata (None values left out) and markdown."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**{k: v for k, v in front.items() if v is not None})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def metric_table(metrics: dict, keys) -> str:
    rows = "\n".join(f"| `{k}` | {metrics[k]:.4g} |" for k in keys if isinstance(metrics.get(k), (int, float)))
    return f"| metric | value |\n|---|---|\n{rows}" if rows else "(none logged)"


def model_card(config: Config, final_metrics: Optional[dict] = None, repo_id: str = ""):
    """The PPO policy's card: Hub metadata, a description that matches the run, final and held-out metrics."""
    m, d, r, p = config.model, config.data, config.reward, config.ppo
    adapter = m.use_peft and not m.merge_adapter
    base, dataset = hub_id(m.model_name_or_path), hub_id(d.dataset_name, data=True)
    front = {
        "library_name": "peft" if adapter else "transformers",
        "base_model": base,
        "datasets": [dataset] if dataset else None,
        "tags": ["llm_rl", "ppo", p.advantage_estimator, "reinforcement-learning", "rlhf"],
        "pipeline_tag": "text-generation",
    }
    rewards = ([f"reward model `{r.reward_model_name_or_path}`"] if r.reward_model_name_or_path else []) + [
        f"`{spec}`" for spec in r.reward_funcs
    ]
    kl = "a KL penalty to the reference in the loss" if p.kl_in_loss else (
        "a KL penalty to the reference on every token's reward, the sequence score on the last token")
    estimator = ADVANTAGE_ESTIMATORS[p.advantage_estimator]
    value_head = estimator.needs_values
    saved = ("a LoRA adapter (peft)" if adapter else "a plain causal LM") + (
        ", plus `value_head.safetensors` (the value head, for resuming PPO)" if value_head else "")
    repo = repo_id or "REPO_ID"
    load = load_snippet("CausalLM", adapter, repo)
    metrics = final_metrics or {}
    eval_keys = [k for k in metrics if k.startswith("eval/")]
    evaluation = f"\n## Held-out evaluation (last)\n\n{metric_table(metrics, eval_keys)}\n" if eval_keys else ""
    body = f"""# {Path(config.train.output_dir).name}

Fine-tuned from `{m.model_name_or_path}` by [llm_rl](https://pypi.org/project/llm_rl/) {__version__}
with token-level PPO: {kl}; {estimator.card}.

- prompts: `{d.dataset_name}` (split `{d.dataset_split}`, column `{d.prompt_column}`)
- reward: {", ".join(rewards) or "none"}
- saved: {saved}

## Use

```python
{load}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({repo!r})
```

## Final metrics (last PPO update)

{metric_table(metrics, CARD_METRICS)}
{evaluation}
## Training configuration

```yaml
{yaml.safe_dump(config.to_dict(), sort_keys=False).strip()}
```
"""
    return build_card(front, body)


def reward_model_card(config: RewardTrainingConfig, metrics: dict, repo_id: str):
    """A reward model's card (llm_rl.training.reward_trainer): base model, pairs, how to load, held-out metrics."""
    adapter = config.use_peft and not config.merge_adapter
    dataset = hub_id(config.dataset_name, data=True)
    front = {
        "library_name": "peft" if adapter else "transformers",
        "base_model": hub_id(config.model_name_or_path),
        "datasets": [dataset] if dataset else None,
        "tags": ["llm_rl", "reward-model"],
        "pipeline_tag": "text-classification",
    }
    eval_keys = [k for k in metrics if k.startswith("eval/")]
    body = (
        f"# Reward model trained with llm_rl\n\nBase model: `{config.model_name_or_path}`; pairs: "
        f"`{config.dataset_name}`; {'LoRA adapter' if adapter else 'full weights'}, one output (the reward), "
        "read at the last token of prompt + completion, trained with the Bradley-Terry pairwise loss.\n\n"
        f"```python\n{load_snippet('SequenceClassification', adapter, repo_id)}\n```\n\n"
        f"## Held-out pairs\n\n{metric_table(metrics, eval_keys)}\n\n"
        "Training options: `reward_config.yaml`; metrics per step: `metrics.jsonl`.\n"
    )
    return build_card(front, body)


def load_snippet(head: str, adapter: bool, repo: str) -> str:
    """The two lines that load a saved model: `AutoModelFor<head>`, or peft's class for an adapter."""
    cls = f"AutoPeftModelFor{head}" if adapter else f"AutoModelFor{head}"
    return f"from {'peft' if adapter else 'transformers'} import {cls}\nmodel = {cls}.from_pretrained({repo!r})"


def push_folder(directory: Path, repo_id: str, private: bool = False, commit_message: str = "llm_rl") -> str:
    """Create the repo if needed and upload the folder (checkpoints excluded). Returns the commit URL.

    The token comes from the usual places (HF_TOKEN, `huggingface-cli login`).
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", ".tmp-*", "*.tmp", "runs/*"],
    )
    return str(getattr(info, "commit_url", info))
