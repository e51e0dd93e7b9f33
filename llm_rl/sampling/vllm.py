"""Rollouts from a vLLM engine in the training process (`rollout_engine: vllm`).

    engine = VLLMEngine(model, accelerator, settings, sampling_config, model_path, max_model_len, seed)
    rollout = VLLMSampler(engine, tokenizer, num_generations).sample(batch)  # pushes the current weights, samples
    with engine.turns() as generate_turn: ...  # multi-turn episodes: one engine call per turn (EpisodeSampler)

One engine per training process, colocated (VLLM_ENABLE_V1_MULTIPROCESSING=0), built once from the policy's
checkpoint folder with the run's thread count, fed token ids, and asked for its log-prob of every sampled token
after temperature (`logprobs_mode: processed_logprobs`). Before every rollout the policy's weights go to the
engine (`EngineWeights`): the rollout is always sampled from the weights the last optimizer step left, on
every process. Padding, stop tokens and truncation go through the same `truncate_after_stop` as HF generate.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator

import torch

from llm_rl.config.errors import ConfigError
from llm_rl.config.rules import engine_budget
from llm_rl.config.variants import ROLLOUT_ENGINES
from llm_rl.sampling.hf import repeat_rows
from llm_rl.sampling.rollout import Rollout, decode_responses, truncate_after_stop
from llm_rl.sampling.sampler import SamplingSettings

def import_vllm():
    """The vllm module, or a ConfigError that gives the install command."""
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"rollout_engine: vllm needs vLLM, which is not installed ({error}). Install it: "
                          f"{ROLLOUT_ENGINES['vllm'].install}") from error
    return vllm


# ====================================================================== the policy's weights, in vLLM's names
def engine_weight_names(lm) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a transformers causal LM's parameters as its checkpoint names them, which is what a
    vLLM model's `load_weights` reads: a peft model's prefixes (`base_model.model.`, `.base_layer`) removed and
    its LoRA matrices left out (merge them into the base weights first: `merged_adapter`)."""
    for name, tensor in lm.named_parameters():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, tensor.detach()


@contextlib.contextmanager
def merged_adapter(lm):
    """A peft model with its LoRA adapter merged into the base weights while the block runs, unmerged after;
    any other model as it is."""
    if not hasattr(lm, "merge_adapter"):
        yield lm
        return
    lm.merge_adapter()
    try:
        yield lm
    finally:
        lm.unmerge_adapter()


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of (name, tensor) of at most `max_bytes` each (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class EngineWeights:
    """Pushes the policy's weights into a vLLM engine, in buckets of at most `bucket_bytes`.

    CPU (and any engine without a transfer backend): the worker's in-place reload, one call whose iterator
    walks the buckets, then the prefix cache is dropped. GPU (`transfer=True`): vLLM's weight-transfer API over
    CUDA IPC, `init_weight_transfer_engine` once, then per push `start_weight_update`, one `update_weights` per
    bucket and `finish_weight_update`; the engine reads the trainer's tensors in place (no host copy)."""

    def __init__(self, llm, bucket_bytes: int, transfer: bool = False, tied_head: bool = False):
        self.llm, self.bucket_bytes, self.transfer, self.tied_head = llm, bucket_bytes, transfer, tied_head
        self.started = False
        self.seconds = 0.0  # of the last push

    def push(self, lm) -> None:
        start = time.perf_counter()
        with torch.no_grad(), merged_adapter(lm):
            groups = buckets(engine_weight_names(lm), self.bucket_bytes)
            if self.transfer:
                self._transfer(groups)
            else:
                flat = (item for group in groups for item in group)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": flat})
                if self.tied_head:
                    self.llm.collective_rpc(repack_tied_lm_head)
        self.llm.reset_prefix_cache()
        self.seconds = time.perf_counter() - start

    def _transfer(self, groups: Iterator[list[tuple[str, torch.Tensor]]]) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if not self.started:
            self.llm.collective_rpc("init_weight_transfer_engine", args=({"packed": False},))
            self.started = True
        self.llm.collective_rpc("start_weight_update")
        for group in groups:
            kept = [tensor.contiguous() for _, tensor in group]  # alive until the engine has read them
            uuid = str(torch.cuda.get_device_properties(kept[0].device).uuid) if kept[0].is_cuda else "cpu"
            self.llm.collective_rpc("update_weights", args=({
                "names": [name for name, _ in group],
                "dtype_names": [str(t.dtype).removeprefix("torch.") for t in kept],
                "shapes": [list(t.shape) for t in kept],
                "ipc_handles": [{uuid: reduce_tensor(t)[1]} for t in kept],
            },))
        self.llm.collective_rpc("finish_weight_update")


def ties_output_embedding(lm) -> bool:
    """Whether the LM's output projection is its input embedding (GPT-2, small Qwen2/Llama/Gemma checkpoints)."""
    out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def repack_tied_lm_head(worker) -> None:
    """Runs on the engine's worker after a CPU reload of a tied model. vLLM's CPU build computes the logits from
    a prepacked copy of the lm head's weight; the reload refills the tensor the head shares with the embedding
    through the embedding layer only, so without this the head would keep sampling from the old weights."""
    head = worker.model_runner.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)


