"""``tether train``: RL post-training with any objective preset (flags generated from TrainConfig)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tether.configs import add_dataclass_arguments, config_from_args, given

NAME = "train"
HELP = "Run RL post-training (default: the built-in model on arithmetic, CPU, a few minutes)."
DESCRIPTION = (HELP + " The default job: the engine one weight version ahead (mode async, max_staleness 1) with "
               "int8 weights against the fp32 trainer, pi_old from snapshots (old_logits snapshot), objective tis; "
               "the defaults listed below are the classic job's, which --classic runs (and which any --objective, "
               "--mode, --model, --engine, --env, --bf16 or --eval-every starts from). docs/default_job.md")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tether.train.config import TrainConfig  # imported here: the config pulls in torch (cli.py is lazy)

    p.description = DESCRIPTION
    p.add_argument("--classic", action="store_true", help="the classic job instead of the default job: synchronous, "
                   "fp32 engine sharing the trainer's numerics, GRPO (the default before issue 24; docs/default_job.md)")
    add_dataclass_arguments(p, TrainConfig)


def train_config(args: argparse.Namespace):
    """The ``TrainConfig`` that ``tether train`` runs for parsed ``args``: the flags over the config file, over the
    default job (unless ``--classic``) and the agent algorithm's defaults."""
    from tether.train.config import TrainConfig, algorithm_defaults, default_job

    return config_from_args(TrainConfig, args, job=algorithm_defaults if args.classic
                            else lambda given: {**default_job(given), **algorithm_defaults(given)})


def run(args: argparse.Namespace) -> int:
    from tether.train.checkpoint import CheckpointError
    from tether.train.config import TrainMode
    from tether.train.signals import Interrupted
    from tether.train.summary import print_summary
    from tether.train.sync import TrainingStopped, train

    resume = given(args, "resume")
    if resume and args.config is None:
        saved = Path(resume) / "config.json"
        if not saved.exists():
            raise FileNotFoundError(f"--resume {resume}: no config.json there (not a tether run directory?)")
        args.config = str(saved)  # the run's own config; explicit flags still override it
    cfg = train_config(args)
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
