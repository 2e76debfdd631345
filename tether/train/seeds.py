"""Per-step seeds: every random draw of step ``s`` comes from generators seeded by (seed, s, salt)."""


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """The seed of draw ``salt`` at step ``step`` of a run seeded ``seed`` (different for every (seed, step, salt)
    in range; a resumed run recomputes the same ones, which is what makes it bitwise identical)."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)
