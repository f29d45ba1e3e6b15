"""Training: the pretraining loop, checkpoints, metrics sinks and synthetic token data."""
