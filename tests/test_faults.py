"""The fault suite, short version (CI): real broker, real worker processes, real faults.

The long version (`make test-faults`) is tests/test_faults_long.py; the bad-input suite is
tests/test_bad_input.py. What each test proves is in its name and docstring.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from actprm.daemon.run import synthetic_trajectories
from actprm.streams.messages import Trajectory
from actprm.streams.tools import produce_trajectories
from actprm.streams.topics import Topics
from helpers_daemon import Daemon, consumed_ids, wait_until
from helpers_faults import child_pids, cpu_seconds, format_summary, run_crash_trials, topic_ids

pytestmark = [pytest.mark.broker, pytest.mark.slow]

OUTAGE_S = 10


def _stream(n: int, tag: str, seed: int = 7) -> list[Trajectory]:
    return [t.model_copy(update={"id": f"{tag}-{t.id}", "problem": f"({tag} {i}) {t.problem}"})
            for i, t in enumerate(synthetic_trajectories(n, seed=seed))]


def _feed_until_stopped(bootstrap: str, prefix: str, stop: threading.Event) -> None:
    """A producer of small batches, each with fresh metadata (as `actprm produce` is), until told."""
    for i in range(10_000):
        if stop.is_set():
            return
        try:
            produce_trajectories(bootstrap, prefix, _stream(2, f"busy{i}", seed=i))
        except Exception:  # noqa: BLE001  (the broker is going down under it)
            return
        time.sleep(0.05)


def test_sigkill_each_role_once_loses_nothing_and_repeats_nothing(broker, topic_prefix, tmp_path):
    """Scorer, judge and trainer in their own processes, each SIGKILLed once at a random moment
    while a stream flows: every trajectory is rewarded, judged once, trained once; versions only
    increase and every version on disk loads with its checksum."""
    report = run_crash_trials(broker.bootstrap, topic_prefix, tmp_path, n_traj=24, n_kills=3,
                              seed=random.randrange(1 << 16), kill_after_s=(1.0, 5.0),
                              kill_plan=tuple(random.sample(["scorer", "judge", "trainer"], 3)))
    print(format_summary([report.row]))
    assert not report.problems, "\n".join(report.problems)


def test_the_embedded_broker_dying_restarts_the_daemon_on_the_same_port_and_the_loop_resumes(topic_prefix, tmp_path):
    """The zero-setup default: the daemon's own broker is SIGKILLed (as the OOM killer would: it
    keeps everything in RAM). The daemon starts over as a whole process (same pid, exec) with a
    new broker on the same port, so producers keep their address; what the old broker held is
    gone, everything sent afterwards is rewarded and trained, and no label is trained twice."""
    daemon = Daemon("", topic_prefix, tmp_path).start()
    try:
        wait_until(lambda: "started the embedded broker" in daemon.stderr(), 60, what="the embedded broker")
        line = next(x for x in daemon.stderr().splitlines() if "started the embedded broker" in x)
        bootstrap = json.loads(line)["bootstrap"]
        wait_until(lambda: "serving" in daemon.stderr(), 60, what="the daemon serving")
        before, after = _stream(8, "pre"), _stream(8, "post", seed=11)
        produce_trajectories(bootstrap, topic_prefix, before)
        wait_until(lambda: {t.id for t in before} <= set(consumed_ids(daemon.store)), 120, interval=1,
                   what="the labels of the first stream trained")
        (old_broker,) = child_pids(daemon.proc.pid)
        os.kill(old_broker, signal.SIGKILL)
        wait_until(lambda: "the embedded broker stopped" in daemon.stderr(), 30, what="the death noticed")
        wait_until(lambda: daemon.stderr().count("started the embedded broker") == 2, 60, what="a new broker")
        produce_trajectories(bootstrap, topic_prefix, after)  # the address producers already know
        want = {t.id for t in after}
        wait_until(lambda: want <= topic_ids(bootstrap, Topics(topic_prefix).rewards), 120, interval=1, what="rewards")
        wait_until(lambda: want <= set(consumed_ids(daemon.store)), 120, interval=1, what="labels trained")
        (new_broker,) = child_pids(daemon.proc.pid)
        assert new_broker != old_broker
        assert daemon.terminate(90) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()
    assert max(consumed_ids(daemon.store).values()) == 1, "a label was trained twice"
    assert "UnknownError" not in daemon.stderr()


@pytest.mark.faults  # ~1 minute each: long suite only
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_broker_outage_is_logged_retried_without_spinning_and_the_daemon_resumes(fresh_broker, topic_prefix, tmp_path, busy):
    """Stop the broker under a running daemon, start it again. The embedded broker is memory
    only, so it comes back empty: the hardest case, as a durable Kafka keeps its data. The daemon
    stays up, holds its sends, logs the outage with backoff and does not spin; it then finds
    the broker's data gone, restarts its worker in the new epoch, and the whole loop resumes:
    everything sent afterwards is rewarded, judged, trained into a new version, with no send
    failing on a partition poisoned by a stale client."""
    broker = fresh_broker
    topics = Topics(topic_prefix)
    before, after = _stream(8, "pre"), _stream(8, "post", seed=11)
    daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path).start()
    try:
        produce_trajectories(broker.bootstrap, topic_prefix, before)
        wait_until(lambda: {t.id for t in before} <= set(consumed_ids(daemon.store)), 120, interval=1,
                   what="the labels of the first stream trained")
        versions_before = daemon.store.versions()
        feeding = threading.Event()
        if busy:  # the broker dies while the daemon has records in flight on every topic
            feeder = threading.Thread(target=_feed_until_stopped, args=(broker.bootstrap, topic_prefix, feeding), daemon=True)
            feeder.start()
            wait_until(lambda: len(topic_ids(broker.bootstrap, topics.rewards)) > 24, 60, interval=0.2, what="the flow")
        log_mark = len(daemon.stderr())
        broker.stop()
        feeding.set()
        cpu0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(OUTAGE_S)
        cpu_share = (cpu_seconds(daemon.proc.pid) - cpu0) / (time.monotonic() - t0)
        assert daemon.proc.poll() is None, f"the daemon died with the broker:\n{daemon.stderr()[-3000:]}"
        outage_log = daemon.stderr()[log_mark:]
        broker.start()  # same port, empty
        produce_trajectories(broker.bootstrap, topic_prefix, after)
        want = {t.id for t in after}
        wait_until(lambda: want <= topic_ids(broker.bootstrap, topics.rewards), 120, interval=2, what="rewards after the restart")
        wait_until(lambda: want <= set(consumed_ids(daemon.store)), 120, interval=1, what="labels after the restart trained")
        # Settled after recovery: the log must not keep growing with retries (a spin in disguise).
        settle_mark, t1 = len(daemon.stderr().splitlines()), time.monotonic()
        time.sleep(5)
        settled_rate = (len(daemon.stderr().splitlines()) - settle_mark) / (time.monotonic() - t1)
        assert daemon.proc.poll() is None
        assert daemon.terminate(90) == 0, daemon.stderr()[-3000:]
    finally:
        daemon.kill()
    log = daemon.stderr()
    print(f"CPU share during the {OUTAGE_S}s outage: {cpu_share:.2f}; outage log lines: {len(outage_log.splitlines())}")
    assert cpu_share < 0.5, f"the daemon spins while the broker is down ({cpu_share:.0%} of a core)"
    assert "holding sends" in outage_log, outage_log[-2000:]
    assert len(outage_log.splitlines()) < OUTAGE_S * 3, f"retries without backoff flood the log:\n{outage_log[-3000:]}"
    assert "the broker lost its data" in log, "the empty broker was not noticed"
    assert "UnknownError" not in log, "a send failed on a partition a stale client poisoned"
    assert max(daemon.store.versions()) > max(versions_before), "no update after the restart"
    assert max(consumed_ids(daemon.store).values()) == 1, "a label was trained twice"
    assert settled_rate < 2, f"{settled_rate:.1f} log lines/s after recovery:\n{log[-2000:]}"
