"""What every role is given: a way out for its messages, a place for its last error, an observer.

Each role is built with a `Sender`. In the daemon its `produce` is the faust producer
(streams/app.py); in the role tests it is a list (tests/support/roles.py). Sends wait
while the broker's data is in doubt (the write gate, streams/kafka/epoch.py). A message that does not decode as its topic's
schema goes to the dead-letter topic with the reason, so nothing is lost and no agent crashes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog

from actprm.client import messages
from actprm.streams.kafka.epoch import WriteGate

log = structlog.get_logger("actprm")

M = TypeVar("M", bound=messages.Message)

# (topic, key, value) -> an awaitable that resolves when the broker has acknowledged the record
Produce = Callable[[str, bytes | None, bytes], Awaitable[Awaitable[object]]]


@dataclass
class Event:
    """One consumed record as the roles need it (faust events are adapted to this)."""

    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes


class Sender:
    def __init__(self, produce: Produce, dead_letters: str, gate: WriteGate | None = None):
        self._produce = produce
        self.dead_letters = dead_letters  # the dead-letter topic's name
        self.gate = gate or WriteGate()
        self.counts: Counter = Counter()

    async def enqueue(self, topic: str, key: str | None, value: bytes) -> Awaitable[object]:
        """Hand a record to the producer; await the result for the broker's ack. Many can be in flight."""
        await self.gate.wait()
        return await self._produce(topic, key.encode() if key else None, value)

    async def send(self, topic: str, key: str | None, value: bytes) -> None:
        """Send and wait for the ack: a handler's input offset is committed only after it."""
        await (await self.enqueue(topic, key, value))

    async def dead_letter(self, event: Event, error: Exception | str) -> None:
        reason = getattr(error, "reason", None) or str(error)
        dl = messages.dead_letter(event.topic, event.partition, event.offset, event.key, event.value, reason)
        await self.send(self.dead_letters, None, messages.encode(dl))
        self.counts["dead_lettered"] += 1
        key = event.key.decode("utf-8", "replace") if event.key else None
        log.warning("dead letter", id=key, topic=event.topic, partition=event.partition, offset=event.offset,
                    reason=str(reason)[:200])

    async def decoded(self, cls: type[M], events: Sequence[Event]) -> list[tuple[Event, M]]:
        """Each event that decodes as `cls`, with its message; the others become dead letters."""
        out = []
        for event in events:
            try:
                out.append((event, messages.decode(cls, event.value)))
            except messages.MessageError as err:
                await self.dead_letter(event, err)
        return out


class LastError:
    """The last error of a process, whichever part had it (shown in status and `ctl status`)."""

    def __init__(self) -> None:
        self.message: str | None = None

    def note(self, message: str) -> None:
        self.message = message


class Observer(Protocol):
    """What the roles report beyond counts (daemon/metrics.py's Metrics is one)."""

    def observe_scores(self, mu_lists) -> None: ...
    def observe_swap(self, seconds: float) -> None: ...
    def observe_judge(self, latency_s: float, ok: bool) -> None: ...
    def observe_agreement(self, predicted_first_error: int, judged_first_error: int, confident: bool) -> None: ...
