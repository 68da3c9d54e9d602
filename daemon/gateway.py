"""`actprm serve`: an HTTP reward gateway for RL trainers, with Kafka underneath.

RL frameworks take one scalar reward per sample from an HTTP server or a function; none speaks
Kafka. The gateway is process wiring only: each request becomes trajectories for the
RewardClient (actprm.client.kafka), which produces them to the trajectories topic and awaits
their rewards; the scorers do not know the gateway exists.

- POST /get_reward  OpenRLHF's remote reward model: {"query", "prompts", "labels"} ->
                    {"rewards", "scores", "extra_logs", "errors"}
- POST /v1/rewards  per-step scores: {"items": [{"prompt", "response"} | {"problem", "steps"}]}
                    -> {"items": [{"ok", "id", "mu", "sigma", "reward", ...} | {"ok": false, "failure", "error", "reward"}]}
- GET  /healthz     200 when the client is connected, with its counters
- GET  /metrics     the same counters for Prometheus (actprm_gateway_*: fallbacks, outages, ...)

Each sample gets an answer by the client's one failure policy (actprm.client.outcome): its
reward, or gateway.fallback_reward with the reason (per item; for OpenRLHF in extra_logs), so
one bad sample never fails its request and an outage never makes OpenRLHF retry for minutes.
422 is only for a request malformed as a whole. A sample's id comes from its content, so a
retried request is answered from the reward already read, and never scored or charged twice.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import structlog
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from actprm.client.kafka import RewardClient
from actprm.client.openrlhf import merge, openrlhf_answer, query_items
from actprm.client.outcome import Outcome, RewardUnavailable
from actprm.daemon.settings import GatewaySettings, Settings

log = structlog.get_logger("actprm")

ITEM_FIELDS = {"prompt", "problem", "response", "steps", "metadata", "key"}


class OpenRLHFRequest(BaseModel):
    """What OpenRLHF's remote reward client posts (`--reward.remote_url`, older `--remote_rm_url`)."""

    model_config = ConfigDict(extra="ignore")  # newer OpenRLHF versions may send more; they are not ours to refuse

    query: list[str] = Field(min_length=1, description="prompt + response, one per sample")
    prompts: list[str] | None = Field(None, description="the prompt of each sample, a prefix (or its left-cut tail) of its query")
    labels: list[Any] | None = Field(None, description="reference answers; unused (the PRM needs none)")


class RewardsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(min_length=1)
    min_version: int | None = Field(None, ge=0, description="a reward of an older version is a failure ('stale')")
    timeout_s: float | None = Field(None, gt=0, description="this request's deadline (at most gateway.timeout_s)")


def item_problem(item: Any, i: int) -> str | None:
    """Why an item of /v1/rewards is not one we can read, or None."""
    if not isinstance(item, dict):
        return f"item {i}: expected an object"
    unknown = sorted(set(item) - ITEM_FIELDS)
    if unknown:
        return (f"item {i}: unexpected field(s) {', '.join(unknown)}; give prompt+response or problem+steps"
                + (" (ids come from the content)" if "id" in unknown else ""))
    return None


def per_step_answer(outcomes: list[Outcome], gw: GatewaySettings) -> dict:
    items = []
    for o in outcomes:
        if o.reward is not None:
            r = o.reward
            items.append({"ok": True, "id": r.id, "mu": r.mu, "sigma": r.sigma, "reward": o.value(gw.reduce, gw.fallback_reward),
                          "model_version": r.model_version, "selected": r.selected, "n_steps": r.n_steps,
                          "truncated": r.truncated, "first_error": r.first_error, "round_id": r.round_id})
        else:
            items.append({"ok": False, "failure": o.failure, "error": o.error, "reward": gw.fallback_reward})
    return {"items": items}


def _validation_reason(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)[:1000]


