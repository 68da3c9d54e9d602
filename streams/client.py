"""RewardClient: score trajectories through running actprm scorers from Python (asyncio).

    async with RewardClient(settings) as client:
        rewards = await client.score([{"problem": p, "response": r}], timeout_s=60)

`score` produces Trajectory messages and awaits their Reward by id. One reader serves every
waiter: it is assigned all partitions of the rewards topic without a consumer group (so it never
takes partitions from anyone, and there is no group to join per request), and it is positioned
before the first trajectory is produced, so no reward can be missed.

Where it starts reading: the broker's end offsets. On a Kafka cluster they are exact; the
embedded Tansu broker answers the first offset of the newest batch + 1 (see the broker notes),
which is at or *before* the true end, so the reader at most re-reads a few old rewards and skips
them by id. Nothing here depends on an end offset being exact.

Delivery is at-least-once, so a reward may arrive twice: the first one for an id wins. A scorer
never scores an id twice (its ledger), so every item gets a fresh id unless the caller gives one.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from actprm.streams import messages
from actprm.streams.messages import MAX_STEPS, Reward, Trajectory
from actprm.streams.topics import Topics, ensure_topics

log = structlog.get_logger("actprm")

REDUCTIONS = ("min", "mean", "last", "prod")


class ItemError(ValueError):
    """An item that is not a valid trajectory; the message names its index and the reason."""


class RewardTimeout(TimeoutError):
    """Some rewards did not arrive in time. Their trajectories were sent and will still be scored."""

    def __init__(self, missing: list[str], timeout_s: float):
        self.missing = missing
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        super().__init__(f"no reward within {timeout_s:g}s for {len(missing)} id(s): {shown}")


class StaleRewardError(RuntimeError):
    """Rewards scored by a version older than the caller's min_version."""

    def __init__(self, stale: dict[str, int], min_version: int):
        self.stale = stale
        shown = ", ".join(f"{i} (v{v})" for i, v in list(stale.items())[:20])
        super().__init__(f"{len(stale)} reward(s) from a version older than v{min_version}: {shown}")


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


def new_id() -> str:
    return f"rc-{uuid.uuid4().hex}"


def to_trajectory(item: Trajectory | Mapping[str, Any], *, split: str, index: int = 0) -> Trajectory:
    """A Trajectory from a Trajectory or a dict: {"problem" or "prompt", "steps" or "response",
    optional "id", "metadata", "gold_first_error", "policy_step", "split"}. Raises ItemError."""
    if isinstance(item, Trajectory):
        return item
    if not isinstance(item, Mapping):
        raise ItemError(f"item {index}: expected an object, got {type(item).__name__}")
    data = dict(item)
    if "prompt" in data:
        if "problem" in data:
            raise ItemError(f"item {index}: give problem or prompt, not both")
        data["problem"] = data.pop("prompt")
    data.setdefault("id", new_id())
    if "response" in data:
        data.setdefault("split", split)
    try:
        return Trajectory.model_validate(data)
    except ValidationError as err:
        raise ItemError(f"item {index}: {messages.summarise(err)}") from None


