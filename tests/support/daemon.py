"""Drive the real daemon in tests: a subprocess `actprm run`, topic readers and waits.

Everything here is real: the daemon is the console script in its own process (so it can be
SIGKILLed) and the broker is Tansu. The judge server is FaultyJudge in support.faulty_judge.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from actprm.model.training.checkpoints import CheckpointStore
from actprm.model.training.consolidate import id_hash
from actprm.client import messages
from actprm.client.topics import Topics, schemas_by_topic

ACTPRM = str(Path(sys.executable).with_name("actprm"))

# Small and quick: a 4-head ensemble on the tiny backbone, updates every 8 labels.
TINY_ENV = {
    "ACTPRM_MODEL__BACKBONE": "tiny",
    "ACTPRM_MODEL__N_HEADS": "4",
    "ACTPRM_MODEL__MAX_LENGTH": "1024",
    "ACTPRM_UPDATE__BATCH_SIZE": "8",
    "ACTPRM_UPDATE__MAX_WAIT_S": "1.0",
    "ACTPRM_SCORER__MAX_BATCH": "8",
    "ACTPRM_SCORER__MAX_WAIT_S": "0.1",
    "ACTPRM_SCORER__VERSION_POLL_S": "0.2",
    "ACTPRM_KAFKA__PARTITIONS": "2",
    "ACTPRM_KAFKA__SESSION_TIMEOUT_S": "6",
    "ACTPRM_LOG_FORMAT": "json",
    "ACTPRM_METRICS__PORT": "0",  # several daemons at once must not fight over one port
    # A bounded run's closing consolidation (600 steps by default) is tested where it is the
    # point (tests/streams/test_learning.py); elsewhere it would only lengthen the run.
    "ACTPRM_CONSOLIDATE__AT_END": "false",
}


class Daemon:
    """One `actprm run` process; its stdout/stderr go to files in the state dir."""

    def __init__(self, bootstrap: str, prefix: str, state_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **TINY_ENV, "ACTPRM_KAFKA__BOOTSTRAP": bootstrap,
                    "ACTPRM_KAFKA__TOPIC_PREFIX": prefix, "ACTPRM_STATE_DIR": str(self.state_dir), **(env or {})}
        self.args = ["run", "--heldout", "0", *args]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Daemon:
        self.starts += 1
        out = open(self.state_dir / f"stdout.{self.starts}", "wb")
        err = open(self.state_dir / f"stderr.{self.starts}", "wb")
        self.proc = subprocess.Popen([ACTPRM, *self.args], env=self.env, stdout=out, stderr=err)
        return self

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not stop within {timeout}s; stderr tail:\n{self.stderr()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.wait(timeout)
        return self.proc.returncode if self.proc else 0

    def stderr(self) -> str:
        return "".join((self.state_dir / f"stderr.{i}").read_text(errors="replace") for i in range(1, self.starts + 1))

    def final_status(self) -> dict:
        text = (self.state_dir / f"stdout.{self.starts}").read_text()
        return json.loads(text[text.index("{"):])

    @property
    def store(self) -> CheckpointStore:
        return CheckpointStore(self.state_dir / "checkpoints")


def manifests(store: CheckpointStore) -> list:
    return [store.manifest(v) for v in store.versions()]


def consumed_ids(store: CheckpointStore) -> Counter:
    """How many versions consumed each label id (must never exceed 1)."""
    return Counter(i for m in manifests(store) for i in m.consumed_label_ids)


def all_consumed(store: CheckpointStore, ids, val_fraction: float = 0.15) -> bool:
    """Has every label been consumed? By a version, or, for a label of the consolidations'
    validation slice (its id hashes below val_fraction) whose batch held no other, by none:
    such a batch has nothing to train and publishes no version."""
    used = consumed_ids(store)
    return all(i in used or id_hash(i) < val_fraction for i in ids)


async def _read_all(bootstrap: str, topic: str, settle_s: float, timeout_s: float, until) -> list:
    schema = {t: s for t, s in schemas_by_topic(Topics(topic.rsplit(".", 1)[0])).items()}[topic]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got, last_new = [], time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    got.append(messages.decode(schema, r.value))
                    last_new = time.monotonic()
            if until(got) and time.monotonic() - last_new >= settle_s:
                break
        return got
    finally:
        await consumer.stop()


def read_topic(bootstrap: str, topic: str, *, until=lambda got: True, settle_s: float = 1.0, timeout_s: float = 30) -> list:
    """Every message on a topic from the beginning (no consumer group), decoded with its schema."""
    return asyncio.run(_read_all(bootstrap, topic, settle_s, timeout_s, until))


async def publish(bootstrap: str, topic: str, items: list) -> None:
    """Send schema messages to a topic, keyed by id, each acknowledged before the next."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for m in items:
            await producer.send_and_wait(topic, key=m.id.encode(), value=messages.encode(m))
    finally:
        await producer.stop()
