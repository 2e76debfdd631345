"""The one exception a run raises to stop on purpose (the CLI prints its message and exits 3)."""


class TrainingStopped(RuntimeError):
    """The run must stop: too many consecutive non-finite steps, or a mismatch budget with action ``stop``.
    The message says why and names the checkpoint a resume would start from."""
