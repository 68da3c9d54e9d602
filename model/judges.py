"""Judges: turn an annotation request into the index of the first wrong step (-1 = all correct).

A judge either returns a Judgement or raises JudgeError. A failure is never turned into a
label: an unparseable or missing answer must not train the PRM.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import structlog

log = structlog.get_logger("actprm")


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


# ---------------------------------------------------------------------------------------------
# Prompt and verdict
#
# The prompt follows ProcessBench's critique format (paragraphs tagged and numbered from 0, the
# earliest wrong paragraph's index in a box, -1 when none) and the ActivePRM labelling prompt's
# way of reviewing (paragraph by paragraph, stop at the first error: later paragraphs may only
# carry it forward). The instruction never shows a filled box such as the "all correct" one:
# a small model that copies the instruction would otherwise hand back a verdict it never gave.

PROMPT_VERSION = "critique-2"  # change it with any change to the template or to the parser's rules

_CRITIQUE_TEMPLATE = """\
The following is a math problem and a solution to it. The solution is split into paragraphs; \
each is wrapped in tags and numbered from 0.

[Problem]

{problem}

[Solution]

{paragraphs}

Review the solution paragraph by paragraph, in order. For each one, check its arithmetic, its \
algebra, its logic and how it uses the problem's conditions and the earlier paragraphs. \
A paragraph is wrong if it makes a mistake of its own; a paragraph that only carries \
forward an earlier mistake is not the earliest error. Stop at the first wrong paragraph: \
what comes after it does not matter.

When you are done, write your verdict alone on the last line: a LaTeX box, \\boxed{{}}, holding \
one integer, the number of the earliest wrong paragraph (from 0 to {last}); if no paragraph \
is wrong, the integer is minus one. Write nothing after the box."""

# Runs of this many words of the instruction found in an answer mark an echo of the prompt.
_ECHO_WORDS = 8


def critique_messages(problem: str, steps: list[str]) -> list[dict[str, str]]:
    """Chat messages asking the judge for the earliest wrong paragraph (ProcessBench style).

    One user message and no system prompt: reasoning judges such as QwQ are tuned that way.
    """
    if not steps:
        raise ValueError("a critique needs at least one step")
    paragraphs = "\n\n".join(
        f"<paragraph_{i}>\n{step.strip()}\n</paragraph_{i}>" for i, step in enumerate(steps)
    )
    text = _CRITIQUE_TEMPLATE.format(problem=problem.strip(), paragraphs=paragraphs, last=len(steps) - 1)
    return [{"role": "user", "content": text}]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(words: list[str], n: int = _ECHO_WORDS) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# The instruction's own words (the template without the problem and the paragraphs).
_INSTRUCTION_SHINGLES = _shingles(_words(re.sub(r"\{\w*\}", " ", _CRITIQUE_TEMPLATE)))

_BOX = re.compile(r"\\boxed\s*\{")
_INTEGER = re.compile(r"-?\d+")
# What may follow the verdict's box on its line: closing markup and punctuation only.
_AFTER_BOX = re.compile(r"[\s.!$*_)\]`]*")


def _unparseable(detail: str) -> JudgeError:
    return JudgeError(f"unparseable judge answer: {detail}", retryable=False)


def _answer_part(text: str) -> str:
    """The text after the reasoning: a box inside <think> is a draft, not the verdict."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        # The reasoning never ended (e.g. cut at max_tokens), so there is no final answer.
        raise _unparseable("reasoning never finished (<think> without </think>)")
    return text


def _box_contents(line: str) -> list[tuple[str, int]]:
    """Each \\boxed{...} of the line: its content and where its closing brace ends."""
    out = []
    for m in _BOX.finditer(line):
        depth, i = 1, m.end()
        while i < len(line) and depth:
            depth += {"{": 1, "}": -1}.get(line[i], 0)
            i += 1
        if depth:
            raise _unparseable("the verdict's \\boxed{ is never closed")
        out.append((line[m.end() : i - 1], i))
    return out


