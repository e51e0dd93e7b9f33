"""Layer 6: the run skeleton (output folder, checkpoints, resume, callbacks, evaluation) and the trainers."""
