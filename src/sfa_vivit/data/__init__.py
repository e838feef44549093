"""Data: annotation adapters, shard preparation, the shard reader with clip sampling and
augmentations, and the synthetic dataset."""
