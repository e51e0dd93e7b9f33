"""Layer 3: the `Rollout` type and the sampling seam (`Sampler`, `SamplingSettings`) with its engines:
`HFSampler` (transformers' generate) and `EpisodeSampler` (multi-turn episodes)."""