def parse_verdict(text: str, n_steps: int, finish_reason: str | None = None) -> int:
    """The first-error index the judge gives as its answer; raises JudgeError when unsure.

    The verdict counts only where the judge states it as its answer: one \\boxed{k} on the
    last line after any <think> reasoning, with nothing but closing punctuation after it, k a
    single integer in [-1, n_steps - 1]; a box inside <think> is a draft, and boxes elsewhere
    in the answer that say otherwise leave the verdict in doubt. An answer that
    repeats the prompt's instruction, was cut at max_tokens (finish_reason "length") or ends
    mid-sentence after its box is a judge failure, never a guessed label.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if finish_reason == "length":
        raise _unparseable("the answer was cut at max_tokens before it ended")
    answer = _answer_part(text or "").strip()
    if not answer:
        raise _unparseable("no answer text")
    if _shingles(_words(answer)) & _INSTRUCTION_SHINGLES:
        raise _unparseable("the answer repeats the prompt's instruction")
    last = answer.splitlines()[-1]
    boxes = _box_contents(last)
    if not boxes:
        raise _unparseable("no \\boxed{...} verdict on the answer's last line")
    if len(boxes) > 1:
        raise _unparseable(f"{len(boxes)} boxes on the answer's last line")
    # Boxes that disagree (a box per paragraph, a changed mind outside <think>) leave the verdict in doubt.
    others = {c.strip() for line in answer.splitlines()[:-1] for c, _ in _box_contents(line)}
    if others - {boxes[0][0].strip()}:
        raise _unparseable(f"the answer's boxes disagree ({', '.join(sorted(others | {boxes[0][0].strip()}))[:60]})")
    content, end = boxes[0]
    if not _AFTER_BOX.fullmatch(last[end:]):
        raise _unparseable(f"the answer goes on after its box: {last[end:][:60]!r}")
    content = content.strip()
    if not _INTEGER.fullmatch(content):
        raise _unparseable(f"final box holds {content[:60]!r}, not one integer")
    verdict = int(content)
    if not -1 <= verdict <= n_steps - 1:
        raise _unparseable(f"verdict {verdict} is outside [-1, {n_steps - 1}]")
    return verdict


def _require_steps(request: JudgeRequest) -> None:
    if not request.steps:
        raise JudgeError(f"request {request.id!r} has no steps to judge", retryable=False)


# ---------------------------------------------------------------------------------------------
# Oracle


class OracleJudge:
    """Returns the gold first-error index carried by the request (benchmarks, replays)."""

    name = "oracle"
    model = None
    prompt_version = None  # no prompt: the gold label

    async def judge(self, request: JudgeRequest) -> Judgement:
        started = time.monotonic()
        gold = request.gold_first_error
        if gold is None:
            raise JudgeError(f"request {request.id!r} has no gold first-error index", retryable=False)
        # bool is an int subclass; True would silently mean step 1.
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise JudgeError(f"gold first-error index {gold!r} is not an integer", retryable=False)
        if not -1 <= gold <= len(request.steps) - 1:
            raise JudgeError(
                f"gold first-error index {gold} is outside [-1, {len(request.steps) - 1}]", retryable=False
            )
        return Judgement(request.id, gold, self.name, time.monotonic() - started)

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP server (vLLM, SGLang, ...)


class OpenAIJudge:
    """Any OpenAI-compatible /v1/chat/completions server.

    base_url is what OpenAI clients take, e.g. "http://host:8000/v1".
    max_retries counts retries after the first attempt (as OpenAI clients do): 3 means at
    most 4 requests, 0 means one.
    Timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff and
    jitter, never sooner than the server's Retry-After; a Retry-After longer than
    retry_after_max_s ends the call at once (retryable, with the wait the server asked for)
    so that the caller's retry queue asks again later. Other 4xx, malformed responses and
    unparseable answers are not retried.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 120.0,
        concurrency: int = 8,
        temperature: float = 0.5,
        max_tokens: int = 8192,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.name = f"openai:{model}"
        self.model = model
        self.prompt_version = PROMPT_VERSION
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._semaphore = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency),
        )

    def longest_call_s(self) -> float:
        """The longest one judge() may take while healthy: every attempt up to its timeout,
        and the longest wait between attempts (the liveness check allows this much)."""
        waits = self.max_retries * max(self.backoff_max_s, self.retry_after_max_s)
        return (self.max_retries + 1) * self.timeout_s + waits

    async def judge(self, request: JudgeRequest) -> Judgement:
        _require_steps(request)
        started = time.monotonic()
        payload = {
            "model": self.model,
            "messages": critique_messages(request.problem, request.steps),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "n": 1,
            "stream": False,
        }
        try:
            (text, finish_reason), attempts = await self._post_with_retries(payload)
            try:
                first_error = parse_verdict(text, len(request.steps), finish_reason)
            except JudgeError as exc:
                if finish_reason == "length":
                    # Truncation is the usual cause of a missing verdict; say so to guide max_tokens.
                    exc.reason = f"{exc.reason} (max_tokens={self.max_tokens})"
                exc.answer, exc.attempts = text, attempts
                raise
        except JudgeError as exc:
            exc.latency_s = time.monotonic() - started  # a failure's real cost, not 0
            raise
        return Judgement(request.id, first_error, self.name, time.monotonic() - started, raw=text,
                         prompt_version=PROMPT_VERSION, attempts=attempts)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post_with_retries(self, payload: dict[str, Any]) -> tuple[tuple[str, str | None], int]:
        """(the answer, finish_reason) and the attempts it took; a JudgeError once retrying ends."""
        last = self.max_retries + 1
        for attempt in range(1, last + 1):
            try:
                return await self._post_once(payload), attempt
            except JudgeError as exc:
                exc.attempts = attempt
                asked = exc.retry_after_s or 0.0
                if not exc.retryable or attempt == last or asked > self.retry_after_max_s:
                    if exc.retryable:
                        tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
                        exc.reason = f"{exc.reason} after {tries}"
                    raise
                delay = max(self._backoff(attempt), asked)
                log.info("judge call failed; retrying", reason=exc.reason, attempt=attempt, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, capped.

        The random half spreads out many judges that failed together (a restarting server).
        """
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        return base / 2 + random.uniform(0, base / 2)

    async def _post_once(self, payload: dict[str, Any]) -> tuple[str, str | None]:
        """One HTTP request; every failure becomes a JudgeError whose flag drives the retry."""
        async with self._semaphore:
            try:
                # httpx's timeout is per read; this bounds the whole request as well.
                async with asyncio.timeout(self.timeout_s):
                    response = await self._client.post(self.url, json=payload)
            except (TimeoutError, httpx.TimeoutException) as exc:
                raise JudgeError(f"judge timed out after {self.timeout_s:g} s", retryable=True) from exc
            except httpx.UnsupportedProtocol as exc:
                raise JudgeError(f"judge URL {self.url!r} is not http(s): {exc}", retryable=False) from exc
            except httpx.TransportError as exc:
                detail = f"{type(exc).__name__}: {exc}"
                raise JudgeError(f"judge connection error ({detail})", retryable=True) from exc
            except httpx.RequestError as exc:
                detail = f"{type(exc).__name__}: {exc}"
                raise JudgeError(f"judge request failed ({detail})", retryable=False) from exc
        return _read_completion(response)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds an HTTP Retry-After header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _read_completion(response: httpx.Response) -> tuple[str, str | None]:
    """(answer text, finish_reason) from a chat-completions response, or a JudgeError."""
    status = response.status_code
    if status == 429 or status >= 500:
        asked = retry_after_s(response.headers.get("retry-after"))
        said = f" (Retry-After {asked:g} s)" if asked is not None else ""
        raise JudgeError(f"judge HTTP {status}{said}", retryable=True, retry_after_s=asked)
    if status >= 400:
        raise JudgeError(f"judge HTTP {status}: {response.text[:200]!r}", retryable=False)
    try:
        body = response.json()
    except ValueError as exc:
        snippet = response.text[:120]
        raise JudgeError(f"malformed judge response (not JSON): {snippet!r}", retryable=False) from exc
    try:
        choice = body["choices"][0]
        message = choice["message"]
        content = message.get("content")
        finish_reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise JudgeError(
            f"malformed judge response (no choices[0].message): {str(body)[:120]!r}", retryable=False
        ) from exc
    if content is None:
        # A reasoning parser may keep the thinking apart and leave content empty when cut.
        content = ""
    if not isinstance(content, str):
        raise JudgeError(f"malformed judge response (content is {type(content).__name__})", retryable=False)
    return content, finish_reason


# ---------------------------------------------------------------------------------------------
# In-process vLLM engine (GPU host, optional extra)


class VLLMJudge:
    """A vLLM engine in this process. The async engine batches concurrent requests itself.

    engine_args go to vllm's AsyncEngineArgs (e.g. tensor_parallel_size, max_model_len).
    device: "cuda" / "auto" (the current GPU) or "cuda:N"; gpu_memory_utilization: the share of
    that GPU's memory the engine takes (lower it to leave room for the scorer on the same GPU).
    A host without CUDA is refused at once: vLLM on a CPU would take hours per judgement.
    """

    def __init__(
        self,
        model: str,
        temperature: float = 0.5,
        max_tokens: int = 8192,
        timeout_s: float | None = 1800.0,
        engine_args: dict[str, Any] | None = None,
        device: str = "cuda",
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        index = _vllm_gpu(device)
        try:
            # Imported here so that CPU hosts without the extra can still use other judges.
            from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
        except ImportError as exc:
            raise JudgeError(
                f"the vllm judge needs `pip install actprm[vllm]` on a GPU host ({exc})", retryable=False
            ) from exc
        from transformers import AutoTokenizer

        self.name = f"vllm:{model}"
        self.model, self.prompt_version = model, PROMPT_VERSION
        self.timeout_s = timeout_s
        # The tokenizer's own chat template, so the prompt matches what the model was tuned on.
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self._sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=1)
        args = {"gpu_memory_utilization": gpu_memory_utilization, **(engine_args or {})}
        # vLLM has no device index: its engine process sees the GPUs CUDA_VISIBLE_DEVICES names.
        # This process has initialised CUDA already (in _vllm_gpu), so narrowing the variable
        # while the engine starts changes only what the engine sees.
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if index is not None:
            visible = saved.split(",") if saved else [str(i) for i in range(_cuda_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[index]
        try:
            self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model, **args))
        finally:
            if index is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved

    async def judge(self, request: JudgeRequest) -> Judgement:
        _require_steps(request)
        started = time.monotonic()
        prompt = self._tokenizer.apply_chat_template(
            critique_messages(request.problem, request.steps), tokenize=False, add_generation_prompt=True
        )
        # Unique per call: the same trajectory id may be judged again after a failure.
        request_id = f"{request.id}-{uuid.uuid4().hex}"
        try:
            async with asyncio.timeout(self.timeout_s):
                final = None
                async for output in self._engine.generate(prompt, self._sampling, request_id):
                    final = output
        except TimeoutError as exc:
            await self._engine.abort(request_id)
            raise JudgeError(f"vllm judge timed out after {self.timeout_s:g} s", retryable=True) from exc
        except ValueError as exc:
            # vLLM rejects bad inputs (e.g. a prompt longer than the context) with ValueError.
            raise JudgeError(f"vllm rejected the request: {exc}", retryable=False) from exc
        if final is None or not final.outputs:
            raise JudgeError("vllm returned no output", retryable=True)
        text, finish_reason = final.outputs[0].text, final.outputs[0].finish_reason
        try:
            first_error = parse_verdict(text, len(request.steps), finish_reason)
        except JudgeError as exc:
            exc.answer, exc.latency_s = text, time.monotonic() - started
            raise
        return Judgement(request.id, first_error, self.name, time.monotonic() - started, raw=text,
                         prompt_version=PROMPT_VERSION)

    async def aclose(self) -> None:
        shutdown = getattr(self._engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def _vllm_gpu(device: str) -> int | None:
    """The GPU index judge.device names (None: the current one); a CPU host is a one-line JudgeError."""
    import torch

    if not torch.cuda.is_available():
        raise JudgeError("the vllm judge runs in-process on a CUDA GPU and this host has none; use judge.kind=openai "
                         "against a vLLM server, or run the judge role after `pip install actprm[vllm]` on a GPU host",
                         retryable=False)
    torch.cuda.init()
    key = device.strip().lower()
    if key in ("auto", "cuda"):
        return None
    m = re.fullmatch(r"cuda:(\d+)", key)
    if m is None or int(m.group(1)) >= torch.cuda.device_count():
        raise JudgeError(f"judge.device {device!r} is not one of this host's {torch.cuda.device_count()} CUDA devices",
                         retryable=False)
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------


_KINDS = {"oracle": OracleJudge, "openai": OpenAIJudge, "vllm": VLLMJudge}
# Settings only the HTTP judge uses. Other kinds drop them, so that one settings section can
# feed any kind; any other unknown setting is still a TypeError (a typo must not pass).
_HTTP_ONLY = {"base_url", "api_key", "max_retries", "backoff_initial_s", "backoff_max_s", "retry_after_max_s",
              "concurrency"}
_DROPPED = {"oracle": _HTTP_ONLY | {"model", "temperature", "max_tokens", "timeout_s"}, "vllm": _HTTP_ONLY}


def make_judge(kind: str, **settings: Any) -> Judge:
    """A judge by kind: "oracle" | "openai" | "vllm"; settings go to its constructor."""
    key = kind.strip().lower()
    cls = _KINDS.get(key)
    if cls is None:
        raise ValueError(f"unknown judge kind {kind!r}; expected one of: {', '.join(_KINDS)}")
    dropped = _DROPPED.get(key, set())
    return cls(**{name: value for name, value in settings.items() if name not in dropped})


# ---------------------------------------------------------------------------------------------
# How good is a judge? Its verdicts on gold-labelled records, as ProcessBench scores a labeller.


def _percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def judge_quality(judge: Judge, records: list, concurrency: int = 1, on_done=None) -> dict:
    """Judge each record (id, problem, steps, label: the gold first error) and score the verdicts.

    f1 and agreement count a failure (an unparseable answer, a timeout) as a wrong label: that
    is what a labeller built on this judge delivers; f1_parsed and agreement_parsed count only
    the answers that gave a verdict. `on_done` is called after each record (a progress bar).
    """
    from actprm.model.metrics import processbench_scores

    slots = asyncio.Semaphore(max(1, concurrency))
    results: list[dict] = []

    async def one(record) -> None:
        async with slots:
            started = time.monotonic()
            try:
                verdict = await judge.judge(JudgeRequest(record.id, record.problem, record.steps, record.label))
            except JudgeError as err:
                results.append({"id": record.id, "gold": record.label, "verdict": None, "reason": err.reason,
                                "latency_s": err.latency_s or time.monotonic() - started, "attempts": err.attempts})
            else:
                results.append({"id": record.id, "gold": record.label, "verdict": verdict.first_error,
                                "latency_s": verdict.latency_s, "attempts": verdict.attempts})
        if on_done is not None:
            on_done()

    await asyncio.gather(*(one(r) for r in records))
    parsed = [r for r in results if r["verdict"] is not None]
    # A failure is a wrong label: -2 matches no gold first error and is not "all correct".
    every = processbench_scores([-2 if r["verdict"] is None else r["verdict"] for r in results],
                                [r["gold"] for r in results])
    among = processbench_scores([r["verdict"] for r in parsed], [r["gold"] for r in parsed])
    latencies = [r["latency_s"] for r in results]
    # Failures by kind: the reason without its particulars (quoted text, figures in brackets).
    reasons = Counter(re.sub(r" [('\"].*", "", r["reason"])[:100] for r in results if r["verdict"] is None)
    rounded = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "judge": getattr(judge, "name", "?"), "prompt_version": getattr(judge, "prompt_version", None), "n": len(results),
        "n_error": every["n_error"], "n_correct": every["n_correct"],
        "f1": rounded(every["f1"]), "acc_error": rounded(every["acc_error"]), "acc_correct": rounded(every["acc_correct"]),
        "agreement": rounded(sum(r["verdict"] == r["gold"] for r in results) / len(results)) if results else None,
        "parse_rate": rounded(len(parsed) / len(results)) if results else None,
        "f1_parsed": rounded(among["f1"]),
        "agreement_parsed": rounded(sum(r["verdict"] == r["gold"] for r in parsed) / len(parsed)) if parsed else None,
        "latency_p50_s": rounded(_percentile(latencies, 0.5)), "latency_p99_s": rounded(_percentile(latencies, 0.99)),
        "retries": sum(r["attempts"] - 1 for r in results),
        "failures": dict(reasons.most_common(8)),
        "verdicts_predicted_all_correct": sum(r["verdict"] == -1 for r in parsed),
    }
