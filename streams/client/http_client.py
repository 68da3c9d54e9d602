"""HttpRewardClient: rewards from `actprm serve` (the gateway) over HTTP, with the same
failure policy as the Kafka client: an Outcome per sample, the fallback on failure.

    client = HttpRewardClient()                      # gateway.host/port/token from ACTPRM_GATEWAY__*
    outcomes = client.score_each([{"prompt": p, "response": r}])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from actprm.client.messages import Reward
from actprm.client.outcome import Outages, Outcome, RewardUnavailable
from actprm.client.settings import sections


class HttpRewardClient:
    def __init__(self, settings: Any = None, *, url: str | None = None):
        _, self.reward = sections(settings)
        self.url = (url or self.reward.url).rstrip("/")
        token = self.reward.token.get_secret_value() if self.reward.token else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.outages = Outages("HTTP reward client")

    def _deadline(self, timeout_s: float | None) -> float:
        deadline = self.reward.timeout_s if timeout_s is None else timeout_s
        return min(deadline, self.reward.outage_timeout_s) if self.outages.ongoing else deadline

    def _outcomes(self, n: int, body: Mapping[str, Any] | None, failure: str, deadline: float) -> list[Outcome]:
        if body is None:
            if self.reward.on_failure == "raise":
                raise RewardUnavailable([f"item {i}" for i in range(n)], deadline, sent=False, reason=failure)
            self.outages.failed(n, failure)
            return [Outcome(None, "unavailable", failure) for _ in range(n)]
        out = []
        for item in body["items"]:
            if item.get("ok", True) and "mu" in item:
                out.append(Outcome(Reward.model_validate({k: v for k, v in item.items() if k in Reward.model_fields})))
            else:
                out.append(Outcome(None, item.get("failure", "unavailable"), item.get("error", "")))
        if any(o.failure == "unavailable" for o in out):
            self.outages.failed(sum(o.failure == "unavailable" for o in out), "the gateway had no reward in time")
        else:
            self.outages.recovered()
        return out

    def _post(self, items: Sequence[Mapping[str, Any]], deadline: float) -> dict:
        # The gateway answers by its own deadline; a little more here covers the trip.
        return {"url": f"{self.url}/v1/rewards", "json": {"items": list(items), "timeout_s": deadline},
                "headers": self.headers, "timeout": deadline + 5}

    def _answer(self, n: int, deadline: float, resp: httpx.Response | None, err: Exception | None) -> list[Outcome]:
        if err is not None:
            return self._outcomes(n, None, f"gateway {self.url} unreachable: {type(err).__name__}", deadline)
        if resp.status_code != 200:
            return self._outcomes(n, None, f"gateway answered {resp.status_code}: {resp.text[:200]}", deadline)
        return self._outcomes(n, resp.json(), "", deadline)

    def score_each(self, items: Sequence[Mapping[str, Any]], *, timeout_s: float | None = None) -> list[Outcome]:
        deadline = self._deadline(timeout_s)
        try:
            return self._answer(len(items), deadline, httpx.post(**self._post(items, deadline)), None)
        except httpx.HTTPError as err:
            return self._answer(len(items), deadline, None, err)

    async def ascore_each(self, items: Sequence[Mapping[str, Any]], *, timeout_s: float | None = None) -> list[Outcome]:
        deadline = self._deadline(timeout_s)
        try:
            async with httpx.AsyncClient() as http:
                return self._answer(len(items), deadline, await http.post(**self._post(items, deadline)), None)
        except httpx.HTTPError as err:
            return self._answer(len(items), deadline, None, err)
