"""Layer 1: pure tensor maths on tensors and masks (no models, no I/O): ops, KL, advantages, losses, scores, targets."""
