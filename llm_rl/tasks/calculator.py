"""Built-in tool-calling task, TRL's `environment_factory` shape: addition with a calculator tool.

A prompt asks "What is 12+34?"; the policy may call the `add` tool (`<tool_call>{"name": "add", "arguments":
{"a": 12, "b": 34}}</tool_call>`), reads its result in a `tool` message, and answers. `exact_sum` gives 1.0
when the final answer is the sum. A character-level tokenizer with a small tool-aware chat template and a
random tiny model make it run offline; a random model rarely calls the tool, so this task shows the wiring
(and tests it), not learning.

    python -m llm_rl.tasks.calculator outputs/calculator   # writes model/ and train.jsonl
    llm-rl ppo --config recipes/configs/calculator_tools.yaml
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

from llm_rl.tasks import arithmetic

MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<tool_call>", "</tool_call>"]
# tools=, when given, as a system turn; a reply ends with the EOS the policy wrote; tool results as <|tool|> turns
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Calculator:
    """One episode's calculator: the tool the policy may call, and the calls it made."""

    def reset(self, **row) -> None:
        self.calls: list[tuple[int, int]] = []
        return None  # the prompt column already asks the question

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.

        Returns:
            The sum of a and b.
        """
        self.calls.append((a, b))
        return a + b


def final_answer(transcript: str) -> str:
    """The last reply of an episode's transcript under CHAT_TEMPLATE (its EOS removed)."""
    return transcript.rsplit("<|assistant|>", 1)[-1].split(arithmetic.EOS)[0].strip()


def exact_sum(prompts, completions, answer, environments=None, **_) -> list[float]:
    """1.0 when the episode's final answer is the sum, else 0.0."""
    return [float(final_answer(c) == str(a)) for c, a in zip(completions, answer)]


def build_tokenizer():
    """Characters of printable ASCII, the role and tool-call markers as single tokens, and CHAT_TEMPLATE."""
    tokenizer = arithmetic.build_tokenizer([c for c in string.printable if c not in "\t\n\r\x0b\x0c"])
    tokenizer.add_tokens(MARKERS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        rows.append({"prompt": f"What is {a}+{b}?", "a": a, "b": b, "answer": a + b})
    return rows


def prepare(folder: Path, num_rows: int = 64, seed: int = 0) -> Path:
    """A random tiny model with the task's tokenizer in folder/model, and the prompts in folder/train.jsonl."""
    import torch

    folder = Path(folder)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = arithmetic.build_model(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=1024)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in make_rows(num_rows, seed)))
    return folder


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/calculator")))
