"""The judge seam, role by role, against a real HTTP judge server (tests/support/faulty_judge.py):
no false label, what the judge said kept, failures that heal (Retry-After, the retry queue
across a restart, one refund for a final give-up), results sent as soon as they are in, and a
slow judge that stays alive for the liveness check. No broker: the roles send into a list.
"""

from __future__ import annotations

import asyncio
import time


from actprm.client import messages
from actprm.client.messages import AnnotationRequest, DeadLetter, Label
from actprm.client.topics import Topics
from actprm.daemon.metrics import health
from actprm.model.judges.clients import OpenAIJudge
from actprm.model.judges.verdict import PROMPT_VERSION
from actprm.streams.config import JudgeSettings, SelectionSettings
from actprm.streams.roles.judging import RETRY_QUEUE, JudgeRole, VerdictLog, read_verdicts
from actprm.streams.state.ledger import Ledger
from actprm.streams.roles.rounds import KeeperRole, RoundKeeper
from actprm.streams.kafka.sender import Event
from support.faulty_judge import FaultyJudge, tagged_stream, with_mode
from support.roles import memory_sender, sent_to

TOPICS = Topics("seam")


class Clock:
    """The role's wall clock, moved by the test: the retry queue's hours pass at once."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def requests(tag: str, modes: list[str]) -> list[AnnotationRequest]:
    out = []
    for t, mode in zip(tagged_stream(len(modes), tag), modes):
        out.append(AnnotationRequest(id=t.id, problem=with_mode(t.problem, mode), steps=t.steps,
                                     gold_first_error=t.gold_first_error, round_id=0, model_version=0,
                                     mu=[0.5] * len(t.steps)))
    return out


def events(reqs: list[AnnotationRequest], topic: str = TOPICS.annotations) -> list[Event]:
    return [Event(topic, 0, i, r.id.encode(), messages.encode(r)) for i, r in enumerate(reqs)]


def role(server: FaultyJudge, ledger: Ledger, tmp_path, clock=time.time, **settings) -> tuple[JudgeRole, list]:
    s = JudgeSettings(kind="openai", base_url=server.base_url, model="faulty", timeout_s=2.0, max_retries=1,
                      backoff_initial_s=0.01, backoff_max_s=0.02, **settings)
    judge = OpenAIJudge(s.base_url, s.model, timeout_s=s.timeout_s, max_retries=s.max_retries,
                        backoff_initial_s=s.backoff_initial_s, backoff_max_s=s.backoff_max_s,
                        retry_after_max_s=s.retry_after_max_s, concurrency=s.concurrency)
    sender, sent = memory_sender(TOPICS.dead_letters)
    return JudgeRole(judge, ledger, sender, TOPICS, SelectionSettings(), settings=s,
                     audit=VerdictLog(tmp_path / "judge"), clock=clock), sent


def gold_of(reqs) -> dict[str, int]:
    return {r.problem: r.gold_first_error for r in reqs}


def test_an_echoed_verdict_is_never_a_label_and_the_dead_letter_carries_the_answer(tmp_path):
    reqs = requests("echo", ["ok", "echo", "no_verdict"])
    with FaultyJudge(gold_of(reqs)).start() as server:
        judging, sent = role(server, Ledger(tmp_path / "ledger"), tmp_path)

        async def go():
            await judging.on_annotations(events(reqs))
            await judging.aclose()

        asyncio.run(go())
    labels = sent_to(sent, TOPICS.labels, Label)
    assert [l.id for l in labels] == [reqs[0].id], "only the answer that states its verdict is a label"
    assert labels[0].first_error == reqs[0].gold_first_error
    assert labels[0].prompt_version == PROMPT_VERSION and labels[0].answer.endswith(f"\\boxed{{{reqs[0].gold_first_error}}}")
    dead = {d.key: d for d in sent_to(sent, TOPICS.dead_letters, DeadLetter)}
    assert "repeats the prompt's instruction" in dead[reqs[1].id].reason
    assert dead[reqs[1].id].judge_answer.endswith("\\boxed{-1}")  # the answer that failed, kept
    assert dead[reqs[2].id].judge_answer == "I am not sure."
    # Every outcome is in the verdict log with its text, the prompt version and the model.
    log = {e["id"]: e for e in read_verdicts(tmp_path / "judge")}
    assert {e["outcome"] for e in log.values()} == {"label", "dead"}
    assert all(e["prompt_version"] == PROMPT_VERSION and e["model"] == "faulty" and e["answer"] for e in log.values())


def test_retry_after_is_honoured_and_a_long_one_goes_to_the_retry_queue(tmp_path):
    reqs = requests("ra", ["http429", "http429"])
    clock = Clock()
    with FaultyJudge(gold_of(reqs), retry_after="1").start() as server:
        judging, sent = role(server, Ledger(tmp_path / "ledger"), tmp_path, clock=clock, retry_after_max_s=5)
        server.modes[reqs[1].problem] = "http429"

        async def go():
            await judging.on_annotations(events(reqs[:1]))
            server.retry_after = "7200"  # longer than retry_after_max_s: not waited for inside the call
            await judging.on_annotations(events(reqs[1:]))
            await judging.aclose()

        asyncio.run(go())
        first = server.call_times[reqs[0].problem]
        assert len(first) == 2 and first[1] - first[0] >= 1.0, "the retry came before Retry-After: 1"
        assert server.calls[reqs[1].problem] == 1
    queued = judging.ledger.get(RETRY_QUEUE, reqs[1].id)
    assert queued["next_at"] >= clock.now + 7200 and "Retry-After 7200" in queued["reason"]
    assert judging.counts["judge_retries"] == 1 and judging.counts["judge_retries_queued"] == 2
    assert "HTTP 429" in judging.errors.message


def test_the_retry_queue_survives_a_restart_and_a_final_give_up_is_refunded_once(tmp_path):
    reqs = requests("rq", ["http500", "http500"])
    healing, failing = reqs
    keeper_ledger = Ledger(tmp_path / "keeper")
    rounds = RoundKeeper(keeper_ledger, default_budget=5)
    for r in reqs:
        rounds.admit(r.id)
    assert rounds.state.used == 2
    clock = Clock()
    with FaultyJudge(gold_of(reqs)).start() as server:
        # First life: both calls fail after their retries: queued, nothing sent, latency real.
        first, sent = role(server, Ledger(tmp_path / "judge-ledger"), tmp_path, clock=clock, retry_delays_s=[3600, 7200])

        async def life1():
            await first.on_annotations(events(reqs))
            await first.aclose()

        asyncio.run(life1())
        assert not sent_to(sent, TOPICS.labels, Label) and not sent_to(sent, TOPICS.dead_letters, DeadLetter)
        assert first.queued() == 2 and first.counts["judge_retries"] == 2
        assert "HTTP 500" in first.errors.message
        first.ledger.close()

        # Second life (a restart): the queue is read back from the ledger, and asked again when due.
        server.modes[healing.problem] = "ok"
        second, sent = role(server, Ledger(tmp_path / "judge-ledger"), tmp_path, clock=clock,
                            retry_delays_s=[3600, 7200])

        async def life2():
            assert await second.retry_due() == 0  # not due yet
            clock.now += 3601
            assert await second.retry_due() == 2
            clock.now += 7201
            assert await second.retry_due() == 1  # the failing one: its last try
            assert await second.retry_due() == 0
            await second.aclose()

        asyncio.run(life2())
        assert server.calls[healing.problem] == 2 * 2 - 1 and server.calls[failing.problem] == 3 * 2
    assert [l.id for l in sent_to(sent, TOPICS.labels, Label)] == [healing.id]
    dead = sent_to(sent, TOPICS.dead_letters, DeadLetter)
    assert [d.key for d in dead] == [failing.id] and "no retries left" in dead[0].reason
    assert second.queued() == 0
    # The give-up notice goes back to the keeper, which refunds the charge once, however often it comes.
    notices = [(t, k, v) for t, k, v in sent if t == TOPICS.candidates]
    assert len(notices) == 1
    keeper_sender, _ = memory_sender(TOPICS.dead_letters)
    keeper = KeeperRole(rounds, keeper_sender, TOPICS)
    redelivered = [Event(TOPICS.candidates, 0, i, k, v) for i, (_, k, v) in enumerate(notices * 2)]
    asyncio.run(keeper.on_candidates(redelivered))
    assert rounds.state.used == 1
    assert (keeper.counts["annotation_refunds"], keeper.counts["annotation_refunds_declined"]) == (1, 1)
    outcomes = [e["outcome"] for e in read_verdicts(tmp_path / "judge") if e["id"] == failing.id]
    assert outcomes == ["retry_later", "retry_later", "dead"]


def test_each_result_is_sent_as_soon_as_it_is_in_not_after_the_slowest(tmp_path):
    reqs = requests("fast", ["slow", "ok", "ok", "ok"])
    with FaultyJudge(gold_of(reqs), slow_s=1.5).start() as server:
        judging, sent = role(server, Ledger(tmp_path / "ledger"), tmp_path, concurrency=4)
        slow_in_flight_at_send: list[bool] = []
        inner = judging.sender._produce

        async def produce(topic, key, value):
            if topic == TOPICS.labels and key != reqs[0].id.encode():
                slow_in_flight_at_send.append(reqs[0].problem in server.in_flight_now())
            return await inner(topic, key, value)

        judging.sender._produce = produce

        async def go():
            await judging.on_annotations(events(reqs))
            await judging.aclose()

        asyncio.run(go())
    assert slow_in_flight_at_send == [True] * 3, "a fast label waited for the slow call of its batch"
    assert [l.id for l in sent_to(sent, TOPICS.labels, Label)][-1] == reqs[0].id


def test_a_slow_judge_call_within_its_timeouts_is_alive_and_one_past_them_is_stuck(tmp_path):
    reqs = requests("alive", ["ok"])
    with FaultyJudge(gold_of(reqs)).start() as server:
        judging, _ = role(server, Ledger(tmp_path / "ledger"), tmp_path)

        class Proc:  # what health() reads of a process
            process_id, roles, paused_consume, judge = "p", ("judge",), False, judging
            busy_since = {"judge": time.time() - 5}

        judging.in_flight["x"] = time.time() - 5  # longer than stuck_after_s, within the call's allowance
        ok, detail = health(Proc, stuck_after_s=1)
        assert ok and detail["judge_calls_alive_until_s"] > 0
        allowance = judging.judge.longest_call_s()
        ok, detail = health(Proc, stuck_after_s=1, now=time.time() + allowance)
        assert not ok and "role judge busy" in detail["reason"]
        asyncio.run(judging.aclose())


def test_the_daemon_defaults_let_a_healthy_slow_judge_pass_its_liveness_probe():
    from actprm.daemon.settings import Settings

    s = Settings()
    judge = OpenAIJudge(s.judge.base_url, s.judge.model, timeout_s=s.judge.timeout_s, max_retries=s.judge.max_retries,
                        backoff_max_s=s.judge.backoff_max_s, retry_after_max_s=s.judge.retry_after_max_s)
    # A call that uses every attempt up to its timeout is longer than stuck_after_s ...
    assert s.judge.timeout_s * (s.judge.max_retries + 1) > s.metrics.stuck_after_s
    # ... and the liveness allowance covers it.
    assert judge.longest_call_s() >= s.judge.timeout_s * (s.judge.max_retries + 1)
    asyncio.run(judge.aclose())


def test_drain_says_how_many_calls_it_abandons(tmp_path):
    reqs = requests("drain", ["slow"])
    with FaultyJudge(gold_of(reqs), slow_s=3.0).start() as server:
        judging, _ = role(server, Ledger(tmp_path / "ledger"), tmp_path)

        async def go():
            call = asyncio.ensure_future(judging.on_annotations(events(reqs)))
            deadline = time.monotonic() + 5
            while not judging.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            abandoned = await judging.drain(0.2)
            left = await judging.drain(10)
            await call
            await judging.aclose()
            return abandoned, left

        assert asyncio.run(go()) == (1, 0)


def test_the_verdict_log_is_bounded_and_the_report_shows_a_sample_with_the_text(tmp_path):
    from actprm.daemon.report.page import verdict_section

    log = VerdictLog(tmp_path / "judge", max_bytes=2048)
    for i in range(200):
        outcome = "label" if i % 3 else "dead"
        log.write({"at": 1e9 + i, "id": f"t{i}", "outcome": outcome, "first_error": 1, "gold": 1, "model": "qwq",
                   "prompt_version": PROMPT_VERSION, "latency_s": 2.5, "reason": "unparseable judge answer: echo",
                   "answer": f"paragraph 1 <b>is</b> wrong\n\\boxed{{1}} #{i}"})
    files = sorted(p.name for p in (tmp_path / "judge").iterdir())
    assert files == ["verdicts.jsonl", "verdicts.jsonl.1", "verdicts.jsonl.2"]  # rotated, three kept
    assert sum(p.stat().st_size for p in (tmp_path / "judge").iterdir()) < 4 * 2048
    entries = list(read_verdicts(tmp_path / "judge"))
    assert entries[-1]["id"] == "t199" and [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    page = verdict_section(tmp_path)
    assert "\\boxed{1} #199" in page and "&lt;b&gt;is&lt;/b&gt;" in page  # the answer's text, escaped
    assert "t198" in page and "unparseable judge answer: echo" in page and PROMPT_VERSION in page
