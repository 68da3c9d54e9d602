"""Notice when the broker has lost our data, so the worker can start over instead of hanging.

A Kafka cluster keeps its topics across restarts; the embedded broker keeps them in memory and
comes back empty. Faust's consumers then commit, forever, to partitions that no longer exist.
"Our topic is missing" cannot be the signal: any client's metadata request creates a missing
topic again, empty. So the first record of the epoch topic names the life of the broker's data:
every process reads it at start, checks it now and then, and when it is gone or different the
process restarts its worker (all durable state is in the ledger and the checkpoint store).
"""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from actprm.streams import messages
from actprm.streams.messages import BrokerEpoch


async def read_epoch(bootstrap: str, topic: str, wait_ms: int = 1500, **kafka_options) -> str | None:
    """The epoch in the topic's first record, or None when the topic is empty.

    Raises the client's error when the broker cannot be reached (the caller decides)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=100, **kafka_options)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
        for record in batch.get(tp, []):
            try:
                return messages.decode(BrokerEpoch, record.value).epoch
            except messages.MessageError:
                return None
        return None
    finally:
        await consumer.stop()


async def claim_epoch(bootstrap: str, topic: str, **kafka_options) -> str:
    """The current epoch; when there is none yet, write one. If several processes write at
    once, the first record in the log wins and all of them read the same one."""
    found = await read_epoch(bootstrap, topic, **kafka_options)
    if found is not None:
        return found
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options)
    await producer.start()
    try:
        await producer.send_and_wait(topic, messages.encode(BrokerEpoch(epoch=uuid.uuid4().hex)), partition=0)
    finally:
        await producer.stop()
    found = await read_epoch(bootstrap, topic, wait_ms=5000, **kafka_options)
    if found is None:
        raise RuntimeError(f"wrote an epoch record to {topic} on {bootstrap} but could not read it back")
    return found
