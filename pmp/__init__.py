"""pmp: Private Mask Pre-Training for causal language models."""

__version__ = "0.1.0"
