"""Readers in no consumer group, for the daemon's one-partition topics (control, acks, epoch,
versions). Topic names and creation are the client's (actprm.client.topics), shared with RL clients."""

from __future__ import annotations

from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

log = structlog.get_logger("actprm")


def partition_reader(bootstrap: str, **kafka_options: Any) -> AIOKafkaConsumer:
    """A consumer in no group, for a reader that must see every record of a one-partition topic
    itself (control commands, acks, the epoch record): nothing is shared and nothing committed."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                            fetch_max_wait_ms=100, **kafka_options)


async def started_reader(bootstrap: str, purpose: str, **kafka_options: Any) -> AIOKafkaConsumer:
    """A started partition_reader. The broker may be away right now (an outage, a restart):
    wait for it with backoff rather than let the error crash the whole app."""
    async for attempt in AsyncRetrying(retry=retry_if_exception_type(KafkaError), wait=wait_exponential(0.5, max=10),
                                       before_sleep=lambda state: log.warning(
                                           f"{purpose} cannot reach the broker; retrying",
                                           error=str(state.outcome.exception())[:200])):
        with attempt:
            reader = partition_reader(bootstrap, **kafka_options)
            try:
                await reader.start()
            except BaseException:
                await reader.stop()
                raise
    return reader


async def read_from(reader: AIOKafkaConsumer, topic: str, offset: int | None = None) -> TopicPartition:
    """Point a started partition_reader at partition 0 of `topic`, at `offset` (None: the first record)."""
    tp = TopicPartition(topic, 0)
    reader.assign([tp])
    if offset is None:
        await reader.seek_to_beginning(tp)
    else:
        reader.seek(tp, offset)
    return tp
