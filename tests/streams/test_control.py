"""The control plane: signing, live settings, what each role does, and ctl over a real broker."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time

import pytest
import structlog
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from actprm.daemon.cli.main import app
from actprm.daemon.cli.ctl import format_status, overall
from actprm.daemon.settings import Settings
from actprm.client import messages
from actprm.streams.control import (
    apply_setting,
    handle_command,
    receive,
    run_control_consumer,
    sign,
    verify,
)
from actprm.streams.tools.ctl_client import CtlError, asend_command
from actprm.streams.state.ledger import META, PENDING, TRAINED
from actprm.client.messages import ControlAck, ControlCommand, Label
from actprm.streams.process import Process
from actprm.streams.kafka.sender import Sender
from actprm.streams.roles.training import LABELS_FROM_ROUND
from support.roles import event, memory_process, sent_to
from actprm.client.topics import Topics, ensure_topics

SECRET = "s3cret"
NOW = 1_000_000.0


def command(**kw) -> ControlCommand:
    base = {"id": "c1", "command": "pause", "args": {"scope": "train"}, "issued_at": NOW, "nonce": "n1"}
    return ControlCommand(**(base | kw))


# ---------------------------------------------------------------- sign / verify


def test_signature_is_hmac_sha256_of_canonical_json_without_the_signature():
    # Keys sorted, no spaces, the signature field left out.
    body = b'{"args":{"scope":"train"},"command":"pause","id":"c1","issued_at":1000000.0,"nonce":"n1","schema_version":1}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert sign(command(), SECRET).signature == expected
    # The signature survives the wire: encode -> decode -> verify.
    wire = messages.decode(ControlCommand, messages.encode(sign(command(), SECRET)))
    assert verify(wire, SECRET, {}, NOW, 300) is None


def test_verify_accepts_a_good_command_and_remembers_its_nonce():
    seen: dict[str, float] = {}
    assert verify(sign(command(), SECRET), SECRET, seen, NOW + 1, 300) is None
    assert seen == {"n1": NOW}


@pytest.mark.parametrize("cmd, secret, reason", [
    (command(), SECRET, "unsigned"),
    (sign(command(), "other"), SECRET, "bad signature"),
    (sign(command(), SECRET).model_copy(update={"args": {"scope": "all"}}), SECRET, "bad signature"),  # tampered
    (sign(command(issued_at=NOW - 301), SECRET), SECRET, "outside the ±300s window"),  # too old
    (sign(command(issued_at=NOW + 301), SECRET), SECRET, "outside the ±300s window"),  # from the future
    (command(issued_at=NOW - 301), None, "outside"),  # freshness is checked without a secret too
])
def test_verify_rejects(cmd, secret, reason):
    seen: dict[str, float] = {}
    got = verify(cmd, secret, seen, NOW, 300)
    assert got is not None and reason in got
    assert seen == {}  # a refused command leaves no nonce behind


def test_verify_rejects_a_replayed_nonce_and_forgets_nonces_past_the_window():
    seen: dict[str, float] = {}
    cmd = sign(command(), SECRET)
    assert verify(cmd, SECRET, seen, NOW, 300) is None
    assert "replayed" in verify(cmd, SECRET, seen, NOW + 10, 300)
    # 301 s later the nonce is forgotten, and the replay is refused for its age instead.
    assert "outside" in verify(cmd, SECRET, seen, NOW + 301, 300)
    assert seen == {}
    # Without a secret, unsigned commands pass but replays still do not.
    assert verify(command(nonce="n2"), None, seen, NOW, 300) is None
    assert "replayed" in verify(command(nonce="n2"), None, seen, NOW, 300)


# ---------------------------------------------------------------- apply_setting


def test_apply_setting_parses_validates_and_applies():
    s = Settings()
    assert apply_setting(s, "selection.delta_pred", "0.9") == 0.9 and s.selection.delta_pred == 0.9
    assert apply_setting(s, "update.batch_size", "32") == 32 and s.update.batch_size == 32
    assert apply_setting(s, "selection.strategy", "random") == "random" and s.selection.strategy == "random"


@pytest.mark.parametrize("key, value, words", [
    ("selection.delta_pred", "0.3", "selection.delta_pred: Input should be greater than 0.5"),
    ("update.batch_size", "1.5", "update.batch_size: Input should be a valid integer"),
    ("update.batch_size", "0", "update.batch_size: Input should be greater than or equal to 1"),
    ("selection.strategy", "best", "selection.strategy: Input should be 'actprm'"),
    ("kafka.bootstrap", "x:1", "kafka.bootstrap cannot be set on a running daemon"),
    ("nonsense", "1", "nonsense cannot be set"),
])
def test_apply_setting_refuses_and_changes_nothing(key, value, words):
    s = Settings()
    before = s.model_dump()
    with pytest.raises(ValueError) as err:
        apply_setting(s, key, value)
    assert words in str(err.value)
    assert s.model_dump() == before


# ---------------------------------------------------------------- handle_command on a real process


def tiny_settings(tmp_path, **kw) -> Settings:
    return Settings(state_dir=tmp_path, model={"backbone": "tiny", "n_heads": 4, "max_length": 256}, **kw)


@pytest.fixture
def topics(request) -> Topics:
    """Topics("t"); a broker test's are its own prefix's, created on the broker."""
    if request.node.get_closest_marker("broker") is None:
        return Topics("t")
    broker, prefix = request.getfixturevalue("broker"), request.getfixturevalue("topic_prefix")
    topics = Topics(prefix)
    asyncio.run(ensure_topics(broker.bootstrap, topics))
    return topics


@pytest.fixture
def rt(tmp_path, topics):
    """All three roles on the tiny backbone, in a fresh state dir; what they send is kept in rt.sent."""
    process, sent = memory_process(tiny_settings(tmp_path / "state"), topics=topics)
    process.sent = sent
    yield process
    process.close()


@pytest.fixture
def judge_rt(tmp_path, topics):
    """A judge-only process: no model, no round keeper."""
    process, _ = memory_process(tiny_settings(tmp_path / "judge"), ("judge",), topics)
    yield process
    process.close()


def do(rt, name, **args) -> ControlAck | None:
    return asyncio.run(handle_command(rt, ControlCommand(command=name, args=args)))


def test_status_answers_with_the_runtime_status(rt, judge_rt):
    ack = do(rt, "status")
    assert ack.ok and ack.role == "scorer,judge,trainer" and ack.process_id == rt.process_id
    s = ack.state
    assert (s["round"], s["budget_left"], s["served_version"], s["state"]) == (0, 1000, 0, "running")
    assert s["paused_consume"] is False and s["busy_s"] == {}
    judge_ack = do(judge_rt, "status")
    assert judge_ack.ok and judge_ack.role == "judge" and "round" not in judge_ack.state


def test_status_shows_the_label_counters_that_explain_a_stalled_trainer(rt, judge_rt):
    from actprm.daemon.cli.ctl import status_json

    label = Label(id="a", first_error=-1, n_steps=1, judge="oracle", round_id=0, problem="p", steps=["s"])
    labels = rt.topics.labels
    asyncio.run(rt.trainer.on_labels([event(labels, label), event(labels, label)]))  # received, then a duplicate
    assert do(rt, "reset-round").ok
    asyncio.run(rt.trainer.on_labels([event(labels, label.model_copy(update={"id": "b"}))]))  # of the closed round 0: stale
    acks = [do(rt, "status"), do(judge_rt, "status")]
    s = acks[0].state
    assert (s["labels_received"], s["labels_duplicate"], s["labels_stale_round"]) == (1, 1, 1)
    assert s["pending_labels"] == 0 and s["labels_replayed"] == 0
    assert "labels_received" not in acks[1].state  # a judge has no trainer counters
    o = status_json(acks)["overall"]
    assert {k: o[k] for k in ("labels_received", "labels_duplicate", "labels_stale_round", "pending_labels",
                              "labels_replayed")} == {"labels_received": 1, "labels_duplicate": 1,
                                                      "labels_stale_round": 1, "pending_labels": 0, "labels_replayed": 0}
    table = format_status(acks)
    assert "labels recv/dup/stale/pend/replay" in table and "1/1/1/0/0" in table
    assert "labels 1 received, 1 duplicate, 1 stale round, 0 pending, 0 replayed" in table


def test_pause_scopes(rt, judge_rt):
    ack = do(rt, "pause", scope="annotate")
    assert ack.ok and "rewards keep flowing" in ack.message
    assert rt.keeper.rounds.state.paused_annotate and not rt.keeper.rounds.state.paused_train and not rt.paused_consume
    assert ack.state["state"] == "paused (annotate)"
    assert do(judge_rt, "pause", scope="annotate") is None  # the round keeper's business only

    assert do(rt, "pause", scope="train").state["state"] == "paused (annotate, train)"
    assert do(rt, "resume", scope="annotate").ok and not rt.keeper.rounds.state.paused_annotate

    # all: every process stops consuming; the trainer also stops annotating and training.
    assert do(judge_rt, "pause", scope="all").ok and judge_rt.paused_consume
    ack = do(rt, "pause", scope="all")
    assert rt.paused_consume and ack.state["state"] == "paused (all)"
    do(rt, "resume", scope="all")
    assert not rt.paused_consume and not rt.keeper.rounds.state.paused_annotate and not rt.keeper.rounds.state.paused_train
    bad = do(rt, "pause", scope="everything")
    assert not bad.ok and "scope must be one of annotate, train, all" in bad.message


def pending_label(rt, label_id: str, round_id: int) -> Label:
    label = Label(id=label_id, first_error=-1, n_steps=1, judge="oracle", round_id=round_id, problem="p", steps=["s"])
    assert rt.trainer.updates.receive(label)
    return label


def test_reset_round_drops_labels_of_the_old_round_unless_kept(rt, judge_rt):
    rt.keeper.rounds.admit("a")
    rt.keeper.rounds.admit("b")  # 2 requests in flight in round 0
    pending_label(rt, "a", 0)
    ack = do(rt, "reset-round", budget=5)
    assert ack.ok, ack.message
    assert "round 1 started with budget 5" in ack.message and "the 2 requests admitted in round 0" in ack.message
    assert "1 pending dropped" in ack.message
    st = rt.keeper.rounds.state
    assert (st.round_id, st.budget, st.used, st.left) == (1, 5, 0, 5)
    assert rt.settings.round.budget == 5
    assert not rt.ledger.has(PENDING, "a") and rt.ledger.has(TRAINED, "a")
    assert rt.ledger.get(META, LABELS_FROM_ROUND) == 1
    late = Label(id="b", first_error=0, n_steps=1, judge="oracle", round_id=0, problem="p", steps=["s"])
    assert not rt.trainer.accepts(late)  # the lead's on_labels drops it
    assert rt.trainer.accepts(late.model_copy(update={"round_id": 1}))

    pending_label(rt, "c", 1)
    ack = do(rt, "reset-round", keep_pending=True)
    assert ack.ok and "round 2 started with budget 5" in ack.message and "trained in this round" in ack.message
    assert rt.ledger.has(PENDING, "c")
    # The cut-off stays at round 1: round 1's late labels count, round 0's are still dropped.
    assert rt.trainer.accepts(late.model_copy(update={"round_id": 1})) and not rt.trainer.accepts(late)

    assert do(judge_rt, "reset-round") is None
    assert not do(rt, "reset-round", budget=-1).ok


def test_rollback_publishes_a_new_version_with_the_old_weights(rt, judge_rt):
    _, v0 = rt.trainer.store.load(0)
    fields = rt.trainer.store.manifest(0).model_dump() | {"kind": "update", "parent": 0}
    rt.trainer.store.save({k: t + 1 for k, t in v0.items()}, fields)  # version 1: different weights
    ack = do(rt, "rollback", version=0)
    assert ack.ok, ack.message
    assert ack.state["version"] == 2 and "weights of version 0" in ack.message
    m2, v2 = rt.trainer.store.load(2)
    assert m2.rolled_back_from == 0 and all(v2[k].equal(v0[k]) for k in v0)
    announced = sent_to(rt.sent, rt.topics.versions, messages.ModelVersion)
    assert [(a.version, a.status) for a in announced] == [(2, "rolled_back")]
    assert rt.scorer.serving.current.version == 2  # this process serves too: switched at once

    missing = do(rt, "rollback", version=9)
    assert not missing.ok and missing.message == "version 9 does not exist (have 0..2)"
    assert rt.trainer.store.versions() == [0, 1, 2]
    assert do(judge_rt, "rollback", version=0) is None


def test_set_applies_live_and_refuses_bad_values(rt):
    old_selector = rt.scorer.selector
    ack = do(rt, "set", key="selection.delta_std", value="0.01")
    assert ack.ok and ack.message == "selection.delta_std = 0.01"
    assert rt.settings.selection.delta_std == 0.01 and rt.scorer.selector is not old_selector
    assert do(rt, "set", key="update.batch_size", value="4").ok and rt.trainer.updates.batch_size == 4
    assert do(rt, "set", key="round.budget", value="7").ok and rt.keeper.rounds.state.budget == 7
    bad = do(rt, "set", key="update.batch_size", value="-1")
    assert not bad.ok and bad.message.startswith("update.batch_size: ")
    assert rt.settings.update.batch_size == 4 and rt.trainer.updates.batch_size == 4


def test_receive_skips_old_commands_and_rejects_unsigned_ones_when_a_secret_is_set(judge_rt):
    seen: dict[str, float] = {}
    old = ControlCommand(command="status", issued_at=judge_rt.started_at - 1)
    assert asyncio.run(receive(judge_rt, messages.encode(old), None, seen)) is None
    assert asyncio.run(receive(judge_rt, b"not json", None, seen)) is None
    ack = asyncio.run(receive(judge_rt, messages.encode(ControlCommand(command="status")), SECRET, seen))
    assert not ack.ok and ack.message.startswith("rejected: unsigned")
    good = sign(ControlCommand(command="status"), SECRET)
    assert asyncio.run(receive(judge_rt, messages.encode(good), SECRET, seen)).ok
    again = asyncio.run(receive(judge_rt, messages.encode(good), SECRET, seen))
    assert not again.ok and "replayed" in again.message


def test_a_command_sent_while_the_process_loads_is_answered(rt):
    # Version 0 is written while the process loads, seconds before it is ready on a busy machine;
    # whoever waits for it and then sends a command must get an answer, not silence.
    v0_written = (rt.store.root / "v000000").stat().st_mtime
    assert rt.started_at <= v0_written
    sent_once_v0_appeared = ControlCommand(command="status", issued_at=v0_written)
    ack = asyncio.run(receive(rt, messages.encode(sent_once_v0_appeared), None, {}))
    assert ack is not None and ack.ok


# ---------------------------------------------------------------- over the embedded broker


async def _responders(bootstrap: str, processes: list[Process], body):
    """Run run_control_consumer for each process (acks sent by a real producer) around `body()`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()

    async def produce(topic, key, value):
        return await producer.send(topic, key=key, value=value)

    tasks = []
    for process in processes:
        process.sender = Sender(produce, process.topics.dead_letters)
        tasks.append(asyncio.create_task(run_control_consumer(process, bootstrap)))
    try:
        return await body()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()


