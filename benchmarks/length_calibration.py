"""Fixed vs length-calibrated sequence thresholds on the exact lab, at several lengths (issue 17 item 3).

For each mismatch kind of the lab (tether.lab.mismatch) and each horizon T, the lab measures, exactly over all V^T
sequences, the bias ``||E g - grad J|| / ||grad J||``, the per-sample variance and the mu-mass dropped whole of:

- ``sequence_is``: the full product ratio, unbiased (the reference);
- ``mis`` (weighted, no veto), band [0.5, 2] on the product ratio: fixed, ``sqrt``, ``sqrt`` with the drift term,
  and ``geo``, every calibrated band meant at ``ref_len`` T0 (all four agree at T = T0);
- ``tis`` at sequence level, cap 2 on the product ratio: fixed, ``sqrt``, ``geo``.

``--old pi`` throughout: logp_old is pi's, so the corrections act on pi_old / mu (with ``--old mu`` they are 1).
The drift of the ``sqrt+drift`` rows is the exact per-token mean log-ratio at T0, ``m = E_mu[S_T0] / T0``
(= minus the per-token KL(mu || pi), what the meter's ``mismatch/kl_k1`` estimates in a run). The relative MSE of a
batch of n sequences is ``bias^2 + var / (n ||grad J||^2)``.

    python benchmarks/length_calibration.py [--vocab 2] [--horizons 2,4,8,12,16] [--ref-len 4] [--strength 0.3]
                                            [--kinds staleness,noise,...] [--n 64,1024] [--json out.json]

One cell by hand: ``tether lab --mismatch noise --strength 0.3 --old pi --vocab 2 --horizon 8 --objectives
"mis:veto=null,mis:veto=null:length_calibration=sqrt:ref_len=4" --markdown``.
"""

from __future__ import annotations

import argparse
import json
import time

from tether.lab.mismatch import MISMATCHES, behaviour_probs
from tether.lab.policy import init_logits, make_space, seq_probs, token_logp, token_logp_from_probs
from tether.lab.run import LabConfig, measure


def specs(ref_len: float, drift: float) -> dict[str, str]:
    """Row label -> lab objective spec."""
    r = f"ref_len={ref_len:g}"
    return {
        "sequence_is": "sequence_is",
        "mis fixed": "mis:veto=null",
        "mis sqrt": f"mis:veto=null:length_calibration=sqrt:{r}",
        "mis sqrt+drift": f"mis:veto=null:length_calibration=sqrt:{r}:length_drift={drift!r}",
        "mis geo": f"mis:veto=null:length_calibration=geo:{r}",
        "tis fixed": "tis:level=sequence",
        "tis sqrt": f"tis:level=sequence:length_calibration=sqrt:{r}",
        "tis geo": f"tis:level=sequence:length_calibration=geo:{r}",
    }


def drift_at(kind: str, strength: float, vocab: int, horizon: int, seed: int) -> float:
    """Exact per-token mean of log pi - log mu under mu at this horizon: E_mu[sum_t delta_t] / T."""
    space = make_space(vocab, horizon)
    theta = init_logits(space, seed=seed)
    logp_mu = token_logp_from_probs(behaviour_probs(theta, kind, strength, seed=seed), space)
    mu = seq_probs(logp_mu)
    delta = (token_logp(theta, space) - logp_mu.clamp(min=-1e4)).sum(-1)
    return float((mu * delta).sum()) / horizon


def run(kinds: list[str], horizons: list[int], strength: float, vocab: int, ref_len: int, seed: int) -> list[dict]:
    out = []
    for kind in kinds:
        drift = drift_at(kind, strength, vocab, ref_len, seed)
        rows = specs(ref_len, drift)
        for T in horizons:
            cfg = LabConfig(mismatch=kind, strengths=[strength], objectives=list(rows.values()), vocab=vocab,
                            horizon=T, old="pi", seed=seed)
            res = measure(cfg)
            for label, r in zip(rows, res["results"]):
                out.append({"kind": kind, "T": T, "label": label, "drift": drift, "grad_norm": res["grad_norm"],
                            **{k: r[k] for k in ("bias", "variance", "dropped", "cosine")}})
    return out


def rel_mse(r: dict, n: int) -> float:
    """``bias^2 + var / (n ||grad J||^2)``: the relative MSE of the mean over a batch of n sequences."""
    return r["bias"] ** 2 + r["variance"] / (n * r["grad_norm"] ** 2)


def table(rows: list[dict], kind: str, ns: list[int]) -> str:
    sel = [r for r in rows if r["kind"] == kind]
    Ts = list(dict.fromkeys(r["T"] for r in sel))
    labels = list(dict.fromkeys(r["label"] for r in sel))
    cols = " / ".join(["bias", "var", "drop", *(f"MSE@{n}" for n in ns)])
    head = "| estimator | " + " | ".join(f"T={T}: {cols}" for T in Ts) + " |\n"
    body = "|---" * (len(Ts) + 1) + "|\n"
    for lab in labels:
        cells = []
        for T in Ts:
            r = next(x for x in sel if x["label"] == lab and x["T"] == T)
            vals = [r["bias"], r["variance"], r["dropped"], *(rel_mse(r, n) for n in ns)]
            cells.append(" / ".join(f"{v:.3f}" for v in vals))
        body += f"| {lab} | " + " | ".join(cells) + " |\n"
    return head + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(MISMATCHES))
    ap.add_argument("--horizons", default="2,4,8,12,16")
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--vocab", type=int, default=2)
    ap.add_argument("--ref-len", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", default="64,1024", help="batch sizes of the relative MSE columns, comma-separated")
    ap.add_argument("--json", default=None, help="also write every number here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    kinds = [k for k in args.kinds.split(",") if k]
    rows = run(kinds, [int(t) for t in args.horizons.split(",")], args.strength, args.vocab, args.ref_len,
               args.seed)
    for kind in kinds:
        d = next(r["drift"] for r in rows if r["kind"] == kind)
        print(f"\n### `{kind}`, s={args.strength:g} (V={args.vocab}, T0={args.ref_len}, drift m={d:.4f})\n")
        print(table(rows, kind, [int(n) for n in args.n.split(",")]), end="")
    print(f"\n{time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
