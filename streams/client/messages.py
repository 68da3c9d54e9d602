"""The one schema of every Kafka message, and the JSON codec that every producer and consumer uses.

decode() turns every way a payload can be bad into one MessageError with a short, readable
reason, so a consumer has exactly one exception to route to the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from typing_extensions import Self  # typing.Self is 3.11+; the client runs on 3.10 too

from actprm.client.steps import DEFAULT_SPLIT, StepSplitError, split_steps

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_REASON_CHARS = 500
# A dead letter must itself fit in a Kafka message (1 MB by default), so keep only a prefix of huge payloads.
MAX_DEAD_LETTER_RAW_BYTES = 256 * 1024
MAX_STEPS = 512


def _now() -> float:
    return time.time()


def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or whitespace only")
    return text


MessageId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Step = Annotated[str, AfterValidator(_non_blank)]
Steps = Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]
Scalar = str | int | float | bool | None
StepIndex = Annotated[int, Field(ge=-1)]  # -1 means every step is correct
Count = Annotated[int, Field(ge=0)]


def _exact_int(value: Any) -> Any:
    # Literal[1] alone takes 1.0 and True (they compare equal to 1), even in strict mode.
    if type(value) is not int:
        raise ValueError(f"must be the integer {SCHEMA_VERSION}, got {value!r}")
    return value


class MessageError(ValueError):
    """A payload that is not a valid message; `reason` says why, in at most MAX_REASON_CHARS."""

    def __init__(self, reason: str) -> None:
        self.reason = _bounded(reason)
        super().__init__(self.reason)


class Message(BaseModel):
    # strict: a producer sending "3" for an int is a bug to surface, not to coerce.
    # allow_inf_nan=False: JSON has no NaN, and a NaN reward is a bug at the producer.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    schema_version: Annotated[Literal[1], BeforeValidator(_exact_int)] = SCHEMA_VERSION


def _check_step_index(name: str, value: int | None, n_steps: int) -> None:
    if value is not None and not -1 <= value < n_steps:
        raise ValueError(f"{name}={value} must be -1 (all correct) or a step index below {n_steps}")


def _gold_within_steps(self):
    _check_step_index("gold_first_error", self.gold_first_error, len(self.steps))
    return self


gold_in_range = model_validator(mode="after")(_gold_within_steps)  # of Trajectory and AnnotationRequest


class Trajectory(Message):
    """One policy rollout split into steps, sent by the RL run to be scored.

    A producer may send `response` (raw text) instead of `steps`, with an optional `split` mode
    (actprm.client.steps.split_steps: a separator, default a blank line, "lines" or "re:PATTERN"); the
    text is split here, so every reader gets `steps` and nothing else."""

    id: MessageId
    problem: str
    steps: Steps
    gold_first_error: int | None = None
    policy_step: int | None = None
    metadata: dict[str, Scalar] = {}
    created_at: float = Field(default_factory=_now)

    @model_validator(mode="before")
    @classmethod
    def _split_response(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        has_steps, has_response = "steps" in data, "response" in data
        if has_steps and has_response:
            raise ValueError("give steps or response, not both")
        if not has_response:
            if "split" in data:
                raise ValueError("split applies to response only; this message has steps")
            if not has_steps:
                raise ValueError("give steps (a list of strings) or response (text to split into steps)")
            return data
        data = dict(data)
        response, mode = data.pop("response"), data.pop("split", DEFAULT_SPLIT)
        if not isinstance(mode, str):
            raise ValueError(f"split must be a string, got {_json_type(mode)}")
        try:
            data["steps"] = split_steps(response, mode, max_steps=MAX_STEPS)
        except StepSplitError as err:
            raise ValueError(str(err)) from None
        return data

    _gold_in_range = gold_in_range


class Reward(Message):
    """Per-step scores for one trajectory; mu/sigma cover the scored prefix (len <= n_steps)."""

    id: MessageId
    mu: list[float]
    sigma: list[Annotated[float, Field(ge=0)]]
    first_error: StepIndex
    selected: bool
    model_version: Count
    n_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)]
    truncated: bool
    round_id: Count
    scored_at: float = Field(default_factory=_now)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.mu) != len(self.sigma):
            raise ValueError(f"mu has {len(self.mu)} values but sigma has {len(self.sigma)}")
        if len(self.mu) > self.n_steps:
            raise ValueError(f"{len(self.mu)} scores for only n_steps={self.n_steps}")
        _check_step_index("first_error", self.first_error, self.n_steps)
        return self


class AnnotationRequest(Message):
    """A trajectory the selector wants judged."""

    id: MessageId
    problem: str
    steps: Steps
    gold_first_error: int | None = None
    round_id: Count
    model_version: Count
    mu: list[float]
    metadata: dict[str, Scalar] = {}  # the trajectory's own (e.g. its error kind, policy step), for reports
    requested_at: float = Field(default_factory=_now)
    # Set by a judge that gave up on this request for good (the reason): sent back on the
    # candidates topic so that the round keeper refunds its charge, once.
    judge_gave_up: str | None = None

    _gold_in_range = gold_in_range


class Label(Message):
    """A judge's verdict; carries the text so the trainer can redo the forward pass."""

    id: MessageId
    first_error: StepIndex
    n_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)]
    judge: str
    round_id: Count
    problem: str
    steps: Steps
    judged_at: float = Field(default_factory=_now)
    latency_s: Annotated[float, Field(ge=0)] = 0.0
    # What the version that asked for this label predicted: every label is first a test of
    # that version (prequential evaluation), then a training example.
    scored_version: Count | None = None
    mu: list[float] | None = None
    metadata: dict[str, Scalar] = {}
    # For audits: what the judge answered (its end, where the verdict is) and which prompt asked.
    answer: str | None = None
    prompt_version: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.n_steps == len(self.steps):
            _check_step_index("first_error", self.first_error, self.n_steps)
            return self
        raise ValueError(f"n_steps={self.n_steps} but {len(self.steps)} steps were sent")


