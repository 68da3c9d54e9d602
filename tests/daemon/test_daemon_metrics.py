"""Prometheus metrics and /healthz of a daemon process (daemon/metrics.py).

(tests/model/test_metrics.py covers the pure evaluation metrics of model/eval/metrics.py.)
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from actprm.daemon.metrics import Metrics, health, start_metrics
from actprm.daemon.settings import Settings
from actprm.model.uncertainty import predicted_first_error
from support.roles import memory_process


def sample(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels or None)


def test_observations_hand_worked():
    m = Metrics()
    m.observe_scores([[0.9, 0.4], [0.03]])
    # 3 steps, sum 1.33; 0.03 <= 0.05, 0.4 <= 0.4, 0.9 <= 0.9.
    assert sample(m, "actprm_step_score_count") == 3
    assert sample(m, "actprm_step_score_sum") == pytest.approx(1.33)
    assert sample(m, "actprm_step_score_bucket", le="0.05") == 1
    assert sample(m, "actprm_step_score_bucket", le="0.35") == 1
    assert sample(m, "actprm_step_score_bucket", le="0.4") == 2
    assert sample(m, "actprm_step_score_bucket", le="0.9") == 3

    m.observe_judge(2.0, ok=True)
    m.observe_judge(4.0, ok=True)
    m.observe_judge(30.0, ok=False)
    assert sample(m, "actprm_judge_calls_total", outcome="ok") == 2
    assert sample(m, "actprm_judge_calls_total", outcome="failed") == 1
    assert sample(m, "actprm_judge_latency_seconds_sum") == 36.0
    assert m.summary()["judge_latency_p50_s"] == 4.0  # median of 2, 4, 30

    m.observe_swap(0.2)
    assert sample(m, "actprm_swap_seconds_bucket", le="0.25") == 1 and sample(m, "actprm_swap_seconds_bucket", le="0.1") == 0

    # Confident: one right (2 == 2), one wrong (1 != -1); the unconfident one does not count.
    assert m.confident_accuracy() is None
    m.observe_agreement(2, 2, confident=True)
    m.observe_agreement(1, -1, confident=True)
    m.observe_agreement(0, 3, confident=False)
    assert m.confident_accuracy() == 0.5
    assert sample(m, "actprm_agreement_total", confident="true", outcome="right") == 1
    assert sample(m, "actprm_agreement_total", confident="false", outcome="wrong") == 1


def test_predicted_first_error():
    assert predicted_first_error([0.9, 0.4, 0.8]) == 1
    assert predicted_first_error([0.7, 0.5]) == -1  # a step AT the threshold is correct
    assert predicted_first_error([]) == -1


def test_two_instances_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.observe_swap(1.0)
    assert sample(b, "actprm_swap_seconds_count") == 0


@pytest.fixture
def rt(tmp_path):
    settings = Settings(state_dir=tmp_path, model={"backbone": "tiny", "n_heads": 4, "max_length": 256},
                        metrics={"port": 0, "stuck_after_s": 600})
    runtime, _ = memory_process(settings, metrics=Metrics())
    yield runtime
    runtime.close()


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def test_endpoint_serves_the_named_metrics_and_healthz_flips_when_a_role_is_stuck(rt):
    assert asyncio.run(start_metrics(rt)) is None  # port 0 in settings: off, but the Metrics is attached
    m = rt.metrics
    rt.scorer.counts.update(consumed=5, scored=4, selected=2, score_seconds=1.5)
    rt.judge.counts.update(judged=1)
    rt.sender.counts.update(dead_lettered=1)
    rt.trainer.counts.update(updates=1)
    rt.keeper.rounds.admit("a")
    m.observe_scores([[0.9, 0.2]])
    m.observe_judge(1.5, ok=True)
    m.observe_swap(0.05)

    async def scenario():
        server = await m.serve("127.0.0.1", 0, lambda: health(rt, rt.settings.metrics.stuck_after_s))
        base = f"http://127.0.0.1:{server.port}"
        try:
            page = await _get(f"{base}/metrics")
            healthy = await _get(f"{base}/healthz")
            rt.busy_since["judge"] = time.time() - 700  # one judge call running for 700 s
            stuck = await _get(f"{base}/healthz")
            rt.busy_since["judge"] = None
            recovered = await _get(f"{base}/healthz")
        finally:
            await server.close()
        return page, healthy, stuck, recovered

    (code, text), healthy, stuck, recovered = asyncio.run(scenario())
    assert code == 200
    lines = set(text.splitlines())
    for expected in ("actprm_consumed_total 5.0", "actprm_scored_total 4.0", "actprm_selected_total 2.0",
                     "actprm_judged_total 1.0", "actprm_dead_lettered_total 1.0", "actprm_updates_total 1.0",
                     "actprm_score_seconds_total 1.5", "actprm_budget_left 999.0", "actprm_budget_used 1.0",
                     "actprm_round 0.0", "actprm_served_version 0.0", "actprm_selected_pct 50.0",
                     'actprm_paused{scope="consume"} 0.0', 'actprm_busy_seconds{role="judge"} 0.0',
                     "actprm_step_score_count 2.0", "actprm_judge_latency_seconds_count 1.0",
                     "actprm_swap_seconds_count 1.0", 'actprm_judge_calls_total{outcome="ok"} 1.0'):
        assert expected in lines, expected
    assert healthy[0] == 200 and json.loads(healthy[1])["ok"] is True
    assert stuck[0] == 503
    body = json.loads(stuck[1])
    assert body["ok"] is False and body["reason"] == "role judge busy for 700s (stuck_after_s=600)"
    assert recovered[0] == 200


def test_health_is_plain_arithmetic(rt):
    now = 10_000.0
    rt.busy_since["scorer"] = now - 30
    ok, detail = health(rt, stuck_after_s=60, now=now)
    assert ok and detail["busy_s"] == {"scorer": 30.0} and "reason" not in detail
    rt.busy_since["trainer"] = now - 61
    ok, detail = health(rt, stuck_after_s=60, now=now)
    assert not ok and detail["reason"] == "role trainer busy for 61s (stuck_after_s=60)"
    rt.paused_consume = True  # paused on purpose is not stuck
    rt.busy_since["trainer"] = None
    assert health(rt, stuck_after_s=60, now=now)[0]


def test_serve_reports_a_taken_port(rt):
    async def scenario():
        m = Metrics(rt)
        first = await m.serve("127.0.0.1", 0, lambda: (True, {}))
        try:
            with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{first.port}"):
                await Metrics(rt).serve("127.0.0.1", first.port, lambda: (True, {}))
        finally:
            await first.close()

    asyncio.run(scenario())


def test_the_status_service_runs_on_without_metrics_when_the_port_is_taken(rt):
    from actprm.daemon.run import RunOptions, StatusService

    async def scenario():
        first = await Metrics(rt).serve("127.0.0.1", 0, lambda: (True, {}))
        try:
            rt.settings.metrics.port = first.port
            service = StatusService(rt, RunOptions(heldout=0))
            await service.on_start()  # must not raise: the daemon serves on, without metrics
            assert service.metrics_server is None
            assert f"metrics server on 127.0.0.1:{first.port} not started" in rt.status()["last_error"]
        finally:
            await first.close()

    asyncio.run(scenario())
