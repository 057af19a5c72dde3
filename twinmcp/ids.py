"""Ids that correlate or deduplicate (request ids, quota tickets): 128 random bits from the
process's PRNG, which the OS seeds and Python reseeds after a fork. ``uuid4`` makes a system call
per id, on every proxied request; these ids guard nothing, so they need no secret randomness.
Never use them for tokens or keys (``secrets`` does that)."""

from __future__ import annotations

import random


def random_hex() -> str:
    """32 lowercase hex digits."""
    return f"{random.getrandbits(128):032x}"  # noqa: S311 - an id, not a secret
