"""Prometheus metrics and the health endpoint of one daemon process.

The roles' counts (proc.counters()) and round state (proc.status()) are read at scrape time by
a collector, so the hot path only bumps a Counter. What needs a distribution (per-step
scores, judge latency, swap time) and the ensemble's agreement with the judge are observed
directly. Everything lives on this class's own registry, never the process-global one, so
two daemon processes in one Python process (tests) do not collide.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
JUDGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # reasoning judges take minutes
SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STATUS_GAUGES = ("round", "budget_used", "budget_left", "served_version", "trained_version", "pending_labels",
                 "selected_pct")
STATUS_FLAGS = ("paused_annotate", "paused_train")

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


ALWAYS_COUNTED = ("consumed", "scored", "selected", "annotation_requests", "judged", "judge_failures", "dead_lettered",
                  "labels_received", "updates", "updates_rejected", "update_failures", "swaps", "swap_failures",
                  "duplicates_skipped", "labels_replayed", "consolidations", "consolidations_refused")


class _ProcessCollector:
    """Reads proc.counters and proc.status() at scrape time, beside its Metrics' own figures."""

    def __init__(self, proc, metrics: Metrics):
        self.proc, self.metrics = proc, metrics

    def collect(self) -> Iterable:
        proc = self.proc
        # The named counters exist from the start (at 0), so dashboards and alerts never miss them.
        counters = {name: 0 for name in ALWAYS_COUNTED} | dict(proc.counters())
        for name, value in sorted(counters.items()):
            yield CounterMetricFamily(f"actprm_{name}", f"counted {name}", value=value)
        st = proc.status()
        for name in STATUS_GAUGES:
            if st.get(name) is not None:
                yield GaugeMetricFamily(f"actprm_{name}", f"status {name}", value=st[name])
        yield from _learning_gauges(st)
        flags = GaugeMetricFamily("actprm_paused", "1 while paused, by scope", labels=["scope"])
        for name in STATUS_FLAGS:
            if name in st:
                flags.add_metric([name.removeprefix("paused_")], float(st[name]))
        flags.add_metric(["consume"], float(proc.paused_consume))
        yield flags
        yield GaugeMetricFamily("actprm_sends_held", "1 while sends wait for the broker's data to be confirmed",
                                value=float(proc.sender.gate.held))
        yield CounterMetricFamily("actprm_sends_held_times", "times sends were held (broker outages)",
                                  value=proc.sender.gate.holds)
        busy = GaugeMetricFamily("actprm_busy_seconds", "how long each role's current handler call has run (0: idle)",
                                 labels=["role"])
        now = time.time()
        for role, since in proc.busy_since.items():
            busy.add_metric([role], 0.0 if since is None else now - since)
        yield busy
        watch = self.metrics.broker_watch
        if watch is not None:
            rss = watch.rss()
            if rss is not None:
                yield GaugeMetricFamily("actprm_broker_rss_bytes", "resident memory of the embedded broker (no retention: "
                                        "it grows with every message)", value=rss)
            yield GaugeMetricFamily("actprm_broker_memory_limit_bytes", "the embedded broker's memory limit "
                                    "(ACTPRM_BROKER_MEMORY_LIMIT_MB); status warns at 80% of it", value=watch.limit_bytes)
        accuracy = self.metrics.confident_accuracy()
        if accuracy is not None:
            yield GaugeMetricFamily("actprm_confident_accuracy",
                                    "share of confident predictions whose first error matched the judge", value=accuracy)


def _learning_gauges(st: dict) -> Iterable:
    """Prequential figures (each label tests the version that scored it) and the held-out F1."""
    online = st.get("online")
    if online:
        for key, help_ in (("online_f1", "ProcessBench F1 of the scoring versions on the last labels (prequential)"),
                           ("step_accuracy", "share of labelled steps scored on the judge's side of 0.5 (prequential)"),
                           ("first_error_agreement", "share of the last labels whose predicted first error was the judge's")):
            if online.get(key) is not None:
                name = key if key.startswith("online") else f"online_{key}"
                yield GaugeMetricFamily(f"actprm_{name}", help_, value=online[key])
        yield GaugeMetricFamily("actprm_online_window_labels", "labels in the prequential window", value=online["labels"])
        by_version = GaugeMetricFamily("actprm_online_f1_by_version", "prequential F1 of each scoring version in the window",
                                       labels=["version"])
        for version, summary in online.get("by_version", {}).items():
            if summary.get("online_f1") is not None:
                by_version.add_metric([version], summary["online_f1"])
        yield by_version
    sample = st.get("stream_sample")
    if sample and sample.get("online_f1") is not None:
        yield GaugeMetricFamily("actprm_stream_sample_f1", "ProcessBench F1 of the scoring versions on the last labels "
                                "of the stream's validation sample (judged whether selected or not)", value=sample["online_f1"])
    heldout = st.get("heldout")
    if heldout and heldout.get("f1") is not None:
        yield GaugeMetricFamily("actprm_heldout_f1", "ProcessBench F1 of the served version on the held-out set",
                                value=heldout["f1"])


