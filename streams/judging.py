"""Judge worker logic: each trajectory is judged at most once, whatever Kafka redelivers.

The outcome (a label or a failure) is written to the ledger before it is sent; a redelivered
request gets the stored outcome again instead of a second judge call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from actprm.model.judges import Judge, JudgeError, JudgeRequest
from actprm.streams.ledger import JUDGED, Ledger
from actprm.streams.messages import AnnotationRequest, Label


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