# ====================================================================== the engine
def check_architecture(vllm, lm) -> None:
    """ConfigError unless vLLM has a model class for the policy's architecture."""
    from vllm.model_executor.models import ModelRegistry

    names = list(getattr(lm.config, "architectures", None) or [type(lm).__name__])
    supported = ModelRegistry.get_supported_archs()
    if not any(name in supported for name in names):
        raise ConfigError(f"rollout_engine: vllm: vLLM {vllm.__version__} has no model for {', '.join(names)}; "
                          "use rollout_engine: hf for this policy")


def engine_length(config, model_config) -> int:
    """The engine's max_model_len: `vllm_max_model_len`, or max_prompt_length + max_new_tokens (+ max_episode_tokens
    for multi-turn episodes: a turn's context is the whole episode so far), never above the positions the model
    has (vLLM refuses a longer one; a prompt plus response that long would not fit either)."""
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    asked = config.sampling.vllm_max_model_len
    if asked is not None:
        if positions is not None and asked > positions:
            raise ConfigError(f"vllm_max_model_len {asked} is above the model's {positions} positions "
                              f"(max_position_embeddings): set it to at most {positions}")
        return asked
    wanted = config.data.max_prompt_length + engine_budget(config)
    return wanted if positions is None else min(wanted, positions)


