"""textarena's single-player games as text environments: ``--env textarena:GuessTheNumber-v0``.

Only games that import, reset and step offline are accepted (``OFFLINE_GAMES``, checked with textarena 0.7.4
in a network namespace): no game here downloads data or calls a model. The others are refused by name with the
reason (``REFUSED``): the word games fetch nltk word lists at reset, two need an OpenRouter key (a model plays
the other side), two do not import in 0.7.4; multi-player games are not single-player environments.

Text: the game is made with ``textarena.make(id, **kwargs)`` and played unwrapped (no observation wrapper, so
nothing is re-rendered): the first observation is the messages the game shows at reset (its instructions and
board), each reply the messages a step adds, joined by newlines, ending with one; the echo of the player's own
action is left out (it is already in the context as sampled tokens). ``prompt`` replaces the game's
instructions (its ``PROMPT`` messages) with a text of your own, for a small-context model (the built-in one has
256 tokens; textarena's prompts are 200-2000 characters). Actions are the game's own format (``[7]``,
``[A C]``, ...). textarena pays a reward only at the end: the terminal step's reward is the player's reward
from ``close()``, 0 before; ``info["success"]``: that reward is at least 1 (a win). No ``info["state"]``: GiGPO
anchors fall back to the observation's tokens.

Determinism: textarena draws from the global ``random`` module (and some games from numpy's); each
environment keeps its own copy of both generators' states and swaps it in around every call, so an episode is
a fixed function of ``reset(seed)`` and its actions whatever else runs between its steps, and the caller's
global generators are left as they were. What a game prints to stdout is swallowed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import random
from collections.abc import Callable
from typing import Any

from tether.agent.env import TextStep

OFFLINE_GAMES = ("2048", "Bandit", "Blackjack", "Countdown", "Crosswords", "Cryptarithm", "FifteenPuzzle",
                 "FrozenLake", "GuessTheNumber", "LightsOut", "LogicPuzzle", "Mastermind", "Minesweeper", "PegJump",
                 "RushHour", "Secretary", "Set", "Slitherlink", "Sokoban", "Sudoku", "ThreeCardMonte",
                 "TowerOfHanoi")
"""Single-player games (any variant, ``GuessTheNumber-v0-hardcore``) that import, reset and step offline."""
REFUSED = {
    **dict.fromkeys(("Wordle", "WordLadder", "WordSearch", "Hangman"), "downloads nltk word lists at reset"),
    **dict.fromkeys(("GuessWho", "TwentyQuestions"), "needs an OpenRouter API key (a model plays the other side)"),
    **dict.fromkeys(("Klondike", "UltimateTexasHoldem"), "does not import in textarena 0.7.4"),
}


def _textarena():
    if importlib.util.find_spec("textarena") is None:
        raise ValueError("textarena:* environments need textarena: pip install -e '.[textarena]' (not in the "
                         "agents extra: it pulls openai, nltk and a chess engine; docs/agents.md)")
    import numpy as np

    outer = random.getstate(), np.random.get_state()
    try:
        import textarena  # its first import draws from the global generator: put it back
    finally:
        random.setstate(outer[0])
        np.random.set_state(outer[1])
    return textarena


def check_game(env_id: str) -> None:
    """A ValueError naming ``env_id`` unless it is a registered variant of an offline single-player game."""
    base = env_id.split("-v", 1)[0]
    if base in REFUSED:
        raise ValueError(f"environment 'textarena:{env_id}': {base} {REFUSED[base]}; offline single-player games: "
                         f"{', '.join(OFFLINE_GAMES)}")
    if base not in OFFLINE_GAMES:
        raise ValueError(f"environment 'textarena:{env_id}' is not an offline single-player game tether supports; "
                         f"supported (any variant, e.g. GuessTheNumber-v0): {', '.join(OFFLINE_GAMES)}")
    _textarena()
    from textarena.envs.registration import ENV_REGISTRY

    if env_id not in ENV_REGISTRY:
        raise ValueError(f"environment 'textarena:{env_id}' is not registered in textarena "
                         f"(variants of {base}: {', '.join(k for k in ENV_REGISTRY if k.startswith(base + '-v'))})")


class TextArenaGame:
    """One textarena single-player game as a :class:`~tether.agent.env.TextEnv` (module docstring).

    ``env_id``: e.g. ``GuessTheNumber-v0``, ``TowerOfHanoi-v0``, ``Mastermind-v0``; ``prompt``: replaces the
    game's instructions; ``max_turns``: the episode cap (none: the run's ``max_turns``); every other keyword
    goes to ``textarena.make`` (``min_number=1, max_number=8``, ``num_disks=2``, ...)."""

    def __init__(self, env_id: str, prompt: str | None = None, max_turns: int | None = None,
                 **game_kwargs: Any) -> None:
        check_game(env_id)
        ta = _textarena()
        if max_turns is not None and (isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1):
            raise ValueError(f"textarena:{env_id}: max_turns must be an int >= 1 or none, got {max_turns!r}")
        self.env_id, self.prompt, self.max_turns = env_id, prompt, max_turns
        self._rng: tuple | None = None
        try:  # a game module's first import may draw from the global generators: isolated too
            game = self._isolated(lambda: ta.make(env_id, **game_kwargs))
        except TypeError as exc:
            raise ValueError(f"textarena:{env_id}: env_options {game_kwargs} do not fit the game: {exc}") from exc
        while isinstance(game, ta.Wrapper):  # play the raw game: its own messages, nothing re-rendered
            game = game.env
        self.game, self._types = game, ta.ObservationType
        self.done = True

    def _isolated(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` with this episode's generator states in ``random`` and ``numpy.random``."""
        import numpy as np

        outer = random.getstate(), np.random.get_state()
        if self._rng is not None:
            random.setstate(self._rng[0])
            np.random.set_state(self._rng[1])
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # some games print progress lines
                return fn(*args)
        finally:
            self._rng = random.getstate(), np.random.get_state()
            random.setstate(outer[0])
            np.random.set_state(outer[1])

    def _messages(self) -> str:
        _, messages = self.game.get_observation()
        parts = []
        for _, text, kind in messages:
            if kind is self._types.PLAYER_ACTION:
                continue
            if kind is self._types.PROMPT and self.prompt is not None:
                text = self.prompt
            parts.append(str(text).rstrip("\n"))
        return "\n".join(parts) + "\n"

    def reset(self, seed: int) -> str:
        import numpy as np

        self._rng = random.Random(int(seed)).getstate(), np.random.RandomState(int(seed) % 2**32).get_state()
        self._isolated(lambda: self.game.reset(num_players=1, seed=int(seed)))
        self.done = False
        return self._isolated(self._messages)

    def step(self, action: str) -> TextStep:
        if self.done:
            raise RuntimeError(f"textarena:{self.env_id}: step() before reset(seed) or after the episode ended")
        done, _ = self._isolated(self.game.step, str(action))
        if not done:
            return TextStep(self._isolated(self._messages), 0.0, False, {"success": False})
        self.done = True
        rewards, game_info = self._isolated(self.game.close)
        reward = float((rewards or {}).get(0, 0.0))
        reason = ((game_info or {}).get(0) or {}).get("reason")
        return TextStep(None, reward, True, {"success": reward >= 1.0, "reason": reason})
