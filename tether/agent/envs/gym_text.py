"""gymnasium's toy_text environments as text environments: ``--env gym:FrozenLake-v1`` (the ``agents`` extra).

The discrete observation is rendered as a few ASCII characters and actions are one letter (or the action's
index as a digit), so an episode fits the built-in character model's context. Formats (docs/agents.md):

=============  ===========================================  =============================  ==================
family         first observation                            reply (the new state)          actions
=============  ===========================================  =============================  ==================
FrozenLake     the map (``S F H G``, one row a line), then   ``r,c``                        ``L D R U``
               the position ``r,c``
CliffWalking   the 4x12 grid (``S`` start, ``C`` cliff,      ``r,c``                        ``U R D L``
               ``G`` goal, ``.``), then ``r,c``
Taxi           gymnasium's 5x5 map, then ``r,c P D``: the     ``r,c P D``                    ``S N E W P D``
               taxi, the passenger (``R G Y B``, ``T``: in    (south, north, east, west,
               the taxi) and the destination                  pickup, dropoff)
Blackjack      ``you 14 dealer 10`` (`` ace``: a usable ace)  the same after a hit           ``S H`` (stick, hit)
=============  ===========================================  =============================  ==================

Every line ends with a newline. An action is read after stripping whitespace, case-insensitively; the digit
``i`` is gymnasium's action ``i``. An unreadable action gets ``?`` and the current state (reward 0, no
gymnasium step, the turn counts). Rewards are gymnasium's own; the episode ends when gymnasium's episode does
(terminated or truncated) and the episode runner caps it at ``max_turns``. ``info["success"]``: FrozenLake
and Blackjack a positive reward, CliffWalking and Taxi a terminal step (the goal / a right dropoff).
``info["state"]`` and ``state_id()`` are gymnasium's observation. ``reset(seed)`` is ``gymnasium reset(seed=seed)``,
so an episode is a fixed function of its seed and actions (slippery maps included). ``expert_action()``: the
greedy action of value iteration on the environment's transition table (``P``; discount 0.99), and for
Blackjack hit below 17.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tether.agent.env import TextStep

FAMILIES = {
    "gymnasium.envs.toy_text.frozen_lake:FrozenLakeEnv": "FrozenLake",
    "gymnasium.envs.toy_text.cliffwalking:CliffWalkingEnv": "CliffWalking",
    "gymnasium.envs.toy_text.taxi:TaxiEnv": "Taxi",
    "gymnasium.envs.toy_text.blackjack:BlackjackEnv": "Blackjack",
}
"""gymnasium entry point -> the rendering family; any registered id with one of these entry points works."""
ACTIONS = {"FrozenLake": "LDRU", "CliffWalking": "URDL", "Taxi": "SNEWPD", "Blackjack": "SH"}
"""Each family's action letters, in gymnasium's action order."""
DEFAULT_MAX_TURNS = {"FrozenLake": 16, "CliffWalking": 24, "Taxi": 24, "Blackjack": 8}
_TAXI_SPOTS = "RGYB"
_EXPERTS: dict[tuple, list[int]] = {}


def _gym():
    if importlib.util.find_spec("gymnasium") is None:
        raise ValueError("gym:* environments need gymnasium: pip install -e '.[agents]'")
    import gymnasium

    return gymnasium


def family_of(env_id: str) -> str:
    """The rendering family of a registered gymnasium id; a ValueError naming the id otherwise."""
    gym = _gym()
    try:
        spec = gym.spec(env_id)
    except Exception as exc:  # gymnasium's NameNotFound / DeprecatedEnv / VersionNotFound carry a hint
        raise ValueError(f"environment 'gym:{env_id}': {exc}") from None
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    if entry not in FAMILIES:
        raise ValueError(f"environment 'gym:{env_id}' is not a toy_text environment tether renders as text; "
                         f"supported: ids of {', '.join(sorted(set(FAMILIES.values())))} (e.g. FrozenLake-v1, "
                         "CliffWalking-v1, Taxi-v4, Blackjack-v1)")
    return FAMILIES[entry]


class GymText:
    """A gymnasium toy_text environment as a :class:`~tether.agent.env.TextEnv` (module docstring).

    ``env_id``: a registered id (``FrozenLake-v1``, ``FrozenLake8x8-v1``, ``CliffWalking-v1``, ``Taxi-v4``,
    ``Blackjack-v1``, ...); ``max_turns``: the episode cap (default per family: 16, 24, 24, 8); every other
    keyword goes to ``gymnasium.make`` (``is_slippery=False``, ``map_name="8x8"``, ``natural=True``, ...)."""

    def __init__(self, env_id: str, max_turns: int | None = None, **gym_kwargs: Any) -> None:
        self.family = family_of(env_id)
        self.env_id, self.gym_kwargs = env_id, dict(gym_kwargs)
        self.max_turns = DEFAULT_MAX_TURNS[self.family] if max_turns is None else max_turns
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ValueError(f"gym:{env_id}: max_turns must be an int >= 1, got {max_turns!r}")
        try:
            self.env = _gym().make(env_id, disable_env_checker=True, **gym_kwargs)
        except TypeError as exc:
            raise ValueError(f"gym:{env_id}: env_options {gym_kwargs} do not fit gymnasium.make: {exc}") from exc
        self.letters = ACTIONS[self.family]
        self.obs: Any = None

    # rendering
    def _cell(self, r: int, c: int) -> str:
        u = self.env.unwrapped
        if self.family == "FrozenLake":
            return u.desc[r][c].decode()
        if (r, c) == (u.shape[0] - 1, 0):
            return "S"
        if (r, c) == (u.shape[0] - 1, u.shape[1] - 1):
            return "G"
        return "C" if u._cliff[r, c] else "."

    def _board(self) -> str:
        u = self.env.unwrapped
        if self.family == "Taxi":
            return "\n".join(b"".join(row).decode() for row in u.desc) + "\n"
        rows, cols = (u.nrow, u.ncol) if self.family == "FrozenLake" else u.shape
        return "\n".join("".join(self._cell(r, c) for c in range(cols)) for r in range(rows)) + "\n"

    def describe(self, obs: Any) -> str:
        """The text of one observation (a reply)."""
        u = self.env.unwrapped
        if self.family == "Blackjack":
            total, dealer, ace = (int(x) for x in obs)
            return f"you {total} dealer {dealer}{' ace' if ace else ''}\n"
        if self.family == "Taxi":
            r, c, p, d = (int(x) for x in u.decode(int(obs)))
            return f"{r},{c} {'T' if p == 4 else _TAXI_SPOTS[p]} {_TAXI_SPOTS[d]}\n"
        cols = u.ncol if self.family == "FrozenLake" else u.shape[1]
        return f"{int(obs) // cols},{int(obs) % cols}\n"

    # the TextEnv protocol
    def reset(self, seed: int) -> str:
        obs, _ = self.env.reset(seed=int(seed))
        self.obs, self.done = obs, False
        head = "" if self.family == "Blackjack" else self._board()
        return head + self.describe(obs)

    def state_id(self) -> Any:
        return tuple(int(x) for x in self.obs) if self.family == "Blackjack" else int(self.obs)

    def parse(self, action: str) -> int | None:
        """gymnasium's action for ``action`` (a letter or the index as a digit), None if unreadable."""
        a = str(action).strip().upper()
        if len(a) == 1 and a in self.letters:
            return self.letters.index(a)
        if a.isdigit() and int(a) < len(self.letters):
            return int(a)
        return None

    def step(self, action: str) -> TextStep:
        if self.obs is None or self.done:
            raise RuntimeError(f"gym:{self.env_id}: step() " + ("before reset(seed)" if self.obs is None else
                                                              "after the episode ended"))
        a = self.parse(action)
        if a is None:
            return TextStep("?" + self.describe(self.obs), 0.0, False,
                            {"success": False, "state": self.state_id(), "invalid": True})
        obs, reward, terminated, truncated, _ = self.env.step(a)
        self.obs, self.done = obs, bool(terminated or truncated)
        if self.family in ("FrozenLake", "Blackjack"):
            success = self.done and reward > 0
        else:
            success = bool(terminated)
        info = {"success": bool(success), "state": self.state_id()}
        return TextStep(None if self.done else self.describe(obs), float(reward), self.done, info)

    def expert_action(self) -> str:
        """Value iteration's greedy action on ``P`` (discount 0.99); Blackjack: hit below 17."""
        if self.family == "Blackjack":
            return "H" if int(self.obs[0]) < 17 else "S"
        key = (self.env_id, repr(sorted(self.gym_kwargs.items())))
        if key not in _EXPERTS:
            _EXPERTS[key] = greedy_policy(self.env.unwrapped.P)
        return self.letters[_EXPERTS[key][int(self.obs)]]


def greedy_policy(P: dict, gamma: float = 0.99, tol: float = 1e-10, max_iter: int = 10_000) -> list[int]:
    """``argmax_a sum_{s'} p (r + gamma V(s') [not terminal])`` after value iteration
    ``V(s) <- max_a sum p (r + gamma V(s'))`` on a gymnasium transition table ``P[s][a] = [(p, s', r, term)]``;
    ties go to the lowest action."""
    n = len(P)
    V = [0.0] * n

    def q(s: int, a: int) -> float:
        return sum(p * (r + (0.0 if term else gamma * V[int(s2)])) for p, s2, r, term in P[s][a])

    for _ in range(max_iter):
        delta = 0.0
        for s in range(n):
            best = max(q(s, a) for a in range(len(P[s])))
            delta = max(delta, abs(best - V[s]))
            V[s] = best
        if delta < tol:
            break
    return [max(range(len(P[s])), key=lambda a, s=s: (q(s, a), -a)) for s in range(n)]
