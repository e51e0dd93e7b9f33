"""Model card and Hub upload of what the trainer saved.

The output folder already holds what users load: the policy as a plain causal LM (or a peft
adapter), tokenizer, generation config, value head and the config used. The card adds what a
reader of the Hub page needs: base model, data, reward, hyper-parameters, final metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

import llm_rl
from llm_rl.config import Config

CARD_METRICS = ("score/mean", "kl/per_sequence", "entropy", "response/length", "response/eos_rate")


def model_card(config: Config, final_metrics: Optional[dict] = None) -> str:
    """README.md text with YAML front matter the Hub indexes (library, base model, tags, datasets)."""
    m, d, r = config.model, config.data, config.reward
    rewards = ([f"reward model `{r.reward_model_name_or_path}`"] if r.reward_model_name_or_path else []) + [
        f"`{spec}`" for spec in r.reward_funcs
    ]
    front = {
        "library_name": "peft" if m.use_peft and not m.merge_adapter else "transformers",
        "base_model": m.model_name_or_path,
        "tags": ["llm_rl", "ppo", "reinforcement-learning", "rlhf"],
        "pipeline_tag": "text-generation",
    }
    if d.dataset_name and not Path(d.dataset_name).exists():
        front["datasets"] = [d.dataset_name]  # only Hub ids; a local file name means nothing on the Hub
    metrics = final_metrics or {}
    metric_rows = "\n".join(f"| `{k}` | {metrics[k]:.4g} |" for k in CARD_METRICS if k in metrics)
    metric_rows += "".join(f"\n| `{k}` | {v:.4g} |" for k, v in metrics.items() if k.startswith("eval/"))
    saved = "a LoRA adapter (peft)" if front["library_name"] == "peft" else "a plain causal LM"
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {Path(config.train.output_dir).name}

Fine-tuned from `{m.model_name_or_path}` with PPO by [llm_rl](https://pypi.org/project/llm_rl/) {llm_rl.__version__}:
token-level rewards (KL penalty to the reference on every token, the sequence score on the last one),
GAE advantages, clipped policy and value losses.

- prompts: `{d.dataset_name}` (split `{d.dataset_split}`, column `{d.prompt_column}`)
- reward: {", ".join(rewards) or "none"}
- saved: {saved}, plus `value_head.safetensors` (the value head, for resuming PPO)

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("REPO_ID")
tokenizer = AutoTokenizer.from_pretrained("REPO_ID")
```

## Final metrics (last PPO update)

| metric | value |
|---|---|
{metric_rows}

## Training configuration

```yaml
{yaml.safe_dump(config.to_dict(), sort_keys=False).strip()}
```
"""


def write_model_card(directory: Path, config: Config, final_metrics: Optional[dict] = None, repo_id: str = "") -> Path:
    path = Path(directory) / "README.md"
    text = model_card(config, final_metrics)
    path.write_text(text.replace("REPO_ID", repo_id or str(directory)))
    return path


def push_folder(directory: Path, repo_id: str, private: bool = False, commit_message: str = "llm_rl PPO") -> str:
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
