"""``tether train``: RL post-training with any objective preset (flags generated from TrainConfig)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tether.configs import add_dataclass_arguments, config_from_args, given

NAME = "train"
HELP = "Run RL post-training (default: the built-in model on arithmetic, CPU, a few minutes)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tether.train.config import TrainConfig  # imported here: the config pulls in torch (cli.py is lazy)

    add_dataclass_arguments(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from tether.train.checkpoint import CheckpointError
    from tether.train.config import TrainConfig, TrainMode
    from tether.train.signals import Interrupted
    from tether.train.summary import print_summary
    from tether.train.sync import TrainingStopped, train

    resume = given(args, "resume")
    if resume and args.config is None:
        saved = Path(resume) / "config.json"
        if not saved.exists():
            raise FileNotFoundError(f"--resume {resume}: no config.json there (not a tether run directory?)")
        args.config = str(saved)  # the run's own config; explicit flags still override it
    cfg = config_from_args(TrainConfig, args)
    if cfg.mode is TrainMode.ASYNC:  # docs/async.md
        from tether.train.async_loop import train
    elif cfg.mode is TrainMode.DIST:  # docs/distributed.md
        from tether.dist.driver import train
    try:
        summary = train(cfg)
    except TrainingStopped as e:
        print(f"tether train: stopped: {e}")
        return 3
    except Interrupted as e:  # SIGINT / SIGTERM: one line, no traceback (docs/reliability.md)
        print(f"tether train: {e}")
        return 128 + e.signum
    except CheckpointError as e:  # a full disk, no intact checkpoint: what is intact and what to do
        print(f"tether train: error: {e}", file=sys.stderr)
        return 1
    if summary and not cfg.quiet:  # a trainer rank > 0 under an external launcher has none: rank 0 prints it
        print_summary(summary)
    return 0