class ModelVersion(Message):
    """A published (or refused) checkpoint; the versions topic is compacted by version."""

    version: Count
    location: str
    parent: int | None
    metrics: dict[str, float] = {}
    created_at: float = Field(default_factory=_now)
    status: Literal["published", "rejected", "rolled_back"] = "published"
    reason: str | None = None


class ControlCommand(Message):
    """An operator command; nonce and signature let a receiver refuse replays and forgeries."""

    id: MessageId = Field(default_factory=lambda: str(uuid.uuid4()))
    command: Literal["status", "pause", "resume", "reset-round", "rollback", "set", "consolidate"]
    args: dict[str, Scalar] = {}
    issued_at: float = Field(default_factory=_now)
    nonce: str = Field(default_factory=lambda: uuid.uuid4().hex)
    signature: str | None = None


class ControlAck(Message):
    """One process's answer to a ControlCommand."""

    command_id: MessageId
    role: str
    process_id: str
    ok: bool
    message: str = ""
    state: dict[str, Any] = {}
    at: float = Field(default_factory=_now)


class DeadLetter(Message):
    """A message no consumer could use, kept with its origin and the reason."""

    source_topic: str
    partition: int | None
    offset: int | None
    key: str | None
    raw_b64: str
    reason: str
    error_type: str
    raw_bytes: Count = 0  # the original payload's size; raw_b64 may hold only a prefix
    raw_truncated: bool = False
    at: float = Field(default_factory=_now)
    judge_answer: str | None = None  # a judge failure's answer text (the end of it), e.g. one that did not parse


class BrokerEpoch(Message):
    """The first record of the epoch topic: which life of the broker's data this is.

    A broker that comes back without its data (the embedded one keeps it in memory) has lost
    this record too, so a process that finds another epoch, or none, knows to start over."""

    epoch: str
    created_at: float = Field(default_factory=_now)


M = TypeVar("M", bound=Message)

ALL_SCHEMAS: tuple[type[Message], ...] = (
    Trajectory, Reward, AnnotationRequest, Label, ModelVersion, ControlCommand, ControlAck, DeadLetter, BrokerEpoch,
)  # fmt: skip


def encode(msg: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """UTF-8 JSON; refuses (MessageError) what decode() on the other side would refuse for size."""
    raw = msg.model_dump_json().encode("utf-8")
    if len(raw) > max_bytes:
        raise MessageError(f"{type(msg).__name__} encodes to {len(raw)} bytes, over the {max_bytes}-byte limit")
    return raw


def decode(schema: type[M], raw: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse and validate one payload; every failure is a MessageError."""
    name = schema.__name__
    if raw is None:
        raise MessageError(f"{name}: empty payload (a tombstone or null value)")
    if len(raw) > max_bytes:
        raise MessageError(f"{name}: payload of {len(raw)} bytes is over the {max_bytes}-byte limit")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"{name}: invalid UTF-8 at byte {exc.start}: {exc.reason}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MessageError(f"{name}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
        raise MessageError(f"{name}: unreadable JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"{name}: expected a JSON object, got {_json_type(obj)}")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:  # 1.0 and true are not 1
        raise MessageError(f"{name}: unsupported schema_version {version!r} (this build reads {SCHEMA_VERSION})")
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        raise MessageError(f"{name}: {summarise(exc)}") from None
    except RecursionError:
        raise MessageError(f"{name}: payload nested too deeply") from None


def summarise(exc: ValidationError) -> str:
    """'field: message; field.0: message' for every pydantic error, without echoing the input."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        text = err["msg"].removeprefix("Value error, ")  # our own validators' messages read better bare
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts)


def dead_letter(
    source_topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | str | None,
    raw: bytes | None,
    error: BaseException | str,
) -> DeadLetter:
    """Wrap an unusable record for the dead-letter topic."""
    raw = raw or b""
    kept = raw[:MAX_DEAD_LETTER_RAW_BYTES]
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="backslashreplace")
    if isinstance(error, MessageError):
        reason = error.reason
    elif isinstance(error, BaseException):
        reason = str(error) or type(error).__name__
    else:
        reason = error
    return DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        key=key,
        raw_b64=base64.b64encode(kept).decode("ascii"),
        reason=_bounded(reason),
        error_type=type(error).__name__ if isinstance(error, BaseException) else "",
        raw_bytes=len(raw),
        raw_truncated=len(kept) < len(raw),
    )


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _json_type(obj: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)
