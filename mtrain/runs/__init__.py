"""A training run on disk: its directory, checkpoint files and their integrity, its lock and
its wandb record."""
