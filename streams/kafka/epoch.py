"""Notice when the broker has lost our data, so the worker can start over instead of hanging.

A Kafka cluster keeps its topics across restarts; the embedded broker keeps them in memory and
comes back empty. Faust's consumers then commit, forever, to partitions that no longer exist.
"Our topic is missing" cannot be the signal: any client's metadata request creates a missing
topic again, empty. So the first record of the epoch topic names the life of the broker's data:
every process reads it at start, checks it now and then, and when it is gone or different the
process restarts its worker (all durable state is in the ledger and the checkpoint store).

Between losing the broker and knowing its data is still ours, the process sends nothing (the
WriteGate): a memory-only broker that came back empty must not see a single write from a
client that still believes in the old topics.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import structlog
from aiokafka import AIOKafkaProducer

from actprm.client import messages
from actprm.client.messages import BrokerEpoch
from actprm.client.topics import read_epoch

log = structlog.get_logger("actprm")


async def claim_epoch(bootstrap: str, topic: str, **kafka_options) -> str:
    """The current epoch; when there is none yet, write one. If several processes write at
    once, the first record in the log wins and all of them read the same one."""
    found = await read_epoch(bootstrap, topic, **kafka_options)
    if found is not None:
        return found
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_options)
    try:
        await producer.start()
        await producer.send_and_wait(topic, messages.encode(BrokerEpoch(epoch=uuid.uuid4().hex)), partition=0)
    finally:
        await producer.stop()
    found = await read_epoch(bootstrap, topic, wait_ms=5000, **kafka_options)
    if found is None:
        raise RuntimeError(f"wrote an epoch record to {topic} on {bootstrap} but could not read it back")
    return found


class WriteGate:
    """Every send of this process waits here while the broker's data is in doubt.

    Why: a memory-only broker that restarted is empty, and a producer with metadata from before
    the restart writes straight into partitions the broker no longer has. Tansu files such a
    batch outside the topic it re-creates, and every later producer then fails on that
    partition for ever (its log: AlreadyExists ... records/00000000000000000000.batch). So
    nothing is sent between losing the broker and knowing its data is still ours."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.held_because: str | None = None
        self.holds = 0  # times sends were held (each broker outage or doubt counts once)

    @property
    def held(self) -> bool:
        return not self._open.is_set()

    def hold(self, why: str) -> None:
        if not self.held:
            self.holds += 1
        self.held_because = why
        self._open.clear()

    def release(self) -> None:
        self.held_because = None
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


class BrokerLink:
    """A TCP connection to a bootstrap broker that never carries a request.

    The kernel closes it the moment the broker process goes away, so a restart is seen at once,
    before any Kafka client of this process has reconnected and written to the new broker."""

    def __init__(self, bootstrap: str) -> None:
        self.servers = []
        for server in bootstrap.split(","):
            host, _, port = server.strip().rpartition(":")
            self.servers.append((host or "127.0.0.1", int(port)))
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def dropped_within(self, seconds: float) -> bool:
        """True when the connection dropped; False after `seconds` without news. No server
        accepting a connection is no news: the epoch reads tell whether the broker is down."""
        if self._reader is None and not await self._connect():
            await asyncio.sleep(seconds)
            return False
        try:
            data = await asyncio.wait_for(self._reader.read(1024), seconds)
        except asyncio.TimeoutError:
            return False
        except OSError:
            data = b""
        if data:  # a broker never speaks first; whatever it is, the connection is alive
            return False
        self.close()
        return True

    async def _connect(self) -> bool:
        for host, port in self.servers:
            try:
                self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                return True
            except (OSError, asyncio.TimeoutError):
                continue
        return False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def guard_epoch(expected: str, read, link: BrokerLink, gate: WriteGate, on_lost,
                      check_every_s: float = 10.0, max_backoff_s: float = 10.0) -> None:
    """Forever: wait for the broker link to drop or for the next check, then read the epoch.

    `read(wait_ms)` returns the epoch now on the broker (None when there is none) and raises
    when the broker cannot be reached. The same epoch releases the gate. No or another epoch
    twice in a row (the second read waits longer, so one slow fetch on a busy machine never
    restarts a healthy worker) calls `on_lost(now)` with the gate still held. While the broker
    is unreachable the gate stays held and reads back off from 0.5 s to `max_backoff_s`."""
    delay, misses, outage = 0.5, 0, False
    while True:
        if gate.held:
            await asyncio.sleep(delay)
        elif await link.dropped_within(check_every_s):
            gate.hold("the connection to the broker dropped")  # before anything else can fail
            # Quiet unless the broker stays away: a Kafka cluster closes idle connections
            # (connections.max.idle.ms), and a read a moment later finds all well.
            log.debug("the connection to the broker dropped; holding sends until its data is confirmed")
        try:
            now = await read(5000 if misses else 1500)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001  (the broker is down: keep holding, back off)
            gate.hold("the broker is unreachable")
            outage = True
            log.warning("broker unreachable; holding sends and retrying", retry_in_s=delay, error=f"{type(err).__name__}: {err}"[:200])
            delay = min(2 * delay, max_backoff_s)
            continue
        delay = 0.5
        if now == expected:
            if gate.held:
                (log.info if outage else log.debug)("the broker is back with our data; sending again")
                gate.release()
            misses, outage = 0, False
            continue
        misses += 1
        gate.hold("the broker's data epoch is not ours")
        if misses >= 2:
            on_lost(now)
            return


def restart_this_process(reason: str, **fields) -> None:
    """Replace this process with a fresh one with the same command line.

    Not faust's clean stop: its consumers would retry commits to partitions that no longer
    exist for ever. Everything durable is in the ledger and the checkpoint store (written
    through to the kernel) and every handler is idempotent, so the fresh process picks up as
    after a crash, against the broker as it is now."""
    log.error(reason, **fields)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])
