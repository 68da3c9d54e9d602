"""The judge: each trajectory is judged at most once, whatever Kafka redelivers.

The outcome (a label or a final failure) is written to the ledger before it is sent; a
redelivered request gets the stored outcome again instead of a second judge call.

A batch's calls run together (the judge client bounds them to `judge.concurrency`) and each
result is sent as soon as it is in. A call that fails in a way that may heal (a timeout, 5xx,
429) after its own retries goes to the retry queue, durable in the ledger, and is asked again
hours later (`judge.retry_delays_s`); only a final give-up is a dead letter, which carries the
judge's answer, and the request goes back to the round keeper to refund its charge once.
Every verdict, failure and retry is written to the verdict log (`state_dir/judge/`, rotated)
with the judge's answer, the prompt version and the model, for audits and `actprm report`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from actprm.client import messages
from actprm.client.messages import AnnotationRequest, Label
from actprm.client.topics import Topics
from actprm.model.judges.base import Judge, JudgeError, JudgeRequest, Judgement
from actprm.model.judges.clients import make_judge
from actprm.model.uncertainty import is_aleatoric, predicted_first_error
from actprm.streams.config import JudgeSettings, SelectionSettings
from actprm.streams.state.ledger import JUDGED, Ledger
from actprm.streams.kafka.sender import Event, LastError, Observer, Sender

log = structlog.get_logger("actprm")

RETRY_QUEUE = "judge_retry"  # trajectory id -> {"request", "tries", "next_at", "reason"}: asked again later
AUDIT_FILES = 3  # the verdict log and its rotated copies


def tail(text: str | None, max_chars: int) -> str | None:
    """The end of an answer (where the verdict is), at most max_chars, marked when cut."""
    if text is None or len(text) <= max_chars:
        return text
    return "…" + text[len(text) - max_chars + 1 :] if max_chars > 0 else ""


class VerdictLog:
    """What the judge said, one JSON line per outcome, bounded: rotated at max_bytes, 3 files kept."""

    def __init__(self, directory: Path, max_bytes: int = 8 * 1024 * 1024):
        self.path = Path(directory) / "verdicts.jsonl"
        self.max_bytes = max_bytes

    def write(self, entry: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
                for i in range(AUDIT_FILES - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    newer = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
                    if newer.exists():
                        newer.replace(older)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        except OSError as err:  # an audit line lost is no reason to lose the label
            log.warning("verdict log not written", path=str(self.path), error=str(err))


def read_verdicts(directory: Path) -> Iterator[dict]:
    """The verdict log's entries, oldest first; a torn or unreadable line is skipped."""
    base = Path(directory) / "verdicts.jsonl"
    for path in [base.with_name(f"{base.name}.{i}") for i in range(AUDIT_FILES - 1, 0, -1)] + [base]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def configured_judge(j: JudgeSettings) -> Judge:
    """The judge the judge section of the settings describes."""
    kwargs = {} if j.kind == "oracle" else {
        "base_url": j.base_url, "model": j.model, "timeout_s": j.timeout_s, "max_retries": j.max_retries,
        "backoff_initial_s": j.backoff_initial_s, "backoff_max_s": j.backoff_max_s, "retry_after_max_s": j.retry_after_max_s,
        "concurrency": j.concurrency, "temperature": j.temperature, "max_tokens": j.max_tokens,
        "api_key": j.api_key.get_secret_value() if j.api_key else None}
    if j.kind == "vllm":
        kwargs |= {"device": j.device, "gpu_memory_utilization": j.gpu_memory_utilization}
    return make_judge(j.kind, **kwargs)


@dataclass
class JudgeOutcome:
    label: Label | None = None
    failure: str | None = None  # a dead letter's reason
    repeated: bool = False  # served from the ledger: no judge call was made
    error: JudgeError | None = None  # the failure itself (retryable? its answer, latency, attempts)
    verdict: Judgement | None = None


def _label(request: AnnotationRequest, first_error: int, judge: str, latency_s: float, answer: str | None = None,
           prompt_version: str | None = None) -> Label:
    return Label(id=request.id, first_error=first_error, n_steps=len(request.steps), judge=judge,
                 round_id=request.round_id, problem=request.problem, steps=request.steps,
                 judged_at=time.time(), latency_s=latency_s, scored_version=request.model_version,
                 mu=request.mu, metadata=request.metadata, answer=answer, prompt_version=prompt_version)


def _stored(request: AnnotationRequest, done: dict) -> JudgeOutcome:
    if "dead" in done:
        return JudgeOutcome(failure=done["dead"], repeated=True)
    return JudgeOutcome(label=_label(request, done["first_error"], done["judge"], 0.0,
                                     prompt_version=done.get("prompt_version")), repeated=True)


