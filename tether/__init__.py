"""tether: RL post-training for language models that measures and corrects policy mismatch."""

__version__ = "0.1.0"
