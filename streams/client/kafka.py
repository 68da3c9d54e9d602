"""RewardClient: rewards from running actprm scorers over Kafka, from Python (asyncio).

    async with RewardClient() as client:              # settings from ACTPRM_KAFKA__* / ACTPRM_GATEWAY__*
        outcomes = await client.score_each([{"problem": p, "response": r}])
        rewards = await client.score(items)          # or: raise when any reward is missing

`score` produces Trajectory messages and awaits their Reward by id. One reader serves every
waiter: it is assigned all partitions of the rewards topic without a consumer group (so it
never takes partitions from anyone, and there is no group to join per request), and it is
positioned before the first trajectory is produced, so no reward can be missed.

- A sample's id comes from its content (ids.py): a retry is the same trajectory, so it is
  scored once and charged once, and answered at once from the rewards this client has read
  (`gateway.reward_cache` of them); a scorer that sees the id again re-sends its reward.
- Where it starts reading: the broker's end offsets, which on the embedded broker may be a
  little before the true end; old rewards read again are skipped by id.
- The broker losing its data (the embedded one keeps it in memory) is noticed through the
  epoch record the daemons write (streams/kafka/epoch.py): the client then starts its Kafka clients
  afresh, reads the new data from its start, and sends the samples still awaited again.
- A timeout says truthfully whether the samples reached Kafka (RewardUnavailable.sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import ValidationError

from actprm.client import messages
from actprm.client.ids import sample_id
from actprm.client.messages import MAX_STEPS, Reward, Trajectory
from actprm.client.outcome import Outages, Outcome, RewardUnavailable, quiet_aiokafka
from actprm.client.settings import aiokafka_options, sections
from actprm.client.steps import StepSplitError, split_steps
from actprm.client.topics import Topics, ensure_topics, read_epoch

log = logging.getLogger("actprm.client")

EPOCH_CHECK_S = 2.0  # how often the broker's data epoch is read while samples are awaited


class ItemError(ValueError):
    """An item that is not a valid trajectory; the message names its index and the reason."""


class StaleRewardError(RuntimeError):
    """Rewards scored by a version older than the caller's min_version."""

    def __init__(self, stale: dict[str, int], min_version: int):
        self.stale = stale
        shown = ", ".join(f"{i} (v{v})" for i, v in list(stale.items())[:20])
        super().__init__(f"{len(stale)} reward(s) from a version older than v{min_version}: {shown}")


def to_trajectory(item: Trajectory | Mapping[str, Any], *, split: str, max_steps: int = MAX_STEPS,
                  index: int = 0) -> Trajectory:
    """A Trajectory from a Trajectory or a dict: {"problem" or "prompt", "steps" or "response",
    optional "id", "key" (the caller's sample index: part of the id), "metadata",
    "gold_first_error", "policy_step", "split"}. Raises ItemError naming the index and why."""
    if isinstance(item, Trajectory):
        return item
    if not isinstance(item, Mapping):
        raise ItemError(f"item {index}: expected an object, got {type(item).__name__}")
    data = dict(item)
    if "prompt" in data:
        if "problem" in data:
            raise ItemError(f"item {index}: give problem or prompt, not both")
        data["problem"] = data.pop("prompt")
    if data.get("problem") is None:
        data["problem"] = ""
    key = data.pop("key", None)
    if "response" in data:
        if "steps" in data:
            raise ItemError(f"item {index}: give steps or response, not both")
        try:
            data["steps"] = split_steps(data.pop("response"), data.pop("split", split), max_steps=max_steps)
        except StepSplitError as err:
            raise ItemError(f"item {index}: {err}") from None
    if isinstance(data.get("steps"), list) and len(data["steps"]) > max_steps:
        raise ItemError(f"item {index}: {len(data['steps'])} steps, over the limit of {max_steps}")
    if "id" not in data and isinstance(data.get("problem"), str) and isinstance(data.get("steps"), list) \
            and all(isinstance(s, str) for s in data["steps"]):
        data["id"] = sample_id(data["problem"], data["steps"], key)
    try:
        return Trajectory.model_validate(data)
    except ValidationError as err:
        raise ItemError(f"item {index}: {messages.summarise(err)}") from None


