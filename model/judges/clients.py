"""The kinds of judge: gold labels (oracle), any OpenAI-compatible server, an in-process vLLM engine."""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import time
import uuid
from typing import Any

import httpx
import structlog

from actprm.model.judges.base import Judge, JudgeError, JudgeRequest, Judgement
from actprm.model.judges.verdict import PROMPT_VERSION, _require_steps, critique_messages, parse_verdict

log = structlog.get_logger("actprm")


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
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, timeout_s
        # The retry policy: attempts after the first, exponential backoff, and how long a server's Retry-After may ask for.
        self.max_retries, self.retry_after_max_s = max_retries, retry_after_max_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
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
