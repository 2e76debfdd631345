"""GSPO and CTPO (plain and LA clip) vs slow loop references, gradient semantics, preset identities."""

from __future__ import annotations

import math

import pytest
import torch
from _ratio_family_data import clamp, exp, grad_of, make_inputs, rows, token_delta

from tether.objectives import LossInputs, get_preset
from tether.objectives.ratios import gspo_log_ratio
from tether.objectives.sequence_ratio import ctpo_la_loss

pytestmark = pytest.mark.unit
RTOL = 1e-9
MAX_LOG = 10.0


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------- references


def ref_gspo(inputs: LossInputs, eps_low: float, eps_high: float) -> tuple[float, torch.Tensor]:
    """Value and d loss / d logp_theta of GSPO with seq-mean-token-mean, by loops."""
    B, T = inputs.mask_BT.shape
    grad = torch.zeros(B, T, dtype=torch.float64)
    total, n_seq = 0.0, 0
    per_seq = []
    for i, valid, th, old, adv in rows(inputs):
        if not valid:
            continue
        n_seq += 1
        log_s = sum(token_delta(th[t], old[t]) for t in valid) / len(valid)
        s = exp(min(log_s, MAX_LOG))
        seq_loss = 0.0
        for t in valid:
            A = adv[t]
            l1, l2 = -A * s, -A * clamp(s, 1 - eps_low, 1 + eps_high)
            seq_loss += max(l1, l2)
            unclipped = l1 >= l2 and log_s <= MAX_LOG
            grad[i, t] = (-A * s if unclipped else 0.0) / len(valid)
        per_seq.append((i, seq_loss / len(valid)))
    total = sum(v for _, v in per_seq)
    n = max(n_seq, 1)
    return total / n, grad / n


def ref_cum_log_rho(valid: list[int], th: list[float], old: list[float], geomean: bool) -> dict[int, float]:
    out, acc = {}, 0.0
    for p, t in enumerate(valid, start=1):
        acc += token_delta(th[t], old[t])
        out[t] = acc / p if geomean else acc
    return out


def ref_ctpo(
    inputs: LossInputs, *, geomean: bool, c_low: float, c_high: float, c_c: float, power: float
) -> tuple[float, torch.Tensor]:
    """Value and gradient of CTPO-LA with token-mean, by loops over sequences and tokens."""
    B, T = inputs.mask_BT.shape
    grad = torch.zeros(B, T, dtype=torch.float64)
    total, n_tok = 0.0, 0
    for i, valid, th, old, adv in rows(inputs):
        cum = ref_cum_log_rho(valid, th, old, geomean)
        for p, t in enumerate(valid, start=1):
            n_tok += 1
            A = adv[t]
            x = min(cum[t], MAX_LOG)
            sigma = max(p, 1) ** power
            lo, hi = -c_low * sigma, c_high * sigma
            rho, rho_c = exp(x), exp(clamp(x, lo, hi))
            l1, l2 = -A * rho, -A * rho_c
            l = max(l1, l2)
            inside = lo <= x <= hi
            g = -A * rho if (inside or l1 > l2) else 0.0
            if A < 0:
                l3 = -A * exp(c_c * sigma)
                if l3 < l:
                    l, g = l3, 0.0
            if cum[t] > MAX_LOG:
                g = 0.0
            total += l
            grad[i, t] = g
    n = max(n_tok, 1)
    return total / n, grad / n


# ---------------------------------------------------------------- GSPO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.28), (math.inf, math.inf)])
def test_gspo_matches_loop_reference(seed, eps):
    inputs = make_inputs(seed)
    loss, metrics = get_preset("gspo")(inputs, eps_low=eps[0], eps_high=eps[1])
    ref_val, ref_grad = ref_gspo(inputs, *eps)
    _close(loss, torch.tensor(ref_val, dtype=torch.float64))
    _close(grad_of(loss, inputs), ref_grad)
    assert all(not v.requires_grad for v in metrics.values())


