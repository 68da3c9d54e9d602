"""One failure policy for every way a caller gets rewards (Python clients, gateway, adapters).

A sample gets an Outcome: its Reward, or the fallback with the reason it has none. What a
framework receives on failure is decided here and nowhere else:
- TRL: None (TRL skips a None reward for that sample);
- verl: {"score": fallback_reward, "ok": False, ...}: every dict has the same keys, ok True or False;
- OpenRLHF: fallback_reward, with extra_logs `prm_ok` 0 and `prm_failure` the reason's code.
With on_failure="raise" an unavailable reward raises RewardUnavailable instead; a sample that
cannot be scored at all (no steps, too many) always gets the fallback and its reason.

Every fallback is counted; an outage is logged when it starts and when it ends, a few lines per
outage however many samples it touches.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from actprm.client.messages import Reward

log = logging.getLogger("actprm.client")

REDUCTIONS = ("min", "mean", "last", "prod")

# Why a sample has no reward; the code is what OpenRLHF's numeric extra_logs can carry.
FAILURE_CODES = {"": 0, "unavailable": 1, "invalid": 2, "stale": 3}
INVALID_LOG_EVERY_S = 60.0  # an RL policy may write empty answers for hours: a line a minute, not one per batch


class RewardUnavailable(RuntimeError):
    """No reward by the deadline (on_failure="raise"); `sent` says whether the samples reached Kafka."""

    def __init__(self, missing: list[str], timeout_s: float, sent: bool, reason: str = ""):
        self.missing, self.timeout_s, self.sent = missing, timeout_s, sent
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        where = ("they were sent and will still be scored" if sent else
                 "they were NOT sent: Kafka did not take them" + (f" ({reason})" if reason else ""))
        super().__init__(f"no reward within {timeout_s:g}s for {len(missing)} sample(s) ({shown}); {where}")


def reduce_steps(mu: list[float], how: str = "min") -> float:
    """One scalar per trajectory from its per-step scores (RL trainers take one per sample).

    min (PURE's choice: a solution is as good as its worst step), mean, last, or prod (the
    probability that every step is right). No scored step (a prompt too long for max_length)
    gives 0.0: nothing was shown to be right."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown reduction {how!r}; choose one of {', '.join(REDUCTIONS)}")
    if not mu:
        return 0.0
    if how == "min":
        return min(mu)
    if how == "mean":
        return sum(mu) / len(mu)
    if how == "last":
        return mu[-1]
    return math.prod(mu)


@dataclass
class Outcome:
    """What one sample got: a reward, or none and why (`failure`: unavailable, invalid, stale)."""

    reward: Reward | None
    failure: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.reward is not None

    def value(self, how: str, fallback: float) -> float:
        return reduce_steps(self.reward.mu, how) if self.reward is not None else fallback

    @property
    def failure_code(self) -> int:
        return FAILURE_CODES.get(self.failure, 1)


class Outages:
    """Counts fallbacks and logs each outage once when it starts and once when it ends."""

    def __init__(self, where: str):
        self.where = where
        self.counts: Counter = Counter()
        self.since: float | None = None
        self.reason = ""
        self._invalid_logged_at = -math.inf

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, n: int, reason: str) -> None:
        self.counts["fallbacks"] += n
        if self.since is None:
            self.since, self.reason = time.monotonic(), reason
            self.counts["outages"] += 1
            log.warning("actprm %s: rewards unavailable (%s); answering the fallback until they are back", self.where, reason)

    def recovered(self) -> None:
        if self.since is not None:
            took = time.monotonic() - self.since
            log.warning("actprm %s: rewards are back after %.1fs (%d fallback(s) so far)", self.where, took,
                        self.counts["fallbacks"])
            self.since, self.reason = None, ""

    def invalid(self, n: int, first_error: str) -> None:
        """Samples that cannot be scored (no steps, too many): counted, logged at most once a minute."""
        self.counts["invalid"] += n
        self.counts["fallbacks"] += n
        now = time.monotonic()
        if now - self._invalid_logged_at >= INVALID_LOG_EVERY_S:
            self._invalid_logged_at = now
            log.warning("actprm %s: sample(s) that cannot be scored get the fallback (%d so far); latest: %s",
                        self.where, self.counts["invalid"], first_error[:200])


class QuietRepeats(logging.Filter):
    """Let one line of each kind through per `window_s`: a broker that is away makes aiokafka
    log the same connection error several times a second, hundreds of lines per outage."""

    def __init__(self, window_s: float = 60.0):
        super().__init__()
        self.window_s = window_s
        self.last: dict[tuple[str, str], float] = {}
        self.suppressed: Counter = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -math.inf) < self.window_s:
            self.suppressed[key] += 1
            return False
        self.last[key] = now
        if len(self.last) > 1000:
            self.last.clear()
        return True


_QUIET = QuietRepeats()


def quiet_aiokafka() -> QuietRepeats:
    """Install the repeat filter on every aiokafka logger (idempotent)."""
    import aiokafka  # noqa: F401  (its modules create their loggers on import)

    names = [n for n in list(logging.root.manager.loggerDict) if n == "aiokafka" or n.startswith("aiokafka.")]
    for name in names or ["aiokafka"]:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    return _QUIET
