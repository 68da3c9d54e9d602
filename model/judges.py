"""Judges: turn an annotation request into the index of the first wrong step (-1 = all correct).

A judge either returns a Judgement or raises JudgeError. A failure is never turned into a
label: an unparseable or missing answer must not train the PRM.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt


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
    raw: str | None = None  # the judge's answer text, kept for audits


class JudgeError(Exception):
    """A judge failure, never a label. `retryable` says whether asking again may succeed."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class Judge(Protocol):
    name: str

    async def judge(self, request: JudgeRequest) -> Judgement: ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Prompt and verdict


_CRITIQUE_TEMPLATE = """\
You are checking a step-by-step solution to a math problem. The solution is split into \
paragraphs; each is wrapped in tags and numbered from 0.

[Problem]

{problem}

[Solution]

{paragraphs}

Check the paragraphs in order, one at a time. For each one, verify its arithmetic, its \
algebra, its logic and how it uses the problem's conditions and the earlier paragraphs. \
A paragraph is wrong if it makes a mistake of its own; a paragraph that only carries \
forward an earlier mistake is not the earliest error. Stop at the first wrong paragraph: \
what comes after it does not matter.

Finish with one last line in exactly this form and write nothing after it:
\\boxed{{k}}
where k is the index of the earliest wrong paragraph (an integer from 0 to {last}), or \
\\boxed{{-1}} if every paragraph is correct. Put a single integer in the box."""


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


_BOXED = "\\boxed"
_INTEGER = re.compile(r"-?\d+")


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


def _last_box_content(text: str) -> str:
    start = text.rfind(_BOXED)
    if start < 0:
        raise _unparseable("no \\boxed{...} verdict")
    i = start + len(_BOXED)
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        raise _unparseable("the last \\boxed has no {...}")
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    raise _unparseable("the last \\boxed{ is never closed")


def parse_verdict(text: str, n_steps: int) -> int:
    """The first-error index in the judge's LAST \\boxed{...}; raises JudgeError when unsure.

    Strict on purpose: the box must hold exactly one integer in [-1, n_steps - 1]. Anything
    else (no box, "2, 3", "two", out of range) is a judge failure, never a guessed label.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    content = _last_box_content(_answer_part(text)).strip()
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


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, JudgeError) and exc.retryable


class OpenAIJudge:
    """Any OpenAI-compatible /v1/chat/completions server.

    base_url is what OpenAI clients take, e.g. "http://host:8000/v1".
    max_retries counts retries after the first attempt (as OpenAI clients do): 3 means at
    most 4 requests, 0 means one.
    Timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff and
    jitter; other 4xx, malformed responses and unparseable answers are not.
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
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._semaphore = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency),
        )

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
        text, finish_reason = await self._post_with_retries(payload)
        try:
            first_error = parse_verdict(text, len(request.steps))
        except JudgeError as exc:
            if finish_reason == "length":
                # Truncation is the usual cause of a missing box; say so to guide max_tokens.
                raise JudgeError(
                    f"{exc.reason} (answer cut at max_tokens={self.max_tokens})", retryable=False
                ) from exc
            raise
        return Judgement(request.id, first_error, self.name, time.monotonic() - started, raw=text)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post_with_retries(self, payload: dict[str, Any]) -> tuple[str, str | None]:
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._backoff,
            retry=retry_if_exception(_is_retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    return await self._post_once(payload)
        except JudgeError as exc:
            if exc.retryable:
                tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
                raise JudgeError(f"{exc.reason} after {tries}", retryable=True) from exc
            raise
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _backoff(self, retry_state: RetryCallState) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, capped.

        The random half spreads out many judges that failed together (a restarting server).
        """
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (retry_state.attempt_number - 1))
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


def _read_completion(response: httpx.Response) -> tuple[str, str | None]:
    """(answer text, finish_reason) from a chat-completions response, or a JudgeError."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise JudgeError(f"judge HTTP {status}", retryable=True)
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
        text = final.outputs[0].text
        first_error = parse_verdict(text, len(request.steps))
        return Judgement(request.id, first_error, self.name, time.monotonic() - started, raw=text)

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
_HTTP_ONLY = {"base_url", "api_key", "max_retries", "backoff_initial_s", "backoff_max_s", "concurrency"}
_DROPPED = {"oracle": _HTTP_ONLY | {"model", "temperature", "max_tokens", "timeout_s"}, "vllm": _HTTP_ONLY}


def make_judge(kind: str, **settings: Any) -> Judge:
    """A judge by kind: "oracle" | "openai" | "vllm"; settings go to its constructor."""
    key = kind.strip().lower()
    cls = _KINDS.get(key)
    if cls is None:
        raise ValueError(f"unknown judge kind {kind!r}; expected one of: {', '.join(_KINDS)}")
    dropped = _DROPPED.get(key, set())
    return cls(**{name: value for name, value in settings.items() if name not in dropped})
