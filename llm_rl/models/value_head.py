"""The policy: any causal LM plus a value head on the hidden state its lm head reads.

One pass of the model's own forward gives both the next-token logits and V(x_t).
Logits come out of that forward, so whatever the architecture does after its lm
head (Gemma 2/3 softcapping, Granite's and Cohere's logit scaling, ...) is in the
log-probs PPO trains on. The lm head runs only on the positions that predict
response tokens (`logits_to_keep`), so prompt positions never pay for a
(len, vocab) projection.

Given the response tokens, the forward gives their log-probs and the entropy instead of
logits. By default (`chunked_logprobs`) it skips the lm head and computes them from the
hidden states the head reads, in chunks (`llm_rl.algorithms.chunked`): no (batch, len, vocab)
tensor exists at once. That path is taken only where a check at load found it exact
(`llm_rl.models.lm_head.check_chunked_head`); other models compute them from the logits.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from llm_rl.algorithms.chunked import chunked_logprobs_and_entropy
from llm_rl.algorithms.ops import entropy_from_logits, logprobs_from_logits
from llm_rl.config.errors import ModelLoadError
from llm_rl.models.lm_head import (
    check_chunked_head,
    logit_transform,
    plain_linear_head,
    reading_lm_head_input,
    report_unchunked,
)

VALUE_HEAD_FILE = "value_head.safetensors"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, len) -> (batch, len): 0, 1, 2, ... counted over real tokens only.

    Left padding shifts a prompt right; without this, absolute-position models
    (GPT-2) would score a short prompt at other positions than it was sampled at.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# config fields and module attributes that hold a dropout probability, a layer-drop rate or
# router noise: "attention_dropout", "resid_pdrop", "layerdrop", "router_jitter_noise", ...
_STOCHASTIC_NAME = re.compile(r"drop|jitter", re.IGNORECASE)


def disable_dropout(model: nn.Module) -> None:
    """Make every forward deterministic, whatever the config says, so the rollout's log-probs
    equal the first training forward's (PPO ratio 1).

    Zeroing `nn.Dropout` modules is not enough: many architectures read a float from the
    config (Llama/Qwen/Mistral `attention_dropout`, Starcoder2's residual and embedding
    dropout, OPT's `layerdrop`, Mixtral's router jitter) and apply it whenever the module is
    in training mode. Those floats are zeroed on the configs and on the modules that copied them.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_stochastic_floats(module)
        config = getattr(module, "config", None)
        if config is not None:
            _zero_config(config)


def _zero_stochastic_floats(obj) -> None:
    for name, value in list(vars(obj).items()):
        if _STOCHASTIC_NAME.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            setattr(obj, name, 0.0)


