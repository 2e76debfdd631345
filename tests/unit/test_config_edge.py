"""The config's one edge (issue 12): the CLI, config files and the Python API build the same validated config."""

import argparse
import contextlib
import io
import math

import pytest

from tether.cli import build_parser
from tether.configs import add_dataclass_arguments, build, config_from_args, to_dict
from tether.train.config import (
    AsyncConfig,
    KLConfig,
    KLPlacement,
    OldLogits,
    StalenessPolicy,
    TrainConfig,
    TrainMode,
)

pytestmark = pytest.mark.unit


def subcommand_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", sorted(subcommand_parsers()))
def test_help_of_every_subcommand_renders_cleanly(name):
    """A bare % in a help string made argparse print its internal dict (option_strings, dest, ...)."""
    text = subcommand_parsers()[name].format_help()
    assert "option_strings" not in text and "%(" not in text and "dest=" not in text
    assert text.startswith("usage: tether")


def test_train_help_is_grouped_and_shows_choices():
    text = subcommand_parsers()["train"].format_help()
    for group in ("task:", "rewards:", "objective:", "KL penalty:", "run:", "sampling:", "optimisation:",
                  "model:", "engine:", "logging:", "mismatch budget:", "async (mode async):", "dist (mode dist):"):
        assert f"\n{group}\n" in text, group
    assert "--staleness-policy {wait,drop,downweight}" in text and "--mode {sync,async,dist}" in text
    assert "30 % so RL" in text  # the escaped % comes out as itself
    async_part = text.split("async (mode async):")[1]
    assert "--max-staleness" in async_part and "--old-logits" in async_part


def test_python_api_converts_strings_exactly_like_the_cli():
    cfg = TrainConfig.from_flat(mode="async", staleness_policy="drop", kl_placement="reward", kl_coef="0.1",
                                old_logits="snapshot", max_staleness="2")
    assert cfg.mode is TrainMode.ASYNC and cfg.async_.staleness_policy is StalenessPolicy.DROP
    assert cfg.kl_placement is KLPlacement.REWARD and cfg.kl == KLConfig(coef=0.1)
    assert cfg.old_logits is OldLogits.SNAPSHOT and cfg.lag == 2
    direct = TrainConfig(mode="async", kl_placement="reward", kl=KLConfig(coef=0.1))
    assert direct.mode is TrainMode.ASYNC and isinstance(direct.async_, AsyncConfig)
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, TrainConfig)
    cli = config_from_args(TrainConfig, p.parse_args(["--mode", "async", "--staleness-policy", "drop",
                                                      "--kl-placement", "reward", "--kl-coef", "0.1",
                                                      "--old-logits", "snapshot", "--max-staleness", "2"]))
    assert cli == cfg


def test_config_json_round_trips():
    """What a run writes to config.json is what --resume reads back."""
    cfg = TrainConfig.from_flat(mode="async", max_staleness=3, staleness_policy="downweight", kl_placement="loss",
                                kl_coef=0.5, kl_estimator="k2", budget_max_kl=0.02, budget_action="lower_lr",
                                grad_clip=None, top_p=0.9)
    assert build(TrainConfig, to_dict(cfg)) == cfg
    sync = TrainConfig.from_flat()
    assert build(TrainConfig, to_dict(sync)) == sync and "max_staleness" not in to_dict(sync)


@pytest.mark.parametrize("bad, words", [
    (dict(mode="ASYNC"), "'mode': 'ASYNC' is not one of: sync, async"),
    (dict(max_staleness=2), "'max_staleness' needs mode 'async'"),
    (dict(staleness_policy="drop"), "'staleness_policy' needs mode 'async'"),
    (dict(downweight_decay=0.3), "'downweight_decay' needs mode 'async'"),
    (dict(kl_coef=0.1), "'kl_coef' needs kl_placement reward or loss"),
    (dict(kl_placement="reward"), "'kl_coef' must be > 0"),
    (dict(kl_placement="loss", kl_coef=math.nan), "'kl_coef' must be finite"),
    (dict(kl_placement="loss", kl_coef=0.1, kl_estimator="k9"), "'kl_estimator' must be one of"),
    (dict(grad_clip=-1), "'grad_clip' must be > 0 or none"),
    (dict(grad_clip=0), "'grad_clip' must be > 0 or none"),
    (dict(temperature=0), "'temperature' must be finite and > 0"),
    (dict(temperature=math.nan), "'temperature' must be finite"),
    (dict(top_p=0), "'top_p' must be in (0, 1]"),
    (dict(top_p=1.5), "'top_p' must be in (0, 1]"),
    (dict(top_k=0), "'top_k' must be >= 1 or none"),
    (dict(lr=math.inf), "'lr' must be finite"),
    (dict(weight_decay=-1), "'weight_decay' must be >= 0"),
    (dict(threads=0), "'threads' must be >= 1 or none"),
    (dict(reward_timeout_s=0), "'reward_timeout_s' must be finite and > 0"),
    (dict(reward_timeout_s=math.inf), "'reward_timeout_s' must be finite"),
    (dict(budget_lr_factor=1.0), "'budget_lr_factor' must be in (0, 1)"),
    (dict(budget_max_kl=math.nan), "'budget_max_kl' must be finite"),
    (dict(learning_rate=1e-5), "'learning_rate' (did you mean 'lr'?"),
    (dict(num_generations=8), "'num_generations' (did you mean 'group_size'?"),
    (dict(max_stalenes=2), "'max_stalenes' (did you mean 'max_staleness'?)"),
])
def test_bad_values_are_refused_naming_the_field(bad, words):
    with pytest.raises(ValueError) as e:
        TrainConfig.from_flat(**bad)
    assert words in str(e.value)


def test_direct_construction_checks_the_same(tmp_path):
    with pytest.raises(ValueError, match="'mode': 'ASYNC'"):
        TrainConfig(mode="ASYNC")
    with pytest.raises(ValueError, match="'grad_clip' must be > 0"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="section 'async_'"):
        TrainConfig(async_=AsyncConfig())
    with pytest.raises(ValueError, match="'max_staleness' must be >= 0"):
        AsyncConfig(max_staleness=-1)


def test_a_trl_name_in_a_config_file_gets_a_did_you_mean(tmp_path):
    f = tmp_path / "grpo.toml"
    f.write_text("learning_rate = 1e-5\nnum_generations = 4\n")
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, TrainConfig)
    with pytest.raises(ValueError) as e:
        config_from_args(TrainConfig, p.parse_args(["--config", str(f)]))
    msg = str(e.value)
    assert "grpo.toml" in msg and "did you mean 'lr'" in msg and "did you mean 'group_size'" in msg


def test_cli_error_is_one_line_without_traceback():
    from tether.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--mode", "sync", "--max-staleness", "3"])
    assert rc == 2 and "max_staleness" in err.getvalue() and "Traceback" not in err.getvalue()
