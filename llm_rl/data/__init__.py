"""Layer 2: prompt datasets (text or chat), multi-turn dataset rows, and their seeded per-process order."""
