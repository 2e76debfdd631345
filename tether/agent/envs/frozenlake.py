"""``frozenlake``: a deterministic (not slippery) FrozenLake in text.

The prompt is the map, one row per line (``S`` start, ``F`` frozen, ``H`` hole, ``G`` goal), then the agent's
position as two digits, row then column (``00`` is the top-left corner)::

    SFFF
    FHFH
    FFFH
    HFFG
    00

An action is one letter, ``L`` ``D`` ``R`` or ``U`` (case and surrounding whitespace ignored). The reply is
the new position, ``rc`` and a newline (a move off the edge leaves the agent where it is, as in
gymnasium's FrozenLake-v1). Stepping on ``G`` ends the episode with reward 1, on a hole with reward 0.
Any other action gets ``?rc`` (the position, unchanged) and counts as a turn.

Maps: ``layout="random"`` (default) draws one from the seed like gymnasium's ``generate_random_map``
(S top-left, G bottom-right, every other cell frozen with probability ``p_frozen``), keeping only maps whose
shortest S->G path takes at most ``max_turns`` moves, so every episode can be won within the turn cap.
``layout="classic"`` is gymnasium's fixed 4x4 map above, the same for every seed.

An optimal episode on the default settings is at most 20 + 3 + 8 * 5 = 63 characters.
"""

from __future__ import annotations

import random
from collections import deque

from tether.agent.env import TextStep
from tether.agent.envs.base import TurnEnv, check_int

CLASSIC_4X4 = ("SFFF", "FHFH", "FFFH", "HFFG")
MOVES = {"R": (0, 1), "D": (1, 0), "L": (0, -1), "U": (-1, 0)}
"""Action letter -> (row, column) step; also the expert's tie-break order (right, then down)."""
MAX_DRAWS = 1000


def distances_to_goal(rows: tuple[str, ...]) -> dict[tuple[int, int], int]:
    """Moves from each cell (not a hole) to G by breadth-first search from G; unreachable cells absent."""
    n = len(rows)
    goal = next((r, c) for r in range(n) for c in range(n) if rows[r][c] == "G")
    dist = {goal: 0}
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < n and 0 <= nc < n and rows[nr][nc] != "H" and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return dist


class FrozenLake(TurnEnv):
    """Text FrozenLake (module docstring).

    ``size``: side of the square map (2..9; the default 4 keeps episodes short). ``layout``: ``random`` or
    ``classic`` (4x4 only). ``p_frozen``: probability that a random map's cell is frozen. ``max_turns``:
    the turn cap (random maps always have a path of at most that many moves)."""
    name = "frozenlake"

    def __init__(self, size: int = 4, layout: str = "random", p_frozen: float = 0.8, max_turns: int = 8) -> None:
        self.size = check_int(self.name, "size", size, 2, 9)
        self.max_turns = check_int(self.name, "max_turns", max_turns, 1)
        if layout not in ("random", "classic"):
            raise ValueError(f"{self.name}: layout must be 'random' or 'classic', got {layout!r}")
        if layout == "classic" and size != 4:
            raise ValueError(f"{self.name}: layout 'classic' is the 4x4 map; size must be 4, got {size}")
        if not 0 < p_frozen <= 1:
            raise ValueError(f"{self.name}: p_frozen must be in (0, 1], got {p_frozen!r}")
        if 2 * (size - 1) > max_turns:
            raise ValueError(f"{self.name}: a {size}x{size} map needs at least {2 * (size - 1)} moves; "
                             f"max_turns is {max_turns}")
        self.layout, self.p_frozen = layout, float(p_frozen)

    def _draw(self, rng: random.Random) -> tuple[str, ...]:
        if self.layout == "classic":
            return CLASSIC_4X4
        n = self.size
        for _ in range(MAX_DRAWS):
            cells = [["F" if rng.random() < self.p_frozen else "H" for _ in range(n)] for _ in range(n)]
            cells[0][0], cells[n - 1][n - 1] = "S", "G"
            rows = tuple("".join(row) for row in cells)
            if distances_to_goal(rows).get((0, 0), self.max_turns + 1) <= self.max_turns:
                return rows
        raise ValueError(f"{self.name}: no map with a path of at most {self.max_turns} moves in {MAX_DRAWS} draws; "
                         "raise p_frozen or max_turns")

    def reset(self, seed: int) -> str:
        self.rows = self._draw(random.Random(seed))
        self.dist = distances_to_goal(self.rows)
        self.pos = (0, 0)
        self._begin()
        return "\n".join(self.rows) + "\n" + self._where()

    def _where(self) -> str:
        return f"{self.pos[0]}{self.pos[1]}\n"

    def _state(self) -> tuple:
        return (self.name, self.rows, self.pos)

    def _act(self, action: str) -> TextStep:
        move = MOVES.get(action.upper())
        if move is None:
            return self._reply("?" + self._where(), invalid=True)
        r, c = self.pos[0] + move[0], self.pos[1] + move[1]
        if 0 <= r < self.size and 0 <= c < self.size:
            self.pos = (r, c)
        cell = self.rows[self.pos[0]][self.pos[1]]
        if cell in "GH":
            return self._end(cell == "G")
        return self._reply(self._where())

    def expert_action(self) -> str:
        """The first move (order R, D, L, U) onto a cell one step closer to G."""
        here = self.dist[self.pos]
        for letter, (dr, dc) in MOVES.items():
            if self.dist.get((self.pos[0] + dr, self.pos[1] + dc)) == here - 1:
                return letter
        raise RuntimeError(f"{self.name}: no move towards G from {self.pos}")  # only on G itself (episode over)
