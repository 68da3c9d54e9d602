"""The torch-free client (streams/client, `actprm.client`): plain helpers, then a real broker,
a real scorer daemon on `tiny`, the daemon stopped, the broker restarted, a retry charged once."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import pytest

from actprm.client.ids import sample_id
from actprm.client.kafka import ItemError, RewardClient, StaleRewardError, to_trajectory
from actprm.client.messages import Reward
from actprm.client.outcome import QuietRepeats, RewardUnavailable, reduce_steps
from actprm.client.settings import ClientSettings, KafkaSettings, RewardSettings, load_client_settings
from actprm.client.steps import message_text
from actprm.client.topics import Topics
from support.daemon import Daemon, publish, read_topic


def test_reductions():
    mu = [0.9, 0.5, 0.8]
    assert reduce_steps(mu) == 0.5 and reduce_steps(mu, "last") == 0.8
    assert reduce_steps(mu, "mean") == pytest.approx(2.2 / 3) and reduce_steps(mu, "prod") == pytest.approx(0.36)
    assert reduce_steps([], "min") == 0.0
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        reduce_steps(mu, "max")


def test_a_sample_id_comes_from_its_content_so_a_retry_is_the_same_trajectory():
    a = to_trajectory({"prompt": "2+2?", "response": "2+2=4\n\nSo 4."}, split="\n\n")
    again = to_trajectory({"problem": "2+2?", "steps": ["2+2=4", "So 4."]}, split="\n\n")
    assert a.problem == "2+2?" and a.steps == ["2+2=4", "So 4."] and a.id == again.id == sample_id("2+2?", a.steps)
    assert to_trajectory({"prompt": "2+2?", "response": "2+2=4\n\nSo 5."}, split="\n\n").id != a.id
    assert to_trajectory({"prompt": "2+2?", "response": "2+2=4\n\nSo 4.", "key": 7}, split="\n\n").id != a.id
    assert sample_id("ab", ["c"]) != sample_id("a", ["bc"])  # parts are length-prefixed
    assert to_trajectory({"id": "mine", "problem": "p", "steps": ["x"]}, split="\n\n").id == "mine"
    assert to_trajectory({"prompt": "p", "response": "a\nb"}, split="lines").steps == ["a", "b"]
    with pytest.raises(ItemError, match="item 3: give steps"):
        to_trajectory({"problem": "p"}, split="\n\n", index=3)
    with pytest.raises(ItemError, match="give problem or prompt, not both"):
        to_trajectory({"problem": "p", "prompt": "p", "steps": ["x"]}, split="\n\n")
    with pytest.raises(ItemError, match="item 0: response has no steps"):
        to_trajectory({"prompt": "p", "response": "  "}, split="\n\n")
    with pytest.raises(ItemError, match="3 steps, over the limit of 2"):
        to_trajectory({"prompt": "p", "response": "a\n\nb\n\nc"}, split="\n\n", max_steps=2)
    with pytest.raises(ValueError, match="needs a Kafka broker"):
        RewardClient(KafkaSettings())


def test_message_text_reads_every_shape_frameworks_send():
    assert message_text("2+2?", "user") == "2+2?" and message_text(None, "assistant") == ""
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert message_text(prompt, "user") == "2+2?"
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image"},
                                          {"type": "text", "text": "2+2?"}]}]
    assert message_text(parts, "user") == "What is\n2+2?"
    completion = [{"role": "assistant", "content": "2+2 = 4."},
                  {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calc"}}]},
                  {"role": "tool", "content": "4"},
                  {"role": "assistant", "content": [{"type": "text", "text": "So 4."}]}]
    assert message_text(completion, "assistant") == "2+2 = 4.\n\ncalls calc\n\nSo 4."  # no step reads "None"
    assert message_text({"role": "assistant", "content": None}, "assistant") == ""


def test_client_settings_come_from_the_environment_and_the_daemons_toml(tmp_path):
    toml = tmp_path / "actprm.toml"
    toml.write_text('[kafka]\nbootstrap = "from-file:9092"\ntopic_prefix = "run7"\n'
                    '[gateway]\nreduce = "mean"\nport = 5001\nresponse_marker = "x"\n[model]\nbackbone = "tiny"\n')
    s = load_client_settings(toml, environ={"ACTPRM_KAFKA__BOOTSTRAP": "env:9092", "ACTPRM_GATEWAY__TIMEOUT_S": "7",
                                            "ACTPRM_GATEWAY__ON_FAILURE": "raise", "ACTPRM_MODEL__N_HEADS": "3"},
                             gateway={"fallback_reward": -1.0})
    assert (s.kafka.bootstrap, s.kafka.topic_prefix) == ("env:9092", "run7")  # environment over file
    assert (s.gateway.reduce, s.gateway.timeout_s, s.gateway.on_failure, s.gateway.fallback_reward) == ("mean", 7.0, "raise", -1.0)
    assert s.gateway.url == "http://127.0.0.1:5001"
    with pytest.raises(ValueError, match="timeout_s"):
        load_client_settings(environ={"ACTPRM_GATEWAY__TIMEOUT_S": "-1"})
    # The daemon's settings compose the same sections: one home for each value.
    from actprm.daemon.settings import Settings

    assert isinstance(Settings().gateway, RewardSettings) and Settings.model_fields["kafka"].annotation is KafkaSettings


def test_the_client_package_loads_no_torch_transformers_or_faust():
    code = ("import sys, actprm.client, actprm.client.trl, actprm.client.verl, actprm.client.openrlhf; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'faust', 'structlog', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_repeated_log_lines_are_let_through_once_per_window():
    quiet = QuietRepeats(window_s=60)
    record = lambda msg: logging.LogRecord("aiokafka.conn", logging.ERROR, "f", 1, msg, None, None)  # noqa: E731
    passed = [quiet.filter(record("Unable connect to %s")) for _ in range(300)]
    assert passed.count(True) == 1 and quiet.filter(record("another line"))


def _client(broker, prefix: str, **reward) -> ClientSettings:
    return ClientSettings(kafka=KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=prefix, partitions=2),
                          gateway=RewardSettings(**reward))


def _reward(i: str, version: int) -> Reward:
    return Reward(id=i, mu=[0.5], sigma=[0.1], first_error=-1, selected=False, model_version=version, n_steps=1,
                  truncated=False, round_id=0)


async def sent(client: RewardClient, produced: int, timeout_s: float = 10) -> None:
    """Wait until the client has sent `produced` samples (its waiters are registered before)."""
    deadline = time.monotonic() + timeout_s
    while client.stats["produced"] < produced:
        assert time.monotonic() < deadline, f"the client sent {client.stats['produced']} samples, not {produced}"
        await asyncio.sleep(0.01)


@pytest.mark.broker
def test_failures_are_the_fallback_or_raise_and_repeats_are_one_trajectory(broker, topic_prefix):
    """No scorer here: the test publishes the rewards itself, to see the client keep the first
    of two, refuse an old version, answer a retry from what it read, and name what never came."""
    async def scenario():
        async with RewardClient(_client(broker, topic_prefix, on_failure="raise")) as client:
            with pytest.raises(RewardUnavailable) as missing:
                await client.score([{"id": "never-1", "problem": "p", "steps": ["x"]},
                                    {"id": "never-2", "problem": "p", "steps": ["y"]}], timeout_s=1.0)
            assert missing.value.missing == ["never-1", "never-2"] and missing.value.sent
            assert "they were sent and will still be scored" in str(missing.value)

            # The same sample twice in one call is one trajectory, produced once, answered twice.
            produced = client.stats["produced"]
            call = asyncio.create_task(client.score([{"id": "dup-1", "problem": "p", "steps": ["x"]}] * 2, timeout_s=30))
            await sent(client, produced + 1)
            await publish(broker.bootstrap, client.topics.rewards, [_reward("dup-1", 3), _reward("dup-1", 4)])
            got = await call
            assert [r.model_version for r in got] == [3, 3] and client.stats["produced"] == produced + 1
            # A retry is answered at once from the reward already read: nothing is sent again.
            (again,) = await client.score([{"id": "dup-1", "problem": "p", "steps": ["x"]}], timeout_s=1)
            assert again.model_version == 3 and client.stats["answered_from_cache"] == 1
            assert client.stats["produced"] == produced + 1

            call = asyncio.create_task(client.score([{"id": "old-1", "problem": "p", "steps": ["x"]}], timeout_s=30,
                                                    min_version=5))
            await sent(client, produced + 2)
            await publish(broker.bootstrap, client.topics.rewards, [_reward("old-1", 4)])
            with pytest.raises(StaleRewardError, match=r"old-1 \(v4\)"):
                await call

        # The fallback policy: every sample gets an Outcome, bad ones with their reason; one outage line.
        async with RewardClient(_client(broker, topic_prefix, on_failure="fallback")) as client:
            outcomes = await client.score_each([{"problem": "p", "steps": ["never"]}, {"prompt": "p", "response": " "}],
                                               timeout_s=1.0)
            assert [o.failure for o in outcomes] == ["unavailable", "invalid"] and "no steps" in outcomes[1].error
            assert client.stats["fallbacks"] == 2 and client.stats["outages"] == 1
            assert client.outages.ongoing and client._deadline(60) == client.reward.outage_timeout_s

    asyncio.run(scenario())


@pytest.mark.broker
def test_a_timeout_says_truthfully_that_samples_were_not_sent(fresh_broker, topic_prefix):
    async def scenario():
        async with RewardClient(_client(fresh_broker, topic_prefix, on_failure="raise")) as client:
            fresh_broker.stop()
            started = time.monotonic()
            with pytest.raises(RewardUnavailable) as missing:
                await client.score([{"problem": "p", "steps": ["x"]}], timeout_s=2.0)
            assert time.monotonic() - started < 2.0 + 1.5  # the deadline holds while Kafka is away
            assert not missing.value.sent and "NOT sent" in str(missing.value)
            return client
    client = asyncio.run(scenario())  # and closing the client with its broker gone does not raise
    assert not client.started


@pytest.mark.broker
@pytest.mark.slow
def test_64_concurrent_calls_each_get_their_own_rewards(broker, topic_prefix, tmp_path):
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer").start()

    def items(call: int) -> list[dict]:
        # A distinct step count per item, so a reward handed to the wrong caller shows in n_steps.
        out = []
        for j in range(8):
            n = 1 + (call * 8 + j) % 7
            steps = [f"step {k} of call {call} item {j}" for k in range(n)]
            out.append({"problem": f"problem {call}.{j}", "steps": steps} if j % 2 else
                       {"prompt": f"problem {call}.{j}", "response": "\n\n".join(steps)})
        return out

    async def scenario():
        async with RewardClient(_client(broker, topic_prefix)) as client:
            await client.score(items(999)[:1], timeout_s=180)  # the daemon is up and serving
            calls = [items(c) for c in range(64)]
            ts = [client.trajectories(batch) for batch in calls]
            results = await asyncio.gather(*(client.score_trajectories(t, timeout_s=180) for t in ts))
            return ts, results, client.stats

    try:
        ts, results, stats = asyncio.run(scenario())
    finally:
        daemon.terminate()
    assert len(results) == 64
    for sent, got in zip(ts, results):
        assert [r.id for r in got] == [t.id for t in sent]
        assert [r.n_steps for r in got] == [len(t.steps) for t in sent]
        assert all(len(r.mu) == len(t.steps) for r, t in zip(got, sent))
    assert len({r.id for got in results for r in got}) == 64 * 8
    assert stats["produced"] == 1 + 64 * 8


@pytest.mark.broker
@pytest.mark.slow
def test_a_retried_sample_is_scored_once_and_charged_once(broker, topic_prefix, tmp_path):
    """Three calls for one sample, the last from a fresh client with nothing cached (another
    gateway replica, a restarted trainer): one score, one charge, one judge call, one answer."""
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer,judge",
                    env={"ACTPRM_SELECTION__STRATEGY": "full"}).start()
    item = {"problem": "What is 2+3?", "steps": ["2+3 = 5", "So 5."], "gold_first_error": -1}

    async def call() -> Reward:
        async with RewardClient(_client(broker, topic_prefix)) as client:
            return (await client.score([item], timeout_s=180))[0]

    async def twice() -> list[Reward]:
        async with RewardClient(_client(broker, topic_prefix)) as client:
            return [(await client.score([item], timeout_s=180))[0] for _ in range(2)]

    try:
        first, second = asyncio.run(twice())
        third = asyncio.run(call())
        t = Topics(topic_prefix)
        labels = read_topic(broker.bootstrap, t.labels, until=lambda got: len(got) >= 1, timeout_s=120)
        annotations = read_topic(broker.bootstrap, t.annotations, settle_s=2)
        rewards = read_topic(broker.bootstrap, t.rewards, settle_s=1)
    finally:
        daemon.terminate()
    assert first == second == third and first.selected
    assert [a.id for a in annotations] == [first.id] and [x.id for x in labels] == [first.id]  # charged, judged once
    assert [r.id for r in rewards] == [first.id] * 2  # scored once; the fresh client's retry got the kept reward again
    assert {r.scored_at for r in rewards} == {first.scored_at}


@pytest.mark.broker
@pytest.mark.slow
def test_a_daemon_that_goes_away_costs_seconds_and_a_few_log_lines_then_rewards_resume(broker, topic_prefix, tmp_path, caplog):
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer").start()
    items = [{"prompt": f"What is {i}+1?", "response": f"{i}+1 = {i + 1}.\n\nSo {i + 1}."} for i in range(4)]

    async def scenario():
        async with RewardClient(_client(broker, topic_prefix, timeout_s=8, outage_timeout_s=1)) as client:
            first = await client.score_each(items[:1], timeout_s=180)
            assert first[0].ok
            daemon.terminate()
            started = time.monotonic()
            during = [await client.score_each([items[1 + i % 3]]) for i in range(6)]
            took = time.monotonic() - started
            assert all(not o[0].ok and o[0].failure == "unavailable" for o in during)
            daemon.start()
            deadline = time.monotonic() + 180
            while not (await client.score_each(items[1:2], timeout_s=5))[0].ok:
                assert time.monotonic() < deadline, "rewards did not resume after the daemon restarted"
            return took, dict(client.stats)

    caplog.set_level(logging.DEBUG)
    try:
        took, stats = asyncio.run(scenario())
    finally:
        daemon.terminate()
    # The first failing call waits its deadline (8 s), the next five the outage deadline (1 s each).
    assert took < 8 + 5 * 1 + 4
    assert stats["fallbacks"] >= 6 and stats["outages"] == 1
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("actprm.client", "aiokafka"))]
    assert 1 <= len(lines) <= 10, [r.getMessage() for r in lines]


@pytest.mark.broker
@pytest.mark.slow
def test_an_open_client_gets_rewards_after_the_broker_lost_its_data(fresh_broker, topic_prefix, tmp_path):
    daemon = Daemon(fresh_broker.bootstrap, topic_prefix, tmp_path, "--role", "scorer,trainer").start()
    items = [{"prompt": f"Count to {i}.", "response": "\n\n".join(str(k) for k in range(1, i + 2))} for i in range(3)]

    async def scenario():
        async with RewardClient(_client(fresh_broker, topic_prefix, timeout_s=20, outage_timeout_s=5)) as client:
            for i in range(4):  # 40 rewards already read, so old offsets are far past a new broker's
                await client.score_each([{"prompt": f"warm {i}.{k}", "response": "a\n\nb"} for k in range(10)],
                                        timeout_s=180)
            await asyncio.to_thread(fresh_broker.restart)  # memory only: every topic is gone
            deadline = time.monotonic() + 240
            while True:
                got = await client.score_each(items)
                if all(o.ok for o in got):
                    return got, dict(client.stats)
                assert time.monotonic() < deadline, f"no rewards after the broker restarted: {dict(client.stats)}"

    try:
        got, stats = asyncio.run(scenario())
    finally:
        daemon.terminate()
    assert [o.reward.n_steps for o in got] == [1, 2, 3] and stats["restarts"] >= 1
