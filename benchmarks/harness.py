"""What the benchmark drivers (ppo_update.py, grpo_update.py) and their sides share, written once.

- workers: every side runs in its own subprocess, the driver script again with hidden `--_worker` options
  (`add_worker_args`, `worker_command`, `run_worker`, `worker_main`), in a quiet offline environment
  (`quiet_env`, `silence`) with `--threads` torch threads (`set_threads`);
- measuring: RSS (`rss_now_mb`, `peak_rss_mb`, `setup_memory`), update clocks and phase wrappers
  (`UpdateClock`, `intervals`, `timed`), garbage collections (`GcLog`), profiles (`make_profiler`) and
  statistics (`median`, `quantile`, `stats`, `pooled_memory`);
- what both sides get: the settings, the tiny GPT-2 models, tokenizers and prompts, built once by the driver
  and loaded with `from_pretrained` by each side (`build_ppo_assets`, `build_grpo_assets`), and the GRPO
  reward function (`Reward`);
- the driver's part: work folder, assets file, round order, versions, table rows, the JSON last line.

Only the standard library is imported at module level (torch, transformers, tokenizers inside the functions):
TRL's interpreter imports this module too (grpo_update.py --trl-python), and nothing of llm_rl.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---------------------------------------------------------------------------------- what both sides get
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

# ppo_update.py: policy (and TRL's value model) shape; reward model shape; rollout shape
SIZES = {
    "default": dict(n_layer=4, n_embd=256, n_head=4, vocab=2048, rm_layer=2, rm_embd=256, rm_head=4,
                    batch_size=16, prompt_len=16, max_new_tokens=48, num_prompts=256),
    "large": dict(n_layer=8, n_embd=512, n_head=8, vocab=2048, rm_layer=2, rm_embd=256, rm_head=4,
                  batch_size=16, prompt_len=16, max_new_tokens=48, num_prompts=256),
    "tiny": dict(n_layer=1, n_embd=32, n_head=2, vocab=64, rm_layer=1, rm_embd=32, rm_head=2,
                 batch_size=2, prompt_len=4, max_new_tokens=4, num_prompts=8),
}

# ppo_update.py: the PPO hyper-parameters both sides get (llm_rl's names; side_trl maps them to TRL's)
PPO_SETTINGS = dict(
    ppo_epochs=1, num_mini_batches=1, gradient_accumulation_steps=1,
    learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    max_grad_norm=None,  # TRL's PPO loop never clips gradients
    clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, ent_coef=0.0,
    gamma=1.0, lam=0.95, whiten_advantages=True, whiten_rewards=False,
    kl_coef=0.05, kl_estimator="k1", kl_placement="reward", adaptive_kl=False,
    temperature=1.0, top_k=0, top_p=1.0, missing_eos_penalty=None, stop_token=None,
    dtype="float32", device="cpu", seed=42,
)

# grpo_update.py
GRPO_CHARS = "0123456789+="  # token ids 0..11; <pad>, <eos>, <unk> get 12, 13, 14 (outside the model's vocabulary)
GRPO_MODEL = dict(n_layer=4, n_embd=128, n_head=4, n_positions=64)
GRPO_NUM_PROMPTS = 512  # operands 100..999: every prompt is exactly 8 characters, so no prompt padding on either side
GRPO_SETTINGS = dict(
    batch_prompts=32, num_generations=8,  # 256 completions per update
    epochs=1, minibatches=1, gradient_accumulation_steps=1,
    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-8, max_grad_norm=1.0,
    clip_range=0.2, kl_coef=0.0, ent_coef=0.0, loss_agg="token_mean (TRL: dapo)",
    advantages="group mean / group std (TRL: scale_rewards group)",
    temperature=1.0, top_k=0, top_p=1.0, dropout="off (llm_rl always; TRL disable_dropout=True)",
    dtype="float32", device="cpu", seed=42, checkpoints="none in the timed updates", logging_steps=10,
)


def _tokenizer(vocab: dict, pre_tokenizer, decoder):
    """A WordLevel tokenizer over `vocab`; <pad>, <eos>, <unk> come after it, outside the models' vocabulary:
    the models have no logit for them, so they never sample EOS (or pad) and responses have a fixed length."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    n = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab={**vocab, PAD: n, EOS: n + 1, UNK: n + 2}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left")


