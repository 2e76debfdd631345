"""Acting on the meter inside the trainer: the mismatch budget's actions and the ``auto`` correction.

The sync loop calls ``MismatchControl.apply`` once per step, after the meter and before the update;
it returns the objective hyper-parameters to use for this step's update and adds to the step's
metrics:

    budget/alarms            number of budget thresholds crossed this step
    budget/alarm/{field}     1 for every crossed threshold (e.g. budget/alarm/max_kl)
    budget/lr_scale          cumulative factor applied to the learning rate by ``lower_lr``
    budget/tighten_scale     cumulative factor applied to the correction by ``tighten``
    auto/level, auto/threshold, auto/reason   the ``auto`` objective's choice (tether.meter.auto)
    objective/{name}         the value this step's update uses of every tightenable hyper-parameter
                             (Preset.tighten) and of the auto threshold

Actions, once per step with at least one alarm (``f`` = the config's factor, in (0, 1)):

    warn      print every alarm's message (it names the metric, its value and the threshold)
    tighten   s <- s * f, and the objective's correction hyper-parameters become
              ``tighten_args(args0, s, preset.tighten)``: the preset declares which ones move and by which rule
              (objectives/registry.py); this module names none of them
    lower_lr  every parameter group's lr and the scheduler's base lr are multiplied by f
    stop      raise TrainingStopped with the alarm's message, before the update: the last
              checkpoint is the last good one

Other sections' alarms go through the same actions: with ``mode = dist`` the post-sync probe
(``sync/probe_max_abs_logp_diff > DistConfig.probe_max_logp_diff``, the largest |log-prob difference| between a
rollout worker and the trainer on the version the step's rollouts used) is one more rule, logged as
``budget/alarm/probe_max_logp_diff``, and it is checked even when no meter threshold is set.

Steps with an alarm are counted in ``counters["budget_alarm_steps"]`` (``count/budget_alarm_steps``
in summary.json). The state (the two scales) lives in the run state, so a resumed run continues with them (the
lowered lr is also in the scheduler's ``base_lrs``, which its state dict saves).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tether.meter.auto import AutoRule, CorrectionLevel, choose_correction
from tether.meter.budget import Alarm, BudgetAction, MismatchBudget, Rule, check_budget, check_rules
from tether.objectives.registry import get_preset, tighten_args

AUTO_OBJECTIVE = "auto"
"""The preset whose ``level`` / ``threshold`` the trainer sets each step from the meter."""

MEASURED_BEFORE_UPDATE = ("engine", "total")
"""The ratios ``setup.mismatch_metrics`` measures (pi_old vs mu); drift / staleness need more inputs."""



def budget_from_config(budget_cfg: Any) -> MismatchBudget | None:
    """The budget section (``TrainConfig.budget``) as a ``MismatchBudget``; ``None`` when no threshold is set."""
    budget = MismatchBudget(
        ratio=budget_cfg.ratio,
        min_ess_token=budget_cfg.min_ess_token,
        min_ess_seq=budget_cfg.min_ess_seq,
        max_abs_logr_p99=budget_cfg.max_abs_logr_p99,
        max_kl=budget_cfg.max_kl,
        action=budget_cfg.action,
    )
    return budget if budget.rules() else None


def section_rules(cfg: Any) -> list[Rule]:
    """The alarms of other config sections that act through the budget (module docstring): the dist probe."""
    dist = getattr(cfg, "dist", None)
    if dist is None:
        return []
    return [("probe_max_logp_diff", "sync/probe_max_abs_logp_diff", "max", float(dist.probe_max_logp_diff))]


def validate_config(budget_cfg: Any) -> None:
    """Start-up checks of the budget section, with errors naming the flat config field (``budget_...``)."""
    try:
        budget_from_config(budget_cfg)
    except ValueError as e:
        field = str(e).split("MismatchBudget.", 1)[-1].split(" ", 1)[0]
        raise ValueError(f"config field 'budget_{field}': {e}") from None
    for name in ("lr_factor", "tighten_factor"):
        v = getattr(budget_cfg, name)
        if not 0 < v < 1:
            raise ValueError(f"config field 'budget_{name}' must be in (0, 1), got {v}")


class MismatchControl:
    """Budget actions and the auto choice for one run (module docstring)."""

    def __init__(self, cfg: Any, objective_args: Mapping[str, Any], state: dict[str, Any],
                 counters: dict[str, int] | None = None, *, rule: AutoRule | None = None):
        self.budget = budget_from_config(cfg.budget)
        self.section_rules = section_rules(cfg)
        self.action = cfg.budget.action
        self.checked = self.budget is not None or bool(self.section_rules)
        self.auto = cfg.objective == AUTO_OBJECTIVE
        self.args0 = dict(objective_args)
        self.rules = dict(get_preset(cfg.objective).tighten)  # the preset says what tightening moves, and how
        self.lr_factor = cfg.budget.lr_factor
        self.tighten_factor = cfg.budget.tighten_factor
        self.rule = rule if rule is not None else AutoRule()
        self.state = state  # persisted in the checkpoint's run state
        self.state.setdefault("lr_scale", 1.0)
        self.state.setdefault("tighten_scale", 1.0)
        self.counters = counters if counters is not None else {}
        if self.checked:  # count/budget_alarm_steps in the summary
            self.counters.setdefault("budget_alarm_steps", 0)
        if self.budget is not None and self.budget.ratio.value not in MEASURED_BEFORE_UPDATE:
            raise ValueError(
                f"config field 'budget_ratio': the trainer checks the budget before the update, where it measures "
                f"{' and '.join(MEASURED_BEFORE_UPDATE)}; '{self.budget.ratio.value}' would never be checked")
        if self.checked and self.action is BudgetAction.TIGHTEN and not (
            self.auto or any(self.args0.get(k) is not None for k in self.rules)
        ):
            raise ValueError(
                f"config field 'budget_action': 'tighten' needs an objective with a correction or clip "
                f"hyper-parameter it can tighten (Preset.tighten); objective '{cfg.objective}' has: "
                f"{', '.join(sorted(self.args0)) or 'none'}, none of them tightenable")

    def alarms(self, metrics: Mapping[str, Any]) -> list[Alarm]:
        mine = check_budget(metrics, self.budget) if self.budget is not None else []
        return mine + check_rules(metrics, self.section_rules, self.action, owner="DistConfig")

    def apply(self, metrics: dict[str, Any], optimizer: Any, scheduler: Any, *, step: int, console: Any = None,
              where: str = "") -> dict[str, Any]:
        """Check the budget, act, choose the auto correction; returns this step's objective arguments.
        ``where``: a sentence naming the checkpoint a resume would start from (ends a ``stop`` message)."""
        alarms = self.alarms(metrics)
        for a in alarms:
            metrics[f"budget/alarm/{a.field}"] = 1
        if self.checked:
            metrics["budget/alarms"] = len(alarms)
        if alarms:
            self.counters["budget_alarm_steps"] = self.counters.get("budget_alarm_steps", 0) + 1
            action = self.action
            if action is BudgetAction.STOP:
                from tether.train.errors import TrainingStopped

                raise TrainingStopped(
                    f"step {step}: {alarms[0].message}" + "".join(f"; also {a.metric} = {a.value:.6g}" for a in alarms[1:])
                    + (f". {where}" if where else ""))
            if action is BudgetAction.LOWER_LR:
                self.state["lr_scale"] *= self.lr_factor
                for group in optimizer.param_groups:
                    group["lr"] *= self.lr_factor
                scheduler.base_lrs = [lr * self.lr_factor for lr in scheduler.base_lrs]
            elif action is BudgetAction.TIGHTEN:
                self.state["tighten_scale"] *= self.tighten_factor
            if console is not None:
                for a in alarms:
                    console.print(f"[yellow]step {step}: {a.message}[/yellow]")
        if self.checked:
            metrics["budget/lr_scale"] = self.state["lr_scale"]
            metrics["budget/tighten_scale"] = self.state["tighten_scale"]
        scale = self.state["tighten_scale"]
        args = tighten_args(self.args0, scale, self.rules)
        if self.auto:
            d = choose_correction(metrics, self.rule)
            threshold = d.threshold
            if scale < 1:
                threshold = d.threshold * scale if d.level is CorrectionLevel.GEOMETRIC else 1.0 + (d.threshold - 1.0) * scale
            args["level"], args["threshold"] = d.level.value, threshold
            metrics["auto/level"] = d.level.value
            metrics["auto/threshold"] = threshold
            metrics["auto/reason"] = d.reason
        if self.checked or self.auto:
            for k in (*self.rules, "threshold"):
                if isinstance(args.get(k), (int, float)):
                    metrics[f"objective/{k}"] = float(args[k])
        return args

