"""Built-in preference pairs on the addition task: chosen = the sum, rejected = a plausible mistake.

    "35+47=" chosen "82"  rejected "81"/"83" (off by one) | "72"/"92"/"182" (carry error) | "28" (digit swap)
                          | "57" (random: any other number from 0 to 165)

The problems come from `llm_rl.tasks.arithmetic.make_splits`, with the same defaults as
`llm-rl demo` (2 digits, 500 held-out problems, seed 0): training pairs use only the
training problems, held-out pairs only the held-out ones, so a reward model trained here
never sees the problems PPO is evaluated on. No download, no file: a reward-model config
names the splits as `dataset_name: llm_rl.tasks.addition_preferences:load_splits`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llm_rl.tasks import arithmetic

MISTAKES = ("off_by_one", "carry_error", "digit_swap", "random")


def wrong_answer(problem: arithmetic.Problem, kind: str, rng: random.Random) -> str | None:
    """An incorrect answer of the given kind, or None when that kind cannot differ from the sum here.

    off_by_one: sum +- 1.  carry_error: sum +- 10^k (k >= 1), a carry dropped or one invented.
    digit_swap: two adjacent digits of the sum exchanged.  random: any other number from 0 to 2 * sum + 1.
    The sign of off_by_one and carry_error is a coin flip: were wrong answers mostly smaller (only
    dropped carries), "the larger answer is right" would rank most pairs correctly, a reward model
    would learn that instead of addition, and PPO would then push answers upwards.
    """
    total = problem.a + problem.b
    if kind == "off_by_one":
        wrong = total + rng.choice((-1, 1))
        return str(wrong if wrong >= 0 else total + 1)
    if kind == "carry_error":
        if rng.random() < 0.5 and total >= 10:  # a carry dropped: one place reads one less
            return str(total - 10 ** rng.randrange(1, len(str(total))))
        return str(total + 10 ** rng.randrange(1, len(str(total)) + 1))  # a carry invented
    if kind == "digit_swap":
        digits = list(str(total))
        places = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
        if not places:
            return None
        i = rng.choice(places)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
        return str(int("".join(digits)))  # a leading zero is dropped, as a sloppy adder would write it
    if kind == "random":  # a guess, as likely above the sum as below: the mistakes no kind above describes
        return str(rng.randrange(0, 2 * total + 2))
    raise ValueError(f"unknown mistake {kind!r}; choose from {MISTAKES}")


def make_pairs(problems: Sequence[arithmetic.Problem], pairs_per_problem: int = 1, seed: int = 0) -> list[dict]:
    """Rows {prompt, chosen, rejected, mistake}; mistakes cycle through MISTAKES, from a seeded generator."""
    rng = random.Random(seed)
    rows = []
    for index, problem in enumerate(problems):
        for k in range(pairs_per_problem):
            start = (index * pairs_per_problem + k) % len(MISTAKES)
            for kind in MISTAKES[start:] + MISTAKES[:start]:  # the next kind that applies to this problem
                wrong = wrong_answer(problem, kind, rng)
                if wrong is not None and wrong != problem.answer:
                    break
            rows.append({"prompt": problem.prompt, "chosen": problem.answer, "rejected": wrong, "mistake": kind})
    return rows


def load_splits(num_digits: int = 2, num_heldout: int = 500, pairs_per_problem: int = 1, seed: int = 0):
    """`datasets.DatasetDict` with 'train' and 'test' preference pairs, from the demo's problem splits."""
    import datasets

    train, heldout = arithmetic.make_splits(num_digits, 10 ** (2 * num_digits) - num_heldout, num_heldout, seed=seed)
    return datasets.DatasetDict(
        train=datasets.Dataset.from_list(make_pairs(train, pairs_per_problem, seed=seed)),
        test=datasets.Dataset.from_list(make_pairs(heldout, 1, seed=seed + 1)),
    )