def word_tokenizer(vocab_size: int):
    """Words w0..w{V-1} take ids 0..V-1 (ppo_update.py)."""
    from tokenizers import decoders, pre_tokenizers

    return _tokenizer({f"w{i}": i for i in range(vocab_size)}, pre_tokenizers.WhitespaceSplit(),
                      decoders.WordPiece(prefix="##", cleanup=False))  # joins words with single spaces


def char_tokenizer():
    """One token per character of GRPO_CHARS (grpo_update.py)."""
    from tokenizers import decoders, pre_tokenizers

    return _tokenizer({ch: i for i, ch in enumerate(GRPO_CHARS)}, pre_tokenizers.Split("", behavior="isolated"),
                      decoders.Fuse())


def gpt2_config(vocab_size: int, **shape):
    """A GPT-2 config; special-token ids stay None: they are outside the model's vocabulary."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)


def save_policy(policy, path: Path) -> None:
    policy.generation_config.eos_token_id = policy.generation_config.bos_token_id = None
    policy.save_pretrained(path)


def write_jsonl(path: Path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_ppo_assets(root: Path, size: dict, seed: int) -> dict:
    """ppo_update.py: tokenizer, policy, reward model, TRL's value model and prompts, saved under `root`."""
    import random

    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(size["vocab"])
    n_positions = 1 << (size["prompt_len"] + size["max_new_tokens"] - 1).bit_length()

    def config(n_layer, n_embd, n_head, **kw):
        return gpt2_config(size["vocab"], n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, **kw)

    paths = {name: root / name for name in ("policy", "reward", "value")}
    policy = GPT2LMHeadModel(config(size["n_layer"], size["n_embd"], size["n_head"]))
    save_policy(policy, paths["policy"])
    # TRL's value model: a sequence classifier with the policy's shape, its backbone started from the policy
    value = GPT2ForSequenceClassification(config(size["n_layer"], size["n_embd"], size["n_head"], num_labels=1))
    value.transformer.load_state_dict(policy.transformer.state_dict())
    value.save_pretrained(paths["value"])
    reward = GPT2ForSequenceClassification(config(size["rm_layer"], size["rm_embd"], size["rm_head"], num_labels=1))
    reward.save_pretrained(paths["reward"])
    for path in paths.values():
        tokenizer.save_pretrained(path)

    # prompts: prompt_len random words each; the trailing space lets "prompt + completion" re-tokenize
    # into exactly prompt_len + max_new_tokens tokens (llm_rl's reward model scores text)
    rng = random.Random(seed)
    rows = ({"prompt": " ".join(f"w{rng.randrange(size['vocab'])}" for _ in range(size["prompt_len"])) + " "}
            for _ in range(size["num_prompts"]))
    data = write_jsonl(root / "prompts.jsonl", rows)
    return {**{k: str(v) for k, v in paths.items()}, "data": data, "policy_params": n_params(policy),
            "reward_params": n_params(reward)}


def build_grpo_assets(root: Path, seed: int) -> dict:
    """grpo_update.py: the character-level policy and the addition prompts (with their answers), under `root`."""
    import random

    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    policy = GPT2LMHeadModel(gpt2_config(len(GRPO_CHARS), **GRPO_MODEL))
    path = root / "policy"
    save_policy(policy, path)
    tokenizer.save_pretrained(path)
    rng = random.Random(seed)

    def problem():
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}

    data = write_jsonl(root / "prompts.jsonl", (problem() for _ in range(GRPO_NUM_PROMPTS)))
    return {"policy": str(path), "data": data, "policy_params": n_params(policy)}


def char_match(prompts, completions, answer, **_) -> list[float]:
    """Share of the answer's characters the completion has at the same position (dense, in [0, 1])."""
    return [sum(x == y for x, y in zip(c, a)) / max(len(a), len(c), 1) for c, a in zip(completions, answer)]


class Reward:
    """grpo_update.py's reward on both sides: `char_match`, also reading the peak RSS at every call: the same
    point of every update on both sides (after generation, before training), without wrapping any method of
    either trainer. TRL calls it with keywords, llm_rl positionally."""

    __name__ = __reward_name__ = "char_match"

    def __init__(self):
        self.peak_mb: list[float] = []

    def __call__(self, prompts, completions, answer, **_):
        self.peak_mb.append(peak_rss_mb())
        return char_match(prompts, completions, answer)


