"""Distributional statistics of one per-token log-ratio, as pure functions of tensors.

Input: ``log_ratio_BT`` = ``log p(y_t) - log q(y_t)`` for a numerator policy ``p`` and a denominator
policy ``q`` (e.g. ``p = pi_old``, ``q = mu``) and ``mask_BT`` (1 on tokens that count). Positions
outside the mask are ignored, whatever they hold (NaN and inf included). Everything is computed in
float64 on the input's device with no host synchronisation; every value is a detached 0-dim tensor.
Formulas: docs/metrics.md.

Direction of the KL estimates: the tokens are assumed to be drawn from the denominator ``q`` (true
for ``pi_old/mu`` and ``pi_theta/mu``: the engine sampled them). With ``z = log p - log q`` and
``r = exp(z)``:

    kl_k1 = E_q[-z]            unbiased for KL(q || p)
    kl_k2 = E_q[z^2 / 2]       biased, second-order in z
    kl_k3 = E_q[r - 1 - z]     unbiased for KL(q || p), >= 0 per token
    chi2  = E_q[(r - 1)^2]     unbiased for chi^2(p || q) = sum_y p(y)^2 / q(y) - 1

Empty inputs (no valid token) give *defined* neutral values, never NaN: ESS 1, quantiles, min, max,
tail mass, KL and chi^2 0, perplexity ratio 1, and ``n_tokens`` 0 tells the reader why. An empty
batch carries no evidence of mismatch, and the budget and the ``auto`` rule must not fire on it.
Profile buckets are different: a bucket with no token has no value, so its statistics are NaN and
its count is 0 (plots draw a gap); profiles feed plots only, never alarms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

QUANTILES: tuple[tuple[str, float], ...] = (
    ("p001", 0.001),
    ("p01", 0.01),
    ("p05", 0.05),
    ("p50", 0.50),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p999", 0.999),
)
"""Log-ratio quantiles: key suffix (percent with the decimal point dropped: p001 = 0.1 %) and level."""

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""|log r| thresholds for the tail mass ``tail_gt_{tau}`` (log(1.1) ~ 0.095, log(2) ~ 0.69)."""

