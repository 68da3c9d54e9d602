"""actprm-client: rewards from a running actprm daemon for RL trainers, without torch.

- `RewardClient` (Kafka, asyncio) and `HttpRewardClient` (the `actprm serve` gateway);
- adapters: `actprm.client.trl`, `actprm.client.verl`, `actprm.client.openrlhf`;
- the message schemas and topic names every actprm process shares (`messages`, `topics`);
- `load_client_settings()`: the kafka and gateway sections, from ACTPRM_* variables or a TOML file.
"""

from actprm.client.http_client import HttpRewardClient
from actprm.client.ids import sample_id
from actprm.client.kafka import ItemError, RewardClient, StaleRewardError
from actprm.client.outcome import Outcome, RewardUnavailable, reduce_steps
from actprm.client.settings import ClientSettings, KafkaSettings, RewardSettings, load_client_settings

__all__ = [
    "ClientSettings", "HttpRewardClient", "ItemError", "KafkaSettings", "Outcome", "RewardClient", "RewardSettings",
    "RewardUnavailable", "StaleRewardError", "load_client_settings", "reduce_steps", "sample_id",
]