@pytest.mark.broker
def test_ctl_client_against_daemons_on_the_broker(broker, topic_prefix, rt, judge_rt):
    async def body():
        send = lambda name, secret=None, **kw: asend_command(  # noqa: E731
            broker.bootstrap, topic_prefix, ControlCommand(command=name, args=kw), secret, timeout_s=15)
        started = time.monotonic()
        status = await send("status")
        status_s = time.monotonic() - started
        paused = await asend_command(broker.bootstrap, topic_prefix,
                                     ControlCommand(command="pause", args={"scope": "annotate"}), None, 15, expect=1)
        # An old command (issued before the processes started) gets no answer.
        with pytest.raises(CtlError) as err:
            await asend_command(broker.bootstrap, topic_prefix, ControlCommand(command="status", issued_at=1.0),
                                None, timeout_s=1)
        return status, status_s, paused, str(err.value)

    status, status_s, paused, no_answer = asyncio.run(_responders(broker.bootstrap, [rt, judge_rt], body))
    assert [a.role for a in status] == ["judge", "scorer,judge,trainer"] and all(a.ok for a in status)
    assert status_s < 10  # returned once the answers settled, not at the timeout
    assert [(a.role, a.ok) for a in paused] == [("scorer,judge,trainer", True)] and rt.keeper.rounds.state.paused_annotate
    assert no_answer == f"no daemon answered within 1s on {broker.bootstrap} (topic {topic_prefix}.control)"

    table = format_status(status)
    assert "budget used/left" in table.splitlines()[0] and "0/1000" in table
    assert overall(status)["served_versions"] == [0]
    assert table.splitlines()[-1].startswith("overall: 2 processes | round 0 running, budget 0 used / 1000 left")


