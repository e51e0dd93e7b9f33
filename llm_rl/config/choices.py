"""TODO docstring"""

from __future__ import annotations

from typing import Literal

# The choices of the config's string options, as types: loading checks membership (`coerce`), and the
# modules that implement them read them from here (llm_rl.algorithms.advantages.ESTIMATORS is keyed by
# AdvantageEstimator). They live here, not in those modules, so that reading a config imports no torch.
AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp", "prefix_diff"]


KLEstimator = Literal["k1", "k2", "k3", "abs"]


KLPlacement = Literal["reward", "loss"]


LossAggregation = Literal["token_mean", "seq_mean_token_mean"]


Schedule = Literal["constant", "linear", "cosine"]


TorchDtype = Literal["float32", "bfloat16", "float16", "auto"]


Decoding = Literal["greedy", "sampled"]


Discount = Literal["turn", "token"]