def test_gspo_value_is_sequence_ratio_gradient_is_s_grad_logp():
    inputs = make_inputs(3, extreme=False)
    lr = gspo_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    m = inputs.maskf_BT
    d = (inputs.logp_theta_BT - inputs.logp_old_BT).detach() * m
    s_B = torch.exp(d.sum(-1) / m.sum(-1).clamp(min=1))
    s_BT = torch.exp(lr)
    _close(s_BT.detach()[inputs.mask_BT], s_B[:, None].expand_as(s_BT)[inputs.mask_BT])
    c = torch.randn(s_BT.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = grad_of((c * s_BT * m).sum(), inputs)
    _close(g, c * s_B[:, None] * m)  # d s_it / d log pi_t = s_i, no cross-token terms


def test_gspo_one_token_equals_ppo():
    """With one token per sequence GSPO is PPO (same eps, no dual clip); the |delta| < 10 range
    avoids GSPO's +10 stop-gradient log cap, the only difference (PPO caps at 20)."""
    mask = torch.zeros(8, 5, dtype=torch.bool)
    for i in range(1, 8):
        mask[i, i % 5] = True  # row 0 empty, one token anywhere in the others
    for eps in [(3e-4, 4e-4), (0.2, 0.28)]:
        a = make_inputs(4, 8, 5, mask=mask, scale=0.3, extreme=False)
        b = make_inputs(4, 8, 5, mask=mask, scale=0.3, extreme=False)
        la, _ = get_preset("gspo")(a, eps_low=eps[0], eps_high=eps[1])
        lb, _ = get_preset("ppo")(b, agg="seq-mean-token-mean", eps_low=eps[0], eps_high=eps[1], dual_clip_c=None)
        _close(la, lb)
        _close(grad_of(la, a), grad_of(lb, b))


def test_gspo_refuses_other_aggregation():
    with pytest.raises(ValueError, match="'agg' must be 'seq-mean-token-mean'"):
        get_preset("gspo")(make_inputs(0), agg="token-mean")


# ---------------------------------------------------------------- CTPO


CTPO_CASES = [
    dict(geomean=False, c_low=0.025, c_high=0.05, c_c=0.05, power=0.5),
    dict(geomean=True, c_low=0.025, c_high=0.05, c_c=0.05, power=-0.5),
    dict(geomean=False, c_low=0.3, c_high=0.6, c_c=1.2, power=0.5),
    dict(geomean=True, c_low=0.2, c_high=0.4, c_c=1.0, power=0.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CTPO_CASES)
def test_ctpo_la_matches_loop_reference(seed, case):
    inputs = make_inputs(seed)
    case = dict(case)
    geomean = case.pop("geomean")
    loss, metrics = get_preset("ctpo")(inputs, mode="geomean" if geomean else "cumprod", **case)
    ref_val, ref_grad = ref_ctpo(inputs, geomean=geomean, **case)
    _close(loss, torch.tensor(ref_val, dtype=torch.float64))
    _close(grad_of(loss, inputs), ref_grad)
    assert all(not v.requires_grad for v in metrics.values())


def test_ctpo_geomean_preset_defaults_are_used():
    inputs = make_inputs(5)
    loss, _ = get_preset("ctpo_geomean")(inputs)
    ref_val, ref_grad = ref_ctpo(inputs, geomean=True, c_low=0.025, c_high=0.05, c_c=0.05, power=-0.5)
    _close(loss, torch.tensor(ref_val, dtype=torch.float64))
    _close(grad_of(loss, inputs), ref_grad)


def test_ctpo_gradient_is_rho_t_grad_logp_without_clip():
    """No clip (huge c): l_t = -A rho_t, gradient -A rho_t on token t only (prefix is a weight)."""
    inputs = make_inputs(6, extreme=False)
    big = 1e6
    loss, _ = get_preset("ctpo")(inputs, c_low=big, c_high=big, c_c=big, agg="seq-mean-token-sum")
    g = grad_of(loss, inputs)
    n_seq = (inputs.mask_BT.sum(-1) > 0).sum().item()
    for i, valid, th, old, adv in rows(inputs):
        cum = ref_cum_log_rho(valid, th, old, geomean=False)
        for t in range(inputs.mask_BT.shape[1]):
            expected = -adv[t] * exp(cum[t]) / n_seq if t in cum else 0.0
            assert g[i, t].item() == pytest.approx(expected, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_ctpo_plain_ppo_clip_on_cumulative_ratio(seed):
    """clip='ppo': PPO clip with dual clip on rho_t, equal to LA with sigma=1 and log-space eps."""
    inputs = make_inputs(seed)
    eps_low, eps_high, c = 0.2, 0.28, 3.0
    loss, _ = get_preset("ctpo")(inputs, clip="ppo", eps_low=eps_low, eps_high=eps_high, dual_clip_c=c)
    ref_val, ref_grad = ref_ctpo(
        inputs, geomean=False, c_low=-math.log(1 - eps_low), c_high=math.log(1 + eps_high), c_c=math.log(c), power=0.0
    )
    _close(loss, torch.tensor(ref_val, dtype=torch.float64))
    _close(grad_of(loss, inputs), ref_grad)


@pytest.mark.parametrize("consts", [(0.025, 0.05, 0.05), (0.2, 0.3, 1.1)])
@pytest.mark.parametrize("extreme", [False, True])
def test_ctpo_length_one_equals_ppo(consts, extreme):
    """On length-1 sequences sigma = 1, so CTPO-LA is PPO with eps_low = 1 - exp(-c_low),
    eps_high = exp(c_high) - 1 and dual clip exp(c_c). With +-50 log-ratios the values still agree
    (the upper clip / dual clip hide the +10 vs +20 caps); the gradients differ only below -20."""
    c_low, c_high, c_c = consts
    mask = torch.zeros(9, 4, dtype=torch.bool)
    for i in range(1, 9):
        mask[i, (i * 3) % 4] = True
    a = make_inputs(7, 9, 4, mask=mask, scale=0.5, extreme=extreme)
    b = make_inputs(7, 9, 4, mask=mask, scale=0.5, extreme=extreme)
    la, _ = get_preset("ctpo")(a, c_low=c_low, c_high=c_high, c_c=c_c)
    lb, _ = get_preset("ppo")(
        b, eps_low=1 - math.exp(-c_low), eps_high=math.exp(c_high) - 1, dual_clip_c=math.exp(c_c)
    )
    _close(la, lb)
    ga, gb = grad_of(la, a), grad_of(lb, b)
    # The one difference: below the -20 token clamp PPO's gradient is 0, while CTPO's
    # stop-gradient path keeps rho_t grad log pi_t with rho_t = exp(-20) (A > 0, unclipped branch).
    below = (a.logp_theta_BT - a.logp_old_BT).detach() < -20
    assert torch.all(gb[below] == 0)
    n_tok = a.mask_BT.sum().item()
    expected = torch.where(a.advantages_BT > 0, -a.advantages_BT * math.exp(-20.0) / n_tok, 0.0)
    _close(ga[below], expected[below])
    _close(ga[~below], gb[~below])
    assert below.any() == extreme


def test_ctpo_la_loss_gradcheck_in_log_rho():
    gen = torch.Generator().manual_seed(11)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    log_rho = (0.05 * torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[0.7] * 5, [-1.3] * 5, [0.2] * 5], dtype=torch.float64)

    def f(x):
        loss, _ = ctpo_la_loss(x, adv, mask, c_low=0.025, c_high=0.05, c_c=0.05, power=0.5)
        return (loss * mask).sum()

    assert torch.autograd.gradcheck(f, (log_rho,))


def test_ctpo_fully_masked_and_bad_mode():
    inputs = make_inputs(0, mask=torch.zeros(3, 4, dtype=torch.bool), B=3, T=4)
    for name in ["ctpo", "ctpo_geomean", "gspo"]:
        loss, metrics = get_preset(name)(inputs)
        assert loss.item() == 0.0
        assert torch.all(grad_of(loss, inputs) == 0)
        assert all(torch.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="'mode': unknown value 'prod'"):
        get_preset("ctpo")(inputs, mode="prod")
    with pytest.raises(ValueError, match="'clip'"):
        get_preset("ctpo")(inputs, clip="tv")