def _zero_config(config, seen: Optional[set] = None) -> None:
    """Zero the stochastic floats of a transformers config and of its sub-configs (text_config, ...)."""
    seen = seen if seen is not None else set()
    if id(config) in seen or not hasattr(config, "to_dict"):
        return
    seen.add(id(config))
    _zero_stochastic_floats(config)
    for value in list(vars(config).values()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _zero_config(value, seen)


def unwrap_transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CausalLMWithValueHead(nn.Module):
    """A causal LM (`pretrained_model`, possibly a peft model) and a linear value head.

    `forward(input_ids, attention_mask, response_start)` returns logits and values at
    the positions that predict tokens `response_start ...` of `input_ids`:
    logits (batch, n, vocab), values (batch, n) with n = len - response_start.
    `forward(..., tokens=response_ids, temperature=T)` returns their log-probs, the values and the entropy.

    `chunked_logprobs`: whether that forward computes log-probs and entropy from the hidden states in
    chunks (`use_chunked_logprobs`); `chunked_head_problem`: why the check at load kept this model off
    that path (None: it passed). `logprob_chunk_size`: positions per chunk (None: ~16M logits a chunk).
    """

    def __init__(self, pretrained_model: nn.Module, value_head_init_std: float = 0.0, value_head: bool = True):
        super().__init__()
        self.pretrained_model = pretrained_model
        lm = unwrap_transformers_model(pretrained_model)
        self.config = lm.config
        # FSDP's transformer auto-wrap reads the layer classes from the model it is given
        self._no_split_modules = list(getattr(lm, "_no_split_modules", None) or [])
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        if head is None or not hasattr(head, "in_features"):  # logits and V are read where the lm head is applied
            raise ModelLoadError(
                f"{type(lm).__name__} has no linear lm head (get_output_embeddings() gives {type(head).__name__}): "
                "load a causal LM (AutoModelForCausalLM), not a base model or another head"
            )
        hidden_size = head.in_features
        self.keeps_logits = accepts_logits_to_keep(lm)  # checked once: the forward's signature does not change
        fuse_tanh_gelu(lm)
        self.shares_prompts = can_share_prompts(lm)
        self.logit_transform = logit_transform(lm)  # what the forward does after the lm head (softcapping, ...)
        self.logprob_chunk_size: Optional[int] = None
        self.chunked_logprobs = False
        self.v_head: Optional[nn.Linear] = None
        if value_head:
            # fp32 head: values feed a regression loss whose scale differs from the LM's.
            self.v_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
            nn.init.normal_(self.v_head.weight, std=value_head_init_std) if value_head_init_std > 0 else nn.init.zeros_(
                self.v_head.weight
            )
            nn.init.zeros_(self.v_head.bias)
        self.chunked_head_problem = self._check_chunked_head()
        self.use_chunked_logprobs(True)

    def use_chunked_logprobs(self, enabled: bool = True) -> bool:
        """Turn the chunked log-probs on or off (the config's `chunked_logprobs`); they stay off for a model
        that failed the check at load (`chunked_head_problem`, logged once). Returns whether they are on."""
        if enabled and self.chunked_head_problem is not None:
            report_unchunked(self.config.model_type, self.chunked_head_problem)
        self.chunked_logprobs = bool(enabled) and self.chunked_head_problem is None
        return self.chunked_logprobs

    def _check_chunked_head(self) -> Optional[str]:
        """Why the chunked log-probs would not equal the model's own (None: they do): `check_chunked_head`."""
        lm = unwrap_transformers_model(self.pretrained_model)

        def chunked(ids, mask, tokens, temperature):
            logprobs, _, entropy = self(ids, mask, response_start=1, tokens=tokens, temperature=temperature,
                                        chunked=True)
            return logprobs, entropy

        with eval_mode(self):
            return check_chunked_head(lm, self.logit_transform, chunked)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int,
        group_size: int = 1,
        tokens: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        entropy: bool = True,
        entropy_grad: bool = True,
        chunked: Optional[bool] = None,
    ) -> tuple:
        """Logits (batch, n, vocab) predicting the n response tokens after `response_start`, and the
        values (batch, n) of the states before them (None without a value head).

        `tokens` (batch, n), the response tokens: (log-probs (batch, n) under softmax(logits / `temperature`),
        values, entropy (batch, n) or None) instead. `entropy=False`: no entropy; `entropy_grad=False`: the
        entropy carries no gradient. `chunked` (default `self.chunked_logprobs`): computed in chunks from the
        hidden states the lm head reads (`chunked_logprobs_and_entropy`), the head skipped; otherwise from
        the logits. Same numbers and gradients either way, to rounding.

        `group_size` > 1: the rows come in consecutive groups with the same prompt (num_generations).
        Every prompt token but the last then goes through the model once per group (`shared_prompt_cache`;
        its gradient is the sum over the group), and each row's last prompt token and response run on
        top: the same log-probs, values and gradients (to rounding), fewer tokens through the model."""
        head = self._chunked_head(tokens is not None and (self.chunked_logprobs if chunked is None else chunked))
        logits, hidden = self._run(input_ids, attention_mask, response_start, group_size, skip_head=head is not None)
        values = None
        if self.v_head is not None:
            values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)  # (batch, n)
        if tokens is None:
            return logits, values
        if head is not None:
            logprobs, ent = chunked_logprobs_and_entropy(
                hidden, head.weight, head.bias, tokens, temperature, post=self.logit_transform,
                chunk_size=self.logprob_chunk_size, entropy=entropy, entropy_grad=entropy_grad,
            )
            return logprobs, values, ent
        logprobs = logprobs_from_logits(logits, tokens, temperature)
        ent = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature) if entropy else None
        return logprobs, values, ent

    def _chunked_head(self, wanted: bool) -> Optional[nn.Linear]:
        """The lm head the chunked path reads, or None (not wanted, or the head is no longer a plain
        `nn.Linear`: e.g. a LoRA adapter on it, added after the check at load; said once)."""
        if not wanted:
            return None
        head = plain_linear_head(unwrap_transformers_model(self.pretrained_model))
        if head is None:
            report_unchunked(self.config.model_type, "its lm head is not a plain nn.Linear (an adapter on it?)")
        return head

    def _run(self, input_ids, attention_mask, response_start: int, group_size: int, skip_head: bool):
        """The model's forward: (logits (batch, n, vocab), or None with `skip_head`; the hidden states
        (batch, n, hidden) the lm head reads, or None when neither the value head nor `skip_head` needs them)."""
        n = input_ids.shape[1] - response_start  # response positions
        lm = unwrap_transformers_model(self.pretrained_model)
        kwargs = {"logits_to_keep": n + 1} if self.keeps_logits else {}
        position_ids = position_ids_from_mask(attention_mask)
        # gradient checkpointing turns transformers' cache off in training, which would drop the shared part
        checkpointing = lm.training and activation_checkpointing(lm)
        share = group_size > 1 and response_start > 1 and self.shares_prompts and not checkpointing
        if share:
            shared = response_start - 1
            kwargs.update(cache_argument(lm, shared_prompt_cache(
                self.pretrained_model, input_ids[:, :shared], attention_mask[:, :shared], group_size
            )))
            input_ids, position_ids = input_ids[:, shared:], position_ids[:, shared:]
        with reading_lm_head_input(lm, enabled=self.v_head is not None, skip_head=skip_head) as head_input:
            logits = self.pretrained_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=share,
                **kwargs,
            ).logits
        # position t predicts token t+1: keep the positions that predict the response.
        hidden = head_input[0][:, -(n + 1) : -1] if head_input else None  # what the lm head read
        return (None if skip_head else logits[:, -(n + 1) : -1]), hidden

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
        check_causal_lm(name_or_path, trust_remote_code)
        lm, info = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[torch_dtype], trust_remote_code=trust_remote_code, output_loading_info=True,
            **kwargs,
        )
        if info["missing_keys"]:  # randomly initialised weights: the policy would not be the checkpoint
            missing = sorted(info["missing_keys"])
            raise ModelLoadError(
                f"{name_or_path} has no weights for {', '.join(missing[:5])}"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                + ": they would start random. Give a causal LM checkpoint (AutoModelForCausalLM) that holds them."
            )
        model = cls(lm, value_head_init_std=value_head_init_std, value_head=value_head)
        head_file = find_value_head(value_head_path or name_or_path)
        if value_head and head_file is not None:
            model.v_head.load_state_dict(load_file(head_file))
        return model


