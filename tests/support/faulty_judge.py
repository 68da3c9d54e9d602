"""An OpenAI-compatible judge server that fails on purpose, for the tests of the daemon's judge
client and of the daemon under judge faults. Each problem's text chooses what the server does
with it (answer the gold label, answer 5xx or 400, hang past the client's timeout, reset the
connection, answer garbage, no choices or no verdict, 429 with a Retry-After, answer slowly,
echo the prompt's instruction), and the server counts its calls per problem, so a test can tell a retried or repeated judgement from a first one; `tagged_stream`
gives every test its own problem texts so those counts never mix streams.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from actprm.streams.tools.produce import synthetic_trajectories
from support.network import free_port

# A problem's text chooses what the judge does with it: "[fault:<mode>] ..." (default ok).
JUDGE_MODES = ("ok", "http500", "timeout", "reset", "garbage", "no_choices", "no_verdict", "http400", "http429",
               "slow", "echo")
RETRYABLE_MODES = {"http500", "timeout", "reset", "http429"}  # the client retries these (and connection refused)
_MODE = re.compile(r"^\[fault:(\w+)\] ")


def tagged_stream(n: int, tag: str, seed: int = 7) -> list:
    """n synthetic trajectories whose ids and problems carry `tag`, so streams never collide."""
    return [t.model_copy(update={"id": f"{tag}-{t.id}", "problem": f"({tag} {i}) {t.problem}"})
            for i, t in enumerate(synthetic_trajectories(n, seed=seed))]


def with_mode(problem: str, mode: str) -> str:
    return problem if mode == "ok" else f"[fault:{mode}] {problem}"


class FaultyJudge:
    """An OpenAI-compatible chat server that answers the gold label or fails as the problem asks.

    Counts calls per problem and remembers which problems were in flight at any moment, so a
    test can tell a judge call repeated because the judge process died waiting for the answer
    from a real second judgement. `start()` may come after the port is handed out: until then
    the port refuses connections (the "connection refused" fault).
    """

    def __init__(self, gold: dict[str, int], delay_s: float = 0.0, hang_s: float = 5.0, port: int | None = None,
                 retry_after: str = "1", slow_s: float = 1.0):
        self.gold, self.delay_s, self.hang_s = gold, delay_s, hang_s
        self.retry_after, self.slow_s = retry_after, slow_s  # the 429's Retry-After header; the "slow" answer's delay
        self.modes: dict[str, str] = {}  # problem -> mode, over the one its text names (a test heals a fault)
        self.call_times: dict[str, list[float]] = {}  # problem -> when each call came in
        self.port = port or free_port()
        self.calls: Counter = Counter()
        self.in_flight: Counter = Counter()
        self._lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def in_flight_now(self) -> set[str]:
        with self._lock:
            return {p for p, n in self.in_flight.items() if n > 0}

    def start(self) -> FaultyJudge:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                problem = re.search(r"\[Problem\]\n\n(.*?)\n\n\[Solution\]", prompt, re.S).group(1)
                m = _MODE.match(problem)
                mode = server.modes.get(problem, m.group(1) if m else "ok")
                with server._lock:
                    server.call_times.setdefault(problem, []).append(time.monotonic())
                    server.calls[problem] += 1
                    server.in_flight[problem] += 1
                try:
                    self._answer(problem, mode, prompt)
                finally:
                    with server._lock:
                        server.in_flight[problem] -= 1

            def _answer(self, problem: str, mode: str, prompt: str = "") -> None:
                time.sleep(server.delay_s)
                if mode == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    return
                if mode == "timeout":
                    time.sleep(server.hang_s)
                if mode == "slow":
                    time.sleep(server.slow_s)
                if mode == "http429":
                    return self._send(429, b'{"error": "rate limited"}', headers={"Retry-After": server.retry_after})
                if mode in ("http500", "http400"):
                    return self._send(int(mode[4:]), b'{"error": "injected"}')
                if mode == "garbage":
                    return self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
                if mode == "no_choices":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                if mode == "echo":  # what a small model does: repeats the instruction, then a box
                    instruction = prompt[prompt.index("Review the solution"):]
                    content = f"{instruction}\n\\boxed{{-1}}"
                elif mode == "no_verdict":
                    content = "I am not sure."
                else:
                    content = f"Checked every paragraph.\n\\boxed{{{server.gold.get(problem, -1)}}}"
                reply = {"id": "x", "object": "chat.completion", "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, data: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
                try:
                    self.send_response(code)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a timeout) or died

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> FaultyJudge:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