@pytest.mark.broker
def test_signed_commands_over_the_broker(broker, topic_prefix, tmp_path, topics):
    runtime, _ = memory_process(tiny_settings(tmp_path, control_secret=SECRET), ("judge",), topics)

    async def body():
        results = []
        for secret in (SECRET, "wrong", None):
            results.append(await asend_command(broker.bootstrap, topic_prefix, ControlCommand(command="status"),
                                               secret, timeout_s=15, expect=1))
        return results

    try:
        good, wrong, unsigned = asyncio.run(_responders(broker.bootstrap, [runtime], body))
    finally:
        runtime.close()
    assert good[0].ok
    assert not wrong[0].ok and wrong[0].message == "rejected: bad signature (wrong secret or altered command)"
    assert not unsigned[0].ok and unsigned[0].message == "rejected: unsigned command (this daemon has a control secret)"


@pytest.mark.broker
def test_ctl_cli_commands(broker, topic_prefix, rt, monkeypatch):
    stop = threading.Event()

    def responder():  # the daemon's loop, in its own thread: the CLI runs asyncio.run itself
        async def body():
            while not stop.is_set():
                await asyncio.sleep(0.05)
        asyncio.run(_responders(broker.bootstrap, [rt], body))

    thread = threading.Thread(target=responder, daemon=True)
    thread.start()
    monkeypatch.delenv("ACTPRM_CONTROL_SECRET", raising=False)
    runner = CliRunner()
    opts = ["--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix, "--timeout", "15"]
    try:
        status = runner.invoke(app, ["ctl", "status", *opts])
        as_json = runner.invoke(app, ["ctl", "status", "--json", *opts])
        paused = runner.invoke(app, ["ctl", "pause", "--scope", "train", *opts])
        setting = runner.invoke(app, ["ctl", "set", "scorer.max_batch", "3", *opts])
        refused = runner.invoke(app, ["ctl", "rollback", "5", *opts])
        bad_value = runner.invoke(app, ["ctl", "set", "scorer.max_batch", "0", *opts])
    finally:
        stop.set()
        thread.join(30)
        structlog.reset_defaults()  # the app callback pointed structlog at CliRunner's (now closed) stderr
    assert status.exit_code == 0, status.output
    assert "ACTPRM_CONTROL_SECRET is not set" in status.stderr
    assert "overall: 1 process | round 0 running" in status.stdout
    assert '"budget_left": 1000' in as_json.stdout and '"processes"' in as_json.stdout
    assert paused.exit_code == 0 and paused.stdout.startswith("ok") and "training paused" in paused.stdout
    assert rt.keeper.rounds.state.paused_train
    assert setting.exit_code == 0 and "scorer.max_batch = 3" in setting.stdout and rt.settings.scorer.max_batch == 3
    assert refused.exit_code == 1 and "FAILED" in refused.stdout and "version 5 does not exist" in refused.stdout
    assert bad_value.exit_code != 0 and rt.settings.scorer.max_batch == 3  # refused before anything was sent


@pytest.mark.broker
def test_ctl_reports_no_daemon(broker, topic_prefix):
    cmd = ControlCommand(command="status")
    with pytest.raises(CtlError, match=f"no daemon on {broker.bootstrap}: topic {topic_prefix}.control does not exist"):
        asyncio.run(asend_command(broker.bootstrap, topic_prefix, cmd, None, timeout_s=1))
    asyncio.run(ensure_topics(broker.bootstrap, Topics(topic_prefix)))
    started = time.monotonic()
    with pytest.raises(CtlError, match=r"no daemon answered within 1\.5s on .* \(topic .*\.control\)"):
        asyncio.run(asend_command(broker.bootstrap, topic_prefix, cmd, None, timeout_s=1.5))
    assert time.monotonic() - started < 10
