"""`actprm bench soak`: does a long run level off? A daemon on a steady stream, measured.

The embedded broker runs as its own process (as `actprm broker` does) and a daemon (`actprm
run`, tiny backbone by default, the gold-label judge, random selection so labelling never
stops) reads a stream this process produces at a steady rate. Every `sample_s` seconds: the
trajectories scored (from `ctl status`, whose round trip is the status latency), the RSS of
the daemon and of the broker, the size of each state subdirectory, the number of files, the
updates. The report gives, after the warm-up, each figure's growth per 10,000 trajectories
(least squares against the trajectories scored), the daemon's RSS over the last part of the
run against its start, and each growth projected to a week at `project_rate` per second.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WEEK_S = 7 * 24 * 3600


def _du(path: Path) -> tuple[int, int]:
    """Bytes and files under a path."""
    size = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
            except FileNotFoundError:  # removed meanwhile (a pruned version, a rotated journal)
                pass
    return size, files


def _proc_status(pid: int) -> dict:
    """RssAnon (heap, native and Python), RssFile (mapped files, shared libraries) in MB and the
    thread count of a process, from /proc: which kind of memory grows."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
                elif key == "Threads":
                    out["threads"] = int(value)
    except (OSError, ValueError):
        pass
    return out


def _slope(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


class _Producer(threading.Thread):
    """The stream: built-in trajectories at `rate` per second, on its own thread and loop."""

    def __init__(self, bootstrap: str, prefix: str, rate: float):
        super().__init__(name="soak-producer", daemon=True)
        self.bootstrap, self.prefix, self.rate = bootstrap, prefix, rate
        self.sent = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        from actprm.client import messages
        from actprm.client.topics import Topics
        from actprm.streams.tools.produce import iter_synthetic_trajectories

        topic = Topics(self.prefix).trajectories
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=20)
        await producer.start()
        try:
            start = time.monotonic()
            base = secrets.randbelow(10**9)

            def endless():  # chunks of 10,000, each with its own seed (so its own ids)
                for k in range(10**9):
                    yield from iter_synthetic_trajectories(10_000, seed=base + k)
            stream = endless()
            while not self.stop_event.is_set():
                due = int((time.monotonic() - start) * self.rate) - self.sent
                for _ in range(max(0, due)):
                    t = next(stream)
                    await producer.send(topic, key=t.id.encode(), value=messages.encode(t))
                    self.sent += 1
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()


def bench_soak(minutes: float = 10.0, rate: float = 90.0, warmup_minutes: float | None = None, sample_s: float = 15.0,
               backbone: str = "tiny", project_rate: float = 100.0, env: dict[str, str] | None = None,
               progress=None) -> dict:
    from actprm.client.messages import ControlCommand
    from actprm.streams.kafka.broker import EmbeddedBroker, rss_bytes
    from actprm.streams.tools.ctl_client import CtlError, send_command

    warmup_minutes = min(5.0, minutes / 3) if warmup_minutes is None else warmup_minutes
    prefix = f"soak{secrets.token_hex(3)}"
    tmp = Path(tempfile.mkdtemp(prefix="actprm-soak-"))
    state = tmp / "state"
    broker = EmbeddedBroker()
    broker.start()
    daemon_env = {**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": broker.bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": prefix,
                  "ACTPRM_STATE_DIR": str(state), "ACTPRM_MODEL__BACKBONE": backbone, "ACTPRM_LOG_FORMAT": "json",
                  "ACTPRM_SELECTION__STRATEGY": "random", "ACTPRM_SELECTION__RANDOM_RATE": "0.05",
                  "ACTPRM_ROUND__BUDGET": "100000000", "ACTPRM_METRICS__PORT": "0", "ACTPRM_KAFKA__PARTITIONS": "2",
                  **(env or {})}
    err = open(tmp / "daemon.stderr", "wb")
    daemon = subprocess.Popen([str(Path(sys.executable).with_name("actprm")), "run", "--heldout", "0"], env=daemon_env,
                              stdout=subprocess.DEVNULL, stderr=err)
    producer = _Producer(broker.bootstrap, prefix, rate)
    samples: list[dict] = []
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 300
        while '"serving"' not in (tmp / "daemon.stderr").read_text(errors="replace"):  # the model is loaded
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {(tmp / 'daemon.stderr').read_text(errors='replace')[-2000:]}")
            time.sleep(1)
        producer.start()
        t0 = time.monotonic()
        end = t0 + minutes * 60
        while time.monotonic() < end:
            time.sleep(max(0.0, min(sample_s, end - time.monotonic())))
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}): "
                                   f"{(tmp / 'daemon.stderr').read_text(errors='replace')[-2000:]}")
            before = time.perf_counter()
            try:
                acks = send_command(broker.bootstrap, prefix, ControlCommand(command="status", args={}), None, 30.0, expect=1)
            except CtlError as e:
                acks, status_s = [], None
                print(f"status failed: {e}", file=sys.stderr)
            else:
                status_s = time.perf_counter() - before
            st = acks[0].state if acks else {}
            dirs = {}
            for sub in sorted(p for p in state.iterdir() if p.is_dir()):
                dirs[sub.name] = _du(sub)
            sample = {"t_s": round(time.monotonic() - t0, 1), "sent": producer.sent, "scored": st.get("scored"),
                      "updates": st.get("updates"), "labels_trained": st.get("labels_trained"),
                      "status_s": round(status_s, 4) if status_s is not None else None,
                      "daemon_rss_mb": round((rss_bytes(daemon.pid) or 0) / 2**20, 1),
                      "daemon_memory": _proc_status(daemon.pid),
                      "broker_rss_mb": round((rss_bytes(broker.pid) or 0) / 2**20, 1),
                      "dirs_mb": {k: round(v[0] / 1e6, 3) for k, v in dirs.items()},
                      "files": sum(v[1] for v in dirs.values())}
            samples.append(sample)
            if progress is not None:
                progress(sample)
    finally:
        producer.stop_event.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        broker.stop()
        err.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(samples, warmup_minutes * 60, rate, project_rate) | {
        "minutes": minutes, "rate": rate, "backbone": backbone, "samples": samples}