def check_causal_lm(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse, from its config and before any weights load, a checkpoint that is not a decoder-only causal LM.
    AutoModelForCausalLM would load a BERT (as BertLMHeadModel, a fresh decoder it was never trained as): that
    policy would train on nonsense without a word."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    kind = config.model_type
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    encoder = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
        return
    what = ("an encoder-decoder" if getattr(config, "is_encoder_decoder", False)
            else "an encoder (masked LM)" if encoder else "a model AutoModelForCausalLM cannot load")
    architectures = ", ".join(config.architectures or []) or "no architectures listed"
    raise ModelLoadError(f"{name_or_path} is a {kind!r} model ({architectures}), {what}, not a causal LM; the policy "
                         "and the reference need a decoder-only causal LM (Llama, Qwen2, Gemma, Mistral, GPT-2, ...)")


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Replace transformers' `NewGELUActivation` (GPT-2, GPT-J, CodeGen, ...: `gelu_new`, four elementwise ops
    and their four backward ops) by `nn.GELU(approximate="tanh")`, the same function in one kernel each way
    (outputs equal to ~1e-7). Returns how many modules were replaced."""
    from transformers.activations import NewGELUActivation

    count = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh").train(child.training))
                count += 1
    return count


def can_share_prompts(lm: nn.Module) -> bool:
    """Whether a group's common prompt can be run once and its keys and values repeated to the group's rows
    (`shared_prompt_cache`): decoders whose generate uses transformers' DynamicCache, every layer of which
    can be repeated (not the recurrent state of Mamba-style layers)."""
    from transformers import DynamicCache

    if not getattr(lm, "_supports_default_dynamic_cache", lambda: False)() or lm.config.is_encoder_decoder:
        return False
    return all(hasattr(layer, "batch_repeat_interleave") for layer in DynamicCache(config=lm.config).layers)


def shared_prompt_cache(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """The KV cache of `prompt_ids` (batch, len), whose rows come in consecutive groups of `group_size` copies
    of one prompt, computed on one row per group and repeated to every row (differentiably). A forward or
    `generate` given it runs only the tokens after the prompt. Raises ValueError if a group's rows differ."""
    from transformers import DynamicCache

    grouped = prompt_ids.view(-1, group_size, prompt_ids.shape[1])
    if not bool((grouped == grouped[:, :1]).all()):
        raise ValueError(f"rows in groups of {group_size} must repeat one prompt each to share its forward")
    ids, mask = prompt_ids[::group_size], prompt_mask[::group_size]
    lm = unwrap_transformers_model(model)
    cache = DynamicCache(config=lm.config)
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(lm) else {}
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
          **cache_argument(lm, cache), **kwargs)
    cache.batch_repeat_interleave(group_size)
    return cache


def activation_checkpointing(lm: nn.Module) -> bool:
    """Whether `lm` recomputes activations in backward (transformers 5: `is_activation_checkpointing`; its
    deprecated alias `is_gradient_checkpointing` before)."""
    flag = getattr(type(lm), "is_activation_checkpointing", None)
    return bool(lm.is_activation_checkpointing if flag is not None else getattr(lm, "is_gradient_checkpointing", False))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing on a transformers model (or a peft model around one): its layers recompute
    their activations in backward. transformers 5 calls it `activation_checkpointing_enable` (non-reentrant
    checkpoints: no input that requires grad is needed, so frozen embeddings under LoRA are fine)."""
    lm = unwrap_transformers_model(model)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable()
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cache_argument(lm: nn.Module, cache) -> dict:
    """{name: cache} for the model's forward and `generate`: transformers renamed `past_key_values` to
    `cache` (5.2x; the old name warns until 5.40), and the installed version decides which one it reads."""
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    return {name: cache}


def accepts_logits_to_keep(lm: nn.Module) -> bool:
    """Whether the model's forward can skip the lm head on positions we do not need."""
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


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
def eval_mode(module: nn.Module):
    """`module` in eval mode inside the block; after it, every submodule back in its own previous mode
    (`module.train(was)` would set them all alike: a wrapper in training mode around a model loaded in
    eval mode would switch the model's dropout on)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was_training in modes:
            m.training = was_training


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