def build_engine(model_path: str, lm, sampling_config, max_model_len: int, max_num_seqs: int, seed: int, device):
    """A colocated vllm.LLM on the policy's checkpoint folder, sized for one rollout. It must come after the run
    has set torch's thread count: in-process, vLLM turns later `torch.set_num_threads` calls into no-ops."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    on_cpu = device.type == "cpu"
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(sampling_config.vllm_kv_cache_gb))
    vllm = import_vllm()
    check_architecture(vllm, lm)
    dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
    extra = {} if on_cpu else {"gpu_memory_utilization": sampling_config.vllm_gpu_memory_utilization,
                               "weight_transfer_config": {"backend": "ipc"}}
    try:
        return vllm.LLM(
            model=model_path, skip_tokenizer_init=True, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, enforce_eager=on_cpu, enable_prefix_caching=False,
            logprobs_mode="processed_logprobs", generation_config="vllm",  # the checkpoint's sampling defaults unread
            load_format="dummy",  # no weights read from the folder: the policy's are pushed before every rollout
            **extra,
        )
    except ValueError as e:  # vLLM's own config checks (pydantic): the message says which setting
        reason = " ".join(str(e).split())
        raise ConfigError(f"rollout_engine: vllm: vLLM {vllm.__version__} refused the engine settings: {reason}") from e


def sampling_params(vllm, settings: SamplingSettings, num_generations: int, vocab_size: int,
                    max_new_tokens: int | None = None):
    """The run's sampling keys as vLLM's SamplingParams: n completions per prompt, the sampled token's
    log-prob, nothing else shaping the distribution. Stop ids beyond the model's `vocab_size` logits can never
    be sampled, so they are left out (vLLM refuses them). `max_new_tokens`: a shorter budget (an episode's turn)."""
    stops = [i for i in settings.stop_token_ids if i < vocab_size]
    return vllm.SamplingParams(
        n=num_generations, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        max_tokens=max_new_tokens or settings.max_new_tokens, stop_token_ids=stops or None, ignore_eos=True,
        logprobs=0, detokenize=False, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        min_p=0.0, min_tokens=0,
    )


def responses_from_outputs(outputs, settings: SamplingSettings, max_new_tokens: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's RequestOutputs (one per prompt, n completions each) as (response_ids, action_mask, ended, logprobs),
    (rows, longest) each but ended (rows,), rows in prompt order, a prompt's completions together."""
    pad = settings.pad_token_id
    ids = torch.full((sum(len(o.outputs) for o in outputs), max_new_tokens), pad, dtype=torch.long)
    logprobs = torch.zeros(ids.shape, dtype=torch.float32)
    row = 0
    for output in outputs:
        for completion in output.outputs:
            tokens = list(completion.token_ids)[:max_new_tokens]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            for t, (token, entry) in enumerate(zip(tokens, completion.logprobs or [])):
                logprobs[row, t] = entry[token].logprob
            row += 1
    ids, mask, ended = truncate_after_stop(ids, list(settings.stop_token_ids), pad)
    longest = max(int(mask.sum(dim=1).max()), 1)
    return ids[:, :longest], mask[:, :longest], ended, (logprobs * mask)[:, :longest]


class VLLMEngine:
    """A colocated vLLM engine for the policy, the weights it samples from kept equal to the trainer's.
    `model_path`: the policy's checkpoint folder (the engine reads its architecture there; the weights are
    pushed before every rollout anyway). Both samplers use it: single responses (`VLLMSampler`) and
    episode turns (`llm_rl.sampling.episodes.EpisodeSampler`, through `turns`)."""

    def __init__(self, model, accelerator, settings: SamplingSettings, sampling_config, model_path: str,
                 max_model_len: int, seed: int):
        self.model, self.accelerator, self.settings = model, accelerator, settings
        self.vllm = import_vllm()
        lm = accelerator.unwrap_model(model).pretrained_model
        self.llm = build_engine(model_path, lm, sampling_config, max_model_len, settings.chunk_size, seed,
                                accelerator.device)
        self.weights = EngineWeights(self.llm, sampling_config.vllm_weight_sync_bucket_mb << 20,
                                     transfer=accelerator.device.type == "cuda", tied_head=ties_output_embedding(lm))
        self.vocab_size = lm.get_output_embeddings().out_features
        sampling_params(self.vllm, settings, 1, self.vocab_size)  # settings vLLM refuses: refused here, at build
        self.timing: dict[str, float] = {}  # the last rollout's weight push, merged into the update's time/* metrics

    def push_weights(self) -> None:
        """The trainer's current policy weights into the engine (before every rollout)."""
        self.weights.push(self.accelerator.unwrap_model(self.model).pretrained_model)
        self.timing = {"time/weight_sync": self.weights.seconds}

    def generate(self, contexts: list[list[int]], n: int, max_new_tokens: int):
        """`n` completions of each token-id context, at most `max_new_tokens` each:
        (response_ids, action_mask, ended, logprobs) on the CPU, a context's completions on consecutive rows."""
        from vllm.inputs import TokensPrompt

        params = sampling_params(self.vllm, self.settings, n, self.vocab_size, max_new_tokens)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params, use_tqdm=False)
        return responses_from_outputs(outputs, self.settings, max_new_tokens)

    @contextlib.contextmanager
    def turns(self):
        """Weights pushed once, then a `TurnGenerator` for the episodes' turns of this rollout."""
        self.push_weights()
        device = self.accelerator.device

        def generate_turn(contexts: list[list[int]], max_new_tokens: int):
            return tuple(t.to(device) for t in self.generate(contexts, 1, max_new_tokens))

        yield generate_turn


class VLLMSampler:
    """`Sampler` of single responses over a `VLLMEngine`: num_generations completions per prompt in one call."""

    def __init__(self, engine: VLLMEngine, tokenizer, num_generations: int):
        self.engine, self.tokenizer, self.num_generations = engine, tokenizer, num_generations

    @property
    def timing(self) -> dict[str, float]:
        return self.engine.timing

    @torch.no_grad()
    def sample(self, batch: dict) -> Rollout:
        self.engine.push_weights()
        contexts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
        response_ids, action_mask, ended, logprobs = self.engine.generate(
            contexts, self.num_generations, self.engine.settings.max_new_tokens)
        device, repeat = self.engine.accelerator.device, self.num_generations
        return Rollout(
            batch["prompt_ids"].repeat_interleave(repeat, 0).to(device),
            batch["prompt_mask"].repeat_interleave(repeat, 0).to(device),
            response_ids.to(device), action_mask.to(device), ended.to(device),
            sampler_logprobs=logprobs.to(device),
            prompts=repeat_rows(batch["prompts"], repeat), prompt_messages=repeat_rows(batch["prompt_messages"], repeat),
            completions=decode_responses(self.tokenizer, response_ids, action_mask, ended),
            columns={name: repeat_rows(values, repeat) for name, values in batch["columns"].items()},
            group_size=repeat,
        )
