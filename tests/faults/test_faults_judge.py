"""Judge faults through a running daemon: an OpenAI-compatible judge that answers 5xx, 429
with a Retry-After, times out, resets the connection, answers slowly, or answers garbage, no
choices, no verdict, an echo of its instruction or HTTP 400.

A fault that may heal is retried inside the call (max_retries, never sooner than the
server's Retry-After) and then goes to the retry queue, to be asked again hours later: no
label, no dead letter, its charge kept. A fault that cannot heal is given up at once: a dead
letter with the reason and the judge's answer, and its charge refunded. No label is ever
guessed; the good trajectories around the faulty ones (a slow one included) are labelled.
"""

from __future__ import annotations

from collections import Counter

import pytest

from actprm.client.topics import Topics
from actprm.streams.roles.judging import read_verdicts
from actprm.streams.tools.produce import produce_trajectories, synthetic_trajectories
from support.daemon import Daemon, read_topic
from support.faulty_judge import RETRYABLE_MODES, FaultyJudge, with_mode

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MAX_RETRIES = 2
# Good ones around every fault; each fault mode once.
MODES = ["ok", "http500", "ok", "timeout", "reset", "garbage", "ok", "no_choices", "no_verdict", "http400", "ok",
         "http429", "slow", "echo"]
# What the dead letter's reason must say for each final fault (model/judges/ words it).
REASON = {"garbage": "not JSON", "no_choices": "no choices", "no_verdict": "no \\boxed",
          "http400": "HTTP 400", "echo": "repeats the prompt's instruction"}
# What the verdict log's reason says for each fault that went to the retry queue.
QUEUED = {"http500": f"HTTP 500 after {MAX_RETRIES + 1} attempts", "timeout": f"timed out after 1 s after {MAX_RETRIES + 1} attempts",
          "reset": "connection error", "http429": f"HTTP 429 (Retry-After 1 s) after {MAX_RETRIES + 1} attempts"}


def test_judge_faults_heal_later_or_are_given_up_with_a_refund_never_guessed(broker, topic_prefix, tmp_path):
    topics = Topics(topic_prefix)
    stream = [t.model_copy(update={"id": f"jf-{mode}-{i}", "problem": with_mode(f"(jf {i}) {t.problem}", mode)})
              for i, (t, mode) in enumerate(zip(synthetic_trajectories(len(MODES), seed=5), MODES))]
    mode_of = {t.id: mode for t, mode in zip(stream, MODES)}
    gold = {t.problem: t.gold_first_error for t in stream}
    with FaultyJudge(gold, hang_s=3.0, retry_after="1", slow_s=0.7).start() as judge:
        env = {"ACTPRM_SELECTION__STRATEGY": "full", "ACTPRM_JUDGE__KIND": "openai",
               "ACTPRM_JUDGE__BASE_URL": judge.base_url, "ACTPRM_JUDGE__MAX_RETRIES": str(MAX_RETRIES),
               "ACTPRM_JUDGE__BACKOFF_INITIAL_S": "0.1", "ACTPRM_JUDGE__BACKOFF_MAX_S": "0.2",
               "ACTPRM_JUDGE__TIMEOUT_S": "1", "ACTPRM_JUDGE__CONCURRENCY": "4"}
        daemon = Daemon(broker.bootstrap, topic_prefix, tmp_path, "--max-trajectories", str(len(stream)), env=env).start()
        try:
            produce_trajectories(broker.bootstrap, topic_prefix, stream)
            assert daemon.wait(240) == 0, daemon.stderr()[-3000:]
        finally:
            daemon.kill()
        calls = Counter(judge.calls)
        times = dict(judge.call_times)

    # Bounded retries: exactly 1 + max_retries calls for what may pass on a retry, 1 otherwise.
    for t in stream:
        mode = mode_of[t.id]
        want = 1 + MAX_RETRIES if mode in RETRYABLE_MODES else 1
        assert calls[t.problem] == want, f"{mode}: {calls[t.problem]} judge calls, expected {want}"
    # Retry-After: 1 was honoured between the attempts (the backoff alone is 0.2 s at most).
    limited = next(t.problem for t in stream if mode_of[t.id] == "http429")
    assert all(b - a >= 1.0 for a, b in zip(times[limited], times[limited][1:])), times[limited]

    healing = {i for i, m in mode_of.items() if m in RETRYABLE_MODES}
    final = {i for i, m in mode_of.items() if m in REASON}
    good = set(mode_of) - healing - final
    labels = read_topic(broker.bootstrap, topics.labels, until=lambda got: good <= {l.id for l in got})
    assert {l.id for l in labels} == good, "a faulty trajectory got a (guessed) label, or a good one none"
    assert all(l.first_error == gold[next(t.problem for t in stream if t.id == l.id)] for l in labels)
    assert all(l.answer and l.prompt_version for l in labels)  # what the judge said travels with the label

    dead = read_topic(broker.bootstrap, topics.dead_letters, until=lambda got: final <= {d.key for d in got})
    by_key = {d.key: d for d in dead}
    assert set(by_key) == final and len(dead) == len(final), [d.key for d in dead]
    for key, d in by_key.items():
        assert d.source_topic == topics.annotations
        assert REASON[mode_of[key]] in d.reason, f"{mode_of[key]}: {d.reason!r}"
    assert by_key[next(i for i in final if mode_of[i] == "echo")].judge_answer.endswith("\\boxed{-1}")

    # The faults that may heal wait in the retry queue (verdict log: "retry_later"), not dead.
    log = list(read_verdicts(tmp_path / "judge"))
    queued = {e["id"]: e for e in log if e["outcome"] == "retry_later"}
    assert set(queued) == healing
    for key, e in queued.items():
        assert QUEUED[mode_of[key]] in e["reason"] and e["retry_in_s"] >= 1800
        # A failed call's real latency: three 1 s timeouts take 3 s, not 0.
        assert e["latency_s"] > (2.5 if mode_of[key] == "timeout" else 1.0 if mode_of[key] == "http429" else 0.0)

    # Charged once per trajectory; the final give-ups refunded, the queued ones still charged.
    status = daemon.final_status()
    assert status["annotation_requests"] == len(stream), status
    assert status["budget_used"] == len(stream) - len(final), status
    assert status["judged"] == len(good) and status["judge_failures"] == len(final), status
    assert status["last_error"] and status["last_error"].startswith("judge:"), status
    assert status["updates"] >= 1  # the good labels were trained
