"""A sample's id, derived from its content: a retried or repeated request is the same trajectory.

RL frameworks retry a reward request that failed or timed out (OpenRLHF five times). With a
fresh id per request each retry was scored again and charged to the annotation budget again;
with an id from the content, the scorer, the round keeper and the judge all see one trajectory
(each dedupes by id), and the client answers a retry from the reward it already has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def sample_id(problem: str, steps: Sequence[str], key: str | int | None = None) -> str:
    """"s-" and 32 hex digits of a hash of the problem, the steps and the caller's key (e.g. its
    sample index: two identical answers the caller wants scored apart get different keys)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (problem, *steps):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        h.update(data)
    if key is not None:
        h.update(b"\x00key:" + str(key).encode("utf-8", "surrogatepass"))
    return f"s-{h.hexdigest()}"
