"""Layer 5: what a run leaves for people to read: model cards and the Hub push, metrics files, curves."""
