"""Exact bias / variance of rollout corrections on an enumerable categorical chain (justifies tether.meter.auto).

Setup (no sampling noise: every expectation is an exact sum over all V^T sequences):
- A first-order Markov policy over V tokens: pi(y_t | y_{t-1}) = softmax(theta[y_{t-1}]), theta ~ N(0, 1),
  with a BOS state. The behaviour policy mu has logits theta + sigma * eps (eps ~ N(0, 1), fixed), so
  sigma sets the size of the engine mismatch; the chain makes the mismatch compound over positions.
- Reward R(y) = fraction of tokens equal to 0; advantage A = R - E_pi[R].
- Target: the exact policy gradient g* = E_pi[A(y) sum_t grad log pi(y_t | s_t)] w.r.t. theta.
- Estimators from n i.i.d. mu-samples (the mean of n per-sample terms):
    none        A sum_t grad log pi_t
    token(C)    A sum_t min(r_t, C) grad log pi_t                  (token-level TIS)
    seq(C)      min(prod_t r_t, C) A sum_t grad log pi_t           (sequence-level TIS)
    geo(tau)    1[|mean_t log r_t| <= tau] A sum_t grad log pi_t   (geometric rejection mask)
  with r_t = pi(y_t|s_t)/mu(y_t|s_t). Relative MSE = (|E g - g*|^2 + tr Cov(g)/n) / |g*|^2.
- The population statistics the meter estimates: token ESS (E r)^2/E r^2 over mu's tokens, sequence ESS
  1/(1 + chi^2_seq), chi^2_seq = E_mu[W^2] - 1, the length T.

The same question on the exact lab (``--lab``, tether.lab: V = 4, T = 6, 4096 sequences, the lab's
mismatch models, ``--old pi`` so the correction acts on pi_old/mu): for each mismatch kind x strength x
batch size n, 10 batches of n sequences are drawn from mu, the meter measures each and
``choose_correction`` decides; the decision's estimator (the ``auto`` preset with that level and
threshold, coefficients by autograd as the lab reads any preset) is scored by its exact relative MSE
(bias^2 + per-sample variance / n) / |grad J|^2, against fixed corrections scored the same way.

Run: python benchmarks/meter_auto_rule.py            (one instance, n = 64: the per-estimator table)
     python benchmarks/meter_auto_rule.py --lab      (the exact lab: the rule against fixed corrections)
     python benchmarks/meter_auto_rule.py --calibrate (6 random instances x n in 64..4096 x T x sigma:
                                                       accuracy and regret of "sequence iff n*ESS_seq >= K")
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def evaluate(V: int, T: int, sigma: float, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(V + 1, V))  # row V is BOS
    eps = rng.normal(size=(V + 1, V))
    pi, mu = softmax(theta), softmax(theta + sigma * eps)
    Y = np.array(list(itertools.product(range(V), repeat=T)))  # [N, T]
    S = np.concatenate([np.full((len(Y), 1), V), Y[:, :-1]], axis=1)  # states
    lp = np.log(pi[S, Y])  # [N, T]
    lm = np.log(mu[S, Y])
    p_seq, m_seq = np.exp(lp.sum(1)), np.exp(lm.sum(1))
    R = (Y == 0).mean(1)
    A = R - (p_seq * R).sum()
    D = (V + 1) * V
    # per-token score grad log pi(y_t|s_t) wrt theta, flattened: onehot(s, y) - onehot(s) x pi(.|s)
    G = np.zeros((len(Y), T, V + 1, V))
    n_idx, t_idx = np.meshgrid(np.arange(len(Y)), np.arange(T), indexing="ij")
    G[n_idx, t_idx, S, :] -= pi[S]
    G[n_idx, t_idx, S, Y] += 1.0
    G = G.reshape(len(Y), T, D)
    score = G.sum(1)  # [N, D]
    g_star = (p_seq * A) @ score
    logr = lp - lm
    r = np.exp(logr)
    W = np.exp(logr.sum(1))
    geo = logr.mean(1)

    def rel_mse(per_sample: np.ndarray) -> tuple[float, float, float]:
        mean = m_seq @ per_sample
        second = m_seq @ (per_sample**2).sum(1)
        bias2 = float(((mean - g_star) ** 2).sum())
        var = float(second - (mean**2).sum()) / n
        norm = float((g_star**2).sum())
        return (bias2 + var) / norm, bias2 / norm, var / norm

    ests: dict[str, tuple[float, float, float]] = {"none": rel_mse(A[:, None] * score)}
    for C in (2.0, 5.0):
        ests[f"token({C:g})"] = rel_mse(A[:, None] * np.einsum("nt,ntd->nd", np.minimum(r, C), G))
    for C in (2.0, 10.0, np.inf):
        ests[f"seq({C:g})"] = rel_mse((np.minimum(W, C) * A)[:, None] * score)
    # caps chosen from the measured tails, as tether.meter.auto does
    tok_cap = float(np.clip(np.exp(np.quantile(logr.ravel(), 0.99, weights=(m_seq[:, None] * np.ones_like(r)).ravel(),
                                               method="inverted_cdf")), 2.0, 10.0))
    seq_cap = float(np.clip(np.exp(np.quantile(logr.sum(1), 0.99, weights=m_seq, method="inverted_cdf")), 2.0, 10.0))
    ests["token(auto)"] = rel_mse(A[:, None] * np.einsum("nt,ntd->nd", np.minimum(r, tok_cap), G))
    ests["seq(auto)"] = rel_mse((np.minimum(W, seq_cap) * A)[:, None] * score)
    for tau in (0.05, 0.2):
        ests[f"geo({tau:g})"] = rel_mse(((np.abs(geo) <= tau) * A)[:, None] * score)
    # population statistics the meter estimates on a batch
    tok_w = m_seq[:, None] * np.ones_like(r) / T  # token distribution under mu
    er, er2 = (tok_w * r).sum(), (tok_w * r * r).sum()
    chi2_seq = float(m_seq @ (W**2) - 1.0)
    chi2_tok = float(er2 - 1.0)
    return {
        "V": V, "T": T, "sigma": sigma, "n": n,
        "ess_token": float(er**2 / er2), "ess_seq": 1.0 / (1.0 + chi2_seq), "chi2_token": chi2_tok,
        "abs_logr_p99": float(np.quantile(np.abs(logr).ravel(), 0.99, weights=tok_w.ravel(), method="inverted_cdf")),
        "rel_mse": {k: v[0] for k, v in ests.items()},
        "rel_bias2": {k: v[1] for k, v in ests.items()},
        "best": min(ests, key=lambda k: ests[k][0]),
        "_logW": logr.sum(1), "_mu_seq": m_seq,  # for batch-level ESS draws (not serialised)
    }


def calibrate() -> None:
    """Regret of the level rule against the better of seq(auto) and token(auto), over many instances."""
    rows = [evaluate(3, T, s, n, seed) for n in (64, 256, 1024, 4096) for T in (2, 4, 6, 8)
            for s in (0.1, 0.3, 0.6, 1.0, 1.5) for seed in range(6)]

    def score(rule) -> str:
        reg, acc = [], 0
        for r in rows:
            ms, mt = r["rel_mse"]["seq(auto)"], r["rel_mse"]["token(auto)"]
            got = ms if rule(r) else mt
            reg.append(got / min(ms, mt))
            acc += got == min(ms, mt)
        return f"acc {acc / len(rows):.3f}  regret mean {np.mean(reg):.3f} p95 {np.quantile(reg, 0.95):.3f} max {np.max(reg):.3f}"

    # the meter sees the *batch* ESS, not the population one: draw batches of n sequences from mu
    rng = np.random.default_rng(1)
    reg_batch, acc_batch = [], []
    for r in rows:
        ms, mt = r["rel_mse"]["seq(auto)"], r["rel_mse"]["token(auto)"]
        p = r["_mu_seq"] / r["_mu_seq"].sum()
        for _ in range(20):
            lw = r["_logW"][rng.choice(len(p), size=r["n"], p=p)]
            w = np.exp(lw - lw.max())
            n_ess = w.sum() ** 2 / (w * w).sum()  # n_seqs * normalised batch ESS
            got = ms if n_ess >= 64 else mt
            reg_batch.append(got / min(ms, mt))
            acc_batch.append(got == min(ms, mt))
    print(f"{len(rows)} configurations")
    print(f"{'n*ESS_seq(batch) >= 64':>28}: acc {np.mean(acc_batch):.3f}  regret mean {np.mean(reg_batch):.3f} "
          f"p95 {np.quantile(reg_batch, 0.95):.3f} max {np.max(reg_batch):.3f}  (20 sampled batches per configuration)")
    print(f"{'always sequence':>28}: {score(lambda r: True)}")
    print(f"{'always token':>28}: {score(lambda r: False)}")
    for K in (16, 32, 64, 100, 200, 300, 1000):
        for e in (0.0, 0.3, 0.5):
            print(f"{f'n*ESS_seq >= {K}, ESS_seq >= {e}':>28}: {score(lambda r, e=e, K=K: r['ess_seq'] >= e and r['n'] * r['ess_seq'] >= K)}")
    for pref in ("token", "seq"):
        reg = [r["rel_mse"][f"{pref}(auto)"] / min(v for k, v in r["rel_mse"].items() if k.startswith(pref + "(") and k != f"{pref}(auto)")
               for r in rows]
        print(f"{pref} cap from the p99 tail vs best fixed cap: regret mean {np.mean(reg):.3f} max {np.max(reg):.3f}")
    for n in (64, 256, 1024, 4096):
        sel = [r for r in rows if r["n"] == n]
        wins = np.mean([r["rel_mse"]["seq(auto)"] < r["rel_mse"]["token(auto)"] for r in sel])
        geo = np.mean([r["best"].startswith("geo") for r in sel])
        print(f"n={n:5d}: sequence beats token in {wins:.2f} of configurations; a geometric mask is best in {geo:.2f}")


def lab(batches: int = 10) -> None:
    """The auto rule on the exact lab (module docstring); prints one Markdown table."""
    import torch

    from tether.lab.estimators import agg_scale, exact_moments, preset_inputs
    from tether.lab.mismatch import behaviour_probs
    from tether.lab.policy import (
        exact_gradient,
        init_logits,
        make_reward,
        make_space,
        seq_probs,
        token_logp,
        token_logp_from_probs,
    )
    from tether.meter import measure, to_floats
    from tether.meter.auto import choose_correction
    from tether.objectives import get_preset

    torch.set_default_dtype(torch.float64)
    space = make_space(4, 6)
    theta = init_logits(space, seed=0)
    rewards = make_reward(space, "pattern", seed=0)
    grad_J = exact_gradient(theta, space, rewards)
    logp_pi = token_logp(theta, space).detach()
    adv = rewards - float((seq_probs(logp_pi) * rewards).sum())
    auto = get_preset("auto")
    T, N = space.horizon, logp_pi.shape[0]
    gn2 = float((grad_J * grad_J).sum())

    def rel_mse(logp_mu, mu_N, n, **choice) -> float:
        x = logp_pi.clone().requires_grad_(True)
        loss, _ = auto(preset_inputs(x, logp_pi, logp_mu, adv, old="pi"), **choice)
        (grad,) = torch.autograd.grad(loss, x)
        c = -grad * N * agg_scale("token-mean", T)
        m = exact_moments(theta, space, c, mu_N, grad_J)
        return ((m.bias ** 2) * gn2 + m.variance / n) / gn2

    fixed = {"token(2)": ("token", 2.0), "token(5)": ("token", 5.0), "seq(2)": ("sequence", 2.0),
             "seq(10)": ("sequence", 10.0), "geo(0.1)": ("geometric", 0.1)}
    print(f"| mismatch | s | n | ESS seq (pop.) | rule picks (tok/seq/geo of {batches}) | "
          + " | ".join(fixed) + " | token(auto) | seq(auto) | rule | best fixed | rule / best |")
    print("|" + "---|" * (10 + len(fixed)))
    g = torch.Generator().manual_seed(0)
    regrets: dict[str, list[float]] = {}
    sweep: list[tuple[float, float, float, float]] = []  # (n * ESS_seq of the batch, token MSE, seq MSE, best)
    for kind in ("staleness", "precision", "noise", "temperature", "truncation"):
        for strength in (0.1, 0.3, 1.0):
            logp_mu = token_logp_from_probs(behaviour_probs(theta, kind, strength, seed=0), space)
            mu_N = seq_probs(logp_mu)
            p = mu_N / mu_N.sum()
            logw = (logp_pi - logp_mu.clamp(min=-1e4)).sum(1)
            w = torch.where(p > 0, torch.exp(logw), 0.0)
            ess_pop = float((p * w).sum() ** 2 / (p * w * w).sum())  # (E_mu W)^2 / E_mu W^2 (W sums to < 1 under truncation)
            for n in (64, 1024):
                ref = {k: rel_mse(logp_mu, mu_N, n, level=lv, threshold=th) for k, (lv, th) in fixed.items()}
                picks = {"token": 0, "sequence": 0, "geometric": 0}
                got: dict[str, list[float]] = {"rule": [], "token(auto)": [], "seq(auto)": []}
                for _ in range(batches):
                    idx = torch.multinomial(p, n, replacement=True, generator=g)
                    stats = to_floats(measure(mask_BT=torch.ones(n, T, dtype=torch.bool), logp_old_BT=logp_pi[idx],
                                              logp_mu_BT=logp_mu[idx], profiles=False))
                    d = choose_correction(stats)
                    picks[d.level.value] += 1
                    # the two levels with the caps the rule would set from this batch's tails
                    tok_cap = min(max(float(np.exp(stats["meter/total/logr_p99"])), 2.0), 10.0)
                    seq_cap = min(max(float(np.exp(min(stats["meter/total/seq_logr_p99"], 700.0))), 2.0), 10.0)
                    mt = rel_mse(logp_mu, mu_N, n, level="token", threshold=tok_cap)
                    ms = rel_mse(logp_mu, mu_N, n, level="sequence", threshold=seq_cap)
                    sweep.append((stats["meter/total/n_seqs"] * stats["meter/total/ess_seq"], mt, ms, min(ref.values())))
                    got["token(auto)"].append(mt)
                    got["seq(auto)"].append(ms)
                    got["rule"].append({"token": mt, "sequence": ms}.get(d.level.value) or
                                       rel_mse(logp_mu, mu_N, n, level=d.level.value, threshold=d.threshold))
                best = min(ref.values())
                for k, v in got.items():
                    regrets.setdefault(k, []).append(float(np.mean(v)) / best)
                rule = float(np.mean(got["rule"]))
                print(f"| {kind} | {strength:g} | {n} | {ess_pop:.3f} | {picks['token']}/{picks['sequence']}/{picks['geometric']} | "
                      + " | ".join(f"{v:.3f}" for v in ref.values())
                      + f" | {np.mean(got['token(auto)']):.3f} | {np.mean(got['seq(auto)']):.3f} | {rule:.3f} | {best:.3f} | "
                      f"{rule / best:.2f} |")
    print(f"\nMSE / MSE of the best fixed correction in hindsight, over {len(regrets['rule'])} settings:")
    print("| policy | mean | median | max |\n|---|---|---|---|")
    for k, v in regrets.items():
        print(f"| {'auto rule' if k == 'rule' else 'always ' + k} | {np.mean(v):.3f} | {np.median(v):.3f} | {np.max(v):.3f} |")
    print("\nthe level threshold K (sequence iff n * ESS_seq(batch) >= K), per batch, MSE / best fixed:")
    print("| K | mean | max | picks the better level |\n|---|---|---|---|")
    for K in (8, 16, 32, 64, 128):
        r = [(ms if e >= K else mt) / b for e, mt, ms, b in sweep]
        acc = np.mean([(ms if e >= K else mt) == min(mt, ms) for e, mt, ms, _ in sweep])
        print(f"| {K} | {np.mean(r):.3f} | {np.max(r):.3f} | {acc:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="sequences per batch")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--calibrate", action="store_true", help="sweep instances and score the level rule")
    ap.add_argument("--lab", action="store_true", help="score the rule on the exact lab (tether.lab)")
    args = ap.parse_args()
    if args.lab:
        lab()
        return
    if args.calibrate:
        calibrate()
        return
    rows = []
    for T in (2, 4, 6, 8):
        for sigma in (0.0, 0.1, 0.3, 0.6, 1.0, 1.5):
            rows.append(evaluate(3, T, sigma, args.n))
    names = list(rows[0]["rel_mse"])
    print(f"{'T':>2} {'sigma':>5} {'essTok':>6} {'essSeq':>6} {'chi2T':>6} | " + " ".join(f"{k:>9}" for k in names) + " | best")
    for row in rows:
        mses = " ".join(f"{row['rel_mse'][k]:9.3f}" for k in names)
        print(f"{row['T']:>2} {row['sigma']:5.2f} {row['ess_token']:6.3f} {row['ess_seq']:6.3f} "
              f"{row['chi2_token']:6.3f} | {mses} | {row['best']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
