"""The adapters' one way to rewards: over Kafka (RewardClient on its own thread) when
kafka.bootstrap is set, else from the gateway over HTTP (`actprm serve` at gateway.host/port).

Either way a sample gets an Outcome by the one failure policy (outcome.py), and the adapters
only translate Outcomes into what their framework expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from actprm.client.background import BackgroundRewardClient
from actprm.client.http_client import HttpRewardClient
from actprm.client.outcome import Outcome, reduce_steps
from actprm.client.settings import ClientSettings, RewardSettings, load_client_settings, sections


class Rewarder:
    def __init__(self, settings: Any = None, **reward_overrides: Any):
        if settings is None:
            settings = load_client_settings(gateway=reward_overrides)
            reward_overrides = {}
        kafka, reward = sections(settings)
        if reward_overrides:
            reward = RewardSettings.model_validate(reward.model_dump() | reward_overrides)
        reduce_steps([], reward.reduce)  # an unknown reduction is refused now, not at the first sample
        self.reward = reward
        self.settings = ClientSettings(kafka=kafka, gateway=reward)
        self.transport = "kafka" if kafka.bootstrap else "http"
        self._kafka = BackgroundRewardClient(self.settings) if self.transport == "kafka" else None
        self._http = HttpRewardClient(self.settings) if self.transport == "http" else None

    def value(self, outcome: Outcome) -> float:
        return outcome.value(self.reward.reduce, self.reward.fallback_reward)

    def outcomes_sync(self, items: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        if self._http is not None:
            return self._http.score_each(items)
        return self._kafka.score_sync(items)

    async def outcomes(self, items: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        if self._http is not None:
            return await self._http.ascore_each(items)
        return await self._kafka.score(items)

    def close(self) -> None:
        """Never raises."""
        if self._kafka is not None:
            self._kafka.close()
