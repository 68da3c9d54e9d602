"""Topic names, the schema each topic carries, and idempotent topic creation.

Shared by the daemon and the clients: a topic's name and its schema have this one home.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from actprm.client import messages

# Kafka's own rule for topic names (249 minus room for our longest suffix).
_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,200}")
_TOPIC_ALREADY_EXISTS = 36


class TopicSetupError(RuntimeError):
    """The broker refused to create a topic for a reason other than it existing already."""


class KafkaUnreachable(ConnectionError):
    """No broker answered at the bootstrap address; the message is one line, for the CLI."""


def unreachable(bootstrap: str, err: Exception) -> KafkaUnreachable:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return KafkaUnreachable(f"cannot reach Kafka at {bootstrap} ({reason}); check the address (--bootstrap, "
                            "ACTPRM_KAFKA__BOOTSTRAP or kafka.bootstrap in --config), that the broker is up, "
                            "and the kafka.security_protocol / SASL settings")


def _topic(kind: str, what: str) -> property:
    return property(lambda self: f"{self.prefix}.{kind}", doc=what)


@dataclass(frozen=True)
class Topics:
    """Every topic the service uses, named f"{prefix}.<kind>"; a prefix per run or test keeps them apart."""

    prefix: str = "actprm"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"topic prefix {self.prefix!r} must be 1-200 of [A-Za-z0-9._-]")

    trajectories = _topic("trajectories", "rollouts to score (the RL run or `actprm produce` writes)")
    rewards = _topic("rewards", "per-step scores, one per trajectory id")
    candidates = _topic("candidates", "scorers propose here; the one round keeper admits within budget to `annotations`")
    annotations = _topic("annotations", "requests for the judge")
    labels = _topic("labels", "the judge's verdicts, for the trainer")
    versions = _topic("versions", "announcements of published weight versions")
    control = _topic("control", "signed operator commands (one partition)")
    acks = _topic("acks", "the daemons' answers to control commands")
    dead_letters = _topic("dead_letters", "malformed or failed messages, each with its reason")
    epoch = _topic("epoch", "the broker data's life: a new one when the broker lost its data")

    def all(self) -> tuple[str, ...]:
        return tuple(schemas_by_topic(self))


def schemas_by_topic(topics: Topics) -> dict[str, type[messages.Message]]:
    """The one schema each topic carries."""
    return {
        topics.trajectories: messages.Trajectory,
        topics.rewards: messages.Reward,
        topics.candidates: messages.AnnotationRequest,
        topics.annotations: messages.AnnotationRequest,
        topics.labels: messages.Label,
        topics.versions: messages.ModelVersion,
        topics.control: messages.ControlCommand,
        topics.acks: messages.ControlAck,
        topics.dead_letters: messages.DeadLetter,
        topics.epoch: messages.BrokerEpoch,
    }


def topic_specs(topics: Topics, partitions: int = 1, replication_factor: int = 1) -> list[NewTopic]:
    """What ensure_topics() creates; `partitions` applies to the data topics only."""
    if partitions < 1 or replication_factor < 1:
        raise ValueError("partitions and replication_factor must be at least 1")
    # Control, acks and versions stay on one partition so every reader sees them in one order;
    # candidates too, so the single round keeper admits them in one order against one budget.
    single = {topics.control, topics.acks, topics.versions, topics.candidates, topics.epoch}
    # Compaction keeps the latest record per key (the version number) forever. Tansu 0.6 accepts
    # and stores cleanup.policy=compact (checked with describe_configs); readers still dedupe.
    configs = {topics.versions: {"cleanup.policy": "compact"}}
    return [
        NewTopic(
            name,
            num_partitions=1 if name in single else partitions,
            replication_factor=replication_factor,
            topic_configs=configs.get(name, {}),
        )
        for name in topics.all()
    ]


async def ensure_topics(
    bootstrap: str,
    topics: Topics,
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    **admin_options: Any,
) -> list[str]:
    """Create any missing topic; returns the names created now. Existing topics are left as they
    are (partition count and config included). `admin_options` go to AIOKafkaAdminClient (SASL/TLS)."""
    specs = topic_specs(topics, partitions, replication_factor)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **admin_options)
    try:
        await admin.start()
    except KafkaConnectionError as err:
        await admin.close()
        raise unreachable(bootstrap, err) from None
    try:
        response = await admin.create_topics(specs)
    finally:
        await admin.close()
    created, failures = [], []
    # create_topics reports per-topic errors in the response instead of raising.
    for err in response.topic_errors:
        name, code = err[0], err[1]
        message = err[2] if len(err) > 2 else None  # older protocol versions carry no message
        if code == 0:
            created.append(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            failures.append(f"{name}: error {code} {message or ''}".strip())
    if failures:
        raise TopicSetupError(f"could not create topics on {bootstrap}: {'; '.join(failures)}")
    return created


async def read_epoch(bootstrap: str, topic: str, wait_ms: int = 1500, **kafka_options: Any) -> str | None:
    """The epoch in the first record of the epoch topic (which life of the broker's data this
    is: streams/kafka/epoch.py), or None when the topic is empty. Raises the client's error when the
    broker cannot be reached (the caller decides)."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=100, **kafka_options)
    try:
        await consumer.start()
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
        for record in batch.get(tp, []):
            try:
                return messages.decode(messages.BrokerEpoch, record.value).epoch
            except messages.MessageError:
                return None
        return None
    finally:
        await consumer.stop()
