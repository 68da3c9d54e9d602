"""Judges against a real local HTTP server that speaks the OpenAI chat-completions shape."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actprm.model.judges.base import JudgeError, JudgeRequest

from actprm.model.judges.clients import OpenAIJudge, OracleJudge, make_judge

from actprm.model.judges.verdict import critique_messages, parse_verdict
from support.network import free_port

STEPS = ["Let x = 2.", "Then 2x = 4.", "So 4 + 1 = 6.", "The answer is 6."]
REQUEST = JudgeRequest(id="t-1", problem="What is 2*2 + 1?", steps=STEPS)


# ---------------------------------------------------------------------------------------------
# A scriptable chat-completions server


class FakeServer:
    """Answers request n with script[n] (the last entry repeats). Records what it saw.

    Script entries: ("answer", text) | ("status", code) | ("raw", body) | ("json", obj)
    | ("hang", seconds) | ("slow", seconds, text).
    """

    def __init__(self) -> None:
        self.script: list[tuple] = [("answer", "\\boxed{-1}")]
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.stop = threading.Event()  # wakes hanging handlers at teardown
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def requests(self) -> int:
        return len(self.bodies)

    def _next_action(self, body: dict, headers: dict) -> tuple:
        with self._lock:
            n = len(self.bodies)
            self.bodies.append(body)
            self.headers.append(headers)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self.script[min(n, len(self.script) - 1)]

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                return None

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                action = server._next_action(body, dict(self.headers))
                try:
                    self._act(action)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to answer
                finally:
                    server._done()

            def _act(self, action: tuple) -> None:
                kind = action[0]
                if kind == "answer":
                    self._send(200, json.dumps(completion(action[1])))
                elif kind == "slow":
                    time.sleep(action[1])
                    self._send(200, json.dumps(completion(action[2])))
                elif kind == "hang":
                    server.stop.wait(action[1])
                    self._send(200, json.dumps(completion("\\boxed{0}")))
                elif kind == "status":  # ("status", code) or ("status", code, {header: value})
                    headers = action[2] if len(action) > 2 else {}
                    self._send(action[1], json.dumps({"error": {"message": "scripted failure"}}), headers)
                elif kind == "raw":
                    self._send(200, action[1])
                elif kind == "json":
                    self._send(200, json.dumps(action[1]))
                else:
                    raise ValueError(f"unknown script action {kind!r}")

            def _send(self, status: int, text: str, headers: dict | None = None) -> None:
                data = text.encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str, finish_reason: str = "stop") -> dict:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
    }


@pytest.fixture
def server():
    srv = FakeServer()
    srv.start()
    yield srv
    srv.close()


def judge_once(base_url: str, request: JudgeRequest = REQUEST, **settings):
    """Build a judge inside the loop (httpx binds to it), judge one request, close."""

    async def go():
        judge = OpenAIJudge(base_url, "qwq", **fast(settings))
        try:
            return await judge.judge(request)
        finally:
            await judge.aclose()

    return asyncio.run(go())


def fast(settings: dict) -> dict:
    # Small timeouts and backoff so the whole file runs in seconds.
    return {"timeout_s": 2.0, "max_retries": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.05} | settings


def judge_error(base_url: str, **settings) -> JudgeError:
    with pytest.raises(JudgeError) as info:
        judge_once(base_url, **settings)
    return info.value


# ---------------------------------------------------------------------------------------------
# OpenAIJudge over HTTP


def test_answer_gives_first_error_and_sends_settings(server):
    server.script = [("answer", "Paragraph 0 is fine. Paragraph 2 adds wrongly.\n\\boxed{2}")]
    result = judge_once(server.base_url, api_key="secret", temperature=0.5, max_tokens=1234)
    assert (result.id, result.first_error, result.judge) == ("t-1", 2, "openai:qwq")
    assert result.raw.endswith("\\boxed{2}") and result.latency_s >= 0
    body = server.bodies[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("qwq", 0.5, 1234)
    assert "<paragraph_3>\nThe answer is 6.\n</paragraph_3>" in body["messages"][-1]["content"]
    assert server.headers[0]["Authorization"] == "Bearer secret"


def test_all_correct_answer(server):
    server.script = [("answer", "<think>maybe \\boxed{1}?</think>All paragraphs hold.\n\\boxed{-1}")]
    assert judge_once(server.base_url).first_error == -1


def test_503_twice_then_success_retries(server):
    server.script = [("status", 503), ("status", 503), ("answer", "\\boxed{2}")]
    assert judge_once(server.base_url, max_retries=2).first_error == 2
    assert server.requests == 3  # the first attempt and two retries


def test_429_is_retried(server):
    server.script = [("status", 429), ("answer", "\\boxed{1}")]
    assert judge_once(server.base_url).first_error == 1
    assert server.requests == 2


def test_retry_after_is_waited_for_before_the_next_attempt(server):
    server.script = [("status", 429, {"Retry-After": "1"}), ("answer", "\\boxed{1}")]
    started = time.monotonic()
    result = judge_once(server.base_url)  # backoff is 0.01 s; the server asked for 1 s
    assert result.first_error == 1 and result.attempts == 2
    assert time.monotonic() - started >= 1.0


def test_a_retry_after_longer_than_allowed_ends_the_call_retryable_with_the_wait(server):
    server.script = [("status", 503, {"Retry-After": "3600"}), ("answer", "\\boxed{1}")]
    err = judge_error(server.base_url, retry_after_max_s=60)
    assert err.retryable and err.retry_after_s == 3600 and "Retry-After 3600" in err.reason
    assert server.requests == 1  # not waited for here: the retry queue asks again in an hour


def test_retry_after_as_an_http_date():
    from email.utils import formatdate

    from actprm.model.judges.clients import retry_after_s

    assert 59 <= retry_after_s(formatdate(time.time() + 60, usegmt=True)) <= 61
    assert retry_after_s("120") == 120 and retry_after_s("soon") is None and retry_after_s(None) is None


def test_a_failed_call_records_its_real_latency(server):
    server.script = [("hang", 10.0)]
    err = judge_error(server.base_url, timeout_s=0.3, max_retries=1)
    assert err.latency_s >= 0.6 and err.attempts == 2


def test_always_500_gives_up_after_max_retries(server):
    server.script = [("status", 500)]
    err = judge_error(server.base_url, max_retries=3)
    assert err.retryable
    assert err.reason == "judge HTTP 500 after 4 attempts"
    assert server.requests == 4


def test_max_retries_zero_means_one_attempt(server):
    server.script = [("status", 503), ("answer", "\\boxed{0}")]
    err = judge_error(server.base_url, max_retries=0)
    assert err.reason == "judge HTTP 503 after 1 attempt"
    assert server.requests == 1


def test_400_is_not_retried(server):
    server.script = [("status", 400)]
    err = judge_error(server.base_url)
    assert not err.retryable and "HTTP 400" in err.reason
    assert server.requests == 1


def test_hang_past_timeout(server):
    server.script = [("hang", 10.0)]
    started = time.monotonic()
    err = judge_error(server.base_url, timeout_s=0.2, max_retries=1)
    assert err.retryable and "timed out" in err.reason and "after 2 attempts" in err.reason
    assert server.requests == 2
    assert time.monotonic() - started < 2.0  # two 0.2 s timeouts plus tiny backoff


def test_refused_connection():
    err = judge_error(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    assert err.retryable
    assert "connection error" in err.reason and "after 2 attempts" in err.reason


@pytest.mark.parametrize(
    "action, words",
    [
        (("raw", "<html>bad gateway</html>"), "not JSON"),
        (("json", {"object": "chat.completion"}), "no choices"),
        (("json", {"choices": []}), "no choices"),
        (("json", {"choices": [{"message": {"content": 3}}]}), "content is int"),
    ],
)
def test_malformed_response_is_a_failure(server, action, words):
    server.script = [action]
    err = judge_error(server.base_url)
    assert not err.retryable and "malformed judge response" in err.reason and words in err.reason
    assert server.requests == 1


@pytest.mark.parametrize(
    "answer",
    [
        "Paragraph 2 looks wrong.",  # no box
        "\\boxed{7}",  # out of range for 4 steps
        "\\boxed{-2}",
        "\\boxed{two}",
        "\\boxed{1, 2}",
        "\\boxed{2.0}",
        "<think>the error is in \\boxed{2}",  # reasoning cut off, no final answer
        "",
    ],
)
def test_unparseable_answer_is_never_a_label(server, answer):
    server.script = [("answer", answer)]
    err = judge_error(server.base_url)
    assert not err.retryable and err.reason.startswith("unparseable judge answer")
    assert server.requests == 1  # not retried: same prompt, same failure


def test_truncated_answer_mentions_max_tokens(server):
    server.script = [("json", completion("Paragraph 0 is fine. Paragraph 1", finish_reason="length"))]
    err = judge_error(server.base_url, max_tokens=64)
    assert err.reason.startswith("unparseable judge answer") and "max_tokens=64" in err.reason


def test_concurrency_limit_is_honoured(server):
    server.script = [("slow", 0.15, "\\boxed{0}")]

    async def go():
        judge = OpenAIJudge(server.base_url, "qwq", **fast({"concurrency": 2}))
        try:
            requests = [JudgeRequest(f"r{i}", "p", STEPS) for i in range(6)]
            return await asyncio.gather(*(judge.judge(r) for r in requests))
        finally:
            await judge.aclose()

    results = asyncio.run(go())
    assert [r.first_error for r in results] == [0] * 6
    assert server.requests == 6
    assert server.max_in_flight == 2  # reached, never exceeded


def test_request_without_steps_is_rejected_before_sending(server):
    with pytest.raises(JudgeError) as info:
        judge_once(server.base_url, request=JudgeRequest("e", "p", []))
    assert not info.value.retryable
    assert server.requests == 0


# ---------------------------------------------------------------------------------------------
# parse_verdict


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("\\boxed{2}", 4, 2),
        ("\\boxed{-1}", 4, -1),
        ("\\boxed{ 0 }", 1, 0),
        ("\\boxed {3}", 4, 3),
        ("Paragraph 3 is wrong: \\boxed{3}.\nSo the answer is\n\\boxed{3}", 4, 3),  # boxes that agree
        ("<think>\\boxed{0} no wait</think>\nFinal: \\boxed{-1}", 2, -1),
        ("reasoning only, chat template opened <think>\n...</think>\\boxed{1}", 2, 1),
        ("\\boxed{-1}", 0, -1),
        ("Paragraph 1 adds wrongly.\nThe earliest error is in paragraph \\boxed{1}.", 4, 1),
        ("Final answer: $\\boxed{2}$", 4, 2),
        ("**\\boxed{0}**\n\n", 2, 0),
    ],
)
def test_parse_verdict_accepts(text, n, expected):
    assert parse_verdict(text, n) == expected


@pytest.mark.parametrize(
    "text, n",
    [
        ("", 3),
        ("the answer is 2", 3),
        ("\\boxed{}", 3),
        ("\\boxed{3}", 3),  # out of range
        ("\\boxed{-2}", 3),
        ("\\boxed{1} and \\boxed{x}", 3),  # only the last box counts
        ("\\boxed{1 or 2}", 3),
        ("\\boxed{1, 2}", 3),
        ("\\boxed{+1}", 3),
        ("\\boxed{1.5}", 3),
        ("\\boxed{\\text{1}}", 3),
        ("\\boxed{2", 3),
        ("\\boxed 2", 3),
        ("<think>\\boxed{1}", 3),  # reasoning never finished
        ("<think>\\boxed{1}</think> no verdict here", 3),  # a draft box is not a verdict
        ("\\boxed{0}", 0),
        ("\\boxed{1} and then", 3),  # the answer goes on after its box: cut mid-sentence
        ("\\boxed{2}\nParagraph 3 also", 4),  # the last line holds no verdict
        ("\\boxed{1} \\boxed{2}", 3),  # two boxes on the last line
        ("First I thought \\boxed{1}, but paragraph 3 is the real error.\n\\boxed{3}", 4),  # boxes disagree
        ("Paragraph 0: \\boxed{1}\nParagraph 1: \\boxed{0}\nParagraph 2: \\boxed{1}", 3),  # a box per paragraph
        ("Review the solution paragraph by paragraph, in order. For each one, check its arithmetic\n"
         "\\boxed{-1}", 3),
        ("if no paragraph is wrong, the integer is minus one. Write nothing after the box.\n\\boxed{-1}", 3),
    ],
)
def test_parse_verdict_rejects(text, n):
    with pytest.raises(JudgeError) as info:
        parse_verdict(text, n)
    assert not info.value.retryable
    assert info.value.reason.startswith("unparseable judge answer")


def test_an_answer_cut_at_max_tokens_is_refused_even_with_a_box():
    with pytest.raises(JudgeError, match="cut at max_tokens"):
        parse_verdict("Paragraph 0 is right.\n\\boxed{0}", 3, finish_reason="length")


def test_the_prompt_instruction_echoed_is_refused():
    prompt = critique_messages("What is 1+1?", ["1+1=2.", "So 2."])[0]["content"]
    echo = prompt[prompt.index("Review the solution"):]
    with pytest.raises(JudgeError, match="repeats the prompt"):
        parse_verdict(echo + "\n\\boxed{-1}", 2)


@given(n=st.integers(1, 40), data=st.data())
def test_parse_verdict_round_trips_any_valid_index(n, data):
    k = data.draw(st.integers(-1, n - 1))
    noise = data.draw(st.text(alphabet=st.characters(blacklist_characters="\\<>"), max_size=50))
    assert parse_verdict(f"{noise}\n\\boxed{{{k}}}", n) == k


# Pieces that look like verdicts, so random answers often contain boxes and think tags.
PIECES = ["\\boxed{", "\\boxed", "{", "}", "-1", "-", "0", "3", "12", ",", " ", "x", "<think>", "</think>"]
answers = st.one_of(st.text(max_size=80), st.lists(st.sampled_from(PIECES), max_size=12).map("".join))


@given(text=answers, n=st.integers(0, 10))
def test_parse_verdict_never_returns_out_of_range(text, n):
    try:
        verdict = parse_verdict(text, n)
    except JudgeError as err:
        assert not err.retryable
    else:
        assert -1 <= verdict <= n - 1


# ---------------------------------------------------------------------------------------------
# Prompt, oracle, factory


def test_critique_messages_tags_every_step():
    messages = critique_messages("Compute 1+1.", ["One plus one.", "Equals 2."])
    assert [m["role"] for m in messages] == ["user"]
    text = messages[0]["content"]
    assert "Compute 1+1." in text
    assert "<paragraph_0>\nOne plus one.\n</paragraph_0>" in text
    assert "<paragraph_1>\nEquals 2.\n</paragraph_1>" in text
    assert "\\boxed{}" in text and "from 0 to 1" in text
    # No filled box in the instruction: a model that copies it must not hand back a verdict.
    assert "\\boxed{-1}" not in text and "\\boxed{0}" not in text
    with pytest.raises(ValueError):
        critique_messages("p", [])


@pytest.mark.parametrize("gold", [-1, 0, 3])
def test_oracle_returns_gold(gold):
    request = JudgeRequest("o", "p", STEPS, gold_first_error=gold)
    result = asyncio.run(OracleJudge().judge(request))
    assert (result.id, result.first_error, result.judge) == ("o", gold, "oracle")


@pytest.mark.parametrize("gold", [None, 4, -2, True])
def test_oracle_without_valid_gold_is_a_dead_letter(gold):
    request = JudgeRequest("o", "p", STEPS, gold_first_error=gold)
    with pytest.raises(JudgeError) as info:
        asyncio.run(OracleJudge().judge(request))
    assert not info.value.retryable


def test_make_judge_kinds():
    assert isinstance(make_judge("oracle"), OracleJudge)

    async def go():
        judge = make_judge("openai", base_url="http://127.0.0.1:1/v1", model="m", concurrency=2)
        await judge.aclose()
        return judge

    assert isinstance(asyncio.run(go()), OpenAIJudge)
    with pytest.raises(ValueError, match="unknown judge kind 'gpt'"):
        make_judge("gpt")


def test_make_judge_oracle_ignores_http_settings_but_not_typos():
    # The daemon feeds one settings section to every kind.
    assert isinstance(make_judge("oracle", base_url="http://x/v1", model="m", max_retries=3), OracleJudge)
    with pytest.raises(TypeError):
        make_judge("oracle", temprature=0.5)


def test_vllm_judge_without_vllm_says_how_to_install():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip(reason="vllm is installed here; the GPU path is not exercised by unit tests")
    with pytest.raises(JudgeError, match=r"pip install actprm\[vllm\]` on a GPU host") as info:
        make_judge("vllm", model="Qwen/QwQ-32B", base_url="http://x/v1", concurrency=8)
    assert not info.value.retryable