@dataclass
class _Wait:
    trajectory: Trajectory
    future: asyncio.Future
    sent: bool = False
    callers: int = 1


@dataclass
class _Pending:
    ids: list[str]
    waits: dict[str, _Wait] = field(default_factory=dict)


class RewardClient:
    """Produce trajectories, await their rewards by id. Use one per process; `score` and
    `score_each` are safe to call from many tasks at once."""

    def __init__(self, settings: Any = None, *, fetch_max_wait_ms: int = 20, epoch_check_s: float = EPOCH_CHECK_S):
        # `settings`: ClientSettings, the daemon's Settings, a KafkaSettings, or None (the environment).
        self.kafka, self.reward = sections(settings)
        if not self.kafka.bootstrap:
            raise ValueError("the reward client needs a Kafka broker: set kafka.bootstrap (ACTPRM_KAFKA__BOOTSTRAP); "
                             "a daemon on the embedded broker logs its address at start")
        self.topics = Topics(self.kafka.topic_prefix)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.epoch_check_s = epoch_check_s
        self.outages = Outages("reward client")
        self.stats = self.outages.counts  # one set of counters: produced, read, cached, fallbacks, ...
        self._waits: dict[str, _Wait] = {}
        self._cache: OrderedDict[str, Reward] = OrderedDict()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None
        self._epoch: str | None = None
        self._restart = asyncio.Lock()

    # --- life -----------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self) -> None:
        quiet_aiokafka()
        await self._ensure_topics()
        try:
            await self._open(from_start=False)
            self._epoch = await self._read_epoch()
        except BaseException:
            await self.stop()
            raise
        self._reader = asyncio.create_task(self._read(), name="actprm-reward-reader")

    async def _ensure_topics(self) -> None:
        """Idempotent; lets a client start before any daemon (or after the broker lost its data)
        with the daemon's partition count, which a topic auto-created by a produce would not have."""
        k = self.kafka
        await ensure_topics(k.bootstrap, self.topics, partitions=k.partitions, replication_factor=k.replication_factor,
                            **aiokafka_options(k))

    async def _open(self, *, from_start: bool) -> None:
        """Fresh producer and reader; the reader at the end of the rewards (or at their start,
        after the broker lost its data), every position resolved before anything is produced."""
        options = aiokafka_options(self.kafka)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap, linger_ms=2, **options)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest", fetch_max_wait_ms=self.fetch_max_wait_ms,
                                          **options)
        await self._producer.start()
        await self._consumer.start()
        tps = await self._partitions(self.topics.rewards)
        self._consumer.assign(tps)
        if from_start:
            await self._consumer.seek_to_beginning(*tps)
        else:
            await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), timeout=10)
                except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001  closing never raises
                    log.debug("closing a Kafka client failed: %s", err)
        self._consumer = self._producer = None

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
        """Stop reading and close the Kafka clients. Never raises."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        for wait in self._waits.values():
            if not wait.future.done():
                wait.future.set_exception(RuntimeError("the reward client stopped"))
                wait.future.exception()  # retrieved: nobody may be left to await it
        self._waits.clear()
        await self._close_clients()

    async def __aenter__(self) -> RewardClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # --- scoring --------------------------------------------------------------------------------

    def trajectories(self, items: Iterable[Trajectory | Mapping[str, Any]]) -> list[Trajectory]:
        """Validate items into trajectories (ItemError names the first bad one and why)."""
        return [to_trajectory(x, split=self.reward.step_split, max_steps=self.reward.max_steps, index=i)
                for i, x in enumerate(items)]

    def outcomes_of_items(self, items: Iterable[Trajectory | Mapping[str, Any]]) -> tuple[list[Trajectory | None], list[Outcome | None]]:
        """Per item: its trajectory, or None and an Outcome saying why it cannot be scored."""
        trajectories, invalid = [], []
        for i, item in enumerate(items):
            try:
                trajectories.append(to_trajectory(item, split=self.reward.step_split, max_steps=self.reward.max_steps,
                                                  index=i))
                invalid.append(None)
            except ItemError as err:
                trajectories.append(None)
                invalid.append(Outcome(None, "invalid", str(err)))
        bad = [o for o in invalid if o is not None]
        if bad:
            self.outages.invalid(len(bad), bad[0].error)
        return trajectories, invalid

    async def score_each(self, items: Iterable[Trajectory | Mapping[str, Any]], *, timeout_s: float | None = None,
                         min_version: int | None = None) -> list[Outcome]:
        """An Outcome per item, in input order, by the failure policy: a sample that cannot be
        scored gets its reason; rewards missing at the deadline are the fallback (counted, the
        outage logged once), or raise RewardUnavailable with on_failure="raise"."""
        trajectories, outcomes = self.outcomes_of_items(items)
        sent = [t for t in trajectories if t is not None]
        got = await self._await(sent, timeout_s) if sent else ({}, [], True, "")
        rewards, missing, was_sent, reason = got
        if missing and self.reward.on_failure == "raise":
            raise RewardUnavailable(missing, self._deadline(timeout_s), was_sent, reason)
        out = []
        for t, o in zip(trajectories, outcomes):
            if o is not None:
                out.append(o)
            elif t.id in rewards:
                r = rewards[t.id]
                stale = min_version is not None and r.model_version < min_version
                out.append(Outcome(None, "stale", f"scored by v{r.model_version}, older than v{min_version}") if stale
                           else Outcome(r))
            else:
                out.append(Outcome(None, "unavailable", f"no reward within {self._deadline(timeout_s):g}s"
                                   + ("" if was_sent else f"; not sent: {reason or 'Kafka did not take it'}")))
        return out

    async def score(self, items: Iterable[Trajectory | Mapping[str, Any]], *, timeout_s: float | None = None,
                    min_version: int | None = None) -> list[Reward]:
        """Rewards in input order, or raise: ItemError for a bad item, RewardUnavailable when any
        reward is missing at the deadline, StaleRewardError for one older than min_version."""
        return await self.score_trajectories(self.trajectories(items), timeout_s=timeout_s, min_version=min_version)

    async def score_trajectories(self, trajectories: list[Trajectory], *, timeout_s: float | None = None,
                                 min_version: int | None = None) -> list[Reward]:
        rewards, missing, was_sent, reason = await self._await(trajectories, timeout_s)
        if missing:
            raise RewardUnavailable(missing, self._deadline(timeout_s), was_sent, reason)
        out = [rewards[t.id] for t in trajectories]
        if min_version is not None:
            stale = {r.id: r.model_version for r in out if r.model_version < min_version}
            if stale:
                raise StaleRewardError(stale, min_version)
        return out

    def _deadline(self, timeout_s: float | None) -> float:
        deadline = self.reward.timeout_s if timeout_s is None else timeout_s
        # While the last call failed, a call waits only briefly: an RL run loses seconds, not minutes.
        return min(deadline, self.reward.outage_timeout_s) if self.outages.ongoing else deadline

    async def _await(self, trajectories: list[Trajectory], timeout_s: float | None) -> tuple[dict[str, Reward], list[str], bool, str]:
        """(rewards by id, ids missing at the deadline, whether every sample reached Kafka, why not)."""
        if not self.started:
            raise RuntimeError("the reward client is not started (use `async with RewardClient(...)`)")
        deadline = self._deadline(timeout_s)
        unique: dict[str, Trajectory] = {}
        for t in trajectories:
            unique.setdefault(t.id, t)  # the same sample twice in one call is one trajectory
        rewards: dict[str, Reward] = {}
        mine: dict[str, _Wait] = {}
        to_send: list[_Wait] = []
        loop = asyncio.get_running_loop()
        for tid, t in unique.items():
            cached = self._cache.get(tid)
            if cached is not None:
                rewards[tid] = cached
                self.stats["answered_from_cache"] += 1
            elif tid in self._waits:  # another caller awaits it already: share its wait
                mine[tid] = self._waits[tid]
                mine[tid].callers += 1
            else:
                wait = _Wait(t, loop.create_future())
                self._waits[tid] = mine[tid] = wait  # registered before producing: a fast reward finds it
                to_send.append(wait)
        reason = ""

        async def send_and_wait() -> None:
            nonlocal reason
            try:
                await self._send(to_send)
            except KafkaError as err:
                reason = f"{type(err).__name__}: {err}"[:200]
                return
            if mine:
                await asyncio.wait([w.future for w in mine.values()])

        try:
            await asyncio.wait_for(send_and_wait(), deadline)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            pass
        finally:
            for tid, wait in mine.items():
                wait.callers -= 1
                if wait.callers <= 0 and self._waits.get(tid) is wait:
                    del self._waits[tid]
        for tid, wait in mine.items():
            if wait.future.done() and not wait.future.cancelled() and wait.future.exception() is None:
                rewards[tid] = wait.future.result()
        missing = [tid for tid in unique if tid not in rewards]
        was_sent = all(w.sent for tid, w in mine.items() if tid in missing)
        if missing:
            self.stats["timeouts"] += 1
            self.outages.failed(len(missing), reason or f"no reward within {deadline:g}s"
                                + ("" if was_sent else " and the samples did not reach Kafka"))
        else:
            self.outages.recovered()
        return rewards, missing, was_sent, reason

    async def _send(self, waits: list[_Wait]) -> None:
        if not waits:
            return
        if self._producer is None:
            raise KafkaConnectionError("the client is reconnecting to the broker")
        acks = [await self._producer.send(self.topics.trajectories, key=w.trajectory.id.encode(),
                                          value=messages.encode(w.trajectory)) for w in waits]
        for w, ack in zip(waits, acks):
            await ack
            w.sent = True
        self.stats["produced"] += len(waits)

    # --- reading --------------------------------------------------------------------------------

    async def _read(self) -> None:
        """The one reader: hand each reward to its waiter and keep it for retries; now and then
        check that the broker still holds the data this client positioned itself in."""
        delay, next_check = 0.5, time.monotonic() + self.epoch_check_s
        while True:
            try:
                if self._consumer is None:  # a restart after lost data failed half way: try it again
                    async with self._restart:
                        await self._close_clients()
                        await self._ensure_topics()
                        await self._open(from_start=True)
                batch = await self._consumer.getmany(timeout_ms=500)
                delay = 0.5
                for records in batch.values():
                    for record in records:
                        self._deliver(record.key, record.value)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + (self.epoch_check_s if self._waits else 5 * self.epoch_check_s)
                    await self._check_epoch()
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError, RuntimeError) as err:  # the broker went away: aiokafka reconnects; keep asking
                self.stats["reader_errors"] += 1
                log.debug("reward reader: %s: %s; retrying in %.1fs", type(err).__name__, err, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)

    def _deliver(self, key: bytes | None, value: bytes | None) -> None:
        self.stats["read"] += 1
        tid = key.decode("utf-8", "replace") if key else None
        if tid is None:
            return
        wait = self._waits.get(tid)
        if wait is None and self.reward.reward_cache == 0:
            return
        try:
            reward = messages.decode(Reward, value)
        except messages.MessageError:
            self.stats["undecodable"] += 1
            return
        if self.reward.reward_cache:
            self._cache.setdefault(tid, reward)  # at-least-once: the first reward for an id wins
            self._cache.move_to_end(tid)
            while len(self._cache) > self.reward.reward_cache:
                self._cache.popitem(last=False)
        if wait is not None:
            if wait.future.done():
                self.stats["duplicates"] += 1
            else:
                wait.future.set_result(reward)
                self.outages.recovered()

    async def _read_epoch(self, wait_ms: int = 1000) -> str | None:
        return await read_epoch(self.kafka.bootstrap, self.topics.epoch, wait_ms, **aiokafka_options(self.kafka))

    async def _check_epoch(self) -> None:
        now = await self._read_epoch()
        if now == self._epoch or (self._epoch is None and now is not None and not self.stats["restarts"]):
            self._epoch = now  # a daemon wrote the first epoch after this client started: nothing was lost
            return
        # Confirmed by a second, longer read: one slow fetch on a busy machine must not make the
        # client read a long-lived topic again from its start.
        now = await self._read_epoch(5000)
        if now == self._epoch:
            return
        async with self._restart:
            log.warning("actprm reward client: the broker lost its data (epoch %s -> %s); reading the new data from its "
                        "start and sending the %d awaited sample(s) again", self._epoch, now, len(self._waits))
            self.stats["restarts"] += 1
            await self._close_clients()
            await self._ensure_topics()
            await self._open(from_start=True)
            self._epoch = now
            for w in self._waits.values():
                w.sent = False
            await self._send([w for w in self._waits.values() if not w.future.done()])
