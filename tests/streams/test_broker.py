"""The embedded broker against a real Tansu process: delivery, group offsets, restart, stop, ports."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from actprm.streams.kafka import broker as broker_module
from actprm.streams.kafka.broker import BrokerError, EmbeddedBroker
from actprm.client.messages import Trajectory, decode, encode
from actprm.client.topics import Topics, ensure_topics, schemas_by_topic

pytestmark = pytest.mark.broker

# Short group timings: a group join takes session_timeout/2 against Tansu.
FAST_GROUP = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000, fetch_max_wait_ms=50)


def _pid_alive(pid: int) -> bool:
    # A zombie still answers kill(pid, 0); an orphan's zombie lingers until its new parent reaps it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i, value in enumerate(values):
            # Partition 0 explicitly: auto-created topics get several partitions, and order is per partition.
            await producer.send_and_wait(topic, value, key=str(i).encode(), partition=0)
    finally:
        await producer.stop()


async def _take(consumer: AIOKafkaConsumer, n: int, timeout_s: float = 15) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=200, max_records=n - len(got))
        got += [record.value for records in batches.values() for record in records]
    return got


def test_group_commit_and_resume(broker: EmbeddedBroker, topic_prefix: str) -> None:
    topic, group = f"{topic_prefix}.data", f"{topic_prefix}.group"
    sent = [encode(Trajectory(id=f"t{i}", problem="1+1", steps=["1+1=2"])) for i in range(5)]

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        await _produce(broker.bootstrap, topic, sent)
        first = AIOKafkaConsumer(
            topic, bootstrap_servers=broker.bootstrap, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest", **FAST_GROUP,
        )  # fmt: skip
        await first.start()
        partition = TopicPartition(topic, 0)
        try:
            head = await _take(first, 3)
            # Commit exactly after the third record, whatever the fetch returned beyond it.
            await first.commit({partition: 3})
        finally:
            await first.stop()
        # Tansu numbers the first group generation 0, and aiokafka sends LeaveGroup only for
        # generation > 0: a second subscriber would wait out the first one's session (~11 s).
        # Manual assignment in the same group reads the committed offset without joining.
        second = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest", **FAST_GROUP,
        )  # fmt: skip
        await second.start()
        try:
            second.assign([partition])
            assert await second.committed(partition) == 3
            tail = await _take(second, 2)
        finally:
            await second.stop()
        return head, tail

    head, tail = asyncio.run(scenario())
    assert head == sent[:3]
    assert tail == sent[3:]
    assert [decode(Trajectory, raw).id for raw in tail] == ["t3", "t4"]


def test_ensure_topics_is_idempotent_and_compacts_versions(broker: EmbeddedBroker, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)

    async def scenario() -> tuple[list[str], list[str], set[str], str]:
        created = await ensure_topics(broker.bootstrap, topics, partitions=2)
        again = await ensure_topics(broker.bootstrap, topics, partitions=2)
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            listed = set(await admin.list_topics())
            [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.versions)])
        finally:
            await admin.close()
        entries = {entry[0]: entry[1] for entry in response.resources[0][4]}
        return created, again, listed, entries.get("cleanup.policy", "")

    created, again, listed, policy = asyncio.run(scenario())
    assert sorted(created) == sorted(topics.all())
    assert again == []
    assert set(topics.all()) <= listed
    assert policy == "compact"
    assert set(schemas_by_topic(topics)) == set(topics.all())


def test_restart_keeps_port_and_loses_data(fresh_broker: EmbeddedBroker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.data"
    port, old_pid = fresh_broker.port, fresh_broker.pid
    asyncio.run(_produce(fresh_broker.bootstrap, topic, [b"before"]))

    fresh_broker.restart()

    assert fresh_broker.running
    assert fresh_broker.port == port
    assert fresh_broker.pid != old_pid
    assert old_pid is not None and not _pid_alive(old_pid)

    async def after_restart() -> tuple[list[str], list[bytes]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=fresh_broker.bootstrap)
        await admin.start()
        try:
            listed = await admin.list_topics()
        finally:
            await admin.close()
        await _produce(fresh_broker.bootstrap, topic, [b"after"])
        # Manual assignment: no group join, so no 3 s wait.
        consumer = AIOKafkaConsumer(bootstrap_servers=fresh_broker.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=50)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            return listed, await _take(consumer, 1)
        finally:
            await consumer.stop()

    listed_before_produce, values = asyncio.run(after_restart())
    assert topic not in listed_before_produce  # memory storage: the restart lost the topic
    assert values == [b"after"]


def test_stop_leaves_no_process(fresh_broker: EmbeddedBroker) -> None:
    pid, port = fresh_broker.pid, fresh_broker.port
    assert pid is not None and _pid_alive(pid)
    fresh_broker.stop()
    assert not fresh_broker.running
    assert not _pid_alive(pid)
    assert not Path(f"/proc/{pid}").exists()
    assert not _port_accepts(port)
    fresh_broker.stop()  # idempotent


def test_explicit_taken_port_raises_clearly() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        broker = EmbeddedBroker(port=taken)
        with pytest.raises(BrokerError, match=f"port {taken}"):
            broker.start()
        assert not broker.running


def test_free_port_collision_moves_to_another_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        real_free_port = broker_module._free_port
        offered = iter([taken])
        # The first "free" port is one that someone grabbed in between: the race start() guards.
        monkeypatch.setattr(broker_module, "_free_port", lambda: next(offered, None) or real_free_port())
        with EmbeddedBroker() as started:
            assert started.port != taken
            assert started.running


def test_async_context_manager() -> None:
    async def scenario() -> tuple[int | None, bool]:
        async with EmbeddedBroker() as started:
            await _produce(started.bootstrap, "async-check", [b"x"])
            pid = started.pid
        return pid, started.running

    pid, running = asyncio.run(scenario())
    assert not running
    assert pid is not None and not _pid_alive(pid)


def test_start_inside_event_loop_says_use_astart() -> None:
    async def scenario() -> None:
        EmbeddedBroker().start()

    with pytest.raises(BrokerError, match="astart"):
        asyncio.run(scenario())


def test_broker_dies_with_its_parent() -> None:
    # A parent killed with SIGKILL runs no cleanup; PR_SET_PDEATHSIG must still end the broker.
    script = (
        "from actprm.streams.kafka.broker import EmbeddedBroker; import time\n"
        "b = EmbeddedBroker().start()\n"
        "print(b.pid, b.log_path.parent, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            pid_text, log_dir = parent.stdout.readline().split()
            pid = int(pid_text)
            assert _pid_alive(pid)
        finally:
            parent.send_signal(signal.SIGKILL)
    shutil.rmtree(log_dir, ignore_errors=True)  # the killed parent could not remove it
    deadline = time.monotonic() + 5
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pid)


def test_the_broker_watch_warns_before_the_memory_limit(monkeypatch) -> None:
    """Tansu has no retention; the daemon reads its RSS and warns at 80% of the limit."""
    import os

    from actprm.daemon.metrics import Metrics
    from actprm.streams.kafka.broker import BrokerWatch, default_memory_limit_bytes, rss_bytes

    rss = rss_bytes(os.getpid())  # this process stands in for the broker
    assert rss and rss_bytes(None) is None and rss_bytes(2**22 + 12345) is None
    roomy = BrokerWatch(lambda: os.getpid(), limit_bytes=2 * rss)
    assert roomy.warning() is None and roomy.summary()["broker_rss_mb"] > 0
    tight = BrokerWatch(lambda: os.getpid(), limit_bytes=int(rss / 0.9))
    assert "move to your own Kafka" in tight.warning()
    metrics = Metrics()
    metrics.broker_watch = tight
    assert metrics.summary()["broker_memory_warning"] == tight.warning()  # what `ctl status` shows
    monkeypatch.setenv("ACTPRM_BROKER_MEMORY_LIMIT_MB", "512")
    assert default_memory_limit_bytes() == 512 << 20
