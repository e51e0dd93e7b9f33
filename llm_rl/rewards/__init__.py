"""Layer 4: reward functions, the reward model, phase 2's scorers and scoring files of completions."""
