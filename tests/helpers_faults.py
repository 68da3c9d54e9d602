"""Fault injection for the daemon tests: a misbehaving judge, raw producers, in-process fault
hooks for the daemon subprocess, process CPU accounting, and the fault-suite summary table.

Every fault is real where it can be: processes are SIGKILLed, the broker process is stopped,
the judge server really times out, answers 5xx or garbage, or is not listening at all. Two
faults cannot be produced from outside a healthy model, so a `sitecustomize` hook (installed
only in the daemon's own PYTHONPATH) injects them inside the daemon process:
- ACTPRM_FAULT_NAN_MARKER: a label batch with this text in a problem makes the step logits
  NaN, so the trainer's own finiteness check has to catch it;
- ACTPRM_FAULT_POISON_MARKER: an update on such a batch is applied and then its heads are
  wrecked (every step scored "correct"), so the canary check has to catch the F1 drop;
- ACTPRM_FAULT_FIT_MARKER: an update on a batch with this text in a label id is repeated
  ACTPRM_FAULT_FIT_STEPS times, a model that has learnt its batch by heart (the canary test
  uses it to give the canary, the same texts under other ids, a known F1 before the wreck).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from aiokafka import AIOKafkaProducer

SUMMARY_FILE = Path("/tmp/actprm-faults-summary.txt")

_SITECUSTOMIZE = '''
import os

_nan, _poison = os.environ.get("ACTPRM_FAULT_NAN_MARKER"), os.environ.get("ACTPRM_FAULT_POISON_MARKER")
_fit, _fit_steps = os.environ.get("ACTPRM_FAULT_FIT_MARKER"), int(os.environ.get("ACTPRM_FAULT_FIT_STEPS", "300"))
if _nan or _poison or _fit:
    import torch
    from actprm.model import trainer as _t

    _update = _t.Trainer.update

    def update(self, samples):
        hit = lambda marker: marker and any(marker in s.problem for s in samples)
        if hit(_nan):
            real = self.prm.head_logits  # every update path reads the heads through it
            self.prm.head_logits = lambda *a, **k: real(*a, **k) * float("nan")
            try:
                return _update(self, samples)
            finally:
                del self.prm.head_logits
        result = _update(self, samples)
        if _fit and any(_fit in s.id for s in samples):
            for _ in range(_fit_steps - 1):
                result = _update(self, samples)
        if hit(_poison) and result.applied:
            with torch.no_grad():
                self.prm.heads.w3.zero_()
                self.prm.heads.b3.fill_(50.0)  # sigmoid(50) = 1: "no error anywhere", whatever the input
        return result

    _t.Trainer.update = update
'''


def fault_hook_env(tmp: Path, **markers: str) -> dict[str, str]:
    """Environment that installs the in-daemon fault hook; markers: nan=..., poison=..., fit=..."""
    hook = Path(tmp) / "fault_hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    if "nan" in markers:
        env["ACTPRM_FAULT_NAN_MARKER"] = markers["nan"]
    if "poison" in markers:
        env["ACTPRM_FAULT_POISON_MARKER"] = markers["poison"]
    if "fit" in markers:
        env["ACTPRM_FAULT_FIT_MARKER"] = markers["fit"]
    return env


# --- producing raw bytes ----------------------------------------------------------------------


async def _produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    # Big enough for the 10 MB payload; the broker decides whether it takes it.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Send (key, value) byte pairs in order, waiting for every ack."""
    asyncio.run(_produce_raw(bootstrap, topic, records))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a judge that fails on purpose ---------------------------------------------------------------

# A problem's text chooses what the judge does with it: "[fault:<mode>] ..." (default ok).
JUDGE_MODES = ("ok", "http500", "timeout", "reset", "garbage", "no_choices", "no_verdict", "http400")
RETRYABLE_MODES = {"http500", "timeout", "reset"}  # the client retries these (and connection refused)
_MODE = re.compile(r"^\[fault:(\w+)\] ")


