"""`actprm serve`: an HTTP reward gateway for RL trainers, with Kafka underneath.

RL frameworks take one scalar reward per sample from an HTTP server or a function; none speaks
Kafka. The gateway is process wiring only: each request becomes trajectories for the
RewardClient (streams/client.py), which produces them to the trajectories topic and awaits
their rewards; the scorers do not know the gateway exists.

- POST /get_reward  OpenRLHF's remote reward model: {"query", "prompts", "labels"} ->
                    {"rewards", "scores", "extra_logs"}
- POST /v1/rewards  per-step scores: {"items": [{"prompt", "response"} | {"problem", "steps"}]}
- GET  /healthz     200 when the client is connected

A request that times out is answered 504 naming its ids, but its trajectories were sent: they
are still scored and their rewards still published (nothing is lost; the RL trainer retries).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import structlog
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from actprm.daemon.settings import GatewaySettings, Settings
from actprm.streams.client import ItemError, RewardClient, RewardTimeout, StaleRewardError, reduce_steps
from actprm.streams.messages import Reward

log = structlog.get_logger("actprm")

ITEM_FIELDS = {"prompt", "problem", "response", "steps", "metadata"}


class OpenRLHFRequest(BaseModel):
    """What OpenRLHF's remote reward client posts (`--reward.remote_url`, older `--remote_rm_url`)."""

    model_config = ConfigDict(extra="ignore")  # newer OpenRLHF versions may send more; they are not ours to refuse

    query: list[str] = Field(min_length=1, description="prompt + response, one per sample")
    prompts: list[str] | None = Field(None, description="the prompt of each sample, a prefix of its query")
    labels: list[Any] | None = Field(None, description="reference answers; unused (the PRM needs none)")


class RewardsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1)
    min_version: int | None = Field(None, ge=0, description="refuse (409) rewards of a version older than this")


def split_query(query: str, prompt: str | None, marker: str | None) -> tuple[str, str]:
    """(problem, response) of one OpenRLHF sample: the query minus its prompt, or else the text
    after the last `marker` (e.g. the chat template's assistant header)."""
    if prompt is not None and query.startswith(prompt):
        return prompt, query[len(prompt):]
    if marker and marker in query:
        cut = query.rindex(marker)
        return query[:cut], query[cut + len(marker):]
    if prompt is not None:
        raise ItemError("the query does not start with its prompt" + ("" if marker else "; set gateway.response_marker "
                                                                       "to split it at the assistant's header"))
    raise ItemError("no prompts given and no gateway.response_marker set, so the response cannot be found in the query")


def openrlhf_items(req: OpenRLHFRequest, gw: GatewaySettings) -> list[dict[str, str]]:
    if req.prompts is not None and len(req.prompts) != len(req.query):
        raise ItemError(f"{len(req.query)} queries but {len(req.prompts)} prompts")
    items = []
    for i, query in enumerate(req.query):
        try:
            problem, response = split_query(query, req.prompts[i] if req.prompts else None, gw.response_marker)
        except ItemError as err:
            raise ItemError(f"query {i}: {err}") from None
        items.append({"problem": problem, "response": response})
    return items


def openrlhf_answer(rewards: list[Reward], how: str) -> dict:
    scalars = [reduce_steps(r.mu, how) for r in rewards]
    return {
        "rewards": scalars,
        "scores": scalars,  # the PRM's step scores are probabilities, so the reduction is in 0..1 already
        "extra_logs": {
            "prm_steps": [float(r.n_steps) for r in rewards],
            "prm_sigma_max": [max(r.sigma, default=0.0) for r in rewards],
            "prm_selected": [float(r.selected) for r in rewards],
            "prm_version": [float(r.model_version) for r in rewards],
        },
    }


def per_step_answer(rewards: list[Reward], how: str) -> dict:
    return {"items": [{"id": r.id, "mu": r.mu, "sigma": r.sigma, "reward": reduce_steps(r.mu, how),
                       "model_version": r.model_version, "selected": r.selected, "n_steps": r.n_steps,
                       "truncated": r.truncated} for r in rewards]}


