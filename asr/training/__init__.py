"""Training: configuration, the loop (AMP, DDP, checkpoints, exact resume) and export."""