def tagged_stream(n: int, tag: str, seed: int = 7) -> list:
    """n synthetic trajectories whose ids and problems carry `tag`, so streams never collide."""
    from actprm.streams.tools import synthetic_trajectories

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

    def __init__(self, gold: dict[str, int], delay_s: float = 0.0, hang_s: float = 5.0, port: int | None = None):
        self.gold, self.delay_s, self.hang_s = gold, delay_s, hang_s
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
                mode = m.group(1) if m else "ok"
                with server._lock:
                    server.calls[problem] += 1
                    server.in_flight[problem] += 1
                try:
                    self._answer(problem, mode)
                finally:
                    with server._lock:
                        server.in_flight[problem] -= 1

            def _answer(self, problem: str, mode: str) -> None:
                time.sleep(server.delay_s)
                if mode == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    return
                if mode == "timeout":
                    time.sleep(server.hang_s)
                if mode in ("http500", "http400"):
                    return self._send(int(mode[4:]), b'{"error": "injected"}')
                if mode == "garbage":
                    return self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
                if mode == "no_choices":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                content = ("I am not sure." if mode == "no_verdict"
                           else f"Checked every paragraph.\n\\boxed{{{server.gold.get(problem, -1)}}}")
                reply = {"id": "x", "object": "chat.completion", "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, data: bytes, ctype: str = "application/json") -> None:
                try:
                    self.send_response(code)
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


# --- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_sockets(pid: int, table: str = "tcp") -> list[str]:
    """Local addresses (hex "IP:PORT" as /proc/net/<table> writes them) of the sockets a process
    listens on; table "tcp" is IPv4, "tcp6" IPv6 (absent on a host without IPv6: none)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    path = Path(f"/proc/net/{table}")
    rows = (line.split() for line in (path.read_text().splitlines()[1:] if path.exists() else []))
    return [parts[1] for parts in rows if parts[3] == "0A" and parts[9] in inodes]  # 0A: LISTEN


def listen_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of the TCP sockets a process listens on (IPv4), from /proc."""
    found = set()
    for local in listening_sockets(pid, "tcp"):
        ip_hex, port_hex = local.split(":")
        ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
        found.add((ip, int(port_hex, 16)))
    return found


class TcpRelay:
    """A TCP relay on its own thread in front of a port: `cut()` drops every connection through
    it and refuses new ones, `restore()` accepts again. With a broker that advertises the relay's
    port, that is a network outage after which the broker still has all its data."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.loop = asyncio.new_event_loop()
        self._server = None
        self._pipes: set = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> TcpRelay:
        async def listen():
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)
        self._call(listen())
        return self

    def cut(self) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()
            for task in list(self._pipes):
                task.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)
        self._call(close())

    def close(self) -> None:
        if self._server is not None and self._server.is_serving():
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _relay(self, client_r, client_w) -> None:
        task = asyncio.current_task()
        self._pipes.add(task)
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            self._pipes.discard(task)
            return

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            w.close()

        try:
            await asyncio.gather(pump(client_r, broker_w), pump(broker_r, client_w))
        except asyncio.CancelledError:
            pass  # cut
        finally:
            self._pipes.discard(task)
            client_w.close()
            broker_w.close()


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (all its threads'), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def sigkill(proc) -> bool:
    """SIGKILL a Popen if it runs; False when it had already exited (a crash of its own)."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return True


# --- the summary table -------------------------------------------------------------------------------


SUMMARY_COLUMNS = ("scenario", "faults injected", "messages sent", "rewards", "rewarded twice", "dead letters", "lost",
                   "judged twice", "trained twice")


@dataclass
class SummaryRow:
    scenario: str
    faults: int = 0
    sent: int = 0
    rewards: int = 0
    dead_letters: int = 0
    lost: int = 0
    judged_twice: int = 0
    trained_twice: int = 0
    # Ids with more than one reward (at-least-once: a scorer killed before it recorded a batch
    # scores it again); None where the scenario does not count them ("-").
    rewarded_twice: int | None = None
    notes: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, ...]:
        twice = "-" if self.rewarded_twice is None else str(self.rewarded_twice)
        return (self.scenario, str(self.faults), str(self.sent), str(self.rewards), twice, str(self.dead_letters),
                str(self.lost), str(self.judged_twice), str(self.trained_twice))


