"""Deterministic held-out splits by hashing: a problem's split depends only on its canonical key.

``is_heldout(key, fraction, salt)`` is True for about ``fraction`` of all keys. Because it is a pure
function of the key (blake2b, not Python's randomised ``hash``), the same problem lands in the same
split on every machine, seed and run, and a training sampler that rejects held-out keys can never
produce an evaluation problem.
"""

from __future__ import annotations

import hashlib

_SCALE = float(2**64)


def unit_hash(key: str, salt: str) -> float:
    """A uniform-looking number in [0, 1) determined by ``salt`` and ``key``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=salt.encode("utf-8")[:16]).digest()
    return int.from_bytes(digest, "big") / _SCALE


def is_heldout(key: str, fraction: float, salt: str) -> bool:
    """True if the problem with canonical ``key`` belongs to the held-out evaluation split."""
    return unit_hash(key, salt) < fraction
