"""A daemon process without Kafka: the roles built as `actprm run` builds them, with a Sender
whose broker is a list, so a test drives a role by calling it and reads what it sent."""

from __future__ import annotations

import asyncio

from actprm.streams.process import build_process
from actprm.streams.config import ProcessSettings
from actprm.client import messages
from actprm.streams.process import ROLES, Process
from actprm.streams.kafka.sender import Event, Observer, Sender
from actprm.client.topics import Topics


def memory_sender(dead_letters: str) -> tuple[Sender, list[tuple[str, bytes | None, bytes]]]:
    """A Sender whose broker is a list, each record acknowledged at once."""
    sent: list[tuple[str, bytes | None, bytes]] = []

    async def produce(topic: str, key: bytes | None, value: bytes):
        sent.append((topic, key, value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    return Sender(produce, dead_letters), sent


def memory_process(settings: ProcessSettings, roles: tuple[str, ...] = ROLES, topics: Topics | None = None,
                   metrics: Observer | None = None) -> tuple[Process, list[tuple[str, bytes | None, bytes]]]:
    topics = topics or Topics("t")
    sender, sent = memory_sender(topics.dead_letters)
    return build_process(settings, roles, topics, sender, metrics=metrics), sent


def event(topic: str, msg: messages.Message, offset: int = 0) -> Event:
    """A consumed record of `msg` as the agents hand it to a role."""
    return Event(topic, 0, offset, msg.id.encode(), messages.encode(msg))


def sent_to(sent, topic: str, schema):
    """The messages of `schema` sent to `topic`, in order."""
    return [messages.decode(schema, value) for t, _, value in sent if t == topic]
