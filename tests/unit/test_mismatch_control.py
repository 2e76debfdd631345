"""The trainer's side of the meter: budget actions (warn, tighten, lower_lr, stop) and the auto choice."""

from __future__ import annotations

import math

import pytest
import torch

from tether.meter import measure, to_floats
from tether.objectives import LossInputs, get_preset
from tether.train.config import TrainConfig
from tether.train.mismatch_control import MismatchControl, tighten_args
from tether.train.sync import TrainingStopped

pytestmark = pytest.mark.unit


def _stats(noise: float, B: int = 128, T: int = 16, seed: int = 0, spike: float | None = None) -> dict:
    """Meter metrics of pi_old = mu + noise * N(0, 1) per token (a synthetic drift of size ``noise``)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64).clamp(min=1e-3))
    old = mu + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    if spike is not None:
        old[3, 5] = mu[3, 5] + spike
    return to_floats(measure(mask_BT=torch.ones(B, T, dtype=torch.bool), logp_old_BT=old, logp_mu_BT=mu, profiles=False))


def _opt(lr: float = 1e-3):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)


def _control(objective: str = "tis", **budget) -> tuple[MismatchControl, dict]:
    cfg = TrainConfig.from_flat(objective=objective, **budget)
    state: dict = {}
    return MismatchControl(cfg, get_preset(objective).resolve(None), state, {}), state


def test_tighten_args_matches_hand_values():
    args = {"cap": 3.0, "high": 5.0, "low": 0.5, "eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": None, "agg": "x"}
    out = tighten_args(args, 0.5)
    assert out == {"cap": 2.0, "high": 3.0, "low": 0.75, "eps_low": 0.1, "eps_high": 0.14, "dual_clip_c": None, "agg": "x"}
    assert tighten_args({"cap": math.inf}, 0.25)["cap"] == pytest.approx(1 + 9 * 0.25)
    assert tighten_args(args, 1.0) == args
    with pytest.raises(ValueError, match="scale"):
        tighten_args(args, 0.0)


def test_budget_config_errors_name_the_field():
    with pytest.raises(ValueError, match="budget_min_ess_token"):
        TrainConfig.from_flat(budget_min_ess_token=1.5)
    with pytest.raises(ValueError, match="budget_tighten_factor"):
        TrainConfig.from_flat(budget_tighten_factor=1.0)
    with pytest.raises(ValueError, match="budget_ratio"):
        _control(budget_max_kl=0.1, budget_ratio="drift")
    with pytest.raises(ValueError, match="budget_action.*reinforce"):
        _control("reinforce", budget_max_kl=0.1, budget_action="tighten")


def test_no_alarm_on_a_clean_batch_changes_nothing():
    control, state = _control(budget_max_kl=0.01, budget_min_ess_token=0.9, budget_action="lower_lr")
    opt, sched = _opt()
    m = _stats(0.01)
    args = control.apply(m, opt, sched, step=0)
    assert m["budget/alarms"] == 0 and not any(k.startswith("budget/alarm/") for k in m)
    assert opt.param_groups[0]["lr"] == 1e-3 and state["lr_scale"] == 1.0
    assert args == get_preset("tis").resolve(None)


def test_lower_lr_on_drift_lowers_optimizer_and_scheduler():
    control, state = _control(budget_max_kl=0.01, budget_action="lower_lr", budget_lr_factor=0.25)
    opt, sched = _opt()
    m = _stats(0.6)
    control.apply(m, opt, sched, step=0)
    assert m["budget/alarm/max_kl"] == 1 and m["budget/alarms"] == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    opt.step()
    sched.step()  # the scheduler recomputes from its base lr: the lowering persists
    assert sched.get_last_lr()[0] == pytest.approx(2.5e-4) and state["lr_scale"] == 0.25
    control.apply(_stats(0.6, seed=1), opt, sched, step=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4 * 0.25)
    assert control.counters["budget_alarm_steps"] == 2


def test_tighten_on_drift_tightens_the_correction():
    control, state = _control(budget_max_abs_logr_p99=0.5, budget_action="tighten", budget_tighten_factor=0.5)
    opt, sched = _opt()
    m = _stats(0.6)
    args = control.apply(m, opt, sched, step=0)
    assert m["budget/alarm/max_abs_logr_p99"] == 1
    assert args["cap"] == pytest.approx(1.5) and args["eps_high"] == pytest.approx(0.1)  # tis cap 2, eps 0.2
    assert m["objective/cap"] == pytest.approx(1.5) and state["tighten_scale"] == 0.5
    assert opt.param_groups[0]["lr"] == 1e-3


def test_stop_on_drift_names_metric_and_value():
    control, _ = _control(budget_max_kl=0.01, budget_action="stop")
    opt, sched = _opt()
    m = _stats(0.6)
    with pytest.raises(TrainingStopped) as e:
        control.apply(m, opt, sched, step=7, where="The last checkpoint, step 4 in run/checkpoints, is intact.")
    msg = str(e.value)
    value = m["meter/total/kl_k3"]
    assert "step 7" in msg and "meter/total/kl_k3" in msg and f"{value:.6g}" in msg and "max_kl" in msg
    assert msg.endswith(". The last checkpoint, step 4 in run/checkpoints, is intact.")


def test_warn_prints_and_leaves_the_update_alone():
    printed = []

    class Console:
        def print(self, s):
            printed.append(s)

    control, _ = _control(budget_min_ess_token=0.95, budget_action="warn")
    opt, sched = _opt()
    args = control.apply(_stats(0.6), opt, sched, step=3, console=Console())
    assert len(printed) == 1 and "meter/total/ess_token" in printed[0] and "step 3" in printed[0]
    assert args == get_preset("tis").resolve(None) and opt.param_groups[0]["lr"] == 1e-3


def test_auto_choice_follows_the_injected_mismatch():
    control, _ = _control("auto")
    opt, sched = _opt()
    levels = {}
    for name, m in {"clean": _stats(0.01), "drift": _stats(0.5), "broken": _stats(0.01, spike=-20.0)}.items():
        args = control.apply(m, opt, sched, step=0)
        assert args["level"] == m["auto/level"] and args["threshold"] == m["auto/threshold"]
        assert "budget/alarms" not in m
        levels[name] = (args["level"], args["threshold"])
    assert levels["clean"] == ("sequence", 2.0)  # 128 sequences x ESS ~ 1 >= 64; exp(p99) ~ 1 clamped to 2
    assert levels["drift"][0] == "token" and 2.5 < levels["drift"][1] < 4.0  # exp(p99 of N(0, 0.5^2)) ~ 3.2
    assert levels["broken"][0] == "geometric" and 1e-3 <= levels["broken"][1] <= math.log(2)


def test_auto_tightened_threshold():
    control, _ = _control("auto", budget_max_kl=0.01, budget_action="tighten", budget_tighten_factor=0.5)
    opt, sched = _opt()
    args = control.apply(_stats(0.5), opt, sched, step=0)
    untightened = _control("auto")[0].apply(_stats(0.5), opt, sched, step=0)
    assert args["level"] == "token" and args["threshold"] == pytest.approx(1 + (untightened["threshold"] - 1) * 0.5)
    assert args["eps_low"] == pytest.approx(0.1)


def _inputs(noise: float, spike: float | None = None, B: int = 6, T: int = 5, seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64).clamp(min=1e-3))
    old = mu + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    if spike is not None:
        old[1, 2] += spike
    theta = (old + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) * mask
    return LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=adv, mask_BT=mask, logp_mu_BT=mu,
                      num_tokens=int(mask.sum()), num_seqs=B, horizon=T)


def _ppo_ref(x: LossInputs, w_BT: torch.Tensor) -> torch.Tensor:
    """Loop reference: token-mean of w_t * max(-A r, -A clip(r, 0.8, 1.2)), dual clip c = 3 for A < 0."""
    total = torch.zeros((), dtype=torch.float64)
    B, T = x.mask_BT.shape
    for i in range(B):
        for t in range(T):
            if not x.mask_BT[i, t]:
                continue
            a = x.advantages_BT[i, t]
            r = torch.exp(x.logp_theta_BT[i, t] - x.logp_old_BT[i, t])
            loss = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
            if a < 0:
                loss = torch.minimum(loss, -a * 3.0)
            total = total + w_BT[i, t] * loss
    return total / x.mask_BT.sum()


def test_auto_preset_matches_loop_references_at_each_level():
    preset = get_preset("auto")
    x = _inputs(0.4)
    d = (x.logp_old_BT - x.logp_mu_BT).detach()
    m = x.mask_BT.double()
    w_tok = torch.exp(d).clamp(max=1.7) * m
    w_seq = torch.exp((d * m).sum(-1, keepdim=True)).clamp(max=3.0).expand_as(d) * m
    geo = (d * m).sum(-1) / m.sum(-1)
    w_geo = (geo.abs() <= 0.1).double()[:, None].expand_as(d) * m
    assert 0 < w_geo.sum() < m.sum()  # the band keeps some sequences and drops others
    for level, thr, w in (("token", 1.7, w_tok), ("sequence", 3.0, w_seq), ("geometric", 0.1, w_geo)):
        loss, _ = preset(x, level=level, threshold=thr)
        assert float(loss.detach()) == pytest.approx(float(_ppo_ref(x, w).detach()), rel=1e-9, abs=1e-12), level
    with pytest.raises(ValueError, match="cap"):
        preset(x, level="token", threshold=0.5)
    with pytest.raises(ValueError, match="level"):
        preset(x, level="chunk", threshold=2.0)


def test_a_resumed_run_keeps_its_tightening():
    """The scales live in the run state (saved in the checkpoint): a new control built from it applies them."""
    cfg = TrainConfig.from_flat(objective="tis", budget_max_kl=0.01, budget_action="tighten")
    state = {"lr_scale": 1.0, "tighten_scale": 0.25}
    opt, sched = _opt()
    m = _stats(0.01)
    args = MismatchControl(cfg, get_preset("tis").resolve(None), state, {}).apply(m, opt, sched, step=5)
    assert m["budget/alarms"] == 0 and args["cap"] == pytest.approx(1.25) and m["budget/tighten_scale"] == 0.25


def test_a_preset_declares_what_tightening_moves():
    """The control names no hyper-parameter: a preset with its own ``tighten`` rules (here a band ``lo``/``hi``
    the default names do not know) is tightened by those rules, and one without any is refused for 'tighten'."""
    from tether.objectives import registry
    from tether.objectives.registry import Preset

    banded = Preset(name="_banded", description="test", fn=lambda inputs, **kw: (None, {}),
                    defaults={"lo": 0.5, "hi": 3.0, "cap": 2.0}, tighten={"lo": "lower", "hi": "upper"})
    assert banded.tighten == {"lo": "lower", "hi": "upper"}
    plain = Preset(name="_plain", description="test", fn=lambda inputs, **kw: (None, {}), defaults={"cap": 2.0})
    assert plain.tighten == {"cap": "upper"}  # the shared names by default
    with pytest.raises(ValueError, match="tighten names zz"):
        Preset(name="_bad", description="test", fn=lambda i, **kw: (None, {}), defaults={}, tighten={"zz": "upper"})
    registry._PRESETS["_banded"] = banded
    try:
        cfg = TrainConfig.from_flat(budget_max_kl=0.01, budget_action="tighten")
        object.__setattr__(cfg, "objective", "_banded")
        control = MismatchControl(cfg, banded.resolve(None), {}, {})
        opt, sched = _opt()
        args = control.apply(_stats(0.6), opt, sched, step=0)
        assert args["lo"] == pytest.approx(0.75) and args["hi"] == pytest.approx(2.0)
        assert args["cap"] == 2.0  # not in the preset's rules: left alone
    finally:
        del registry._PRESETS["_banded"]
    with pytest.raises(ValueError, match="'tighten' needs an objective"):
        _control("reinforce", budget_max_kl=0.01, budget_action="tighten")


def test_the_dist_probe_is_a_budget_alarm_even_without_meter_thresholds():
    """mode dist: sync/probe_max_abs_logp_diff over probe_max_logp_diff acts through the budget's action."""
    control, state = _control(mode="dist", probe_max_logp_diff=1e-3, budget_action="lower_lr")
    opt, sched = _opt(1e-3)
    quiet = {"sync/probe_max_abs_logp_diff": 1e-3}  # at the threshold: no alarm (strictly over fires)
    control.apply(quiet, opt, sched, step=0)
    assert quiet["budget/alarms"] == 0 and "budget/alarm/probe_max_logp_diff" not in quiet
    loud = {"sync/probe_max_abs_logp_diff": 2e-3}
    control.apply(loud, opt, sched, step=1)
    assert loud["budget/alarm/probe_max_logp_diff"] == 1 and loud["budget/alarms"] == 1
    assert loud["budget/lr_scale"] == 0.5 and opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    nan = {"sync/probe_max_abs_logp_diff": float("nan")}  # a broken probe never passes as a clean one
    control.apply(nan, opt, sched, step=2)
    assert nan["budget/alarms"] == 1 and state["lr_scale"] == 0.25
    stop, _ = _control(mode="dist", probe_max_logp_diff=1e-3, budget_action="stop")
    with pytest.raises(TrainingStopped, match=r"sync/probe_max_abs_logp_diff = 0.5 > 0.001 "
                                              r"\(DistConfig.probe_max_logp_diff\); action: stop"):
        stop.apply({"sync/probe_max_abs_logp_diff": 0.5}, *_opt(), step=3)
    sync, _ = _control(budget_action="stop")  # no dist section: the probe key is not a rule
    sync.apply({"sync/probe_max_abs_logp_diff": 0.5}, *_opt(), step=0)
