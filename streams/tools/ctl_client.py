"""The ctl client: send a command on the control topic and collect the daemons' acknowledgements.

The client writes an empty marker record to the acks topic first and reads acks from just
after it: the marker's offset comes from the produce response, which is exact on every
broker (the embedded broker's "latest offset" answer is not, so it is never used).
`actprm ctl` (daemon/cli/ctl.py) is the command line over it; tests and tools call it directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from actprm.client import messages
from actprm.streams.control import sign
from actprm.client.messages import ControlAck, ControlCommand
from actprm.client.topics import Topics, unreachable
from actprm.streams.kafka.readers import partition_reader, read_from

MARKER_KEY = b"ctl-marker"


class CtlError(RuntimeError):
    """No daemon answered, or the broker could not be reached."""


async def asend_command(bootstrap: str, prefix: str, cmd: ControlCommand, secret: str | None, timeout_s: float,
                        expect: int | None = None, *, settle_s: float = 1.5, **kafka_options: Any) -> list[ControlAck]:
    """Send `cmd` (signed when a secret is given) and return the acks for it, one per process.

    Returns once `expect` processes answered, or `settle_s` after the last answer when the
    number of processes is unknown; CtlError when none answered within timeout_s.
    """
    topics = Topics(prefix)
    if secret:
        cmd = sign(cmd, secret)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options)
    consumer = partition_reader(bootstrap, **kafka_options)
    try:
        await producer.start()
        await consumer.start()
    except KafkaError as err:
        await producer.stop()
        await consumer.stop()
        raise CtlError(str(unreachable(bootstrap, err))) from None
    acks: dict[tuple[str, str], ControlAck] = {}
    try:
        existing = await consumer.topics()
        if topics.control not in existing or topics.acks not in existing:
            # Every daemon creates its topics at start, so there is none on this prefix.
            raise CtlError(f"no daemon on {bootstrap}: topic {topics.control} does not exist")
        marker = await producer.send_and_wait(topics.acks, key=MARKER_KEY, value=None, partition=0)
        await producer.send_and_wait(topics.control, key=cmd.id.encode(), value=messages.encode(cmd), partition=0)
        tp = await read_from(consumer, topics.acks, marker.offset + 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = None  # when the latest ack arrived
        while expect is None or len(acks) < expect:
            settle_at = deadline if expect is not None or last is None else min(deadline, last + settle_s)
            wait = settle_at - loop.time()
            if wait <= 0:
                break
            batch = await consumer.getmany(tp, timeout_ms=max(1, int(min(wait, 0.25) * 1000)))
            for record in batch.get(tp, []):
                try:
                    ack = messages.decode(ControlAck, record.value)
                except messages.MessageError:
                    continue  # markers of other clients, or junk
                who = (ack.process_id, ack.role)
                if ack.command_id == cmd.id and who not in acks:  # acks may be redelivered
                    acks[who] = ack
                    last = loop.time()
    except KafkaError as err:
        raise CtlError(f"Kafka error on {bootstrap}: {err}") from None
    finally:
        await consumer.stop()
        await producer.stop()
    if not acks:
        raise CtlError(f"no daemon answered within {timeout_s:g}s on {bootstrap} (topic {topics.control})")
    return sorted(acks.values(), key=lambda a: (a.role, a.process_id))


def send_command(bootstrap: str, prefix: str, cmd: ControlCommand, secret: str | None, timeout_s: float,
                 expect: int | None = None, **options: Any) -> list[ControlAck]:
    """Blocking form of asend_command, for the CLI."""
    return asyncio.run(asend_command(bootstrap, prefix, cmd, secret, timeout_s, expect, **options))
