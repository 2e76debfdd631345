"""The multi-turn rollout: run a batch of episodes with an engine, one row of the rollout record per episode.

    obs_0 = env.reset(seed_e)                               every episode e (tokens: Source.PROMPT)
    for turn k = 0 .. max_turns - 1, over the episodes still running:
        before_turn(k)                                      the driver may load newer weights here (async)
        actions = engine.generate(contexts)                 one batched call; each action keeps log mu,
                                                            its weight version and its truncated support
        for each episode: context += action (Source.POLICY, turn k)
                          step = env.step(action tokens)    reward_{e,k}, done
                          context += step.observation       (Source.ENV / TOOL, turn k), unless done

With a ``teacher`` (DAgger's mixture, BEPA's solver episodes; :class:`Teacher`) every running episode's state is
labelled with the teacher's action before each turn, and on the turns the teacher takes, its action is
appended instead of a sample (``Source.TEACHER``, policy id ``TEACHER_POLICY_ID``, its own log mu).

Token-native: the sampled actions and the environment's replies are appended as token ids, so the row the
trainer scores is exactly the row the engine sampled (no re-rendering, no re-tokenisation). Provenance
(``source_BT``, ``turn_BT``, ``policy_id_BT``, ``version_BT``) is recorded per token and the loss mask comes
from it, so env and tool tokens never enter the loss, whatever their ids.

How an episode ends (``EpisodeBatch.outcomes``): ``done`` (the environment said so), ``max_turns`` (the
turn cap: the run's ``max_turns`` or the environment's own, whichever is smaller), ``budget`` (the next
action could not fit: context + ``max_new_tokens`` would pass ``max_episode_tokens``, or a reply did not fit
and was not appended) and ``env_error`` (``env.step`` raised or returned a non-finite reward: the episode ends, its reward so far
is kept, and it is counted in ``failed``; a failing ``env.reset`` is an error that names the environment
and the seed, before any generation). Truncated episodes (``max_turns``, ``budget``) keep
``finished_B`` False, like a single-turn completion cut at the length limit.

Replays (``replays[e]``, Fission-GRPO's forks, ``tether.agent.fission``): after ``reset`` the episode first replays
the given actions of an earlier episode with the same seed (tokens ``Source.REPLAY``, with the original ``log mu``
and versions; never in the loss), appending the environment's replies, then samples on from there; its turn
indices continue from the replayed ones. The replayed row must equal the earlier row's prefix token for token,
else the environment is not deterministic under ``reset(seed)`` and the replay is an error naming it.

A step *marks failure* (``EpisodeBatch.failure_EK``, :func:`marks_failure`) when its reward is negative or its
``info`` has a true ``invalid`` or ``error``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from tether.agent.env import Env, Observation
from tether.engine.base import Engine
from tether.engine.partial import generate_partial
from tether.rollout import Rollout, SamplingParams, Source

log = logging.getLogger("tether.agent")

OUTCOMES = ("done", "max_turns", "budget", "env_error")


@dataclass
class EpisodeBatch:
    """A batch of finished episodes: the rollout record (one row each) and what the credit functions need."""
    rollout: Rollout
    rewards_EK: Tensor
    """Reward of turn k of episode e (0 on turns that did not happen)."""
    turn_mask_EK: Tensor
    """True on the turns that happened (a prefix of each row)."""
    state_EK: Tensor
    """Id of the state each turn acted in (equal ids: the same decision point; GiGPO's anchor states), dense
    over the batch: the environment's ``info["state"]`` of the previous step when it gives one, else its
    ``state_id()`` when it has one (turn 0: after ``reset``), else the tokens of the observation the turn
    answers (turn 0: the reset observation, so a group's first turns, reset with one seed, share an anchor)."""
    outcomes: list[str]
    success_E: Tensor
    """``info["success"]`` of the last step where the environment sets it, else return > 0."""
    failed: int = 0
    """Episodes ended by an environment error."""
    action_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    """[start, end) of each turn's sampled action in the row's tokens."""
    messages: list[list[dict] | None] = field(default_factory=list)
    """Each episode's conversation as messages, where its environment keeps them (text environments)."""
    failure_EK: Tensor | None = None
    """True on the turns whose step marks failure (:func:`marks_failure`)."""
    replayed_EK: Tensor | None = None
    """True on the turns replayed from an earlier episode (``replays``), not sampled in this batch."""
    fission_B: Tensor | None = None
    """True on the rows of Fission-GRPO's forked groups (``tether.agent.fission``); None: no fission."""
    labels: list[list[list[int]]] = field(default_factory=list)
    """With a teacher (``run_episodes(teacher=...)``): the teacher's action tokens for the state of every turn
    that happened, whoever acted there (DAgger's labels, ``tether.agent.dagger``); else empty."""

    @property
    def returns_E(self) -> Tensor:
        return self.rewards_EK.sum(dim=1)

    def metrics(self) -> dict[str, float]:
        n = max(len(self.outcomes), 1)
        turns = self.turn_mask_EK.sum(dim=1).float()
        out = {f"agent/outcome_{o}_frac": sum(x == o for x in self.outcomes) / n for o in OUTCOMES}
        out.update({"agent/success_rate": float(self.success_E.float().mean()), "agent/turns_mean": float(turns.mean()),
                    "agent/return_mean": float(self.returns_E.mean()), "agent/env_failed": float(self.failed)})
        src = self.rollout.source_BT
        attn = self.rollout.attention_mask_BT
        total = max(int(attn.sum()), 1)
        for s in (Source.POLICY, Source.ENV, Source.TOOL):
            out[f"agent/tokens_{s.name.lower()}_frac"] = int((src == s).sum()) / total
        if self.fission_B is not None:  # Fission-GRPO: how many rows were forked, how often they recovered
            forked = self.fission_B
            out["agent/fission_rows"] = float(forked.sum())
            out["agent/fission_success_rate"] = float(self.success_E[forked].float().mean()) if forked.any() else 0.0
            out["agent/fission_base_success_rate"] = float(self.success_E[~forked].float().mean())
            out["agent/fission_replayed_turns_mean"] = (float(self.replayed_EK[forked].sum()) / max(int(forked.sum()), 1)
                                                        if self.replayed_EK is not None else 0.0)
        return out


@dataclass
class _Episode:
    tokens: list[int]
    prompt_len: int
    sources: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    states: list[object] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    marks: list[bool] = field(default_factory=list)
    replayed: int = 0
    labels: list[list[int]] = field(default_factory=list)
    outcome: str | None = None
    success: bool | None = None
    last_state: object = None

    def append(self, ids: Sequence[int], source: Source, turn: int, logp=None, versions=None, kept=None,
               vocab_size: int = 0) -> None:
        n = len(ids)
        self.tokens += list(ids)
        self.sources += [int(source)] * n
        self.turns += [turn] * n
        self.logp += list(logp) if logp is not None else [0.0] * n
        self.versions += list(versions) if versions is not None else [-1] * n
        self.kept += list(kept) if kept is not None else [vocab_size] * n


@dataclass(frozen=True)
class Replay:
    """Actions of an earlier episode to replay after ``reset`` (module docstring): each turn's action tokens with
    the ``log mu``, versions and kept counts they were sampled with, and the earlier row's tokens up to the end
    of the last replayed turn's reply (what the replay must reproduce)."""
    actions: list[list[int]]
    logp: list[list[float]]
    versions: list[list[int]]
    kept: list[list[int]] | None
    tokens: list[int]


def marks_failure(reward: float, info: dict) -> bool:
    """Whether a step marks failure: a negative reward, or ``info["invalid"]`` / ``info["error"]`` true."""
    return reward < 0 or bool(info.get("invalid")) or bool(info.get("error"))


def _replay(ep: _Episode, env: Env, replay: Replay, seed: int, vocab_size: int) -> None:
    """Replay ``replay``'s actions into the fresh episode ``ep`` (module docstring)."""
    name = type(getattr(env, "env", env)).__name__
    for k, action in enumerate(replay.actions):
        start = len(ep.tokens)
        ep.append(action, Source.REPLAY, k, replay.logp[k], replay.versions[k],
                  replay.kept[k] if replay.kept is not None else None, vocab_size=vocab_size)
        ep.spans.append((start, len(ep.tokens)))
        ep.states.append(ep.last_state)
        try:
            step = env.step(action)
        except Exception as exc:
            raise ValueError(f"environment {name} (episode seed {seed}): replaying turn {k} failed: {exc}") from exc
        if step.done or step.observation is None:
            raise ValueError(f"environment {name} (episode seed {seed}): the replayed turn {k} ended the episode, "
                             "which the earlier episode went on from")
        ep.rewards.append(float(step.reward))
        ep.marks.append(marks_failure(float(step.reward), step.info))
        if "success" in step.info:
            ep.success = bool(step.info["success"])
        ep.append(step.observation.tokens, step.observation.source, k, vocab_size=vocab_size)
        ep.last_state = _anchor(env, step.info, step.observation, f"episode seed {seed}, replayed turn {k}")
    if ep.tokens != list(replay.tokens):
        raise ValueError(f"environment {name} is not deterministic under reset(seed={seed}): replaying the same "
                         "actions gave other observations (Fission-GRPO forks need a restorable environment)")
    ep.replayed = len(replay.actions)


def _anchor(env: Env, info: dict | None, obs: Observation, where: str) -> object:
    """The anchor-state key of the decision point after ``obs``: ``info["state"]`` of the step that showed it,
    else the environment's ``state_id()`` (optional; the only source for the reset observation), else the
    observation's tokens. Keys from ids and from tokens never collide (tagged ``"state"`` / ``"tokens"``)."""
    if info is not None and "state" in info:
        key = ("state", info["state"])
    elif callable(getattr(env, "state_id", None)):
        key = ("state", env.state_id())
    else:
        return ("tokens", tuple(obs.tokens))
    try:
        hash(key)
    except TypeError:
        name = type(getattr(env, "env", env)).__name__  # a text environment's own name, not its adapter's
        raise ValueError(f"environment {name} ({where}): its state id {key[1]!r} is not hashable; "
                         "give info['state'] / state_id() as a tuple, string or number") from None
    return key


class Teacher(Protocol):
    """A second policy that can act on some turns (``run_episodes(teacher=...)``; DAgger, BEPA's expert cache).

    ``labels(envs, contexts)`` is the teacher's action in each environment's current state (``contexts``: the
    episodes' tokens so far), as (token ids, EOS included; the teacher's log-prob of each); ``acts(e, k)``
    whether it, not the engine, acts at turn ``k`` of episode ``e``. Its actions are recorded with
    ``Source.TEACHER``, policy id ``TEACHER_POLICY_ID`` and those log-probs as ``logp_mu``."""

    def labels(self, envs: Sequence[Env], contexts: Sequence[list[int]]) -> list[tuple[list[int], list[float]]]:
        ...

    def acts(self, e: int, k: int) -> bool:
        ...


TEACHER_POLICY_ID = 1
"""``policy_id_BT`` of a teacher's tokens (the trained policy is 0)."""


def run_episodes(engine: Engine, envs: Sequence[Env], episode_seeds: Sequence[int], params: SamplingParams, *,
                 group_B: Tensor, seed_fn: Callable[[int, int], int], max_turns: int, max_episode_tokens: int,
                 before_turn: Callable[[int], None] | None = None, chunk_tokens: int | None = None,
                 replays: Sequence[Replay | None] | None = None, teacher: Teacher | None = None) -> EpisodeBatch:
    """Run one episode per environment (``envs[e].reset(episode_seeds[e])``) to its end (module docstring).

    Turn ``k``'s actions are sampled with seeds ``seed_fn(k, c)`` (``c``: the chunk, 0 without partial
    rollouts), so a batch is a fixed function of its seeds and the weights. ``before_turn(k)`` runs before
    every turn's generation (and, with ``chunk_tokens``, before every chunk: ``generate_partial``'s hook).
    ``replays[e]``: actions episode ``e`` replays after ``reset`` before it samples (module docstring).
    ``teacher``: before every turn the teacher labels each running episode's state (``EpisodeBatch.labels``)
    and, where ``teacher.acts(e, k)``, its label is the action (``Source.TEACHER``) instead of a sample.
    """
    if max_turns < 1:
        raise ValueError(f"run_episodes: max_turns must be >= 1, got {max_turns}")
    if len(envs) != len(episode_seeds) or len(envs) != len(group_B) or (replays is not None and len(replays) != len(envs)):
        raise ValueError(f"run_episodes: {len(envs)} environments, {len(episode_seeds)} seeds, {len(group_B)} groups")
    V, N = engine.vocab_size, params.max_new_tokens
    eps: list[_Episode] = []
    failed = 0
    for e, (env, seed) in enumerate(zip(envs, episode_seeds)):
        try:
            obs = env.reset(int(seed))
            if not obs.tokens:
                raise ValueError("reset returned an empty observation")
        except Exception as exc:  # counted, never silent; an empty prompt row cannot be trained on
            raise ValueError(f"environment {type(env).__name__}.reset(seed={seed}) failed: {exc}") from exc
        ep = _Episode(tokens=[], prompt_len=len(obs.tokens),
                      last_state=_anchor(env, None, obs, f"reset(seed={seed})"))
        ep.append(obs.tokens, Source.PROMPT, -1, vocab_size=V)
        if len(obs.tokens) + N > max_episode_tokens:
            raise ValueError(f"environment {type(env).__name__}.reset(seed={seed}): the first observation has "
                             f"{len(obs.tokens)} tokens; with max_new_tokens {N} it passes max_episode_tokens "
                             f"{max_episode_tokens}")
        if replays is not None and replays[e] is not None:
            _replay(ep, env, replays[e], int(seed), V)
        eps.append(ep)
    caps = [min(max_turns, getattr(env, "max_turns", None) or max_turns) for env in envs]
    for k in range(max_turns):
        active = [e for e, ep in enumerate(eps) if ep.outcome is None]
        for e in list(active):
            if len(eps[e].rewards) >= caps[e]:  # turns so far (replayed ones included)
                eps[e].outcome = "max_turns"
            elif len(eps[e].tokens) + N > max_episode_tokens:
                eps[e].outcome = "budget"
        active = [e for e in active if eps[e].outcome is None]
        labels = dict(zip(active, teacher.labels([envs[e] for e in active], [eps[e].tokens for e in active]))) \
            if teacher is not None and active else {}
        by_teacher = {e for e in active if teacher is not None and teacher.acts(e, k)}
        for e in by_teacher:
            if len(eps[e].tokens) + len(labels[e][0]) > max_episode_tokens:
                eps[e].outcome = "budget"
        active = [e for e in active if eps[e].outcome is None]
        if not active:
            break
        sampled = [e for e in active if e not in by_teacher]
        sub = generate_partial(engine, [eps[e].tokens for e in sampled], params,
                               seed_fn=lambda c, k=k: seed_fn(k, c), group_B=group_B[sampled],
                               chunk_tokens=chunk_tokens, before_chunk=before_turn) if sampled else None
        row = {e: j for j, e in enumerate(sampled)}
        for e in active:
            ep = eps[e]
            kk = len(ep.rewards)  # this turn's index: k, or k + the replayed turns
            start = len(ep.tokens)
            if e in row:
                j = row[e]
                a = int(sub.prompt_len_B[j])
                b = a + int(sub.completion_len_B[j])
                action = sub.tokens_BT[j, a:b].tolist()
                kept = sub.kept_count_BT[j, a:b].tolist() if sub.kept_count_BT is not None else None
                ep.append(action, Source.POLICY, kk, sub.logp_mu_BT[j, a:b].tolist(), sub.version_BT[j, a:b].tolist(),
                          kept, vocab_size=V)
            else:
                action, lp = labels[e]
                ep.append(action, Source.TEACHER, kk, lp, vocab_size=V)
            if teacher is not None:
                ep.labels.append(labels[e][0])
            ep.spans.append((start, len(ep.tokens)))
            ep.states.append(ep.last_state)
            try:
                step = envs[e].step(action)
                reward = float(step.reward)
                if reward != reward or reward in (float("inf"), float("-inf")):
                    raise ValueError(f"non-finite reward {reward}")
            except Exception as exc:
                log.warning("environment %s (episode seed %s) failed at turn %d: %s", type(envs[e]).__name__,
                            episode_seeds[e], kk, exc)
                ep.rewards.append(0.0)
                ep.marks.append(True)
                ep.outcome = "env_error"
                failed += 1
                continue
            ep.rewards.append(reward)
            ep.marks.append(marks_failure(reward, step.info))
            if "success" in step.info:
                ep.success = bool(step.info["success"])
            if step.done or step.observation is None:
                ep.outcome = "done"
                continue
            obs = step.observation
            if len(ep.tokens) + len(obs.tokens) > max_episode_tokens:
                ep.outcome = "budget"
                continue
            ep.append(obs.tokens, obs.source, kk, vocab_size=V)
            ep.last_state = _anchor(envs[e], step.info, obs, f"episode seed {episode_seeds[e]}, turn {kk}")
    for ep in eps:
        if ep.outcome is None:
            ep.outcome = "max_turns"
    return _assemble(eps, envs, params, group_B, failed, pad_id=engine.pad_id, vocab_size=V)


def _assemble(eps: list[_Episode], envs: Sequence[Env], params: SamplingParams, group_B: Tensor, failed: int, *,
              pad_id: int, vocab_size: int) -> EpisodeBatch:
    E = len(eps)
    T = max(len(ep.tokens) for ep in eps)
    K = max(max(len(ep.rewards) for ep in eps), 1)

    def grid(fill, dtype, get):
        out = torch.full((E, T), fill, dtype=dtype)
        for i, ep in enumerate(eps):
            vals = get(ep)
            if vals:
                out[i, :len(vals)] = torch.tensor(vals, dtype=dtype)
        return out

    source_BT = grid(int(Source.PAD), torch.int8, lambda ep: ep.sources)
    policy_BT = source_BT == Source.POLICY
    truncates = params.truncates
    rollout = Rollout(
        tokens_BT=grid(pad_id, torch.long, lambda ep: ep.tokens),
        prompt_len_B=torch.tensor([ep.prompt_len for ep in eps], dtype=torch.long),
        completion_len_B=torch.tensor([len(ep.tokens) - ep.prompt_len for ep in eps], dtype=torch.long),
        logp_mu_BT=grid(0.0, torch.float32, lambda ep: ep.logp),
        version_BT=grid(-1, torch.long, lambda ep: ep.versions),
        kept_count_BT=grid(vocab_size, torch.long, lambda ep: ep.kept) if truncates else None,
        sampling=params, group_B=group_B.clone(),
        finished_B=torch.tensor([ep.outcome == "done" for ep in eps]),
        source_BT=source_BT,
        turn_BT=grid(-1, torch.long, lambda ep: ep.turns),
        # a replay (Fission-GRPO's fork prefix) is the policy's own earlier action; a teacher has its own id
        policy_id_BT=torch.where(policy_BT | (source_BT == Source.REPLAY), 0,
                                 torch.where(source_BT == Source.TEACHER, TEACHER_POLICY_ID, -1)),
    )
    rewards_EK = torch.zeros(E, K)
    mask_EK = torch.zeros(E, K, dtype=torch.bool)
    state_EK = torch.full((E, K), -1, dtype=torch.long)
    failure_EK = torch.zeros(E, K, dtype=torch.bool)
    replayed_EK = torch.zeros(E, K, dtype=torch.bool)
    ids: dict[object, int] = {}
    for i, ep in enumerate(eps):
        n = len(ep.rewards)
        rewards_EK[i, :n] = torch.tensor(ep.rewards, dtype=torch.float32)
        mask_EK[i, :n] = True
        failure_EK[i, :n] = torch.tensor(ep.marks[:n], dtype=torch.bool)
        replayed_EK[i, :ep.replayed] = True
        for k, s in enumerate(ep.states[:n]):
            state_EK[i, k] = ids.setdefault(s, len(ids))
    returns = rewards_EK.sum(dim=1)
    success = torch.tensor([ep.success if ep.success is not None else bool(returns[i] > 0) for i, ep in enumerate(eps)])
    return EpisodeBatch(rollout=rollout, rewards_EK=rewards_EK, turn_mask_EK=mask_EK, state_EK=state_EK,
                        outcomes=[ep.outcome for ep in eps], success_E=success, failed=failed,
                        action_spans=[ep.spans for ep in eps],
                        messages=[list(getattr(env, "messages", None) or []) or None for env in envs],
                        failure_EK=failure_EK, replayed_EK=replayed_EK,
                        labels=[ep.labels for ep in eps] if any(ep.labels for ep in eps) else [])


def broadcast_turns(values_EK: Tensor, rollout: Rollout) -> Tensor:
    """``values_EK[e, turn_BT[e, t]]`` on the row's policy tokens, 0 elsewhere: a per-turn quantity (an
    advantage) spread over the tokens of that turn's action."""
    if rollout.turn_BT is None:
        raise ValueError("broadcast_turns: the rollout has no turn indices (a single-turn record)")
    mask = rollout.loss_mask_BT
    idx = rollout.turn_BT.clamp(min=0, max=values_EK.shape[1] - 1)
    return torch.where(mask, values_EK.gather(1, idx), torch.zeros((), dtype=values_EK.dtype))