async def judge_once(judge: Judge, ledger: Ledger, request: AnnotationRequest, answer_max_chars: int = 4000) -> JudgeOutcome:
    """Judge one request, or give the stored outcome of an earlier call. Every failure is
    stored as final here; JudgeRole keeps a retryable one in its retry queue instead."""
    outcome = await call_judge(judge, ledger, request, answer_max_chars)
    if outcome.error is not None:
        ledger.put(JUDGED, request.id, {"dead": outcome.failure})
    return outcome


async def call_judge(judge: Judge, ledger: Ledger, request: AnnotationRequest, answer_max_chars: int = 4000) -> JudgeOutcome:
    """The stored outcome, or one judge call: a label (stored) or a failure (not stored)."""
    done = ledger.get(JUDGED, request.id)
    if done is not None:
        return _stored(request, done)
    try:
        verdict = await judge.judge(JudgeRequest(request.id, request.problem, request.steps, request.gold_first_error))
    except JudgeError as err:
        return JudgeOutcome(failure=err.reason, error=err)
    ledger.put(JUDGED, request.id, {"first_error": verdict.first_error, "judge": verdict.judge,
                                    "prompt_version": verdict.prompt_version})
    label = _label(request, verdict.first_error, verdict.judge, verdict.latency_s,
                   tail(verdict.raw, answer_max_chars), verdict.prompt_version)
    return JudgeOutcome(label=label, verdict=verdict)