# ---------------------------------------------------------------------------------- workers
def quiet_env() -> dict:
    """The workers' environment: offline, no telemetry, CPU, this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true", ACCELERATE_MIXED_PRECISION="no",
        WANDB_DISABLED="true", DISABLE_MLFLOW_INTEGRATION="TRUE", PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def silence() -> None:
    """No warnings, logging or progress bars from transformers and datasets in this process."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:
        pass


def set_threads(threads: int) -> None:
    """torch.set_num_threads in a worker (0: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_worker_args(parser, sides: list[str]) -> None:
    """The hidden options a driver's worker processes get (see `worker_command`)."""
    import argparse

    parser.add_argument("--_worker", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--_assets", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    parser.add_argument("--_round", type=int, default=0, help=argparse.SUPPRESS)


def worker_command(python: str, script: str, side: str, assets_file: Path, result_file: Path, round_: int) -> list[str]:
    """The start of a worker's command line: `script` run again as `side`'s worker (the driver adds its options)."""
    return [python, str(Path(script).resolve()), "--_worker", side, "--_assets", str(assets_file),
            "--_result", str(result_file), "--_round", str(round_)]


def run_worker(cmd: list[str], result_file: Path, what: str) -> dict:
    """Run one side's worker process (`cmd`), which writes its result JSON to `result_file`; that result,
    with the wall time of the whole process added."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=quiet_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-20000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    result = json.loads(result_file.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def worker_main(a, runners: dict) -> None:
    """In a worker process: `runners[a._worker](a, assets)` with `--threads` torch threads; its result to `a._result`."""
    set_threads(a.threads)
    assets = json.loads(Path(a._assets).read_text())
    result = runners[a._worker](a, assets)
    Path(a._result).write_text(json.dumps(result))


def announce(message: str) -> None:
    print(f"[bench] {message} ...", file=sys.stderr, flush=True)


def round_order(sides: list, round_: int) -> list:
    """Who runs first alternates between rounds."""
    return sides if round_ % 2 == 0 else sides[::-1]


# ---------------------------------------------------------------------------------- the driver's folder and output
def open_workdir(a, prefix: str):
    """The driver's working folder: `a.workdir`, or a new temporary one (returned, to clean up at the
    end; None otherwise). Also quiets the libraries' output in this process and the workers'."""
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        a.workdir = tmp.name
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    os.environ.update({k: v for k, v in quiet_env().items() if k != "PYTHONPATH"})
    silence()
    return tmp


def write_assets(workdir: str, assets: dict) -> Path:
    """The assets' description, for the workers (`--_assets`)."""
    path = Path(workdir) / "assets.json"
    path.write_text(json.dumps(assets))
    return path


def versions(names=("torch", "transformers", "accelerate", "trl")) -> dict:
    """Installed versions of `names` (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def environment(names=("torch", "transformers", "accelerate", "trl")) -> dict:
    """The `python` and `versions` entries of the JSON last line."""
    return {"python": platform.python_version(), "versions": versions(names)}


def table_row(*cells, widths) -> str:
    """One table line: the first cell left-aligned, the others right-aligned."""
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def finish(record: dict, tmp) -> None:
    """Remove the temporary work folder (if any), then print the JSON last line."""
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(record, default=str))


# ---------------------------------------------------------------------------------- measuring
def rss_now_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def touch(*models) -> None:
    """Read every weight once: safetensors weights are memory-mapped, so untouched ones are not yet in RSS.
    Called before "RSS after setup" on both sides so that figure includes all models' weights."""
    import torch

    with torch.no_grad():
        for m in models:
            if m is not None:
                for p in m.parameters():
                    p.sum()


def setup_memory(*models) -> tuple[float, float]:
    """(RSS, peak RSS) after setup, with every weight of `models` read in (`touch`)."""
    touch(*models)
    return rss_now_mb(), peak_rss_mb()


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict:
    return {"median": median(xs), "mean": statistics.fmean(xs), "p99": quantile(xs, 0.99),
            "max": max(xs), "min": min(xs), "n": len(xs)}


