"""The faust app: agents that wire topics to the roles' handlers, nothing more; and the worker
that runs it.

Every topic is read as raw bytes so a malformed message becomes a dead letter with its
reason instead of a crashed agent. Micro-batches always use ``take_events(n, within=t)``.
daemon/run.py makes the app (`make_app`), the roles' Sender over its producer
(`kafka_sender`), the process (streams/process.py's `build_process`), then wires them here
(`wire_agents`) and runs a `BoundedStopWorker`.
"""

from __future__ import annotations

import asyncio
import os
import threading

import faust
import structlog
from aiokafka.errors import KafkaError

from actprm.client.settings import aiokafka_options
from actprm.client.topics import Topics, read_epoch
from actprm.streams.config import ProcessSettings
from actprm.streams.control import run_control_consumer
from actprm.streams.kafka.epoch import BrokerLink, WriteGate, guard_epoch, restart_this_process
from actprm.streams.kafka.sender import Event, Sender
from actprm.streams.process import Process

log = structlog.get_logger("actprm")

EPOCH_CHECK_S = 10.0  # how often the broker's data epoch is checked
SCORER_TAKE = 64  # trajectories taken from the stream at most at once; scored in chunks of scorer.max_batch


def _events(batch) -> list[Event]:
    return [Event(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.value) for e in batch]


async def _guarded(proc: Process, what: str, work) -> None:
    """A timer's failure is logged and shown in status, never allowed to crash the worker."""
    try:
        await work()
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001  (the loop must go on; the error is reported)
        proc.errors.note(f"{what}: {type(err).__name__}: {err}")
        log.exception("timer failed", timer=what)


async def _handle(proc: Process, role: str, handler, events: list[Event]) -> None:
    """Run one batch; a Kafka error on the way out (broker down, topic lost) retries the whole
    batch with backoff instead of crashing the agent, which would stop the role for good. The
    handlers dedupe by id, so a retry at most re-sends what already went out."""
    delay = 0.5
    while True:
        try:
            async with proc.busy(role):
                await handler(events)
            return
        except KafkaError as err:
            proc.counts["batch_retries"] += 1
            error = f"{role}: {type(err).__name__}: {err}"[:300]
            proc.errors.note(error)
            log.warning("batch failed on a Kafka error; retrying", role=role, retry_in_s=delay, error=error)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 30.0)


def _credentials(k):
    """The security settings as faust takes them, from the one reading of them (aiokafka_options)."""
    opts = aiokafka_options(k)
    if not opts:
        return None
    if "sasl_mechanism" in opts:
        return faust.SASLCredentials(username=opts["sasl_plain_username"], password=opts["sasl_plain_password"],
                                     mechanism=opts["sasl_mechanism"], ssl_context=opts.get("ssl_context"))
    return faust.SSLCredentials(opts["ssl_context"])


def _with_fetch_wait(fetch_max_wait_ms: int) -> None:
    """faust builds its worker consumer with fetch_max_wait_ms=1500 and offers no setting; a
    broker that holds each long poll that long (Tansu does) adds up to 1.5 s to every hop of a
    reward (measured: 0.71 s of a 0.75 s gateway round trip; 0.10 s at 20 ms). Set it on the
    consumer faust creates, before it starts."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__", AIOKafkaConsumerThread._create_worker_consumer)

    def create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read by start(), when it builds its fetcher
        return consumer

    create_worker_consumer.__wrapped__ = create
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer


def make_app(settings: ProcessSettings, roles: tuple[str, ...], bootstrap: str, broker_epoch: str | None) -> faust.App:
    k = settings.kafka
    _with_fetch_wait(k.fetch_max_wait_ms)
    return faust.App(
        # The consumer group: processes with the same roles share work. The broker data's epoch
        # is part of it, so after the broker loses its data no stale committed offset (a process
        # that had not noticed yet may commit old ones) can make the new group skip messages.
        f"{k.topic_prefix}-{'-'.join(roles)}" + (f"-{broker_epoch[:8]}" if broker_epoch else ""),
        broker=[f"kafka://{host}" for host in bootstrap.split(",")],
        broker_credentials=_credentials(k),
        store="memory://",  # durable state lives in our own ledger, not in faust tables
        processing_guarantee=k.processing_guarantee,
        web_enabled=False,
        broker_session_timeout=k.session_timeout_s,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_partitions=1,
        topic_allow_declare=True,
        datadir=str(settings.state_dir / "faust"),
    )


def _raw_topic(app: faust.App, name: str, partitions: int | None = None):
    return app.topic(name, value_type=bytes, value_serializer="raw", key_serializer="raw", partitions=partitions)


def kafka_sender(app: faust.App, topics: Topics, gate: WriteGate) -> Sender:
    """The roles' Sender over the app's producer: a send resolves on the broker's ack."""
    t = topics
    producers = {name: _raw_topic(app, name) for name in
                 (t.trajectories, t.rewards, t.candidates, t.annotations, t.labels, t.versions, t.acks, t.dead_letters)}

    async def produce(topic: str, key: bytes | None, value: bytes):
        return await producers[topic].send(key=key, value=value)

    return Sender(produce, topics.dead_letters, gate)


