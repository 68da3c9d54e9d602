"""Raw Kafka traffic for the tests that step outside the message schemas. The daemon's own
helpers (support.daemon.publish, read_topic) only send and read valid schema messages; the bad
input tests need to put arbitrary bytes on a topic (no key, truncated JSON, a 10 MB record) to
see what the daemon does with them, and the fault tests need a cheap "which ids are on this
topic yet" that does not fail while a restarted broker has not created the topic again.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from support.daemon import read_topic


async def _produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    # Big enough for the 10 MB payload; the broker decides whether it takes it.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Send (key, value) byte pairs in order, waiting for every ack."""
    asyncio.run(_produce_raw(bootstrap, topic, records))


def topic_ids(bootstrap: str, topic: str) -> set[str]:
    """Ids of the messages on a topic so far; empty while the topic does not exist (yet)."""
    try:
        return {m.id for m in read_topic(bootstrap, topic, until=bool, settle_s=0.5, timeout_s=10)}
    except AssertionError:  # aiokafka: no partitions assigned, the topic is not there
        return set()