class Metrics:
    def __init__(self, proc=None, broker_watch=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_score = Histogram("actprm_step_score", "per-step score mu of every scored step",
                                    buckets=SCORE_BUCKETS, registry=r)
        self.judge_latency = Histogram("actprm_judge_latency_seconds", "judge call latency",
                                       buckets=JUDGE_BUCKETS, registry=r)
        self.judge_calls = Counter("actprm_judge_calls", "judge calls by outcome", ["outcome"], registry=r)
        self.swap_seconds = Histogram("actprm_swap_seconds", "time to load and switch to a new version",
                                      buckets=SWAP_BUCKETS, registry=r)
        self.agreement = Counter("actprm_agreement", "ensemble's first error vs the judge's, by confidence",
                                 ["confident", "outcome"], registry=r)
        self._recent_latency: deque[float] = deque(maxlen=256)
        self._confident = [0, 0]  # right, wrong
        # a BrokerWatch when this process runs the embedded broker (streams/kafka/broker.py)
        self.broker_watch = broker_watch
        self.proc = None
        if proc is not None:
            self.watch(proc)

    def watch(self, proc) -> None:
        """Read this process's counts and status at every scrape (once: a second call is a no-op)."""
        if self.proc is None:
            self.proc = proc
            self.registry.register(_ProcessCollector(proc, self))

    # --- observations (called by the handlers) ---------------------------------------------

    def observe_scores(self, mu_lists: Iterable[Sequence[float]]) -> None:
        for mu in mu_lists:
            for m in mu:
                self.step_score.observe(m)

    def observe_judge(self, latency_s: float, ok: bool) -> None:
        self.judge_latency.observe(latency_s)
        self.judge_calls.labels("ok" if ok else "failed").inc()
        self._recent_latency.append(latency_s)

    def observe_agreement(self, predicted_first_error: int, judged_first_error: int, confident: bool) -> None:
        right = predicted_first_error == judged_first_error
        self.agreement.labels(str(confident).lower(), "right" if right else "wrong").inc()
        if confident:
            self._confident[0 if right else 1] += 1

    def observe_swap(self, seconds: float) -> None:
        self.swap_seconds.observe(seconds)

    # --- reading ---------------------------------------------------------------------------

    def confident_accuracy(self) -> float | None:
        right, wrong = self._confident
        return right / (right + wrong) if right + wrong else None

    def summary(self) -> dict[str, Any]:
        """The few figures `ctl status` shows from here."""
        recent = list(self._recent_latency)
        return {"judge_latency_p50_s": round(statistics.median(recent), 3) if recent else None,
                "confident_accuracy": self.confident_accuracy(),
                **(self.broker_watch.summary() if self.broker_watch is not None else {})}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # --- serving ---------------------------------------------------------------------------

    async def serve(self, host: str, port: int, health_fn: HealthFn) -> MetricsServer:
        """Serve /metrics and /healthz on host:port (port 0: any free port; see .port)."""

        async def metrics_page(_request: web.Request) -> web.Response:
            return web.Response(body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health_page(_request: web.Request) -> web.Response:
            ok, detail = health_fn()
            return web.Response(status=200 if ok else 503, content_type="application/json",
                                text=json.dumps({"ok": ok, **detail}))

        app = web.Application()
        app.router.add_get("/metrics", metrics_page)
        app.router.add_get("/healthz", health_page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            # Still an OSError (with its errno), so the caller's "run on without metrics" catches it.
            raise OSError(err.errno, f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
        return MetricsServer(runner, runner.addresses[0][1])


class MetricsServer:
    def __init__(self, runner: web.AppRunner, port: int):
        self._runner, self.port = runner, port

    async def close(self) -> None:
        await self._runner.cleanup()


def health(proc, stuck_after_s: float, now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """Not ok when a role has been inside one handler call for longer than stuck_after_s."""
    now = time.time() if now is None else now
    busy = {role: round(now - since, 1) for role, since in proc.busy_since.items() if since is not None}
    stuck = {role: s for role, s in busy.items() if s > stuck_after_s}
    detail: dict[str, Any] = {"process_id": proc.process_id, "roles": list(proc.roles), "busy_s": busy,
                              "paused": proc.paused_consume}
    judge = getattr(proc, "judge", None)
    until = judge.alive_until() if judge is not None and "judge" in stuck else None
    if until is not None and now <= until:  # its calls are slow but within their timeouts and retries: alive
        del stuck["judge"]
        detail["judge_calls_alive_until_s"] = round(until - now, 1)
    if stuck:
        detail["reason"] = "; ".join(f"role {role} busy for {s:.0f}s (stuck_after_s={stuck_after_s:g})"
                                     for role, s in stuck.items())
    return not stuck, detail


async def start_metrics(proc) -> MetricsServer | None:
    """Serve the process's Metrics as settings.metrics says; None when port is 0."""
    m = proc.settings.metrics
    proc.metrics.watch(proc)
    if m.port == 0:
        return None
    return await proc.metrics.serve(m.host, m.port, lambda: health(proc, m.stuck_after_s))
