"""tether: RL post-training for language models that measures and corrects policy mismatch."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``tether.Trainer`` imports torch and the trainer on first use, so ``import tether`` (the CLI's start) stays
    light."""
    if name in ("Trainer", "TrainerState"):
        from tether import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
