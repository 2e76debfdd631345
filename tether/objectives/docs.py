"""Render the preset registry as Markdown (docs/objectives.md is generated from this)."""

from __future__ import annotations

from tether.objectives.registry import presets

HEADER = """# Objectives

Generated from the preset registry by `tether objectives --markdown > docs/objectives.md`
(a test fails when this file and the registry disagree). Notation as in methods.md §0:
`r_t = pi_theta(y_t|s_t) / pi_old(y_t|s_t)`, `mu` the behaviour (rollout) policy, `A` the
advantage, `m` the loss mask, `sg` stop-gradient. Every preset returns `(loss, metrics)`; the
per-token loss below is reduced with the preset's `agg` mode (see `tether.objectives.aggregation`):

| mode | loss |
|---|---|
| `token-mean` | `sum_{i,t} m l / N_tok` |
| `seq-mean-token-mean` | `sum_i (sum_t m l / sum_t m) / N_seq` |
| `seq-mean-token-sum` | `sum_i sum_t m l / N_seq` |
| `seq-mean-token-sum-norm` | `sum_i sum_t m l / (N_seq L)` (Dr.GRPO; verl omits `N_seq`) |

`N_tok`, `N_seq` are global counts over the optimiser step, so micro-batching and gradient
accumulation leave loss and gradient unchanged.

`requires` lists the optional inputs a preset needs. `tether train` checks them at start-up, before
any model is built (`tether/train/requirements.py`): it fills `logp_mu_BT` and `logp_prox_BT` always,
`logp_ref_BT` with a KL to the reference, `expert_B` / `logp_expert_old_BT` in the sync loop on a task
with expert solutions (docs/tasks.md, "Expert solutions"), and never the teacher inputs: distillation
presets run in `tether distill` (docs/distill.md).

Choices, deviations from the peers and derivations are in `docs/objectives_notes/`: corrections.md (`tis`,
`icepop`, `mis` and the rejection masks), [length_calibration.md](objectives_notes/length_calibration.md) (the
`length_calibration` option of `tis`, `mis` and `icepop`: sequence thresholds that mean the same at every length,
derived, with the lab's evidence), [alp.md](objectives_notes/alp.md) (`alp`, `alp_seq` and the layerwise
perturbation of `tether train --alp`), ratio_family.md, peer_presets.md, advantages_kl.md.

| preset | description | advantage | agg |
|---|---|---|---|
"""


def render_markdown() -> str:
    items = presets()
    out = [HEADER]
    for name in sorted(items):
        p = items[name]
        out.append(f"| [`{name}`](#{name}) | {p.description} | `{p.advantage}` | `{p.defaults.get('agg', '')}` |\n")
    for name in sorted(items):
        p = items[name]
        defaults = ", ".join(f"`{k}={v}`" for k, v in p.defaults.items())
        out.append(f"\n## {name}\n\n{p.description}\n\n")
        out.append(f"- loss: `{p.equation}`\n")
        out.append(f"- advantage estimator: `{p.advantage}`\n")
        out.append(f"- defaults: {defaults}\n")
        if p.requires:
            out.append(f"- requires: {', '.join(f'`{r}`' for r in p.requires)}\n")
        out.append(f"- source: {p.source}\n")
        if p.fn.__doc__:
            doc = " ".join(line.strip() for line in p.fn.__doc__.strip().splitlines())
            out.append(f"- implementation: `{p.fn.__module__}.{p.fn.__name__}`: {doc}\n")
    return "".join(out)
