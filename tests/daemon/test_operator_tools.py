"""The operator tools (`ctl`, `produce`, `tail`) connect as the daemon does: the one Settings
(ACTPRM_KAFKA__* env, --config, SASL/TLS included), --bootstrap only overriding; and a broker
that cannot be reached is one line naming the address, exit 1, for them and for `run`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter

import pytest

from actprm.client.topics import Topics
from actprm.daemon.cli.connect import kafka_target
from actprm.streams.tools.produce import produce_trajectories, synthetic_trajectories
from support.daemon import ACTPRM, Daemon, read_topic
from support.wait import wait_until
from support.network import free_port
from test_cli import _one_line_error, actprm


def test_the_tools_take_kafka_security_from_the_daemons_settings(tmp_path, monkeypatch):
    for name in ("ACTPRM_CONFIG", "ACTPRM_KAFKA__BOOTSTRAP", "ACTPRM_KAFKA__TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    assert (kafka_target().bootstrap, kafka_target().topic_prefix, kafka_target().options) == ("127.0.0.1:9092", "actprm", {})
    config = tmp_path / "cluster.toml"
    config.write_text('[kafka]\nbootstrap = "kafka-1:9093"\ntopic_prefix = "prod"\nsecurity_protocol = "SASL_SSL"\n'
                      'sasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "actprm"\n')
    monkeypatch.setenv("ACTPRM_KAFKA__SASL_PASSWORD", "from-env")
    t = kafka_target(config)
    assert (t.bootstrap, t.topic_prefix) == ("kafka-1:9093", "prod")
    assert t.options["security_protocol"] == "SASL_SSL" and t.options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert t.options["sasl_plain_username"] == "actprm" and t.options["sasl_plain_password"] == "from-env"
    assert t.options["ssl_context"] is not None
    # --bootstrap / --topic-prefix override only those two; the credentials stay.
    o = kafka_target(config, bootstrap="kafka-2:9093", topic_prefix="canary")
    assert (o.bootstrap, o.topic_prefix, o.options["sasl_plain_username"]) == ("kafka-2:9093", "canary", "actprm")


@pytest.mark.broker
def test_produce_tail_and_ctl_read_the_broker_from_the_config_file(broker, topic_prefix, tmp_path, monkeypatch):
    for name in ("ACTPRM_CONFIG", "ACTPRM_KAFKA__BOOTSTRAP", "ACTPRM_KAFKA__TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "actprm.toml"
    config.write_text(f'[kafka]\nbootstrap = "{broker.bootstrap}"\ntopic_prefix = "{topic_prefix}"\n')
    env = {}  # nothing but the file names the broker (an ACTPRM_KAFKA__* variable would beat it)
    seeds = []
    for _ in range(2):  # two calls without --seed: other ids, so nothing is deduplicated away
        produced = actprm("produce", "--synthetic", "3", "--config", str(config), env=env, timeout=120)
        assert produced.returncode == 0, produced.stderr
        out = json.loads(produced.stdout.strip().splitlines()[-1])
        assert (out["produced"], out["skipped"]) == (3, 0)
        seeds.append(out["seed"])
    again = actprm("produce", "--synthetic", "3", "--seed", str(seeds[0]), "--config", str(config), env=env, timeout=120)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"produced": 3, "skipped": 0, "seed": seeds[0]}
    tailed = actprm("tail", "trajectories", "--limit", "9", "--config", str(config), env=env, timeout=60)
    assert tailed.returncode == 0, tailed.stderr
    ids = [json.loads(line)["id"] for line in tailed.stdout.splitlines() if line.strip()]
    assert len(ids) == 9 and len(set(ids)) == 6  # --seed repeats a call's ids, no seed never does
    assert {f"wp-{seeds[0]}-{i}" for i in range(3)} <= set(ids)
    # No daemon on this prefix: ctl says so about the configured broker, not 127.0.0.1:9092.
    status = actprm("ctl", "status", "--timeout", "2", "--config", str(config), env=env, timeout=60)
    _one_line_error(status, f"no daemon on {broker.bootstrap}: topic {topic_prefix}.control does not exist")


@pytest.mark.slow
@pytest.mark.parametrize("args", [("produce", "--synthetic", "5"), ("tail", "rewards"), ("ctl", "status"),
                                  ("run", "--backbone", "tiny")], ids=lambda a: a[0])
def test_an_unreachable_broker_is_one_line_naming_the_address(args):
    proc = actprm(*args, "--bootstrap", "127.0.0.1:1", timeout=120)
    assert proc.returncode == 1, proc.stderr
    _one_line_error(proc, "cannot reach Kafka at 127.0.0.1:1", "check the address")
    assert len([line for line in proc.stderr.splitlines() if not line.startswith("warning:")]) == 1, proc.stderr


@pytest.mark.slow
def test_a_daemon_restarts_on_actprm_broker_and_keeps_its_topics(topic_prefix, tmp_path):
    """`actprm broker` outlives a daemon: the restarted daemon finds its topics, its committed
    offsets and the rewards it sent, and scores only what is new."""
    port = free_port()
    broker = subprocess.Popen([ACTPRM, "broker", "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        started = json.loads(broker.stdout.readline())
        bootstrap = started["bootstrap"]
        assert bootstrap == f"127.0.0.1:{port}" and started["memory_limit_mb"] > 0
        topics = Topics(topic_prefix)
        stream = synthetic_trajectories(16, seed=11)
        first, second = stream[:8], stream[8:]
        daemon = Daemon(bootstrap, topic_prefix, tmp_path).start()
        try:
            produce_trajectories(bootstrap, topic_prefix, first)
            ids = {t.id for t in first}
            wait_until(lambda: ids <= {r.id for r in read_topic(bootstrap, topics.rewards, settle_s=0.2)}, 180,
                       interval=1, what="rewards of the first half")
            assert daemon.terminate() == 0
            daemon.start()  # the same state dir, the same broker
            produce_trajectories(bootstrap, topic_prefix, second)
            every = {t.id for t in stream}
            wait_until(lambda: every <= {r.id for r in read_topic(bootstrap, topics.rewards, settle_s=0.2)}, 180,
                       interval=1, what="rewards of the second half")
        finally:
            daemon.kill()
        rewards = Counter(r.id for r in read_topic(bootstrap, topics.rewards))
        assert set(rewards) == {t.id for t in stream} and max(rewards.values()) == 1  # nothing scored again
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(30) == 0


def test_ctl_starts_without_torch_or_transformers():
    """`actprm ctl` loads neither (issue 21: 7-11 s of imports under load): its settings come
    from the torch-free client settings, and the daemon's modules load only inside commands."""
    code = ("import sys, actprm.daemon.cli.main as c\n"
            "sys.argv = ['actprm', 'ctl', 'status', '--bootstrap', '127.0.0.1:1', '--timeout', '1']\n"
            "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'faust') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in proc.stderr  # and still the one-line error


def test_the_built_in_stream_is_generated_as_it_is_read():
    import itertools

    from actprm.model.data.synthetic import builtin_records, iter_builtin_records
    from actprm.streams.tools.produce import iter_synthetic_trajectories

    for markers in (False, True):
        assert list(iter_builtin_records(300, seed=4, markers=markers)) == builtin_records(300, seed=4, markers=markers)
    # A million-trajectory stream yields its first ones without building the rest.
    first = list(itertools.islice(iter_synthetic_trajectories(1_000_000, seed=2), 3))
    assert [t.id for t in first] == ["wp-2-0", "wp-2-1", "wp-2-2"]
