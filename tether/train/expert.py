"""Expert rows for the hybrid presets (CalibRL, RL-PLUS): each group's expert solution, teacher-forced.

Each step has ``P`` examples; group ``g`` holds the ``G`` rows sampled for example ``g``. The sync
loop adds one row per group (CalibRL's ``pref_n = 1``, RL-PLUS's ``n_prefix = 1``):

1. ``expert_rollout``: the group's own prompt tokens (copied from its first sampled row: exactly
   what the policy was conditioned on) followed by the tokens of the example's expert solution and
   EOS, cut at ``max_new_tokens`` (then the row is unfinished, like a sampled row at the limit).
   The loss mask covers the solution tokens (from the lengths, as for every row); the support is the
   whole vocabulary (``kept_count = V``: the expert did not draw from the engine's top-k / top-p);
   ``version`` is -1 (no policy version produced these tokens).
2. The rows are scored by the task's reward like any completion and appended to the rollout in the
   groups of their examples; ``expert_B`` marks them (``append_rows``).
3. The loop's pi_old recompute teacher-forces them through the policy with the sampled rows. From
   that recompute (``expert_baseline``, ``expert_behaviour``):

   - ``logp_expert_old_BT[i, p_i + k] = log pi_old(e_k | x, e_<k)`` for the expert ``e`` of row i's
     group, at completion positions ``k < min(|y_i|, |e|)``, 0 elsewhere: CalibRL's baseline,
     aligned by position (methods.md §(a)5);
   - ``logp_mu`` on the expert tokens becomes RL-PLUS's proxy for the unknown expert policy,
     ``log omega_t = log((1 + pi_old(e_t)) / 2)`` (methods.md §(a)6). No preset reads it (CalibRL
     does not use mu on expert rows; RL-PLUS builds its denominator ``0.75 pi_old + 0.25 =
     (pi_old + omega) / 2`` from pi_old): it keeps the record from claiming that the engine sampled
     the expert's tokens.
4. The advantage estimator gets ``include_B = ~expert_B`` (group statistics over sampled rows only;
   the expert row's advantage is ``R_e - mean_on-policy R``), and the mismatch meter reads the
   sampled rows only (``on_policy``): expert tokens are off-policy by construction and would swamp
   the engine / staleness measurement.

``ExpertRows`` bundles these for the loop; ``NoExpertRows`` is its do-nothing twin for every other
preset, so the loop calls the same methods whatever the preset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from tether.objectives.registry import Preset
from tether.rollout import Rollout, concat_rows
from tether.tasks.base import Example
from tether.train.config import TrainConfig
from tether.train.requirements import needs_expert_rows


def expert_rollout(rollout: Rollout, examples: Sequence[Example], tokenizer: Any, *, max_new_tokens: int,
                   pad_id: int, vocab_size: int) -> Rollout:
    """One row per example (group ``g`` = ``examples[g]``): its prompt as sampled in ``rollout``, then its
    expert solution's tokens and EOS, at most ``max_new_tokens`` of them."""
    if rollout.group_B is None:
        raise ValueError("expert rows: the rollout has no group ids")
    dev = rollout.tokens_BT.device
    rows, prompt_lens, comp_lens, finished = [], [], [], []
    for g, ex in enumerate(examples):
        if ex.solution is None:
            raise ValueError(f"expert rows: example {g} ({ex.prompt[:40]!r}) has no expert solution")
        first = torch.nonzero(rollout.group_B == g)
        if first.numel() == 0:
            raise ValueError(f"expert rows: the rollout has no row of group {g}")
        i = int(first[0, 0])
        p = int(rollout.prompt_len_B[i])
        completion = list(tokenizer.encode_completion(ex.solution)) + [tokenizer.eos_id]
        finished.append(len(completion) <= max_new_tokens)
        completion = completion[:max_new_tokens]
        rows.append(rollout.tokens_BT[i, :p].tolist() + completion)
        prompt_lens.append(p)
        comp_lens.append(len(completion))
    P, T = len(rows), max(len(r) for r in rows)
    tokens_BT = torch.full((P, T), pad_id, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        tokens_BT[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    out = Rollout(
        tokens_BT=tokens_BT,
        prompt_len_B=torch.tensor(prompt_lens, dtype=rollout.prompt_len_B.dtype, device=dev),
        completion_len_B=torch.tensor(comp_lens, dtype=rollout.completion_len_B.dtype, device=dev),
        logp_mu_BT=torch.zeros((P, T), dtype=rollout.logp_mu_BT.dtype, device=dev),
        version_BT=torch.full((P, T), -1, dtype=rollout.version_BT.dtype, device=dev),
        kept_count_BT=(None if rollout.kept_count_BT is None else
                       torch.full((P, T), vocab_size, dtype=rollout.kept_count_BT.dtype, device=dev)),
        sampling=rollout.sampling,
        group_B=torch.arange(P, dtype=rollout.group_B.dtype, device=dev),
        finished_B=torch.tensor(finished, dtype=torch.bool, device=dev),
    )
    return out


def append_rows(rollout: Rollout, expert: Rollout, *, pad_id: int, vocab_size: int) -> tuple[Rollout, Tensor]:
    """``rollout``'s rows then ``expert``'s, each expert row in the group of the same id; returns the
    record and ``expert_B`` (True on the appended rows)."""
    both = concat_rows([rollout, expert], pad_id=pad_id, vocab_size=vocab_size)
    both = replace(both, group_B=torch.cat([rollout.group_B, expert.group_B.to(rollout.group_B.device)]))
    expert_B = torch.arange(both.batch_size, device=rollout.tokens_BT.device) >= rollout.batch_size
    return both, expert_B


def expert_baseline(logp_old_BT: Tensor, rollout: Rollout, expert_B: Tensor) -> Tensor:
    """``logp_expert_old_BT``: for each row, pi_old's log-probs of its group's expert solution, by
    completion position (module docstring, step 3); 0 where the row or the expert has no token, and
    on every row of a group without an expert row. No gradient."""
    B, T = logp_old_BT.shape
    dev = logp_old_BT.device
    group_B, expert_B = rollout.group_B.to(dev), expert_B.to(device=dev, dtype=torch.bool)
    _, gid_B = torch.unique(group_B, return_inverse=True)
    expert_of_gid = torch.full((int(gid_B.max()) + 1 if B else 0,), -1, dtype=torch.long, device=dev)
    rows = torch.nonzero(expert_B).flatten()
    expert_of_gid[gid_B[rows]] = rows
    e_B = expert_of_gid[gid_B]  # the expert row of each row's group, -1 if none
    has_e = e_B >= 0
    e_B = e_B.clamp(min=0)
    prompt_B, comp_B = rollout.prompt_len_B.to(dev), rollout.completion_len_B.to(dev)
    k_BT = torch.arange(T, device=dev)[None, :] - prompt_B[:, None]  # completion position of each entry
    src_BT = prompt_B[e_B][:, None] + k_BT  # the same completion position in the expert row
    valid = rollout.loss_mask_BT.to(dev) & (k_BT < comp_B[e_B][:, None]) & has_e[:, None]
    values = logp_old_BT.detach()[e_B].gather(1, src_BT.clamp(0, T - 1))
    return torch.where(valid, values, torch.zeros_like(values))


def expert_behaviour(logp_old_BT: Tensor, rollout: Rollout, expert_B: Tensor) -> Rollout:
    """``rollout`` with ``logp_mu`` on the expert rows' tokens set to ``log((1 + pi_old) / 2)``."""
    on_BT = rollout.loss_mask_BT & expert_B.to(rollout.loss_mask_BT.device)[:, None]
    omega_BT = (torch.log1p(logp_old_BT.detach().exp()) - math.log(2.0)).to(rollout.logp_mu_BT.dtype)
    return replace(rollout, logp_mu_BT=torch.where(on_BT, omega_BT, rollout.logp_mu_BT))


def score_rows(task: Any, texts: Sequence[str], examples: Sequence[Example], *, timeout_s: float) -> tuple[Tensor, int]:
    """Task rewards of ``texts[i]`` as a completion of ``examples[i]`` (the trainer's failure rule:
    a failed call scores 0 and is counted); returns ``(rewards_B, failed)``."""
    from tether.tasks.rewards import score

    reward_of = getattr(task, "reward_for", lambda ex: task.reward)  # TRL-convention rewards per example
    results = [score(reward_of(ex), ex.prompt, text, ex.answer, timeout_s=timeout_s)
               for text, ex in zip(texts, examples, strict=True)]
    return torch.tensor([r.reward for r in results], dtype=torch.float32), sum(int(r.failed) for r in results)


def on_policy_rows(expert_B: Tensor | None, *per_row: Any) -> tuple[Any, ...]:
    """Each of ``per_row`` (tensors with a leading batch axis, or a ``Rollout``) restricted to the
    sampled rows; unchanged when there are no expert rows."""
    if expert_B is None:
        return per_row
    keep = torch.nonzero(~expert_B).flatten()
    return tuple(x.select(keep) if isinstance(x, Rollout) else x[keep.to(x.device)] for x in per_row)


class ExpertRows:
    """The sync loop's expert rows for one run (built at start-up when the preset needs them)."""

    def __init__(self, cfg: TrainConfig, task: Any, policy: Any) -> None:
        self.task, self.policy = task, policy
        self.max_new_tokens, self.timeout_s = cfg.max_new_tokens, cfg.reward_timeout_s
        self.pad_id, self.vocab_size = policy.engine.pad_id, policy.engine.vocab_size
        self.metrics: dict[str, float] = {}
        """This step's ``expert/*`` metrics (docs/metrics.md)."""

    def append(self, rollout: Rollout, rewards_B: Tensor, examples: Sequence[Example]
               ) -> tuple[Rollout, Tensor, Tensor | None, int]:
        """Steps 1-2: ``(rollout + expert rows, rewards + theirs, expert_B, failed reward calls)``."""
        from tether.train.setup import completions

        expert = expert_rollout(rollout, examples, self.policy.tokenizer, max_new_tokens=self.max_new_tokens,
                                pad_id=self.pad_id, vocab_size=self.vocab_size)
        expert_rewards_B, failed = score_rows(self.task, completions(self.policy, expert), examples,
                                              timeout_s=self.timeout_s)
        both, expert_B = append_rows(rollout, expert, pad_id=self.pad_id, vocab_size=self.vocab_size)
        self.metrics = {"expert/rows": float(expert.batch_size), "expert/reward_mean": float(expert_rewards_B.mean()),
                        "expert/truncated_frac": float((~expert.finished_B).float().mean()),
                        "expert/tokens_mean": float(expert.completion_len_B.float().mean())}
        return both, torch.cat([rewards_B, expert_rewards_B.to(rewards_B.dtype)]), expert_B, failed

    def loss_inputs(self, rollout: Rollout, logp_old_BT: Tensor, expert_B: Tensor | None
                    ) -> tuple[Rollout, dict[str, Tensor]]:
        """Step 3, after the pi_old recompute: the record with the expert rows' mu proxy, and the
        per-row ``LossInputs`` fields ``expert_B`` and ``logp_expert_old_BT``."""
        baseline_BT = expert_baseline(logp_old_BT, rollout, expert_B)
        mask_BT = rollout.loss_mask_BT & expert_B[:, None]
        self.metrics["expert/logp_old_mean"] = float((logp_old_BT.detach() * mask_BT).sum() / mask_BT.sum().clamp(min=1))
        return (expert_behaviour(logp_old_BT, rollout, expert_B),
                {"expert_B": expert_B, "logp_expert_old_BT": baseline_BT})


class NoExpertRows:
    """The loop's handle when the preset needs no expert rows: every method leaves the step alone."""

    metrics: dict[str, float] = {}

    def append(self, rollout: Rollout, rewards_B: Tensor, examples: Sequence[Example]
               ) -> tuple[Rollout, Tensor, Tensor | None, int]:
        return rollout, rewards_B, None, 0

    def loss_inputs(self, rollout: Rollout, logp_old_BT: Tensor, expert_B: Tensor | None
                    ) -> tuple[Rollout, dict[str, Tensor]]:
        return rollout, {}


def expert_rows_for(preset: Preset, cfg: TrainConfig, task: Any, policy: Any) -> ExpertRows | NoExpertRows:
    """``ExpertRows`` when ``preset`` trains on expert rows (start-up checked that the task has them)."""
    return ExpertRows(cfg, task, policy) if needs_expert_rows(preset) else NoExpertRows()
