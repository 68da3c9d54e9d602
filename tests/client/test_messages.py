"""Message schemas and the codec: round trips, and one readable MessageError for every bad payload."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from actprm.client.messages import (
    ALL_SCHEMAS,
    MAX_REASON_CHARS,
    AnnotationRequest,
    BrokerEpoch,
    ControlAck,
    ControlCommand,
    DeadLetter,
    Label,
    Message,
    MessageError,
    ModelVersion,
    Reward,
    Trajectory,
    dead_letter,
    decode,
    encode,
)
from actprm.client.topics import Topics, schemas_by_topic

EXAMPLES: list[Message] = [
    Trajectory(
        id="traj-1", problem="What is 2+3?", steps=["2+3=5", "So the answer is 5."],
        gold_first_error=-1, policy_step=12, metadata={"source": "gsm8k", "k": 3, "t": 0.7, "ok": True, "none": None},
    ),
    Reward(
        id="traj-1", mu=[0.9, 0.2], sigma=[0.05, 0.3], first_error=1, selected=True,
        model_version=4, n_steps=3, truncated=True, round_id=2,
    ),
    AnnotationRequest(id="traj-1", problem="p", steps=["a", "b"], gold_first_error=None, round_id=2, model_version=4, mu=[0.5, 0.4]),
    Label(id="traj-1", first_error=0, n_steps=2, judge="gold", round_id=2, problem="p", steps=["a", "b"], latency_s=0.25),
    ModelVersion(version=5, location="/runs/ckpt/5", parent=4, metrics={"f1": 0.61}, status="rejected", reason="f1 dropped"),
    ControlCommand(command="set", args={"budget": 64, "pause": False}, signature="abc"),
    ControlAck(command_id="c-1", role="scorer", process_id="host:123", ok=True, state={"paused": False, "queue": [1, 2]}),
    DeadLetter(source_topic="actprm.trajectories", partition=0, offset=7, key=None, raw_b64="e30=", reason="bad", error_type="MessageError"),
    BrokerEpoch(epoch="3f2a"),
]  # fmt: skip


def _trajectory_dict(**changes: object) -> dict[str, object]:
    data: dict[str, object] = {"schema_version": 1, "id": "t", "problem": "p", "steps": ["a", "b"], "created_at": 1.0}
    data.update(changes)
    return data


def _raw(data: object) -> bytes:
    return json.dumps(data).encode()


def test_examples_cover_every_schema() -> None:
    assert {type(m) for m in EXAMPLES} == set(ALL_SCHEMAS)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    raw = encode(msg)
    assert json.loads(raw)["schema_version"] == 1
    assert decode(type(msg), raw) == msg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff\xfe{}", "invalid UTF-8 at byte 0"),
        (b'{"id": "t",', "invalid JSON"),
        (b'[{"id": "t"}]', "expected a JSON object, got an array"),
        (b'"text"', "expected a JSON object, got a string"),
        (_raw({"schema_version": 1, "id": "t", "steps": ["a"]}), "problem: Field required"),
        (_raw(_trajectory_dict(steps="a")), "steps: Input should be a valid list"),
        (_raw(_trajectory_dict(policy_step="3")), "policy_step: Input should be a valid integer"),
        (_raw(_trajectory_dict(schema_version=2)), "unsupported schema_version 2"),
        (_raw(_trajectory_dict(gold_first_error=2)), "gold_first_error=2 must be -1 (all correct) or a step index below 2"),
        (_raw(_trajectory_dict(gold_first_error=-2)), "gold_first_error=-2"),
        (_raw(_trajectory_dict(steps=[])), "steps: List should have at least 1 item"),
        (_raw(_trajectory_dict(steps=["a", "  "])), "steps.1: must not be empty or whitespace only"),
        (_raw(_trajectory_dict(id="")), "id: String should have at least 1 character"),
        (_raw(_trajectory_dict(id="x" * 257)), "id: String should have at most 256 characters"),
        (_raw(_trajectory_dict(surprise=1)), "surprise: Extra inputs are not permitted"),
        (b'{"schema_version": 1, "id": "t", "problem": "p", "steps": ["a"], "created_at": NaN}', "created_at: Input should be a finite number"),
        (b"1" * 5000, "unreadable JSON"),
        (b"[" * 100_000, "JSON"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_decode_failure_reasons(raw: bytes, expected: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(Trajectory, raw)
    assert expected in caught.value.reason
    assert caught.value.reason.startswith("Trajectory: ")
    assert len(caught.value.reason) <= MAX_REASON_CHARS


@pytest.mark.parametrize("version", [1.0, "1", True, 1.5], ids=repr)
def test_schema_version_must_be_the_integer_1(version: object) -> None:
    # 1.0 and true compare equal to 1; strict means the JSON integer 1 and nothing else.
    with pytest.raises(MessageError, match="unsupported schema_version"):
        decode(Trajectory, _raw(_trajectory_dict(schema_version=version)))
    with pytest.raises(ValueError, match="must be the integer 1"):
        Trajectory.model_validate(_trajectory_dict(schema_version=version))


def test_too_big_is_refused_before_parsing() -> None:
    raw = _raw(_trajectory_dict(problem="x" * 2000))
    with pytest.raises(MessageError, match="over the 1000-byte limit"):
        decode(Trajectory, raw, max_bytes=1000)
    with pytest.raises(MessageError, match="over the 1000-byte limit"):
        encode(decode(Trajectory, raw), max_bytes=1000)


def test_none_payload_is_a_message_error() -> None:
    with pytest.raises(MessageError, match="tombstone"):
        decode(ModelVersion, None)


def test_many_errors_stay_bounded() -> None:
    with pytest.raises(MessageError) as caught:
        decode(Trajectory, _raw(_trajectory_dict(steps=[""] * 400)))
    assert len(caught.value.reason) <= MAX_REASON_CHARS
    assert caught.value.reason.endswith("…")


def test_cross_field_checks() -> None:
    with pytest.raises(ValidationError, match="sigma has 1"):
        Reward(id="t", mu=[0.1, 0.2], sigma=[0.1], first_error=-1, selected=False, model_version=0, n_steps=2, truncated=False, round_id=0)
    with pytest.raises(ValidationError, match="n_steps=3 but 2 steps"):
        Label(id="t", first_error=0, n_steps=3, judge="j", round_id=0, problem="p", steps=["a", "b"])
    with pytest.raises(ValidationError, match="finite"):
        Reward(id="t", mu=[float("nan")], sigma=[0.1], first_error=-1, selected=False, model_version=0, n_steps=1, truncated=False, round_id=0)


def test_dead_letter_keeps_the_original_bytes() -> None:
    raw = b"\xff not json"
    try:
        decode(Trajectory, raw)
    except MessageError as error:
        letter = dead_letter("actprm.trajectories", 1, 42, b"key-\xff", raw, error)
    assert base64.b64decode(letter.raw_b64) == raw
    assert letter.key == "key-\\xff"
    assert letter.error_type == "MessageError"
    assert "invalid UTF-8" in letter.reason
    assert (letter.partition, letter.offset, letter.raw_bytes, letter.raw_truncated) == (1, 42, len(raw), False)
    assert decode(DeadLetter, encode(letter)) == letter


def test_dead_letter_of_a_huge_payload_stays_small() -> None:
    letter = dead_letter("t", None, None, None, b"x" * 2_000_000, ValueError("y" * 10_000))
    assert letter.raw_truncated and letter.raw_bytes == 2_000_000
    assert len(encode(letter)) < 1_000_000  # fits Kafka's default message size
    assert len(letter.reason) <= MAX_REASON_CHARS


def test_every_topic_has_a_schema() -> None:
    topics = Topics("run-7")
    assert schemas_by_topic(topics)[topics.versions] is ModelVersion
    assert topics.trajectories == "run-7.trajectories"
    with pytest.raises(ValueError):
        Topics("bad prefix!")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
# Near misses: a valid trajectory with a few known fields replaced by arbitrary JSON values.
near_misses = st.dictionaries(
    st.sampled_from(["schema_version", "id", "problem", "steps", "gold_first_error", "metadata", "created_at"]),
    json_values,
    max_size=3,
).map(lambda changes: json.dumps(_trajectory_dict(**changes)).encode())
payloads = st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.text(max_size=8), json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    near_misses,
)


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_any_bytes_decode_or_raise_message_error(raw: bytes) -> None:
    for schema in (Trajectory, Reward, ControlCommand):
        try:
            decode(schema, raw)
        except MessageError as error:
            assert 0 < len(error.reason) <= MAX_REASON_CHARS