POSITION_EDGES: tuple[float, ...] = (0, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Response-position buckets [e_k, e_{k+1}); the last bucket is open ([1024, inf))."""
PROB_EDGES: tuple[float, ...] = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99)
"""Token-probability buckets [e_k, e_{k+1}); the last bucket is [0.99, 1]."""
ENTROPY_EDGES: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0)
"""Entropy buckets in nats [e_k, e_{k+1}); the last bucket is open."""
LENGTH_EDGES: tuple[float, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Sequence-length buckets (loss tokens per sequence) [e_k, e_{k+1}); the last bucket is open."""

F64 = torch.float64


def _prep(log_ratio_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """float64 log-ratio with exact zeros off the mask, and the mask as a bool tensor."""
    if log_ratio_BT.shape != mask_BT.shape:
        raise ValueError(f"log_ratio_BT has shape {tuple(log_ratio_BT.shape)} but mask_BT has {tuple(mask_BT.shape)}")
    m = mask_BT.detach().bool()
    z = log_ratio_BT.detach().to(F64)
    return torch.where(m, z, torch.zeros_like(z)), m


def bucket_label(edges: Sequence[float], k: int) -> str:
    """Key fragment of bucket ``k``: ``'lo-hi'`` with ``'inf'`` for the open last bucket."""
    lo = edges[k]
    hi = edges[k + 1] if k + 1 < len(edges) else float("inf")
    return f"{lo:g}-{hi:g}"


def _ess_from_log_weights(logw_N: Tensor, valid_N: Tensor) -> Tensor:
    """Normalised ESS ``(sum w)^2 / (n sum w^2)`` of the valid entries, stable for any log-weight.

    Shifting every log-weight by their max leaves the ratio unchanged and keeps ``exp`` <= 1. Range
    ``[1/n, 1]``; 1 when ``n = 0`` (no evidence of mismatch).
    """
    n = valid_N.sum().to(F64)
    neg_inf = torch.full_like(logw_N, -torch.inf)
    shifted = torch.where(valid_N, logw_N, neg_inf)
    top = shifted.max() if shifted.numel() else torch.zeros((), dtype=F64, device=logw_N.device)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.where(valid_N, torch.exp(shifted - top), torch.zeros_like(logw_N))
    ess = w.sum() ** 2 / (n * (w * w).sum()).clamp(min=torch.finfo(F64).tiny)
    return torch.where(n > 0, ess, torch.ones_like(ess))


def ess_token(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token-level normalised ESS over all valid tokens, weights ``w_t = exp(z_t)``."""
    z, m = _prep(log_ratio_BT, mask_BT)
    return _ess_from_log_weights(z.reshape(-1), m.reshape(-1))


def sequence_log_ratios(log_ratio_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_t z_t, mean_t z_t, n_tokens)`` per row -> three ``[B]`` tensors (mean 0 on empty rows)."""
    z, m = _prep(log_ratio_BT, mask_BT)
    n_B = m.sum(-1).to(F64)
    s_B = z.sum(-1)
    return s_B, s_B / n_B.clamp(min=1.0), n_B


def ess_sequence(log_ratio_BT: Tensor, mask_BT: Tensor, *, geometric: bool = False) -> Tensor:
    """Sequence-level normalised ESS over rows with at least one valid token.

    Product weights ``w_i = exp(sum_t z_it)`` (``geometric=False``) or geometric-mean weights
    ``w_i = exp(mean_t z_it)`` (``geometric=True``).
    """
    s_B, g_B, n_B = sequence_log_ratios(log_ratio_BT, mask_BT)
    return _ess_from_log_weights(g_B if geometric else s_B, n_B > 0)


def _sorted_valid(x_N: Tensor, valid_N: Tensor) -> tuple[Tensor, Tensor]:
    """Valid values sorted ascending first (invalid ones filled with +inf after them), and n."""
    filled = torch.where(valid_N, x_N, torch.full_like(x_N, torch.inf))
    return torch.sort(filled).values, valid_N.sum()


def _quantile_sorted(sorted_N: Tensor, n: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile (NumPy's default ``method='linear'``) of the first n entries; 0 if n = 0."""
    nf = n.to(F64)
    pos = q * (nf - 1).clamp(min=0.0)
    lo = pos.floor()
    hi = pos.ceil()
    if sorted_N.numel() == 0:
        return torch.zeros((), dtype=F64, device=sorted_N.device)
    last = (n - 1).clamp(min=0)
    # index_select with a 1-element index tensor: no host sync (a 0-dim tensor index would be one)
    v_lo = sorted_N.index_select(0, lo.long().clamp(max=last).reshape(1)).reshape(())
    v_hi = sorted_N.index_select(0, hi.long().clamp(max=last).reshape(1)).reshape(())
    # lerp written so that equal neighbours give exactly that value
    val = torch.where(hi > lo, v_lo + (pos - lo) * (v_hi - v_lo), v_lo)
    return torch.where(n > 0, val, torch.zeros_like(val))


def quantiles(x_N: Tensor, valid_N: Tensor, levels: Sequence[float]) -> list[Tensor]:
    """Quantiles of the valid entries of a flat tensor (NumPy 'linear'); 0 when there is none."""
    s, n = _sorted_valid(x_N.to(F64), valid_N)
    return [_quantile_sorted(s, n, q) for q in levels]


def _masked_extreme(x_N: Tensor, valid_N: Tensor, *, largest: bool) -> Tensor:
    fill = -torch.inf if largest else torch.inf
    filled = torch.where(valid_N, x_N, torch.full_like(x_N, fill))
    if filled.numel() == 0:
        return torch.zeros((), dtype=F64, device=x_N.device)
    v = filled.max() if largest else filled.min()
    return torch.where(valid_N.any(), v, torch.zeros_like(v))


def _mean(x_N: Tensor, valid_N: Tensor, *, empty: float = 0.0) -> Tensor:
    n = valid_N.sum().to(F64)
    total = torch.where(valid_N, x_N, torch.zeros_like(x_N)).sum()
    return torch.where(n > 0, total / n.clamp(min=1.0), torch.full_like(total, empty))


def kl_terms(z: Tensor) -> dict[str, Tensor]:
    """Per-token KL / chi^2 terms for ``z = log p - log q``, tokens drawn from q (module docstring)."""
    em1 = torch.expm1(z)
    return {"kl_k1": -z, "kl_k2": 0.5 * z * z, "kl_k3": em1 - z, "chi2": em1 * em1}


def ratio_stats(
    log_ratio_BT: Tensor,
    mask_BT: Tensor,
    *,
    prefix: str,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Tensor]:
    """Batch-level statistics of one log-ratio under ``prefix`` (e.g. ``'meter/engine'``).

    Keys (``{prefix}/...``): ``n_tokens``, ``n_seqs``, ``ess_token``, ``ess_seq`` (product ratio),
    ``ess_geo`` (geometric-mean ratio), ``logr_mean``, ``logr_std``, ``abs_logr_mean``,
    ``logr_{p001..p999}``, ``logr_min``, ``logr_max``, ``abs_logr_p99``, ``abs_logr_max``,
    ``tail_gt_{tau}`` for each threshold, ``kl_k1``, ``kl_k2``, ``kl_k3``, ``chi2``, ``ppl_ratio``,
    ``seq_logr_p99``, ``seq_abs_logr_p50``, ``seq_abs_logr_p99``, ``geo_abs_logr_p50``, ``geo_abs_logr_p99``.
    """
    z, m = _prep(log_ratio_BT, mask_BT)
    zf, mf = z.reshape(-1), m.reshape(-1)
    out: dict[str, Tensor] = {}
    n = mf.sum().to(F64)
    s_B, g_B, n_B = sequence_log_ratios(log_ratio_BT, mask_BT)
    has_B = n_B > 0
    out["n_tokens"] = n
    out["n_seqs"] = has_B.sum().to(F64)
    out["ess_token"] = _ess_from_log_weights(zf, mf)
    out["ess_seq"] = _ess_from_log_weights(s_B, has_B)
    out["ess_geo"] = _ess_from_log_weights(g_B, has_B)
    mean = _mean(zf, mf)
    out["logr_mean"] = mean
    out["logr_std"] = _mean((zf - mean) ** 2, mf).sqrt()
    out["abs_logr_mean"] = _mean(zf.abs(), mf)
    for (name, _), v in zip(QUANTILES, quantiles(zf, mf, [q for _, q in QUANTILES])):
        out[f"logr_{name}"] = v
    out["logr_min"] = _masked_extreme(zf, mf, largest=False)
    out["logr_max"] = _masked_extreme(zf, mf, largest=True)
    (out["abs_logr_p99"],) = quantiles(zf.abs(), mf, [0.99])
    out["abs_logr_max"] = _masked_extreme(zf.abs(), mf, largest=True)
    for tau in thresholds:
        out[f"tail_gt_{tau:g}"] = _mean((zf.abs() > tau).to(F64), mf)
    for name, term in kl_terms(zf).items():
        out[name] = _mean(term, mf)
    out["ppl_ratio"] = torch.exp(out["kl_k1"])
    (out["seq_logr_p99"],) = quantiles(s_B, has_B, [0.99])
    out["seq_abs_logr_p50"], out["seq_abs_logr_p99"] = quantiles(s_B.abs(), has_B, [0.5, 0.99])
    out["geo_abs_logr_p50"], out["geo_abs_logr_p99"] = quantiles(g_B.abs(), has_B, [0.5, 0.99])
    return {f"{prefix}/{k}": v for k, v in out.items()}


def _bucket_token_stats(
    z0_N: Tensor, k3_N: Tensor, valid_N: Tensor, key_N: Tensor, edges: Sequence[float], *, prefix: str, group: str
) -> dict[str, Tensor]:
    """Per-bucket token count, mean |z|, mean z and mean k3 for buckets of ``key_N`` by ``edges``.

    ``z0_N`` and ``k3_N`` are the log-ratio and its k3 term, already 0 off the mask.
    """
    K = len(edges)
    e = torch.tensor(list(edges), dtype=F64, device=z0_N.device)
    idx = (torch.bucketize(key_N.to(F64), e, right=True) - 1).clamp(min=0, max=K - 1)
    w = valid_N.to(F64)
    z0, k3 = z0_N, k3_N

    def per_bucket(v: Tensor) -> Tensor:
        return torch.zeros(K, dtype=F64, device=z0.device).index_add_(0, idx, v * w)

    cnt = per_bucket(torch.ones_like(z0))
    nan = torch.full_like(cnt, torch.nan)
    safe = cnt.clamp(min=1.0)
    stats = {
        "n": cnt,
        "abs_logr_mean": torch.where(cnt > 0, per_bucket(z0.abs()) / safe, nan),
        "logr_mean": torch.where(cnt > 0, per_bucket(z0) / safe, nan),
        "kl_k3": torch.where(cnt > 0, per_bucket(k3) / safe, nan),
    }
    out = {}
    for k in range(K):
        label = bucket_label(edges, k)
        for name, v in stats.items():
            out[f"{prefix}/{group}/{label}/{name}"] = v[k]
    return out


def position_index(mask_BT: Tensor) -> Tensor:
    """Index of each valid token among its row's valid tokens (0 for the first response token)."""
    m = mask_BT.detach().to(torch.long)
    return (m.cumsum(-1) - 1).clamp(min=0)


def profile_stats(
    log_ratio_BT: Tensor,
    mask_BT: Tensor,
    *,
    prefix: str,
    logp_BT: Tensor | None = None,
    entropy_BT: Tensor | None = None,
    position_edges: Sequence[float] = POSITION_EDGES,
    prob_edges: Sequence[float] = PROB_EDGES,
    entropy_edges: Sequence[float] = ENTROPY_EDGES,
    length_edges: Sequence[float] = LENGTH_EDGES,
) -> dict[str, Tensor]:
    """Profiles of the mismatch (docs/metrics.md "Profiles").

    ``{prefix}/by_pos/{lo}-{hi}/{n,abs_logr_mean,logr_mean,kl_k3}``: tokens bucketed by their index in
    the response (``position_index``). ``by_prob``: bucketed by ``exp(logp_BT)`` (the token's
    probability, normally under the sampling policy mu); only when ``logp_BT`` is given. ``by_entropy``:
    bucketed by ``entropy_BT`` (nats); only when given. ``by_len/{lo}-{hi}/{n,ess_seq,ess_geo}``: rows
    bucketed by their number of valid tokens, with the sequence ESS within each bucket. Empty buckets:
    NaN statistics, count 0.
    """
    z, m = _prep(log_ratio_BT, mask_BT)
    zf, mf = z.reshape(-1), m.reshape(-1)
    k3 = torch.where(mf, torch.expm1(zf) - zf, torch.zeros_like(zf))
    pos = position_index(m).reshape(-1)
    out = _bucket_token_stats(zf, k3, mf, pos, position_edges, prefix=prefix, group="by_pos")
    if logp_BT is not None:
        p = torch.exp(torch.where(m, logp_BT.detach().to(F64), torch.zeros_like(z))).reshape(-1)
        out.update(_bucket_token_stats(zf, k3, mf, p, prob_edges, prefix=prefix, group="by_prob"))
    if entropy_BT is not None:
        h = torch.where(m, entropy_BT.detach().to(F64), torch.zeros_like(z)).reshape(-1)
        out.update(_bucket_token_stats(zf, k3, mf, h, entropy_edges, prefix=prefix, group="by_entropy"))
    s_B, g_B, n_B = sequence_log_ratios(z, m)
    e = torch.tensor(list(length_edges), dtype=F64, device=z.device)
    K = len(length_edges)
    idx_B = torch.bucketize(n_B, e, right=True) - 1  # -1: empty rows (and rows shorter than the first edge)
    for k in range(K):
        sel = (idx_B == k) & (n_B > 0)
        cnt = sel.sum().to(F64)
        nan = torch.full_like(cnt, torch.nan)
        label = bucket_label(length_edges, k)
        out[f"{prefix}/by_len/{label}/n"] = cnt
        out[f"{prefix}/by_len/{label}/ess_seq"] = torch.where(cnt > 0, _ess_from_log_weights(s_B, sel), nan)
        out[f"{prefix}/by_len/{label}/ess_geo"] = torch.where(cnt > 0, _ess_from_log_weights(g_B, sel), nan)
    return out