def _check_items(items: list[dict[str, Any]], gw: GatewaySettings) -> None:
    if len(items) > gw.max_items:
        raise ItemError(f"{len(items)} items, over the limit of {gw.max_items} per request")
    for i, item in enumerate(items):
        unknown = sorted(set(item) - ITEM_FIELDS)
        if unknown:
            raise ItemError(f"item {i}: unexpected field(s) {', '.join(unknown)}; give prompt+response or problem+steps"
                            + (" (ids are assigned by the gateway)" if "id" in unknown else ""))


def _validation_reason(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)[:1000]


def create_app(settings: Settings, client: RewardClient) -> FastAPI:
    """The ASGI app around a started client (the caller owns the client's life)."""
    gw = settings.gateway
    app = FastAPI(title="actprm reward gateway", docs_url=None, redoc_url=None, openapi_url=None)
    token = gw.token.get_secret_value() if gw.token else None

    def authorised(authorization: str | None = Header(None)) -> None:
        if token is not None and not (authorization and hmac.compare_digest(authorization, f"Bearer {token}")):
            raise HTTPException(401, "missing or wrong bearer token")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_reason(exc)}, status_code=422)

    @app.exception_handler(ItemError)
    async def _bad_item(request: Request, exc: ItemError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RewardTimeout)
    async def _timeout(request: Request, exc: RewardTimeout) -> JSONResponse:
        log.warning("gateway: rewards late; answered 504 (the samples are still scored)", missing=len(exc.missing))
        return JSONResponse({"detail": str(exc), "ids": exc.missing}, status_code=504)

    @app.exception_handler(StaleRewardError)
    async def _stale(request: Request, exc: StaleRewardError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "versions": exc.stale}, status_code=409)

    @app.exception_handler(KafkaError)
    async def _kafka(request: Request, exc: KafkaError) -> JSONResponse:
        return JSONResponse({"detail": f"Kafka: {type(exc).__name__}: {exc}"[:500]}, status_code=503)

    async def score(items: list[dict[str, Any]], min_version: int | None = None) -> list[Reward]:
        trajectories = client.trajectories(items)
        return await client.score_trajectories(trajectories, timeout_s=gw.timeout_s, min_version=min_version)

    @app.post("/get_reward", dependencies=[Depends(authorised)])
    async def get_reward(req: OpenRLHFRequest) -> dict:
        items = openrlhf_items(req, gw)
        _check_items(items, gw)
        return openrlhf_answer(await score(items), gw.reduce)

    @app.post("/v1/rewards", dependencies=[Depends(authorised)])
    async def rewards(req: RewardsRequest) -> dict:
        _check_items(req.items, gw)
        return per_step_answer(await score(req.items, req.min_version), gw.reduce)

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
    client = RewardClient(settings, split=gw.step_split, max_steps=gw.max_steps)
    try:
        await asyncio.wait_for(client.start(), timeout=60)
    except (KafkaError, TimeoutError, OSError) as err:  # OSError: also streams.topics.KafkaUnreachable
        await client.stop()
        reason = str(err) if "cannot reach Kafka" in str(err) else f"{type(err).__name__}: {err}"
        raise RuntimeError(f"the gateway cannot start: {reason}") from None
    try:
        config = uvicorn.Config(create_app(settings, client), host=gw.host, port=gw.port, log_level="warning",
                                access_log=False, lifespan="off")
        log.info("reward gateway listening", url=f"http://{gw.host}:{gw.port}", bootstrap=settings.kafka.bootstrap,
                 topic_prefix=settings.kafka.topic_prefix, reduce=gw.reduce, auth="bearer token" if gw.token else "none")
        await uvicorn.Server(config).serve()
    finally:
        await client.stop()


def serve_gateway(settings: Settings) -> None:
    """Run the gateway until Ctrl-C / SIGTERM."""
    gw = settings.gateway
    if gw.host not in ("127.0.0.1", "localhost", "::1") and gw.token is None:
        log.warning("the gateway is exposed to the network without a token; set gateway.token", host=gw.host)
    asyncio.run(_serve(settings))