class JudgeRole:
    def __init__(self, judge: Judge, ledger: Ledger, sender: Sender, topics: Topics, selection: SelectionSettings,
                 metrics: Observer | None = None, settings: JudgeSettings | None = None,
                 audit: VerdictLog | None = None, errors: LastError | None = None,
                 clock: Callable[[], float] = time.time):
        self.judge, self.ledger, self.sender, self.topics = judge, ledger, sender, topics
        self.selection = selection  # what "confident" means in the agreement metric
        self.metrics = metrics
        self.settings = settings or JudgeSettings()
        self.audit, self.errors, self.clock = audit, errors or LastError(), clock
        self.counts: Counter = Counter()
        self.in_flight: dict[str, float] = {}  # id -> when its call started (the liveness check reads it)
        self.closed = False

    # --- what the agents call -----------------------------------------------------------------

    async def on_annotations(self, events: Sequence[Event]) -> None:
        todo, ids = [], set()
        for event, request in await self.sender.decoded(AnnotationRequest, events):
            if request.id in ids or request.id in self.in_flight or self.ledger.has(RETRY_QUEUE, request.id):
                self.counts["judge_repeats"] += 1  # redelivered while being judged or waiting to be asked again
                continue
            ids.add(request.id)
            todo.append((event, request, 0))
        await self._run_all(todo)

    async def retry_due(self) -> int:
        """Ask again the queued requests whose time has come (a timer calls this); how many."""
        now = self.clock()
        due = [(key, entry) for key, entry in self.ledger.items(RETRY_QUEUE)
               if entry["next_at"] <= now and key not in self.in_flight]
        due = sorted(due, key=lambda item: item[1]["next_at"])[: 4 * self.settings.concurrency]  # the rest next time
        todo = []
        for key, entry in due:
            try:
                request = messages.decode(AnnotationRequest, json.dumps(entry["request"]).encode())
            except messages.MessageError as err:  # written by this code; unreadable means a newer schema went back
                log.error("retry queue entry unreadable; dropped", id=key, error=err.reason)
                self.ledger.delete(RETRY_QUEUE, key)
                continue
            todo.append((None, request, entry["tries"]))
        await self._run_all(todo)
        return len(todo)

    def queued(self) -> int:
        return self.ledger.count(RETRY_QUEUE)

    def alive_until(self) -> float | None:
        """While a call is in flight: the time by which the oldest must end if the judge is
        healthy (its timeouts, retries and waits). None when no call is in flight."""
        if not self.in_flight:
            return None
        allowance = getattr(self.judge, "longest_call_s", None)
        allowed = allowance() if allowance is not None else self.settings.timeout_s * (self.settings.max_retries + 1)
        return min(self.in_flight.values()) + allowed

    async def drain(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the calls in flight; how many are still running (abandoned)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return len(self.in_flight)

    # --- one call, start to end ----------------------------------------------------------------

    async def _run_all(self, todo: list[tuple[Event | None, AnnotationRequest, int]]) -> None:
        # The calls run together; each sends its own result the moment it ends (_one), so
        # this only waits for the last. A send that failed (Kafka) fails the batch, which the
        # agent retries: what was judged is then resent from the ledger, not judged again.
        results = await asyncio.gather(*(self._one(*item) for item in todo), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _one(self, event: Event | None, request: AnnotationRequest, tries: int) -> None:
        self.in_flight[request.id] = time.time()  # wall time, as the liveness check reads it
        try:
            outcome = await call_judge(self.judge, self.ledger, request, self.settings.answer_max_chars)
        finally:
            self.in_flight.pop(request.id, None)
        if outcome.repeated:
            await self._repeat(request, outcome)
        elif outcome.label is not None:
            await self._judged(request, outcome)
        else:
            await self._failed(event, request, outcome.error, tries)

    async def _repeat(self, request: AnnotationRequest, outcome: JudgeOutcome) -> None:
        self.ledger.delete(RETRY_QUEUE, request.id)
        self.counts["judge_repeats"] += 1
        if outcome.label is not None:  # a failure's dead letter went out with the first outcome
            await self.sender.send(self.topics.labels, request.id, messages.encode(outcome.label))

    async def _judged(self, request: AnnotationRequest, outcome: JudgeOutcome) -> None:
        label, verdict = outcome.label, outcome.verdict
        self.ledger.delete(RETRY_QUEUE, request.id)
        self._count_call(verdict.attempts)
        self._audit(request, "label", first_error=label.first_error, latency_s=verdict.latency_s,
                    attempts=verdict.attempts, answer=label.answer)
        if self.metrics is not None:
            self.metrics.observe_judge(verdict.latency_s, ok=True)
            # Agreement of the scorer's prediction with the judge; "confident" as the selection rule means it.
            confident = bool(request.mu) and not is_aleatoric(request.mu, self.selection.delta_pred)
            self.metrics.observe_agreement(predicted_first_error(request.mu), label.first_error, confident)
        await self.sender.send(self.topics.labels, label.id, messages.encode(label))
        self.counts["judged"] += 1

    async def _failed(self, event: Event | None, request: AnnotationRequest, err: JudgeError, tries: int) -> None:
        self._count_call(err.attempts)
        self.errors.note(f"judge: {err.reason}"[:300])
        if self.metrics is not None:
            self.metrics.observe_judge(err.latency_s, ok=False)
        answer = tail(err.answer, self.settings.answer_max_chars)
        delays = self.settings.retry_delays_s
        room = self.queued() < self.settings.retry_queue_max or self.ledger.has(RETRY_QUEUE, request.id)
        if err.retryable and tries < len(delays) and room:
            wait = max(delays[tries], err.retry_after_s or 0.0)
            self.ledger.put(RETRY_QUEUE, request.id, {"request": request.model_dump(mode="json"), "tries": tries + 1,
                                                     "next_at": self.clock() + wait, "reason": err.reason})
            self.counts["judge_retries_queued"] += 1
            self._audit(request, "retry_later", reason=err.reason, latency_s=err.latency_s, attempts=err.attempts,
                        answer=answer, retry_in_s=wait)
            log.warning("judge call failed; asking again later", id=request.id, reason=err.reason[:200],
                        retry_in_s=round(wait), tries=tries + 1)
            return
        if err.retryable:
            why = "no retries left" if tries >= len(delays) else "the retry queue is full"
            reason = f"{err.reason} ({why})"
        else:
            reason = err.reason
        await self._give_up(event, request, reason, answer, err)

    async def _give_up(self, event: Event | None, request: AnnotationRequest, reason: str, answer: str | None,
                       err: JudgeError) -> None:
        """A final failure: stored, a dead letter with the answer, the charge handed back."""
        with self.ledger.transaction():
            self.ledger.put(JUDGED, request.id, {"dead": reason})
            self.ledger.delete(RETRY_QUEUE, request.id)
        self._audit(request, "dead", reason=reason, latency_s=err.latency_s, attempts=err.attempts, answer=answer)
        raw = event.value if event is not None else messages.encode(request)
        source = event.topic if event is not None else self.topics.annotations
        dl = messages.dead_letter(source, event.partition if event else None, event.offset if event else None,
                                  request.id, raw, f"judge failed: {reason}")
        await self.sender.send(self.sender.dead_letters, None,
                               messages.encode(dl.model_copy(update={"judge_answer": answer})))
        self.sender.counts["dead_lettered"] += 1
        log.warning("dead letter", id=request.id, topic=source, reason=f"judge failed: {reason}"[:200])
        gave_up = request.model_copy(update={"judge_gave_up": reason[:500]})
        await self.sender.send(self.topics.candidates, request.id, messages.encode(gave_up))
        self.counts["judge_failures"] += 1

    def _count_call(self, attempts: int) -> None:
        self.counts["judge_calls"] += 1
        self.counts["judge_retries"] += max(0, attempts - 1)

    def _audit(self, request: AnnotationRequest, outcome: str, **fields) -> None:
        if self.audit is None:
            return
        self.audit.write({"at": round(time.time(), 3), "id": request.id, "round_id": request.round_id,
                          "judge": getattr(self.judge, "name", "?"), "model": getattr(self.judge, "model", None),
                          "prompt_version": getattr(self.judge, "prompt_version", None), "outcome": outcome, "n_steps": len(request.steps), "gold": request.gold_first_error,
                          **fields})

    async def aclose(self) -> None:
        """Release the judge client (idempotent: a stop may come twice)."""
        if not self.closed:
            self.closed = True
            await self.judge.aclose()
