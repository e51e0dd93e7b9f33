"""Layer 8: the built-in demos behind `llm-rl demo` (addition) and `llm-rl demo --task dialogue`."""