def wire_agents(app: faust.App, proc: Process, bootstrap: str, broker_epoch: str | None) -> None:
    s, t, k = proc.settings, proc.topics, proc.settings.kafka

    if proc.scorer is not None:
        scorer = proc.scorer

        @app.agent(_raw_topic(app, t.trajectories, k.partitions))
        async def score(stream):
            # Take generously; the scorer scores in chunks of the live scorer.max_batch.
            async for batch in stream.take_events(max(SCORER_TAKE, s.scorer.max_batch), within=s.scorer.max_wait_s):
                await _handle(proc, "scorer", scorer.on_trajectories, _events(batch))

        @app.on_partitions_assigned.connect
        def note_assignment(_app, assigned, **_kwargs):
            # This scorer's share of the stream after each rebalance: which process has which
            # partitions (an operator's question, and what a test waits for before producing).
            log.info("partitions assigned", topic=t.trajectories,
                     partitions=sorted(tp.partition for tp in assigned if tp.topic == t.trajectories))

        @app.task
        async def follow_announced_versions():
            # Its own reader without a group: every scorer must see every announcement.
            await scorer.serving.follow_announcements(bootstrap, t.versions, **aiokafka_options(k))

        @app.timer(s.scorer.version_poll_s)
        async def poll_checkpoint_store():
            await _guarded(proc, "poll_checkpoint_store", scorer.serving.follow)

    if proc.keeper is not None:
        @app.agent(_raw_topic(app, t.candidates, 1))
        async def keep_round(stream):
            async for batch in stream.take_events(64, within=0.1):
                await _handle(proc, "trainer", proc.keeper.on_candidates, _events(batch))

    if proc.trainer is not None:
        @app.agent(_raw_topic(app, t.labels))
        async def collect_labels(stream):
            async for batch in stream.take_events(64, within=0.2):
                await _handle(proc, "trainer", proc.trainer.on_labels, _events(batch))

        @app.task
        async def update_when_due():
            # Woken by arriving labels (TrainerRole.on_labels) and by control commands; at start it
            # takes up labels the last run left pending.
            await proc.trainer.run_updates()

    if proc.judge is not None:
        @app.agent(_raw_topic(app, t.annotations))
        async def judge(stream):
            async for batch in stream.take_events(s.judge.concurrency, within=0.2):
                await _handle(proc, "judge", proc.judge.on_annotations, _events(batch))

        @app.timer(30.0)
        async def judge_retry_queue():  # requests whose calls failed, asked again when due (streams/roles/judging.py)
            await _guarded(proc, "judge_retry_queue", proc.judge.retry_due)

    if broker_epoch is not None:
        @app.task
        async def guard_broker_data():
            async def read(wait_ms: int) -> str | None:
                return await read_epoch(bootstrap, t.epoch, wait_ms=wait_ms, **aiokafka_options(k))

            def lost(now: str | None) -> None:
                restart_this_process("the broker lost its data (it restarted empty?); restarting this worker",
                                     epoch_was=broker_epoch, epoch_now=now)

            await guard_epoch(broker_epoch, read, BrokerLink(bootstrap), proc.sender.gate, lost, EPOCH_CHECK_S)

    @app.task
    async def obey_control_commands():
        # Its own consumer without a group: every process must see every command, also while paused.
        await run_control_consumer(proc, bootstrap, **aiokafka_options(k))


class BoundedStopWorker(faust.Worker):
    """faust's worker, with a stop that cannot hang.

    With the broker gone, faust's consumers and producer wait up to a minute each for it while
    stopping (mode's shutdown_timeout), so Ctrl-C or a SIGTERM seemed to do nothing. Once a stop
    begins, a timer gives it `stop_timeout()` seconds, then calls `on_timeout` (which exits)."""

    def __init__(self, app: faust.App, *, stop_timeout, on_timeout, **kwargs):
        super().__init__(app, **kwargs)
        self._stop_timeout, self._on_timeout = stop_timeout, on_timeout
        self.stop_timer: threading.Timer | None = None

    async def on_stop(self) -> None:
        self.stop_timer = threading.Timer(self._stop_timeout(), self._on_timeout)
        self.stop_timer.daemon = True
        self.stop_timer.start()
        await super().on_stop()


def supervise_embedded_broker(app: faust.App, broker) -> None:
    """When the embedded broker dies (the OOM killer is the likely one: it keeps everything in
    RAM), start over as a whole process on the same port: a fresh broker, and no client left
    that remembers the old one's topics (see streams/kafka/epoch.py for why that matters)."""

    @app.timer(1.0)
    async def embedded_broker_alive():
        if broker.running:
            return
        code, port = broker.exit_code, broker.port
        os.environ["ACTPRM_KAFKA__EMBEDDED_PORT"] = str(port)
        broker.stop()  # removes its temporary directory; exec would skip every finally block
        restart_this_process("the embedded broker stopped; restarting the daemon with a new one on the same port "
                             "(everything the broker held is lost: it keeps data in memory only)",
                             exit_code=code, port=port)
