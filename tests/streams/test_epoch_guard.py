"""The broker guard (streams/kafka/epoch.py) against a real broker process: sends are held the moment
the broker goes away, released when it comes back with our data, and a broker that came back
empty is reported as lost while nothing has been sent to it."""

from __future__ import annotations

import asyncio
import functools
import socket

import pytest

from actprm.streams.kafka.broker import EmbeddedBroker
from actprm.client.topics import read_epoch
from actprm.streams.kafka.epoch import BrokerLink, WriteGate, claim_epoch, guard_epoch
from support.network import TcpRelay
from support.wait import wait_until_async

pytestmark = pytest.mark.broker

TOPIC = "guard-epoch"


def in_a_loop(scenario):
    """Run an async test body in a fresh event loop (the suite's tests are plain functions)."""
    @functools.wraps(scenario)
    def test():
        asyncio.run(scenario())
    return test


@in_a_loop
async def test_a_link_to_nothing_is_no_news_and_does_not_spin():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await BrokerLink(f"127.0.0.1:{port}").dropped_within(0.5) is False
    assert loop.time() - t0 >= 0.5  # it waited instead of retrying at once


@in_a_loop
async def test_a_link_uses_the_first_server_that_answers():
    async with EmbeddedBroker() as broker:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        link = BrokerLink(f"127.0.0.1:{dead},{broker.bootstrap}")
        assert await link.dropped_within(0.2) is False
        await broker.astop()
        assert await link.dropped_within(5) is True


@in_a_loop
async def test_a_restart_holds_sends_at_once_and_an_empty_broker_is_reported_lost():
    async with EmbeddedBroker() as broker:
        epoch = await claim_epoch(broker.bootstrap, TOPIC)
        gate, lost = WriteGate(), asyncio.get_running_loop().create_future()

        async def read(wait_ms: int):
            return await read_epoch(broker.bootstrap, TOPIC, wait_ms=wait_ms)

        guard = asyncio.create_task(guard_epoch(epoch, read, BrokerLink(broker.bootstrap), gate,
                                                lambda now: lost.set_result(now), check_every_s=60))
        try:
            await asyncio.sleep(0.5)
            assert not gate.held
            await broker.astop()
            # The periodic check is a minute away: only the dropped link can have held the gate.
            await wait_until_async(lambda: gate.held, 2, "the gate to close after the broker stopped", guard)
            await broker.astart()  # same port, empty
            assert await asyncio.wait_for(lost, 30) is None
            assert gate.held, "nothing may be sent to a broker that lost our data"
        finally:
            guard.cancel()


class RecordingGate(WriteGate):
    def __init__(self):
        super().__init__()
        self.history: list[str] = []

    def hold(self, why: str) -> None:
        self.history.append("hold")
        super().hold(why)

    def release(self) -> None:
        self.history.append("release")
        super().release()


@in_a_loop
async def test_a_dropped_link_to_a_broker_that_kept_its_data_holds_sends_only_until_the_epoch_reads_back():
    """A network blip: the guard's own connection (through a relay) is cut while the broker and
    its data stay up. Sends are held, the epoch reads the same, sends go on; nothing is 'lost'."""
    async with EmbeddedBroker() as broker:
        epoch = await claim_epoch(broker.bootstrap, TOPIC)
        link = TcpRelay(broker.port).restore()
        gate, lost = RecordingGate(), []

        async def read(wait_ms: int):
            return await read_epoch(broker.bootstrap, TOPIC, wait_ms=wait_ms)

        guard = asyncio.create_task(guard_epoch(epoch, read, BrokerLink(f"127.0.0.1:{link.port}"), gate,
                                                lost.append, check_every_s=60))
        try:
            await asyncio.sleep(0.5)
            assert gate.history == []
            link.cut()  # every connection through it ends; the broker is untouched
            await wait_until_async(lambda: gate.history == ["hold", "release"], 10, "a hold, then a release", guard)
            assert not gate.held and lost == []
        finally:
            guard.cancel()
            link.close()
