"""Layer 2: the policy with its value head, its training forward, and loading (tokenizer pad policy, LoRA)."""
