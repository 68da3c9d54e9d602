"""Operator tools over any broker: push trajectories in (`actprm produce`), read a topic (`actprm tail`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from tqdm import tqdm

from actprm.client import messages
from actprm.client.messages import Trajectory
from actprm.client.topics import Topics, unreachable

TAILABLE = {"rewards": "rewards", "labels": "labels", "annotations": "annotations", "candidates": "candidates",
            "versions": "versions", "dead-letters": "dead_letters", "trajectories": "trajectories",
            "control": "control", "acks": "acks"}


def synthetic_trajectories(n: int, seed: int, kinds: dict[str, float] | None = None, error_rate: float = 0.5,
                           markers: bool = False) -> list[Trajectory]:
    """The built-in stream: word problems with a known first wrong step (gold labels) of the
    given error kinds (model/data/synthetic.py); each says its kind in metadata."""
    return list(iter_synthetic_trajectories(n, seed, kinds, error_rate, markers))


def iter_synthetic_trajectories(n: int, seed: int, kinds: dict[str, float] | None = None, error_rate: float = 0.5,
                                markers: bool = False) -> Iterator[Trajectory]:
    """`synthetic_trajectories` one at a time: a long built-in stream is never held in memory."""
    from actprm.model.data.synthetic import iter_builtin_records

    return (Trajectory(id=r.id, problem=r.problem, steps=r.steps, gold_first_error=r.label, metadata={"kind": r.extra["kind"]})
            for r in iter_builtin_records(n, seed=seed, kinds=kinds, error_rate=error_rate, markers=markers))


def trajectories_from(file: Path | None, synthetic: int | None, seed: int = 0) -> tuple[list[Trajectory], list[tuple[str, str]]]:
    """Trajectories from a labelled file (gold labels carried for the oracle judge) or the
    built-in generator (ids wp-SEED-i: another seed gives other ids)."""
    if synthetic is not None:
        return synthetic_trajectories(synthetic, seed=seed), []
    from actprm.model.data.records import load_records

    loaded = load_records(file)
    items, skipped = [], list(loaded.skipped)
    for r in loaded.records:
        try:
            items.append(Trajectory(id=r.id, problem=r.problem, steps=r.steps, gold_first_error=r.label))
        except ValueError as err:  # e.g. too many steps for the schema
            skipped.append((r.id, str(err).splitlines()[0]))
    return items, skipped


async def _produce(bootstrap: str, topic: str, items: list[Trajectory], options: dict) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **options)
    try:
        try:
            await producer.start()
        except KafkaConnectionError as err:
            raise unreachable(bootstrap, err) from None
        futures = []
        for t in tqdm(items, desc="produce", unit="traj", disable=None):
            futures.append(await producer.send(topic, key=t.id.encode(), value=messages.encode(t)))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(items)


def produce_trajectories(bootstrap: str, topic_prefix: str, items: list[Trajectory], **options) -> int:
    """options: aiokafka client kwargs (SASL/TLS), as `agents.aiokafka_options` builds them."""
    return asyncio.run(_produce(bootstrap, Topics(topic_prefix).trajectories, items, options))


async def _tail(bootstrap: str, topic: str, limit: int | None, from_beginning: bool, out: TextIO, options: dict) -> int:
    # No consumer group: tailing must never steal partitions from the daemon's workers.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **options)
    seen = 0
    try:
        try:
            await consumer.start()
        except KafkaConnectionError as err:
            raise unreachable(bootstrap, err) from None
        if topic not in await consumer.topics():  # also loads the metadata partitions_for_topic reads
            raise ValueError(f"topic {topic} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        async for record in consumer:
            try:
                line = json.dumps(json.loads(record.value))
            except (ValueError, TypeError):
                line = json.dumps({"undecodable": True, "partition": record.partition, "offset": record.offset})
            print(line, file=out, flush=True)
            seen += 1
            if limit is not None and seen >= limit:
                break
    finally:
        await consumer.stop()
    return seen


def tail_topic(bootstrap: str, topic_prefix: str, what: str, *, limit: int | None, from_beginning: bool, out: TextIO,
               **options) -> int:
    if what not in TAILABLE:
        raise ValueError(f"cannot tail {what!r}; choose one of {', '.join(TAILABLE)}")
    topic = getattr(Topics(topic_prefix), TAILABLE[what])
    try:
        return asyncio.run(_tail(bootstrap, topic, limit, from_beginning, out, options))
    except KeyboardInterrupt:
        return 0
