"""The training runtime: Hydra entry point, loop, checkpoints, metrics."""
