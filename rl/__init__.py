"""aha's trainer: config, GRPO math, the training loop and the `aha` command."""