class RewardClient:
    """Produce trajectories, await their rewards by id. Use one per process; `score` is safe to
    call from many tasks at once."""

    def __init__(self, settings: Any, *, split: str = "\n\n", fetch_max_wait_ms: int = 20,
                 max_steps: int = MAX_STEPS):
        # `settings` is the daemon's Settings or its kafka section (anything with the same fields).
        self.kafka = getattr(settings, "kafka", settings)
        if not self.kafka.bootstrap:
            raise ValueError("the reward client needs a Kafka broker: set kafka.bootstrap (ACTPRM_KAFKA__BOOTSTRAP); "
                             "a daemon on the embedded broker logs its address at start")
        self.topics = Topics(self.kafka.topic_prefix)
        self.split = split
        self.max_steps = max_steps
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.stats: Counter = Counter()
        self._waiters: dict[str, asyncio.Future] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self) -> None:
        from actprm.streams.agents import aiokafka_options  # the daemon's own SASL/TLS mapping

        k, options = self.kafka, aiokafka_options(self.kafka)
        # Idempotent; lets a client start before any daemon, with the daemon's partition count.
        await ensure_topics(k.bootstrap, self.topics, partitions=k.partitions, replication_factor=k.replication_factor,
                            **options)
        self._producer = AIOKafkaProducer(bootstrap_servers=k.bootstrap, linger_ms=2, **options)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=k.bootstrap, group_id=None, enable_auto_commit=False,
                                          fetch_max_wait_ms=self.fetch_max_wait_ms, **options)
        try:
            await self._producer.start()
            await self._consumer.start()
            tps = await self._partitions(self.topics.rewards)
            self._consumer.assign(tps)
            await self._consumer.seek_to_end(*tps)
            for tp in tps:  # resolve every position now: reading starts here, before anything is produced
                await self._consumer.position(tp)
        except BaseException:
            await self.stop()
            raise
        self._reader = asyncio.create_task(self._read(), name="actprm-reward-reader")

    async def _partitions(self, topic: str, wait_s: float = 10.0) -> list[TopicPartition]:
        deadline = time.monotonic() + wait_s
        while True:
            await self._consumer.topics()  # fresh metadata, which partitions_for_topic reads
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} has no partitions on {self.kafka.bootstrap} after {wait_s:g}s")
            await asyncio.sleep(0.2)  # a topic just created may take a moment to show in metadata

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the reward client stopped"))
        self._waiters.clear()
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()
        self._consumer = self._producer = None

    async def __aenter__(self) -> RewardClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def trajectories(self, items: Iterable[Trajectory | Mapping[str, Any]]) -> list[Trajectory]:
        """Validate items into trajectories (ItemError names the first bad one and why)."""
        out = [to_trajectory(x, split=self.split, index=i) for i, x in enumerate(items)]
        for i, t in enumerate(out):
            if len(t.steps) > self.max_steps:
                raise ItemError(f"item {i}: {len(t.steps)} steps, over the limit of {self.max_steps}")
        return out

    async def score(self, items: Iterable[Trajectory | Mapping[str, Any]], *, timeout_s: float = 60.0,
                    min_version: int | None = None) -> list[Reward]:
        """Rewards in input order. RewardTimeout names the ids still missing after timeout_s
        (counted from the call); StaleRewardError when a reward's version is below min_version."""
        trajectories = self.trajectories(items)
        return await self.score_trajectories(trajectories, timeout_s=timeout_s, min_version=min_version)

    async def score_trajectories(self, trajectories: list[Trajectory], *, timeout_s: float = 60.0,
                                 min_version: int | None = None) -> list[Reward]:
        if not self.started:
            raise RuntimeError("the reward client is not started (use `async with RewardClient(...)`)")
        ids = [t.id for t in trajectories]
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            raise ItemError(f"ids repeated in one call: {', '.join(repeated[:10])}")
        busy = [i for i in ids if i in self._waiters]
        if busy:
            raise ItemError(f"ids already awaited by another call: {', '.join(busy[:10])}")
        loop = asyncio.get_running_loop()
        futures = {i: loop.create_future() for i in ids}
        self._waiters.update(futures)  # registered before producing: a fast reward finds its waiter
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                acks = [await self._producer.send(self.topics.trajectories, key=t.id.encode(), value=messages.encode(t))
                        for t in trajectories]
                await asyncio.gather(*acks)
                self.stats["produced"] += len(acks)
                await asyncio.wait(futures.values())
        except TimeoutError:
            missing = [i for i in ids if not futures[i].done()]
            self.stats["timeouts"] += 1
            raise RewardTimeout(missing, timeout_s) from None
        finally:
            for i in ids:
                if self._waiters.get(i) is futures[i]:
                    del self._waiters[i]
        rewards = [futures[i].result() for i in ids]
        self.stats["latency_ms_total"] += int((time.monotonic() - start) * 1000)
        if min_version is not None:
            stale = {r.id: r.model_version for r in rewards if r.model_version < min_version}
            if stale:
                raise StaleRewardError(stale, min_version)
        return rewards

    async def _read(self) -> None:
        """The one reader: hand each reward to its waiter; others' rewards and repeats are skipped."""
        delay = 0.5
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000)
            except KafkaError as err:  # the broker went away: aiokafka reconnects; keep asking
                log.warning("reward reader: Kafka error; retrying", error=f"{type(err).__name__}: {err}", retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)
                continue
            delay = 0.5
            for records in batch.values():
                for record in records:
                    self._deliver(record.key, record.value)

    def _deliver(self, key: bytes | None, value: bytes | None) -> None:
        self.stats["read"] += 1
        fut = self._waiters.get(key.decode("utf-8", "replace")) if key else None
        if fut is None:
            return  # someone else's reward, or one whose caller has stopped waiting
        try:
            reward = messages.decode(Reward, value)
        except messages.MessageError:
            self.stats["undecodable"] += 1
            return
        if fut.done():
            self.stats["duplicates"] += 1  # at-least-once: the first reward for an id wins
        else:
            fut.set_result(reward)
