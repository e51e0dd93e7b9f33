"""The lm head as the chunked log-probs read it (`llm_rl.algorithms.chunked`): its weight and bias, what the
architecture does to the logits after it, and the check, once per model, that the two give the model's own
logits. A model that fails the check, or whose head is not a plain `nn.Linear`, keeps the unchunked path."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llm_rl.algorithms.ops import entropy_from_logits, logprobs_from_logits

logger = logging.getLogger(__name__)

# model_type prefix -> (config field, what the forward does with it after the lm head). Softcapping
# (Gemma 2/3, VaultGemma, nanochat: `final_logit_softcapping`) is read from any config that has it.
LOGIT_SCALING = {
    "granite": ("logits_scaling", "divide"),  # Granite, GraniteMoe*, GraniteMoeHybrid: logits / logits_scaling
    "cohere": ("logit_scale", "multiply"),  # Cohere, Cohere2, Cohere2Moe: logits * logit_scale
    "hyperclovax": ("logits_scaling", "multiply"),  # HyperCLOVA X: logits * logits_scaling
}
PROBE_LENGTH = 6  # tokens of the check's forward
PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}  # relative to the largest logit; half: 1e-2
_reported: set[tuple[str, str]] = set()


def _divide(x: torch.Tensor, by: float) -> torch.Tensor:
    return x / by


def _multiply(x: torch.Tensor, by: float) -> torch.Tensor:
    return x * by


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap  # the op order of Gemma 2's forward


def _compose(steps: list[Callable], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step(x)
    return x


def logit_transform(lm: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What `lm`'s forward does to the lm head's output before returning it as logits (None: nothing):
    Granite's and Cohere's logit scaling, Gemma 2/3's final-logit softcapping. `check_chunked_head` makes
    sure it is exact for the model at hand."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    steps = []
    for prefix, (key, op) in LOGIT_SCALING.items():
        value = getattr(lm, key, getattr(config, key, None))  # Cohere keeps its own copy on the model
        if config.model_type.startswith(prefix) and value is not None:
            steps.append(functools.partial(_divide if op == "divide" else _multiply, by=float(value)))
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        steps.append(functools.partial(_softcap, cap=float(cap)))
    return functools.partial(_compose, steps) if steps else None


def plain_linear_head(lm: nn.Module) -> Optional[nn.Linear]:
    """`lm`'s output layer when it is a plain `nn.Linear` (its forward is `F.linear(x, weight, bias)`, no
    hook or wrapper around it); None otherwise (a LoRA layer on the head, peft's modules_to_save, a
    quantized or sharded layer, a device-map hook): then the logits come from the model's own forward."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward or "forward" in vars(head):
        return None
    if head._forward_hooks or head._forward_pre_hooks or head.weight.device.type == "meta":
        return None
    return head


def check_chunked_head(lm: nn.Module, post: Optional[Callable], chunked_forward: Callable) -> Optional[str]:
    """Why the chunked log-probs would differ from `lm`'s own (None: they do not), from one tiny no-grad
    forward (the caller puts the model in eval mode): `lm`'s logits against hidden -> head -> `post`, and
    `chunked_forward(ids, mask, tokens, temperature)` -> (log-probs, entropy) against the unchunked ones."""
    head = plain_linear_head(lm)
    if head is None:
        head = lm.get_output_embeddings()
        if isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.device.type == "meta":
            return "its weights are not loaded (meta device)"
        return f"its lm head ({type(head).__name__}) is not a plain nn.Linear without hooks"
    ids = (torch.arange(PROBE_LENGTH, device=head.weight.device)[None] * 7 + 3) % head.out_features
    mask, tokens, temperature = torch.ones_like(ids), ids[:, 1:], 0.7
    try:
        with torch.no_grad():
            with reading_lm_head_input(lm) as captured:
                logits = lm(input_ids=ids, attention_mask=mask).logits
            rebuilt = F.linear(captured[0], head.weight, head.bias)
            rebuilt = post(rebuilt) if post is not None else rebuilt
            logprobs, entropy = chunked_forward(ids, mask, tokens, temperature)
    except Exception as error:  # an architecture the chunked forward cannot run: the unchunked path
        return f"the chunked forward failed ({type(error).__name__}: {str(error)[:200]})"
    tolerance = PROBE_TOLERANCE.get(logits.dtype, 1e-2) * max(1.0, float(logits.abs().max()))
    if rebuilt.shape != logits.shape or float((rebuilt - logits).abs().max()) > tolerance:
        return "its logits are not hidden -> lm head -> the known post-head transform (llm_rl.models.lm_head)"
    logits = logits[:, :-1]
    expected = logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits, temperature)
    if any(float((a - b).abs().max()) > tolerance for a, b in zip((logprobs, entropy), expected)):
        return "the chunked log-probs differ from the model's own"
    return None


@contextlib.contextmanager
def reading_lm_head_input(lm: nn.Module, enabled: bool = True, skip_head: bool = False):
    """Yield a list that holds, after the forward, the hidden states (batch, kept, hidden) the
    lm head was applied to: the value head reads exactly the state the logits come from
    (after the final norm and any architecture-specific scaling before the head).

    `skip_head`: the head then runs on none of them (its output has 0 positions), for callers that
    compute what they need from the hidden states themselves (`chunked_logprobs_and_entropy`)."""
    captured: list[torch.Tensor] = []
    if not (enabled or skip_head):
        yield captured
        return

    def read(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:]) if skip_head else None

    handle = lm.get_output_embeddings().register_forward_pre_hook(read)
    try:
        yield captured
    finally:
        handle.remove()


def report_unchunked(model_type: str, reason: str) -> None:
    """One log line per model type and reason: this model computes log-probs from the full logits."""
    if (model_type, reason) not in _reported:
        _reported.add((model_type, reason))
        logger.warning("chunked_logprobs: %s stays on the unchunked path (full logits): %s", model_type, reason)
