"""The policy: any causal LM plus a value head on its last hidden state.

One backbone pass gives both the next-token logits and V(x_t). The lm head and
the value head are applied only to the positions that predict response tokens,
so prompt positions never pay for a (len, vocab) projection.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

VALUE_HEAD_FILE = "value_head.safetensors"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, len) -> (batch, len): 0, 1, 2, ... counted over real tokens only.

    Left padding shifts a prompt right; without this, absolute-position models
    (GPT-2) would score a short prompt at other positions than it was sampled at.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout so the rollout's log-probs equal the first training forward's (PPO ratio 1)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def unwrap_transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CausalLMWithValueHead(nn.Module):
    """A causal LM (`pretrained_model`, possibly a peft model) and a linear value head.

    `forward(input_ids, attention_mask, response_start)` returns logits and values at
    the positions that predict tokens `response_start ...` of `input_ids`:
    logits (batch, n, vocab), values (batch, n) with n = len - response_start.
    """

    def __init__(self, pretrained_model: nn.Module, value_head_init_std: float = 0.0, value_head: bool = True):
        super().__init__()
        self.pretrained_model = pretrained_model
        lm = unwrap_transformers_model(pretrained_model)
        self.config = lm.config
        # FSDP's transformer auto-wrap reads the layer classes from the model it is given
        self._no_split_modules = list(getattr(lm, "_no_split_modules", None) or [])
        hidden_size = lm.get_output_embeddings().in_features
        self.v_head: Optional[nn.Linear] = None
        if value_head:
            # fp32 head: values feed a regression loss whose scale differs from the LM's.
            self.v_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
            nn.init.normal_(self.v_head.weight, std=value_head_init_std) if value_head_init_std > 0 else nn.init.zeros_(
                self.v_head.weight
            )
            nn.init.zeros_(self.v_head.bias)

    # ------------------------------------------------------------------ forward
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        lm = unwrap_transformers_model(self.pretrained_model)
        backbone = getattr(lm, lm.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        # position t predicts token t+1: keep the states that predict the response.
        hidden = hidden[:, response_start - 1 : -1]  # (batch, n, hidden)
        logits = lm.get_output_embeddings()(hidden)
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        values = None
        if self.v_head is not None:
            values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)  # (batch, n)
        return logits, values

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self, save_directory: str | os.PathLike, state_dict: Optional[dict] = None, merge_adapter: bool = False
    ) -> None:
        """Write the policy as a plain HF causal LM (or peft adapter) and the value head beside it.

        `state_dict`: this module's full state dict when the weights live elsewhere
        (gathered from ZeRO-3 / FSDP shards by `accelerator.get_state_dict`).
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        lm_state = {k.removeprefix("pretrained_model."): v for k, v in state_dict.items() if k.startswith("pretrained_model.")}
        head_state = {k.removeprefix("v_head."): v for k, v in state_dict.items() if k.startswith("v_head.")}
        model = self.pretrained_model
        if merge_adapter and hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
            lm_state = None
        model.save_pretrained(save_directory, state_dict=lm_state)  # safetensors
        if head_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, save_directory / VALUE_HEAD_FILE)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        value_head_path: Optional[str] = None,
        value_head_init_std: float = 0.0,
        value_head: bool = True,
        torch_dtype: str = "float32",
        trust_remote_code: bool = False,
        **kwargs,
    ) -> CausalLMWithValueHead:
        """Load a causal LM by Hub id or folder; restore `value_head.safetensors` if it is there."""
        lm = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[torch_dtype], trust_remote_code=trust_remote_code, **kwargs
        )
        model = cls(lm, value_head_init_std=value_head_init_std, value_head=value_head)
        head_file = find_value_head(value_head_path or name_or_path)
        if value_head and head_file is not None:
            model.v_head.load_state_dict(load_file(head_file))
        return model


def find_value_head(name_or_path: str) -> Optional[str]:
    """Path of a saved value head in a local folder or Hub repo, or None if there is none."""
    local = Path(name_or_path) / VALUE_HEAD_FILE
    if local.is_file():
        return str(local)
    if Path(name_or_path).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(name_or_path, VALUE_HEAD_FILE)
    except Exception:  # not on the Hub, offline, or no head saved: start a fresh head
        return None


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module, accelerator):
    """Yield the policy's transformers model with full weights for `generate`.

    ZeRO-3 and FSDP shard parameters; gathering them per generated token would cost
    one all-gather per layer per token, so they are gathered once for the whole rollout.
    """
    unwrapped = accelerator.unwrap_model(model)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield unwrapped.pretrained_model
        return
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            with FSDP.summon_full_params(model, writeback=False, recurse=True):
                yield unwrapped.pretrained_model
            return
    yield unwrapped.pretrained_model
