"""The fault suite, short version (CI): real broker, real worker processes, real faults.

The long version (`make test-faults`: random SIGKILLs, broker outages) is
tests/faults/test_faults_long.py; the bad-input suite is tests/daemon/test_bad_input.py. What each test proves is in its name and docstring.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from actprm.streams.tools.produce import produce_trajectories
from actprm.client.topics import Topics
from support.daemon import Daemon, consumed_ids
from support.wait import wait_until
from support.crash_trials import run_crash_trials
from support.fault_summary import format_summary
from support.faulty_judge import tagged_stream
from support.kafka_io import topic_ids
from support.processes import child_pids

pytestmark = [pytest.mark.broker, pytest.mark.slow]


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
    # Every trajectory labelled: heads that grow sure of the first stream would not ask about
    # the second, and this test is about the broker, not about selection.
    daemon = Daemon("", topic_prefix, tmp_path, env={"ACTPRM_SELECTION__STRATEGY": "full"}).start()
    try:
        wait_until(lambda: "started the embedded broker" in daemon.stderr(), 60, what="the embedded broker")
        line = next(x for x in daemon.stderr().splitlines() if "started the embedded broker" in x)
        bootstrap = json.loads(line)["bootstrap"]
        wait_until(lambda: "serving" in daemon.stderr(), 60, what="the daemon serving")
        before, after = tagged_stream(8, "pre"), tagged_stream(8, "post", seed=11)
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


def test_a_stop_while_the_broker_is_down_finishes_at_once_with_the_status(fresh_broker, topic_prefix, tmp_path):
    """Ctrl-C or SIGTERM with the broker gone: faust alone would wait a minute per client for it.
    The daemon gives the stop 5 s, then prints its status and exits 0."""
    daemon = Daemon(fresh_broker.bootstrap, topic_prefix, tmp_path).start()
    try:
        produce_trajectories(fresh_broker.bootstrap, topic_prefix, tagged_stream(8, "pre"))
        wait_until(lambda: len(consumed_ids(daemon.store)) == 8, 120, interval=1, what="labels trained")
        fresh_broker.stop()
        wait_until(lambda: "holding sends" in daemon.stderr(), 30, what="the outage noticed")
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        took = time.monotonic() - t0
    finally:
        daemon.kill()
    print(f"stop with the broker down took {took:.1f} s")
    assert code == 0 and took < 30, (code, took)
    assert "the stop did not finish in time" in daemon.stderr()
    assert daemon.final_status()["updates"] >= 1  # the status still reaches stdout
