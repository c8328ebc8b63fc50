"""Which requests a canary answers: a stable hash of the request id against the canary's share.

The same `request_id` always lands on the same side of a given share, in every worker and in every process that
recomputes it (the rollout sensor, a test), and a larger share keeps every request a smaller one sent to the canary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

_SCALE = 2.0**64


def stable_hash(text: str) -> float:
    """A number in [0, 1) fixed by `text`: the first 8 bytes of its BLAKE2b digest, big-endian, over 2**64."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / _SCALE


def to_canary(request_id: str, share: float) -> bool:
    """True when the canary answers this request: `stable_hash(request_id) < share`."""
    return share > 0.0 and stable_hash(request_id) < share


def canary_rows(request_ids: Sequence[str], share: float) -> np.ndarray:
    """`to_canary` of each request id, as a boolean array (a batch routed row by row)."""
    if share <= 0.0:
        return np.zeros(len(request_ids), dtype=bool)
    return np.fromiter((stable_hash(r) < share for r in request_ids), dtype=bool, count=len(request_ids))


def parse_share(text: str | None) -> float:
    """The registry tag `rollout.share` as a number in [0, 1]; absent or empty is 0. ValueError naming the text
    otherwise."""
    if text is None or not text.strip():
        return 0.0
    try:
        share = float(text)
    except ValueError:
        raise ValueError(f"rollout share {text!r} is not a number; expected a decimal in [0, 1] such as '0.25'") from None
    if not (math.isfinite(share) and 0.0 <= share <= 1.0):
        raise ValueError(f"rollout share {text!r} is outside [0, 1]; expected a decimal such as '0.25'")
    return share
