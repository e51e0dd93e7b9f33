"""Model cards and Hub upload of what the trainer saved.

The output folder already holds what users load: the policy as a plain causal LM (or a peft
adapter), tokenizer, generation config, the value head when one was trained, and the config used.
The card adds what a reader of the Hub page needs: base model, data, reward, method, metrics.
Cards are built with huggingface_hub's `ModelCard`/`ModelCardData`, and their metadata holds
only what the Hub accepts: `base_model` and `datasets` are given only when they are Hub ids
(a local path there makes the Hub reject the upload).

With push_to_hub, `check_push_access` runs before any model loads (token, network, repo), and a failed
upload after training leaves the saved folder and prints the `hf upload` command that pushes it later.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from llm_rl.config.errors import UserError
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
    if p.kl_coef == 0 and not p.adaptive_kl:  # no reference was kept or read: nothing to say about a KL
        kl = ""
    elif p.kl_in_loss:
        kl = "a KL penalty to the reference in the loss; "
    else:
        kl = "a KL penalty to the reference on every token's reward, the sequence score on the last token; "
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
with token-level PPO: {kl}{estimator.card}.

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


class HubError(UserError):
    """A Hub upload that cannot happen (offline, no or read-only token, refused repo, failed upload)."""

    label = "hub error"


UPLOAD_EXCLUDES = ("checkpoint-*", ".tmp-*", "*.tmp", "runs/*")  # resumable state and scratch files stay local
PREFLIGHT_TIMEOUT_S = 10.0  # per request: the Hub client's shared session waits forever by default


def check_push_access(repo_id: str, token: Optional[str] = None, private: bool = False,
                      timeout: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Before training: refuse a push that cannot happen (HubError, one line), and create the repo.

    Checked in order: offline mode, a token (HF_TOKEN or `hf auth login`), the token is valid (whoami),
    not read-only, its user or one of its organizations owns the namespace, and `create_repo` accepts it.
    Each request waits at most `timeout` seconds, without retries. Returns the token's user name.
    """
    import huggingface_hub

    where = f"push_to_hub to {repo_id!r}"
    if huggingface_hub.is_offline_mode():
        raise HubError(f"{where}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or set "
                       "push_to_hub: false and upload the output folder later with `hf upload`")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"{where}: no Hugging Face token found; set HF_TOKEN or run `hf auth login` with a "
                       "write token, or set push_to_hub: false")
    api = huggingface_hub.HfApi(token=token)
    with bounded_wait(timeout):
        me = hub_call(api.whoami, f"{where}: the token could not be checked at {api.endpoint}")
        role = me.get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise HubError(f"{where}: the token of {me.get('name')!r} is read-only; use a token with write "
                           "access (https://huggingface.co/settings/tokens)")
        namespace = repo_id.split("/")[0] if "/" in repo_id else me.get("name")
        owners = [me.get("name")] + [org.get("name") for org in me.get("orgs", [])]
        if namespace not in owners:
            raise HubError(f"hub_model_id {repo_id!r}: the token of {me.get('name')!r} cannot create repos under "
                           f"{namespace!r} (its user and organizations: {', '.join(map(str, owners))})")
        hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                 f"{where}: the Hub refused to create or open the repo")
    return me.get("name")


@contextlib.contextmanager
def bounded_wait(timeout: float):
    """Requests of the Hub client's shared HTTP session time out after `timeout` seconds meanwhile."""
    from huggingface_hub.utils import get_session

    session = get_session()
    before, session.timeout = session.timeout, timeout
    try:
        yield
    finally:
        session.timeout = before


def hub_call(call, problem: str, then: str = ""):
    """`call()`; its failure (an HTTP status, the network, offline mode) as one HubError line: `problem`,
    the reason, `then`."""
    try:
        return call()
    except Exception as e:  # the client's HTTP errors, its HTTP library's network errors, OSError
        raise HubError(f"{problem}: {short_reason(e)}{then}") from e


def short_reason(error: Exception) -> str:
    """An exception as a short phrase: the HTTP status and the first line of its message, or its type and message."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:200]
    return f"HTTP {status}: {first}" if status else f"{type(error).__name__}: {first}"


def push_command(directory: Path, repo_id: str, private: bool = False) -> str:
    """The `hf upload` command line that uploads the output folder as `push_folder` does."""
    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in UPLOAD_EXCLUDES)
    command = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(directory))} . {excludes}"
    return command + (" --private" if private else "")


def push_folder(directory: Path, repo_id: str, private: bool = False, commit_message: str = "llm_rl") -> str:
    """Create the repo if needed and upload the folder (checkpoints excluded). Returns the commit URL.

    The token comes from the usual places (HF_TOKEN, `hf auth login`). A failure is a HubError that says
    the folder stays and gives the command that uploads it later.
    """
    from huggingface_hub import HfApi

    def upload():
        api = HfApi()
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message,
                                 ignore_patterns=list(UPLOAD_EXCLUDES))

    info = hub_call(upload, f"upload to {repo_id!r} failed", f"; the model is saved in {directory}; "
                    f"push it later with: {push_command(directory, repo_id, private)}")
    return str(getattr(info, "commit_url", info))
