"""What the RL loops can feed a preset, checked at start-up before any model is built.

A preset lists the optional ``LossInputs`` fields it needs (``Preset.requires``). The RL loops of
``tether train`` fill:

- ``logp_mu_BT`` always (the engine's behaviour log-probs);
- ``logp_prox_BT`` always (sync: pi_old itself; async: the old-logit anchor of ``old_logits``);
- ``logp_ref_BT`` iff a KL to the reference is configured (``kl_placement`` reward or loss);
- ``expert_B`` / ``logp_expert_old_BT`` iff the task's training examples all carry an expert
  solution and the loop is the sync one (``tether.train.expert`` adds the rows);
- never the teacher fields ``logp_teacher_BT`` / ``logp_theta_BTV`` / ``logp_teacher_BTV``:
  distillation runs in ``tether distill``.

``check_requirements(preset, cfg, task)`` raises a ``ValueError`` that names the preset, the missing
inputs and what to do, so such a run stops before the warm start instead of failing in its first step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tether.objectives.registry import Preset, presets
from tether.train.config import KLPlacement, TrainConfig, TrainMode

ALWAYS = ("logp_mu_BT", "logp_prox_BT")
EXPERT_INPUTS = ("expert_B", "logp_expert_old_BT")
TEACHER_INPUTS = ("logp_teacher_BT", "logp_theta_BTV", "logp_teacher_BTV")


def has_expert_solutions(task: Any) -> bool:
    """Whether every training example of ``task`` carries an expert solution (``Example.solution``)."""
    return bool(getattr(task, "has_expert_solutions", False))


def needs_expert_rows(preset: Preset) -> bool:
    return any(name in EXPERT_INPUTS for name in preset.requires)


def expert_presets() -> list[str]:
    """The registered presets that train on expert rows (for messages and ``tether tasks``)."""
    return sorted(name for name, p in presets().items() if needs_expert_rows(p))


def inputs_available(cfg: TrainConfig, task: Any) -> set[str]:
    """The optional ``LossInputs`` fields the RL loop fills under ``cfg`` on ``task``."""
    available = set(ALWAYS)
    if cfg.kl_placement is not KLPlacement.NONE:
        available.add("logp_ref_BT")
    if cfg.mode is TrainMode.SYNC and cfg.env is None and has_expert_solutions(task):
        available.update(EXPERT_INPUTS)
    return available


def advice(cfg: TrainConfig, task: Any) -> dict[str, str]:
    """For each field the loop may not fill, what to do to get it (used in ``check_preset``'s message)."""
    if cfg.env is not None:
        expert = "expert rows are single-turn (a dataset's solutions); with --env use the agent algorithms instead"
    elif cfg.mode is not TrainMode.SYNC:
        expert = "expert rows are added by the sync loop only: use --mode sync"
    else:
        n = getattr(task, "n_expert_solutions", None)
        have = f" ({n} of {len(task.train_examples())} training rows of '{task.name}' have one)" if n is not None else ""
        expert = (f"it needs a dataset with an `expert` or `solution` column on every training row{have}; "
                  "see docs/tasks.md, 'Expert solutions'")
    return {
        **dict.fromkeys(EXPERT_INPUTS, expert),
        **dict.fromkeys(TEACHER_INPUTS, "it is a distillation preset: use `tether distill --objective NAME` "
                                        "(docs/distill.md)"),
        "logp_ref_BT": "configure a KL to the reference: --kl-placement reward|loss with --kl-coef > 0",
    }


def check_preset(preset: Preset, available: Iterable[str], *, hints: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` if ``preset`` needs an input outside ``available``, naming the preset, the
    missing inputs and (from ``hints``, keyed by field) what to do."""
    have = set(available)
    missing = [name for name in preset.requires if name not in have]
    if not missing:
        return
    todo = []
    for name in missing:
        hint = (hints or {}).get(name)
        if hint is not None and hint not in todo:
            todo.append(hint)
    what = "; ".join(t.replace("NAME", preset.name) for t in todo) or "no RL loop fills it"
    raise ValueError(f"objective '{preset.name}' needs LossInputs.{', LossInputs.'.join(missing)}, which "
                     f"`tether train` cannot fill here: {what}")


def check_requirements(preset: Preset, cfg: TrainConfig, task: Any) -> None:
    """The start-up check of both RL loops: ``check_preset`` with what this loop fills on ``task``."""
    available = inputs_available(cfg, task)
    if not set(preset.requires) <= available:
        check_preset(preset, available, hints=advice(cfg, task))
