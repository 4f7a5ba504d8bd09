"""Training: state and pure step, optimizer, checkpoints, metrics, the loop."""