class _ClientCounters:
    """The reward client's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, client: RewardClient):
        self.client = client

    def collect(self):
        for name, value in sorted(self.client.stats.items()):
            yield CounterMetricFamily(f"actprm_gateway_{name}", f"reward client: {name.replace('_', ' ')}", value=value)
        yield GaugeMetricFamily("actprm_gateway_outage", "1 while rewards are unavailable (answered with the fallback)",
                                value=float(self.client.outages.ongoing))


def _registry(client: RewardClient) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_ClientCounters(client))
    return registry


def create_app(settings: Settings, client: RewardClient) -> FastAPI:
    """The ASGI app around a started client (the caller owns the client's life)."""
    gw = settings.gateway
    app = FastAPI(title="actprm reward gateway", docs_url=None, redoc_url=None, openapi_url=None)
    token = gw.token.get_secret_value() if gw.token else None

    def authorised(authorization: str | None = Header(None)) -> None:
        if token is not None and not (authorization and hmac.compare_digest(authorization, f"Bearer {token}")):
            raise HTTPException(401, "missing or wrong bearer token")

    def too_many(n: int) -> None:
        if n > gw.max_items:
            raise HTTPException(422, f"{n} samples, over the limit of {gw.max_items} per request")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_reason(exc)}, status_code=422)

    @app.exception_handler(RewardUnavailable)
    async def _unavailable(request: Request, exc: RewardUnavailable) -> JSONResponse:  # on_failure = "raise"
        return JSONResponse({"detail": str(exc), "ids": exc.missing, "sent": exc.sent}, status_code=504)

    @app.exception_handler(KafkaError)
    async def _kafka(request: Request, exc: KafkaError) -> JSONResponse:
        return JSONResponse({"detail": f"Kafka: {type(exc).__name__}: {exc}"[:500]}, status_code=503)

    async def outcomes(items: list[dict], timeout_s: float | None = None, min_version: int | None = None) -> list[Outcome]:
        timeout = gw.timeout_s if timeout_s is None else min(timeout_s, gw.timeout_s)
        return await client.score_each(items, timeout_s=timeout, min_version=min_version)

    @app.post("/get_reward", dependencies=[Depends(authorised)])
    async def get_reward(req: OpenRLHFRequest) -> dict:
        if req.prompts is not None and len(req.prompts) != len(req.query):
            raise HTTPException(422, f"{len(req.query)} queries but {len(req.prompts)} prompts")
        too_many(len(req.query))
        items, bad = query_items(req.query, req.prompts, gw.response_marker)
        good = [x for x in items if x is not None]
        scored = await outcomes(good) if good else []
        return openrlhf_answer(merge(items, bad, scored), gw.reduce, gw.fallback_reward)

    @app.post("/v1/rewards", dependencies=[Depends(authorised)])
    async def rewards(req: RewardsRequest) -> dict:
        too_many(len(req.items))
        problems = [item_problem(x, i) for i, x in enumerate(req.items)]
        good = [x for x, p in zip(req.items, problems) if p is None]
        scored = iter(await outcomes(good, req.timeout_s, req.min_version) if good else [])
        done = [Outcome(None, "invalid", p) if p is not None else next(scored) for p in problems]
        return per_step_answer(done, gw)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(_registry(client)), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = client.started
        body = {"ok": ok, "stats": dict(client.stats)} if ok else {"ok": False, "reason": "the reward client is not running"}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


async def _serve(settings: Settings) -> None:
    import uvicorn

    gw = settings.gateway
    # Started here, not in an ASGI lifespan: a broker that cannot be reached is a one-line error
    # at the command line, not a traceback in uvicorn's log.
    client = RewardClient(settings)
    try:
        await asyncio.wait_for(client.start(), timeout=60)
    except (KafkaError, TimeoutError, OSError) as err:  # OSError: also client.topics.KafkaUnreachable
        await client.stop()
        reason = str(err) if "cannot reach Kafka" in str(err) else f"{type(err).__name__}: {err}"
        raise RuntimeError(f"the gateway cannot start: {reason}") from None
    try:
        config = uvicorn.Config(create_app(settings, client), host=gw.host, port=gw.port, log_level="warning",
                                access_log=False, lifespan="off")
        log.info("reward gateway listening", url=f"http://{gw.host}:{gw.port}", bootstrap=settings.kafka.bootstrap,
                 topic_prefix=settings.kafka.topic_prefix, reduce=gw.reduce, on_failure=gw.on_failure,
                 timeout_s=gw.timeout_s, auth="bearer token" if gw.token else "none")
        await uvicorn.Server(config).serve()
    finally:
        await client.stop()


def serve_gateway(settings: Settings) -> None:
    """Run the gateway until Ctrl-C / SIGTERM."""
    gw = settings.gateway
    if gw.host not in ("127.0.0.1", "localhost", "::1") and gw.token is None:
        log.warning("the gateway is exposed to the network without a token; set gateway.token", host=gw.host)
    asyncio.run(_serve(settings))