def summarise(samples: list[dict], warmup_s: float, rate: float, project_rate: float) -> dict:
    """Growth per 10,000 trajectories after the warm-up, the RSS plateau and a week's projection."""
    kept = [s for s in samples if s["t_s"] >= warmup_s and s["scored"] is not None]
    if len(kept) < 3:
        return {"error": "too few samples after the warm-up"}
    scored = [float(s["scored"]) for s in kept]
    week = project_rate * WEEK_S
    series = {"daemon_rss_mb": [s["daemon_rss_mb"] for s in kept], "broker_rss_mb": [s["broker_rss_mb"] for s in kept],
              "files": [s["files"] for s in kept]}
    for key in ("RssAnon", "RssFile"):
        if all(key in s.get("daemon_memory", {}) for s in kept):
            series[f"daemon_{key}_mb"] = [s["daemon_memory"][key] for s in kept]
    for name in sorted({k for s in kept for k in s["dirs_mb"]}):
        series[f"{name}_mb"] = [s["dirs_mb"].get(name, 0.0) for s in kept]
    growth = {}
    for name, ys in series.items():
        slope = _slope(scored, [float(y) for y in ys])
        per_10k = None if slope is None else slope * 10_000
        growth[name] = {"at_start": ys[0], "at_end": ys[-1], "per_10k": round(per_10k, 3) if per_10k is not None else None,
                        "week": round(ys[0] + per_10k * (week - scored[0]) / 10_000, 1) if per_10k is not None else None}
    span_s = kept[-1]["t_s"] - kept[0]["t_s"]
    throughput = (scored[-1] - scored[0]) / span_s if span_s > 0 else None
    status = [s["status_s"] for s in kept if s["status_s"] is not None]
    half = len(status) // 2
    rss = series["daemon_rss_mb"]
    return {"warmup_s": warmup_s, "scored": int(scored[-1]), "throughput_per_s": round(throughput, 1) if throughput else None,
            "status_latency_s": {"first_half_p50": _median(status[:half]), "second_half_p50": _median(status[half:])},
            # the goal: within +5% over the run after the warm-up
            "daemon_rss_change_pct": round(100 * (rss[-1] - rss[0]) / rss[0], 1) if rss[0] else None,
            "daemon_rss_window": rss_window(kept),
            "growth": growth, "project_rate": project_rate, "week_trajectories": int(week)}


def rss_window(kept: list[dict], edge_s: float = 60.0) -> dict:
    """The daemon's RSS over the run after the warm-up, its first and last `edge_s` each taken as
    a median: a single sample lands anywhere in the saw-tooth of a minute's allocations and
    trims (tens of MB), so two single samples say more about when they fell than about growth."""
    t0, t1 = kept[0]["t_s"], kept[-1]["t_s"]
    first = _median([s["daemon_rss_mb"] for s in kept if s["t_s"] <= t0 + edge_s])
    last = _median([s["daemon_rss_mb"] for s in kept if s["t_s"] >= t1 - edge_s])
    return {"minutes": round((t1 - t0) / 60, 1), "first_median_mb": first, "last_median_mb": last,
            "max_mb": max(s["daemon_rss_mb"] for s in kept),
            "change_pct": round(100 * (last - first) / first, 1) if first else None}


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return round(xs[len(xs) // 2], 4) if xs else None


def table(result: dict) -> str:
    """The per-10k growth as a markdown table (docs/operations.md)."""
    if "growth" not in result:
        return json.dumps(result)
    rows = ["| resource | after warm-up | at end | per 10k trajectories | one week at {:g}/s |".format(result["project_rate"]),
            "|---|---|---|---|---|"]
    for name, g in result["growth"].items():
        rows.append(f"| {name} | {g['at_start']} | {g['at_end']} | {g['per_10k']:+} | {g['week']} |")
    return "\n".join(rows)
