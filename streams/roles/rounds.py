"""Rounds and the annotation budget, kept by one writer.

Scorers send every candidate to a one-partition topic; the single round keeper admits them
in order while the round is annotating and its budget lasts, and forwards them to the judge.
One writer over one partition is what makes "the budget is never exceeded" hold with any
number of scorer processes. An id is charged once: a redelivered candidate that was already
admitted is forwarded again free of charge (the judge dedupes it), so nothing is lost.
The round a request belongs to is decided here, where it is admitted: a scorer in its own
process has no round keeper and cannot know it, so the forwarded request (and the label the
judge makes from it) carries the round the keeper admitted it in.
A request the judge gave up on for good comes back on the same topic (`judge_gave_up` set):
its charge is refunded to the round it was admitted in, if that round is still the current
one, and only once however often the notice is delivered.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from enum import Enum

from pydantic import BaseModel, Field

from actprm.client import messages
from actprm.streams.state.ledger import ADMITTED, META, Ledger

REFUNDED = "refunded"  # trajectory id -> the round whose budget got its charge back
from actprm.client.messages import AnnotationRequest
from actprm.streams.kafka.sender import Event, Sender
from actprm.client.topics import Topics


class RoundState(BaseModel):
    round_id: int = 0
    budget: int = 1000
    used: int = 0
    paused_annotate: bool = False
    paused_train: bool = False
    started_at: float = Field(default_factory=time.time)
    rejected_budget: int = 0  # candidates turned away because the budget was spent
    rejected_paused: int = 0  # candidates turned away while annotation was paused

    @property
    def left(self) -> int:
        return max(0, self.budget - self.used)


class Admission(str, Enum):
    NEW = "new"  # charged and forwarded
    RESEND = "resend"  # admitted before (redelivery): forwarded again, not charged
    OVER_BUDGET = "over_budget"
    PAUSED = "paused"


# The counter each verdict bumps: every candidate the keeper saw is in exactly one of them.
ADMISSION_COUNTERS: dict[Admission, str] = {
    Admission.NEW: "annotation_requests",
    Admission.RESEND: "annotation_resends",
    Admission.OVER_BUDGET: "not_requested_over_budget",
    Admission.PAUSED: "not_requested_paused",
}


class RoundKeeper:
    def __init__(self, ledger: Ledger, default_budget: int):
        self.ledger = ledger
        saved = ledger.get(META, "round")
        self.state = RoundState.model_validate(saved) if saved else RoundState(budget=default_budget)

    def _save(self) -> None:
        self.ledger.put(META, "round", self.state.model_dump(mode="json"))

    def admit(self, trajectory_id: str) -> Admission:
        if self.ledger.has(ADMITTED, trajectory_id):
            return Admission.RESEND
        s = self.state
        if s.paused_annotate:
            s.rejected_paused += 1
            return Admission.PAUSED
        if s.used >= s.budget:
            s.rejected_budget += 1
            return Admission.OVER_BUDGET
        s.used += 1
        with self.ledger.transaction():  # the charge and the id land together
            self.ledger.put(ADMITTED, trajectory_id, s.round_id)
            self._save()
        return Admission.NEW

    def refund(self, trajectory_id: str) -> bool:
        """Hand back the charge of a request the judge gave up on; False when there is
        nothing to refund (never admitted, refunded before, or admitted in an earlier round)."""
        if not self.ledger.has(ADMITTED, trajectory_id) or self.ledger.has(REFUNDED, trajectory_id):
            return False
        s = self.state
        if self.admitted_round(trajectory_id) != s.round_id or s.used == 0:
            return False
        s.used -= 1
        with self.ledger.transaction():  # the refund and its mark land together
            self.ledger.put(REFUNDED, trajectory_id, s.round_id)
            self._save()
        return True

    def admitted_round(self, trajectory_id: str) -> int:
        """The round an admitted id belongs to: the one it was charged in."""
        return self.ledger.get(ADMITTED, trajectory_id, self.state.round_id)

    def new_round(self, budget: int | None = None) -> RoundState:
        """Fresh counters; requests already admitted stay admitted and are still judged."""
        s = self.state
        self.state = RoundState(round_id=s.round_id + 1, budget=s.budget if budget is None else budget,
                                paused_annotate=s.paused_annotate, paused_train=s.paused_train)
        self._save()
        return self.state

    def pause(self, annotate: bool | None = None, train: bool | None = None) -> RoundState:
        if annotate is not None:
            self.state.paused_annotate = annotate
        if train is not None:
            self.state.paused_train = train
        self._save()
        return self.state


def in_round(request: AnnotationRequest, raw: bytes, round_id: int) -> bytes:
    """The request as forwarded to the judge: stamped with the round it was admitted in
    (the scorer's stamp is a guess, 0 when it runs without a round keeper)."""
    if request.round_id == round_id:
        return raw  # the bytes as they came: nothing to re-encode
    return messages.encode(request.model_copy(update={"round_id": round_id}))


class KeeperRole:
    """The round keeper of the trainer's process: admits candidates and forwards them to the judge."""

    def __init__(self, rounds: RoundKeeper, sender: Sender, topics: Topics):
        self.rounds, self.sender, self.topics = rounds, sender, topics
        self.counts: Counter = Counter()  # one of ADMISSION_COUNTERS' names per candidate seen

    async def on_candidates(self, events: Sequence[Event]) -> None:
        for event, msg in await self.sender.decoded(AnnotationRequest, events):
            if msg.judge_gave_up is not None:  # the judge's notice, not a candidate
                refunded = self.rounds.refund(msg.id)
                self.counts["annotation_refunds" if refunded else "annotation_refunds_declined"] += 1
                continue
            verdict = self.rounds.admit(msg.id)
            if verdict in (Admission.NEW, Admission.RESEND):
                # The keeper's round, not the scorer's stamp: a scorer in its own process has none.
                forward = in_round(msg, event.value, self.rounds.admitted_round(msg.id))
                await self.sender.send(self.topics.annotations, msg.id, forward)
            self.counts[ADMISSION_COUNTERS[verdict]] += 1

    def set_budget(self, budget: int) -> None:
        self.rounds.state.budget = budget
        self.rounds.pause()  # persists the round state, unchanged otherwise
