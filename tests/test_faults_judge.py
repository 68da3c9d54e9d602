"""Judge faults through a running daemon: an OpenAI-compatible judge that answers 5xx, times
out, resets the connection, or answers garbage, no choices, no verdict or HTTP 400.

Each faulty trajectory is asked a bounded number of times (1 + max_retries when asking again
may help, once when it cannot), then becomes a dead letter with the reason; no label is ever
guessed for it; the round budget is charged once per trajectory; the good trajectories
around the faulty ones are labelled.
"""

from __future__ import annotations

from collections import Counter

import pytest

from actprm.streams.tools import synthetic_trajectories
from actprm.streams.tools import produce_trajectories
from actprm.client.topics import Topics
from helpers_daemon import Daemon, read_topic
from helpers_faulty_judge import RETRYABLE_MODES, FaultyJudge, with_mode

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MAX_RETRIES = 2
# Good ones around every fault; each fault mode once.
MODES = ["ok", "http500", "ok", "timeout", "reset", "garbage", "ok", "no_choices", "no_verdict", "http400", "ok"]
# What the dead letter's reason must say for each fault (model/judges.py words it).
REASON = {"http500": f"HTTP 500 after {MAX_RETRIES + 1} attempts", "timeout": f"timed out after 1 s after {MAX_RETRIES + 1} attempts",
          "reset": f"connection error", "garbage": "not JSON", "no_choices": "no choices", "no_verdict": "no \\boxed",
          "http400": "HTTP 400"}


def test_judge_faults_are_retried_a_bounded_number_of_times_then_dead_lettered_never_guessed(broker, topic_prefix, tmp_path):
    topics = Topics(topic_prefix)
    stream = [t.model_copy(update={"id": f"jf-{mode}-{i}", "problem": with_mode(f"(jf {i}) {t.problem}", mode)})
              for i, (t, mode) in enumerate(zip(synthetic_trajectories(len(MODES), seed=5), MODES))]
    mode_of = {t.id: mode for t, mode in zip(stream, MODES)}
    gold = {t.problem: t.gold_first_error for t in stream}
    with FaultyJudge(gold, hang_s=3.0).start() as judge:
        env = {"ACTPRM_SELECTION__STRATEGY": "full", "ACTPRM_JUDGE__KIND": "openai",
               "ACTPRM_JUDGE__BASE_URL": judge.base_url, "ACTPRM_JUDGE__MAX_RETRIES": str(MAX_RETRIES),
               "ACTPRM_JUDGE__TIMEOUT_S": "1", "ACTPRM_JUDGE__CONCURRENCY": "4"}
        daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--max-trajectories", str(len(stream)), env=env).start()
        try:
            produce_trajectories(broker.bootstrap, topic_prefix, stream)
            assert daemon.wait(240) == 0, daemon.stderr()[-3000:]
        finally:
            daemon.kill()
        calls = Counter(judge.calls)

    # Bounded retries: exactly 1 + max_retries calls for what may pass on a retry, 1 otherwise.
    for t in stream:
        mode = mode_of[t.id]
        want = 1 + MAX_RETRIES if mode in RETRYABLE_MODES else 1
        assert calls[t.problem] == want, f"{mode}: {calls[t.problem]} judge calls, expected {want}"

    faulty = {i for i, m in mode_of.items() if m != "ok"}
    good = set(mode_of) - faulty
    labels = read_topic(broker.bootstrap, topics.labels, until=lambda got: good <= {l.id for l in got})
    assert {l.id for l in labels} == good, "a faulty trajectory got a (guessed) label, or a good one none"
    assert all(l.first_error == gold[next(t.problem for t in stream if t.id == l.id)] for l in labels)

    dead = read_topic(broker.bootstrap, topics.dead_letters, until=lambda got: faulty <= {d.key for d in got})
    by_key = {d.key: d for d in dead}
    assert set(by_key) == faulty and len(dead) == len(faulty), [d.key for d in dead]
    for key, d in by_key.items():
        assert d.source_topic == topics.annotations
        assert REASON[mode_of[key]] in d.reason, f"{mode_of[key]}: {d.reason!r}"

    # The budget was charged once per trajectory, not once per attempt.
    status = daemon.final_status()
    assert status["annotation_requests"] == status["budget_used"] == len(stream), status
    assert status["judged"] == len(good) and status["judge_failures"] == len(faulty), status
    assert status["updates"] >= 1  # the good labels were trained
