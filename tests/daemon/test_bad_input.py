"""Bad input: generated malformed payloads are each refused by the codec with a reason, and
every refusal makes a dead letter that itself encodes within Kafka's limits.

CI runs 2,000 generated payloads; the long suite (`make test-faults`) runs 10,000. Through a
running daemon: 300 generated payloads and one of 10 MB (Tansu takes it) among valid ones.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actprm.client import messages
from actprm.client.messages import MAX_REASON_CHARS, MessageError, Trajectory

VALID = {"id": "t-1", "problem": "2+2?", "steps": ["2+2=4", "so 4"], "schema_version": 1}
SEPARATORS = ["<|im_end|>", "</s>", "<|endoftext|>", "\n\n", "ки", "<extra_0>", "\x00"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
wrong_types = {"id": st.one_of(st.integers(), st.none(), st.lists(st.text(), max_size=2), st.just("")),
               "problem": st.one_of(st.integers(), st.none(), st.lists(st.text(), max_size=2)),
               "steps": st.one_of(st.just([]), st.text(max_size=5), st.lists(st.integers(), min_size=1, max_size=3),
                                  st.lists(st.just("   "), min_size=1, max_size=3), st.just(["s"] * 513)),
               "gold_first_error": st.one_of(st.text(max_size=3), st.integers(min_value=3, max_value=10**6),
                                             st.integers(max_value=-2)),
               "schema_version": st.one_of(st.integers().filter(lambda v: v != 1), st.text(max_size=3), st.just(True)),
               "metadata": st.one_of(st.text(max_size=3), st.dictionaries(st.text(max_size=3), st.lists(st.integers()), min_size=1))}


@st.composite
def malformed(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "utf8", "type", "missing", "extra", "shape", "separator_bad", "number"]))
    if kind == "json":  # not JSON at all, or truncated JSON
        text = json.dumps(VALID)
        return draw(st.one_of(st.just(text[: draw(st.integers(0, len(text) - 1))].encode()),
                              st.text(max_size=50).filter(lambda t: not _is_object(t)).map(str.encode)))
    if kind == "utf8":  # invalid UTF-8 somewhere inside
        good = json.dumps(VALID).encode()
        at = draw(st.integers(0, len(good)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return good[:at] + bad + good[at:]
    obj = dict(VALID)
    if kind == "type":
        field = draw(st.sampled_from(sorted(wrong_types)))
        obj[field] = draw(wrong_types[field])
    elif kind == "missing":
        for field in draw(st.sets(st.sampled_from(["id", "problem", "steps"]), min_size=1)):
            del obj[field]
    elif kind == "extra":
        obj[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in Trajectory.model_fields))] = draw(json_scalars)
    elif kind == "shape":  # valid JSON that is not an object
        return json.dumps(draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3)))).encode()
    elif kind == "separator_bad":  # separator tokens in text do not rescue an otherwise bad message
        obj["steps"] = [draw(st.sampled_from(SEPARATORS)) * draw(st.integers(1, 3))] + ([] if draw(st.booleans()) else [1])
        obj["id"] = draw(st.sampled_from(["", None, 5]))
    elif kind == "number":  # numbers JSON allows but the schema refuses
        obj["gold_first_error"] = draw(st.sampled_from([1e400, -1e400, 10**400, 0.5]))
        return json.dumps(obj).replace("Infinity", "1e400").encode()
    return json.dumps(obj).encode()


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _check(raw: bytes, seen: list) -> None:
    seen.append(1)
    with pytest.raises(MessageError) as caught:
        messages.decode(Trajectory, raw)
    reason = caught.value.reason
    assert reason and len(reason) <= MAX_REASON_CHARS
    dl = messages.dead_letter("t.trajectories", 0, 7, b"\xffkey", raw, caught.value)
    assert dl.reason == reason and dl.raw_bytes == len(raw)
    messages.decode(messages.DeadLetter, messages.encode(dl, max_bytes=1024 * 1024))


def _run(n: int) -> int:
    seen: list = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(malformed())
    def each(raw: bytes) -> None:
        _check(raw, seen)

    each()
    return len(seen)


def test_generated_malformed_payloads_are_each_refused_with_a_reason():
    assert _run(2_000) >= 2_000


@pytest.mark.faults
def test_ten_thousand_generated_malformed_payloads_are_each_refused_with_a_reason():
    assert _run(10_000) >= 10_000


def test_huge_and_oversized_payloads_are_refused_and_their_dead_letters_stay_small():
    for raw in (json.dumps(VALID | {"problem": "x" * (10 * 1024 * 1024)}).encode(),  # 10 MB
                json.dumps(VALID | {"steps": ["s"] * 100_000}).encode()):  # huge step list
        with pytest.raises(MessageError) as caught:
            messages.decode(Trajectory, raw)
        dl = messages.dead_letter("t.trajectories", 0, 1, None, raw, caught.value)
        assert dl.raw_truncated and len(messages.encode(dl)) < 1024 * 1024
    # Separator tokens inside otherwise valid text are data, not structure: accepted as is.
    ok = messages.decode(Trajectory, json.dumps(VALID | {"steps": [f"a {s} b" for s in SEPARATORS[:6]]}).encode())
    assert ok.steps[0] == "a <|im_end|> b"


def _generated(n: int) -> list[bytes]:
    found: list[bytes] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(malformed())
    def each(raw: bytes) -> None:
        found.append(raw)

    each()
    return found


@pytest.mark.broker
@pytest.mark.slow
def test_malformed_messages_through_a_running_daemon_become_dead_letters_and_the_worker_goes_on(broker, topic_prefix, tmp_path):
    """A few hundred generated malformed payloads and one 10 MB payload, interleaved with valid
    trajectories on the trajectories topic: each malformed one is a dead letter with a reason,
    every valid one is rewarded, and the worker never stops."""
    from actprm.streams.tools.produce import synthetic_trajectories
    from actprm.client.topics import Topics
    from support.daemon import Daemon, read_topic
    from support.kafka_io import produce_raw

    topics, bs = Topics(topic_prefix), broker.bootstrap
    bad = _generated(300)
    bad.append(json.dumps(VALID | {"id": "huge", "problem": "x" * (10 * 1024 * 1024)}).encode())  # 10 MB
    good = [t.model_copy(update={"id": f"ok-{t.id}"}) for t in synthetic_trajectories(30, seed=3)]
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, raw in enumerate(bad):
        records.append((f"bad-{i}".encode(), raw))
        if i % 10 == 0 and good[i // 10:i // 10 + 1]:
            t = good[i // 10]
            records.append((t.id.encode(), messages.encode(t)))
    records += [(t.id.encode(), messages.encode(t)) for t in good[len(bad) // 10 + 1:]]
    assert {k for k, _ in records} >= {t.id.encode() for t in good}

    daemon = Daemon(bs, topic_prefix, tmp_path, env={"ACTPRM_KAFKA__PARTITIONS": "2"}).start()
    try:
        produce_raw(bs, topics.trajectories, records)  # the broker took the 10 MB record: no error here
        want_bad = {f"bad-{i}" for i in range(len(bad))}
        dead = read_topic(bs, topics.dead_letters, until=lambda got: want_bad <= {d.key for d in got}, timeout_s=120)
        rewards = read_topic(bs, topics.rewards, until=lambda got: {t.id for t in good} <= {r.id for r in got},
                             timeout_s=120)
        assert daemon.proc.poll() is None, f"the worker stopped:\n{daemon.stderr()[-3000:]}"
        assert daemon.terminate(60) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()
    mine = [d for d in dead if d.key in want_bad]
    assert {d.key for d in mine} == want_bad and len(mine) == len(want_bad), "a malformed message was lost or doubled"
    assert all(d.reason and d.source_topic == topics.trajectories for d in mine)
    huge = next(d for d in mine if d.key == f"bad-{len(bad) - 1}")
    assert huge.raw_bytes > 10 * 1024 * 1024 and huge.raw_truncated
    assert {r.id for r in rewards} == {t.id for t in good}
    final = daemon.final_status()
    assert final["dead_lettered"] == len(bad) and final["scored"] == len(good), final