def format_summary(rows: list[SummaryRow]) -> str:
    table = [SUMMARY_COLUMNS, *(r.cells() for r in rows)]
    if len(rows) > 1:
        total = SummaryRow("total", *(sum(getattr(r, f) for r in rows) for f in
                                      ("faults", "sent", "rewards", "dead_letters", "lost", "judged_twice", "trained_twice")),
                           rewarded_twice=sum(r.rewarded_twice or 0 for r in rows))
        table.append(total.cells())
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_COLUMNS))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    out = [line(table[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in table[1:])]
    notes = [f"- {r.scenario}: {n}" for r in rows for n in r.notes]
    return "\n".join(out + ([""] + notes if notes else []))


# --- crash trials: the three roles in their own processes, SIGKILLed at random moments --------------


ROLES = ("scorer", "judge", "trainer")


@dataclass
class CrashReport:
    row: SummaryRow
    kills: Counter
    problems: list[str]  # invariant violations; empty when everything held


def run_crash_trials(bootstrap: str, prefix: str, tmp: Path, *, n_traj: int, n_kills: int, seed: int,
                     kill_after_s: tuple[float, float] = (0.5, 6.0), produce_every_s: float = 1.0,
                     drain_timeout_s: float = 300.0, scenario: str = "crash",
                     kill_plan: tuple[str, ...] | None = None) -> CrashReport:
    """Scorer, judge and trainer as three processes sharing a checkpoint directory; a stream
    flows in while a random role is SIGKILLed and restarted `n_kills` times; then everything
    drains and the invariants are checked. Selection is `full`, so every trajectory must end as
    a reward, a label and a trained label."""
    from actprm.streams.tools import synthetic_trajectories
    from actprm.model.checkpoints import CheckpointStore
    from actprm.streams.tools import produce_trajectories
    from actprm.streams.topics import Topics
    from helpers_daemon import Daemon, consumed_ids, manifests, read_topic, wait_until

    rng = random.Random(seed)
    topics = Topics(prefix)
    stream = [t.model_copy(update={"id": f"{scenario}-{t.id}", "problem": f"({scenario} {i}) {t.problem}"})
              for i, t in enumerate(synthetic_trajectories(n_traj, seed=seed))]
    ids = {t.id for t in stream}
    gold = {t.problem: t.gold_first_error for t in stream}
    shared = Path(tmp) / "checkpoints"
    store = CheckpointStore(shared)
    problems: list[str] = []
    kills: Counter = Counter()
    lost_in_flight: Counter = Counter()  # judge calls whose caller was killed while waiting

    with FaultyJudge(gold, delay_s=0.2).start() as judge:
        env = {"ACTPRM_CHECKPOINT_DIR": str(shared), "ACTPRM_SELECTION__STRATEGY": "full",
               "ACTPRM_JUDGE__KIND": "openai", "ACTPRM_JUDGE__BASE_URL": judge.base_url,
               "ACTPRM_JUDGE__CONCURRENCY": "2", "ACTPRM_JUDGE__MAX_RETRIES": "3", "ACTPRM_JUDGE__TIMEOUT_S": "20"}
        procs = {r: Daemon(bootstrap, prefix, Path(tmp) / r, "--role", r, env=env) for r in ROLES}
        try:
            procs["trainer"].start()
            procs["scorer"].start()
            procs["judge"].start()

            chunks = [stream[i:i + 8] for i in range(0, len(stream), 8)]
            produced = threading.Event()

            def produce():
                for chunk in chunks:
                    produce_trajectories(bootstrap, prefix, chunk)
                    time.sleep(produce_every_s)
                produced.set()

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            for i in range(n_kills):
                time.sleep(rng.uniform(*kill_after_s))
                for r, d in procs.items():
                    if d.proc.poll() is not None:
                        raise AssertionError(f"the {r} exited on its own (rc {d.proc.returncode}):\n{d.stderr()[-3000:]}")
                role = kill_plan[i % len(kill_plan)] if kill_plan else rng.choice(ROLES)
                waiting = judge.in_flight_now() if role == "judge" else set()
                sigkill(procs[role].proc)
                if role == "judge":
                    lost_in_flight.update(waiting | judge.in_flight_now())
                kills[role] += 1
                procs[role].start()
            producer.join(600)
            if not produced.is_set():
                problems.append("the producer did not finish")

            trained = lambda: set(consumed_ids(store)) >= ids
            try:
                wait_until(trained, drain_timeout_s, interval=2, what="every label trained after the last kill")
            except AssertionError as err:
                problems.append(f"{err}; trained {len(set(consumed_ids(store)) & ids)}/{len(ids)}")
            for r, d in procs.items():
                if d.terminate(90) != 0:
                    problems.append(f"the {r} did not stop cleanly: {d.stderr()[-2000:]}")
        finally:
            for d in procs.values():
                d.kill()

        rewards = read_topic(bootstrap, topics.rewards, until=lambda got: ids <= {r.id for r in got}, timeout_s=60)
        dead = read_topic(bootstrap, topics.dead_letters, settle_s=0.5)
        labels = read_topic(bootstrap, topics.labels, settle_s=0.5)
        announced = read_topic(bootstrap, topics.versions, settle_s=0.5)
        calls = Counter(judge.calls)

    rewarded = {r.id for r in rewards}
    dead_keys = {d.key for d in dead}
    lost = ids - rewarded - dead_keys
    if lost:
        problems.append(f"{len(lost)} trajectories have neither a reward nor a dead letter: {sorted(lost)[:5]}")
    # Judged twice: a second call that is not explained by a judge killed while it waited.
    judged_twice = {p: n for p, n in calls.items() if n - 1 - lost_in_flight[p] > 0}
    if judged_twice:
        problems.append(f"judged twice: {judged_twice}")
    wrong = [l.id for l in labels if l.first_error != gold[next(t.problem for t in stream if t.id == l.id)]]
    if wrong:
        problems.append(f"labels that differ from the judge's answer: {wrong[:5]}")
    used = consumed_ids(store)
    trained_twice = {i: n for i, n in used.items() if n > 1}
    if trained_twice:
        problems.append(f"trained twice: {trained_twice}")
    # Versions only increase: contiguous version numbers, each update's parent the one before,
    # announcements in increasing order, and per partition every reward from a version no older.
    found = manifests(store)
    if [m.version for m in found] != list(range(len(found))):
        problems.append(f"version numbers are not 0..n: {[m.version for m in found]}")
    bad_parents = [m.version for m in found if m.kind == "update" and m.parent != m.version - 1]
    if bad_parents:
        problems.append(f"updates whose parent is not the previous version: {bad_parents}")
    announced_v = [v.version for v in announced]
    if announced_v != sorted(set(announced_v)):
        problems.append(f"version announcements not strictly increasing: {announced_v}")
    # No half-written checkpoint: every version loads with its checksum; no temporary left.
    for m in found:
        try:
            store.load(m.version)
        except Exception as err:  # noqa: BLE001  (any failure is the finding)
            problems.append(f"version {m.version} does not load: {err}")
    leftovers = list(shared.glob(".tmp-*"))
    if leftovers:
        problems.append(f"temporary checkpoint directories left: {leftovers}")
    logs = {r: d.stderr() for r, d in procs.items()}
    for r, text in logs.items():
        for needle in ("swap failed", "CheckpointError", "timer failed", "Traceback"):
            if needle in text:
                problems.append(f"the {r}'s log has {needle!r}: ...{text[text.index(needle) - 300:text.index(needle) + 700]}")
    # One scorer process at a time, so in scoring order the served version never goes back.
    in_order = [r.model_version for r in sorted(rewards, key=lambda r: r.scored_at)]
    if in_order != sorted(in_order):
        problems.append(f"a reward came from an older version than one before it: {in_order}")

    dup_rewards = len(rewards) - len(rewarded)
    # At-least-once rewards: a repeat names its version, so a consumer deduping by id loses nothing.
    per_id = Counter(r.id for r in rewards if r.id in ids)
    row = SummaryRow(scenario, faults=sum(kills.values()), sent=len(stream), rewards=len(rewarded & ids),
                     rewarded_twice=sum(1 for n in per_id.values() if n > 1),
                     dead_letters=len(dead), lost=len(lost), judged_twice=sum(n - 1 - lost_in_flight[p] for p, n in judged_twice.items()),
                     trained_twice=sum(n - 1 for n in trained_twice.values()))
    row.notes.append(f"seed {seed}; kills by role {dict(kills)}; {len(found)} versions; judge calls {sum(calls.values())} "
                     f"for {len(ids)} trajectories ({sum(lost_in_flight.values())} repeated after the judge died "
                     f"waiting for the answer); {dup_rewards} duplicate rewards from re-scoring after scorer kills")
    return CrashReport(row, kills, problems)


def topic_ids(bootstrap: str, topic: str) -> set[str]:
    """Ids of the messages on a topic so far; empty while the topic does not exist (yet)."""
    from helpers_daemon import read_topic

    try:
        return {m.id for m in read_topic(bootstrap, topic, until=bool, settle_s=0.5, timeout_s=10)}
    except AssertionError:  # aiokafka: no partitions assigned, the topic is not there
        return set()
