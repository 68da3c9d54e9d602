"""What a judge is: it turns an annotation request into the index of the first wrong step
(-1 = all correct), as a Judgement, or raises JudgeError.

A failure is never turned into a label: an unparseable or missing answer must not train the
PRM. The kinds of judge are in clients.py, the prompt and the verdict parser in verdict.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

@dataclass
class JudgeRequest:
    id: str
    problem: str
    steps: list[str]
    gold_first_error: int | None = None


@dataclass
class Judgement:
    id: str
    first_error: int  # index of the first wrong step, -1 = all steps correct
    judge: str
    latency_s: float
    raw: str | None = None  # the judge's answer text, kept for audits (None: the oracle says no text)
    prompt_version: str | None = None  # which critique prompt produced `raw`
    attempts: int = 1  # HTTP requests it took (retries = attempts - 1)


class JudgeError(Exception):
    """A judge failure, never a label. `retryable` says whether asking again may succeed.

    `answer` is the text that failed to parse (kept for the dead letter), `latency_s` the time
    the call really took, `attempts` the requests it made, and `retry_after_s` the wait the
    server asked for (HTTP Retry-After), if any."""

    def __init__(self, reason: str, retryable: bool, *, answer: str | None = None, latency_s: float = 0.0,
                 attempts: int = 1, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.answer = answer
        self.latency_s = latency_s
        self.attempts = attempts
        self.retry_after_s = retry_after_s


class Judge(Protocol):
    name: str

    async def judge(self, request: JudgeRequest) -> Judgement: ...

    async def aclose(self) -> None: ...
