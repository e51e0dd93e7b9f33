"""The config's string options as `Literal` types: loading checks a value against them (`coerce`).

The variant options take their choices from the tables of llm_rl.config.variants, so a name is
written once; the implementations (llm_rl.algorithms) are keyed by the same names. They live in
the config layer, not beside those implementations, so that reading a config imports no torch.
"""

from __future__ import annotations

from typing import Literal

from llm_rl.config.variants import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALINGS,
    IMPORTANCE_SAMPLING_MODES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    ROLLOUT_ENGINES,
)

AdvantageEstimator = Literal[tuple(ADVANTAGE_ESTIMATORS)]
AdvantageScaling = Literal[tuple(ADVANTAGE_SCALINGS)]
KLEstimator = Literal[tuple(KL_ESTIMATORS)]
LossAggregation = Literal[tuple(LOSS_AGGREGATIONS)]
RolloutEngine = Literal[tuple(ROLLOUT_ENGINES)]
ImportanceSamplingModeName = Literal[tuple(IMPORTANCE_SAMPLING_MODES)]

KLPlacement = Literal["reward", "loss"]
Schedule = Literal["constant", "linear", "cosine"]
TorchDtype = Literal["float32", "bfloat16", "float16", "auto"]
Decoding = Literal["greedy", "sampled"]
Discount = Literal["turn", "token"]
