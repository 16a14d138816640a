"""The trainer: dense warm-up, mask identification, rewind, masked pre-training."""
