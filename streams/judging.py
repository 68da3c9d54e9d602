"""The judge: each trajectory is judged at most once, whatever Kafka redelivers.

The outcome (a label or a failure) is written to the ledger before it is sent; a redelivered
request gets the stored outcome again instead of a second judge call.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from actprm.model.judges import Judge, JudgeError, JudgeRequest
from actprm.model.uncertainty import predicted_first_error
from actprm.client import messages
from actprm.streams.config import SelectionSettings
from actprm.streams.ledger import JUDGED, Ledger
from actprm.client.messages import AnnotationRequest, Label
from actprm.streams.sender import Event, Observer, Sender
from actprm.client.topics import Topics


@dataclass
class JudgeOutcome:
    label: Label | None = None
    failure: str | None = None  # a dead letter's reason
    repeated: bool = False  # served from the ledger: no judge call was made


def _label(request: AnnotationRequest, first_error: int, judge: str, latency_s: float) -> Label:
    return Label(id=request.id, first_error=first_error, n_steps=len(request.steps), judge=judge,
                 round_id=request.round_id, problem=request.problem, steps=request.steps,
                 judged_at=time.time(), latency_s=latency_s, scored_version=request.model_version,
                 mu=request.mu, metadata=request.metadata)


async def judge_once(judge: Judge, ledger: Ledger, request: AnnotationRequest) -> JudgeOutcome:
    done = ledger.get(JUDGED, request.id)
    if done is not None:
        if "dead" in done:
            return JudgeOutcome(failure=done["dead"], repeated=True)
        return JudgeOutcome(label=_label(request, done["first_error"], done["judge"], 0.0), repeated=True)
    try:
        verdict = await judge.judge(JudgeRequest(request.id, request.problem, request.steps, request.gold_first_error))
    except JudgeError as err:
        ledger.put(JUDGED, request.id, {"dead": err.reason})
        return JudgeOutcome(failure=err.reason)
    ledger.put(JUDGED, request.id, {"first_error": verdict.first_error, "judge": verdict.judge})
    return JudgeOutcome(label=_label(request, verdict.first_error, verdict.judge, verdict.latency_s))


class JudgeRole:
    def __init__(self, judge: Judge, ledger: Ledger, sender: Sender, topics: Topics, selection: SelectionSettings,
                 metrics: Observer | None = None):
        self.judge, self.ledger, self.sender, self.topics = judge, ledger, sender, topics
        self.selection = selection  # what "confident" means in the agreement metric
        self.metrics = metrics
        self.counts: Counter = Counter()
        self.closed = False

    async def on_annotations(self, events: Sequence[Event]) -> None:
        requests = await self.sender.decoded(AnnotationRequest, events)
        # The judge client bounds its own concurrency; the batch runs in parallel up to it.
        outcomes = await asyncio.gather(*(judge_once(self.judge, self.ledger, m) for _, m in requests))
        for (event, request), outcome in zip(requests, outcomes):
            if self.metrics is not None and not outcome.repeated:
                self._observe(request, outcome)
            if outcome.label is not None:
                await self.sender.send(self.topics.labels, outcome.label.id, messages.encode(outcome.label))
                self.counts["judged" if not outcome.repeated else "judge_repeats"] += 1
            elif not outcome.repeated:
                await self.sender.dead_letter(event, f"judge failed: {outcome.failure}")
                self.counts["judge_failures"] += 1

    def _observe(self, request: AnnotationRequest, outcome: JudgeOutcome) -> None:
        if outcome.label is None:
            self.metrics.observe_judge(0.0, ok=False)
            return
        self.metrics.observe_judge(outcome.label.latency_s, ok=True)
        # Agreement of the scorer's prediction with the judge; "confident" as the aleatoric rule means it.
        d = self.selection.delta_pred
        confident = bool(request.mu) and all(m >= d or m <= 1 - d for m in request.mu)
        self.metrics.observe_agreement(predicted_first_error(request.mu), outcome.label.first_error, confident)

    async def aclose(self) -> None:
        """Release the judge client (idempotent: a stop may come twice)."""
        if not self.closed:
            self.closed = True
            await self.judge.aclose()