def pooled(rounds: list[dict], key: str) -> list:
    """`key`'s values of every round, in one list."""
    return [x for r in rounds for x in r[key]]


def pooled_memory(rounds: list[dict]) -> dict:
    """Peak RSS, RSS after setup and the growth between them: the largest of any round."""
    return {"peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
            "rss_after_setup_mb": max(r["rss_after_setup_mb"] for r in rounds),
            "peak_growth_mb": max(r["peak_rss_mb"] - r["rss_after_setup_mb"] for r in rounds)}


def intervals(start: float, ends: list[float]) -> list[float]:
    """Seconds from each end to the next, the first from `start`."""
    bounds = [start] + ends
    return [b1 - b0 for b0, b1 in zip(bounds, bounds[1:])]


def timed(fn, seconds: list, ends: list | None = None):
    """`fn`, appending the seconds of each call to `seconds` (and the clock at its end to `ends`); it only observes."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        t1 = time.perf_counter()
        seconds.append(t1 - t0)
        if ends is not None:
            ends.append(t1)
        return out

    return wrapper


class UpdateClock:
    """The wall clock at the end of every update (`mark`, from a trainer callback), so the intervals include
    everything the training loop does; the peak RSS at the end of the last update; the profiler runs over
    the timed updates only (after `warmup`, stopped before train() saves or plots anything)."""

    def __init__(self, total: int, warmup: int, profiler=None):
        self.total, self.warmup, self.profiler = total, warmup, profiler
        self.marks: list[float] = []
        self.peak_at_last_update: float | None = None
        self.start_time = 0.0

    def start(self) -> None:
        """Just before train()."""
        if self.profiler is not None and self.warmup == 0:
            self.profiler.start()
        self.start_time = time.perf_counter()

    def mark(self) -> None:
        self.marks.append(time.perf_counter())
        if len(self.marks) == self.total:
            self.peak_at_last_update = peak_rss_mb()
            if self.profiler is not None:
                self.profiler.stop()
        if self.profiler is not None and len(self.marks) == self.warmup:
            self.profiler.start()

    def intervals(self) -> list[float]:
        return intervals(self.start_time, self.marks)

    def profile(self, result: dict, top: int) -> dict:
        """`result`, with the profile's report added when there is a profiler."""
        if self.profiler is not None:
            result["profile"] = self.profiler.report(top)
        return result


class GcLog:
    """Every garbage collection (start relative to `origin`, seconds, generation), through gc.callbacks."""

    def __init__(self):
        self.origin, self.events, self._t0 = time.perf_counter(), [], 0.0
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.events.append((self._t0 - self.origin, time.perf_counter() - self._t0, info["generation"]))

    def per_interval(self, bounds: list[float]) -> list[dict]:
        """gc seconds and gen-2 count in each [bounds[i], bounds[i+1]) (times relative to `origin`)."""
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            inside = [e for e in self.events if lo <= e[0] < hi]
            out.append({"seconds": sum(e[1] for e in inside), "gen2": sum(e[2] == 2 for e in inside),
                        "gen2_seconds": sum(e[1] for e in inside if e[2] == 2)})
        return out


class make_profiler:  # noqa: N801 - a small factory class
    """cProfile or torch.profiler over the timed updates (`--profile`); None when `kind` is None."""

    def __new__(cls, kind):
        if kind is None:
            return None
        return super().__new__(cls)

    def __init__(self, kind):
        self.kind = kind
        self.prof = None

    def start(self):
        if self.kind == "cprofile":
            import cProfile

            self.prof = cProfile.Profile()
            self.prof.enable()
        else:
            import torch.profiler as tp

            self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=False)
            self.prof.__enter__()

    def stop(self):
        if self.prof is None or getattr(self, "stopped", False):
            return
        self.stopped = True
        if self.kind == "cprofile":
            self.prof.disable()
        else:
            self.prof.__exit__(None, None, None)

    def report(self, top: int) -> str:
        if self.prof is None:
            return ""
        if self.kind == "cprofile":
            import io
            import pstats

            buf = io.StringIO()
            stats = pstats.Stats(self.prof, stream=buf).strip_dirs()
            stats.sort_stats("cumulative").print_stats(top)
            stats.sort_stats("tottime").print_stats(top)
            return buf.getvalue()
        return self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
