"""What a client reads: the Kafka section and the reward section, shared with the daemon.

The daemon's settings (daemon/settings.py) compose these same sections, so a value means the
same on both sides and has one home. A client reads them without pydantic-settings, torch or
the daemon: `load_client_settings()` takes, highest first, keyword overrides, the environment
(`ACTPRM_KAFKA__BOOTSTRAP`, `ACTPRM_GATEWAY__REDUCE`, ...), then a TOML file (`config_file` or
`ACTPRM_CONFIG`: its [kafka] and [gateway] tables; other tables are the daemon's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (RL environments often are)
    import tomli as tomllib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from actprm.client.steps import check_split_mode

ENV_PREFIX = "ACTPRM_"


class Section(BaseModel):
    """One section of the settings: unknown keys are errors, and so is a bad value set later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(Section):
    bootstrap: str | None = Field(None, description="host:port[,host:port]; empty starts the embedded broker (memory only: everything is lost when it stops)")
    topic_prefix: str = Field("actprm", pattern=r"^[A-Za-z0-9._-]+$", description="prefix of every topic name")
    embedded_port: int | None = Field(None, ge=1, le=65535, description="port of the embedded broker (default: a free one; a daemon that restarts it keeps it)")
    partitions: int = Field(4, ge=1, description="partitions of the trajectories topic (the most scorer processes that can share it)")
    replication_factor: int = Field(1, ge=1, description="replication of the topics actprm creates (3 on a production cluster)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="exactly_once needs a real Kafka cluster (transactions); consumers dedupe by id either way")
    session_timeout_s: float = Field(6.0, gt=0, description="consumer-group session timeout; a join takes about half of it")
    fetch_max_wait_ms: int = Field(50, ge=1, le=1500, description="longest a consumer's fetch waits for data: the floor of "
                                   "a message's latency through each hop (faust's own 1500 ms cost 0.7 s per gateway request)")


def aiokafka_options(k: KafkaSettings) -> dict:
    """SASL/TLS settings as aiokafka client keyword arguments (producers, consumers, admin)."""
    if k.security_protocol == "PLAINTEXT":
        return {}
    import ssl

    out: dict = {"security_protocol": k.security_protocol}
    if k.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
    if k.security_protocol.startswith("SASL"):
        out |= {"sasl_mechanism": k.sasl_mechanism or "PLAIN", "sasl_plain_username": k.sasl_username,
                "sasl_plain_password": k.sasl_password.get_secret_value() if k.sasl_password else None}
    return out


class RewardSettings(Section):
    """How a sample becomes one reward, and what a caller gets when it cannot have one: read by
    the gateway (`actprm serve`), the Python clients and the TRL / verl / OpenRLHF adapters."""

    reduce: Literal["min", "mean", "last", "prod"] = Field("min", description="per-step scores to one reward per sample (PURE argues for min)")
    step_split: str = Field("\n\n", description="how a response is cut into steps: a separator, 'lines', or 're:PATTERN'")
    max_steps: int = Field(512, ge=1, le=512, description="a response that splits into more steps gets the fallback, with the reason")
    timeout_s: float = Field(60.0, gt=0, description="deadline of one call (a batch of samples) while rewards flow: TRL waits this long per step at most, "
                                                     "and the gateway answers before OpenRLHF's own 180 s limit")
    outage_timeout_s: float = Field(5.0, gt=0, description="deadline of a call while the last one failed (an outage): an RL run loses seconds per step, not minutes")
    on_failure: Literal["fallback", "raise"] = Field("fallback", description="a sample without a reward by the deadline: 'fallback' answers "
                                                                            "fallback_reward (TRL: None) and counts it; 'raise' raises RewardUnavailable")
    fallback_reward: float = Field(0.0, allow_inf_nan=False, description="the reward a sample gets on failure (verl: with ok=false; OpenRLHF: with extra_logs saying so)")
    response_marker: str | None = Field(None, description="OpenRLHF: when a query does not start with its prompt (nor with a left-cut tail of it), the response is the text after the last occurrence of this (e.g. '<|im_start|>assistant\\n')")
    reward_cache: int = Field(20000, ge=0, description="rewards kept by id, so a retried sample is answered at once")
    host: str = Field("127.0.0.1", description="the gateway's address (0.0.0.0 exposes it to the network: set a token)")
    port: int = Field(5000, ge=1, le=65535)
    token: SecretStr | None = Field(None, description="when set, requests need 'Authorization: Bearer TOKEN'")

    @field_validator("step_split")
    @classmethod
    def _split_mode(cls, mode: str) -> str:
        return check_split_mode(mode)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


class ClientSettings(Section):
    kafka: KafkaSettings = KafkaSettings()
    gateway: RewardSettings = RewardSettings()


def _from_env(section: str, fields: set[str], environ: dict[str, str]) -> dict[str, Any]:
    prefix = f"{ENV_PREFIX}{section.upper()}__"
    out = {}
    for key, value in environ.items():
        if key.upper().startswith(prefix):
            name = key[len(prefix):].lower()
            if name in fields:
                out[name] = value
    return out


def load_client_settings(config_file: str | Path | None = None, *, environ: dict[str, str] | None = None,
                         **overrides: Any) -> ClientSettings:
    """ClientSettings from overrides ({"kafka": {...}, "gateway": {...}}), the environment and a TOML file."""
    environ = dict(os.environ if environ is None else environ)
    path = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    table: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with path.open("rb") as f:
            table = tomllib.load(f)
    values: dict[str, Any] = {}
    for name, schema in (("kafka", KafkaSettings), ("gateway", RewardSettings)):
        fields = set(schema.model_fields)
        section = {k: v for k, v in (table.get(name) or {}).items() if k in fields}
        section |= _from_env(name, fields, environ)
        given = overrides.get(name) or {}
        section |= given.model_dump() if isinstance(given, BaseModel) else dict(given)
        values[name] = schema.model_validate(section)
    return ClientSettings(**values)


def sections(settings: Any | None) -> tuple[KafkaSettings, RewardSettings]:
    """(kafka, reward) sections of ClientSettings, the daemon's Settings, or None (load them)."""
    if settings is None:
        settings = load_client_settings()
    if isinstance(settings, KafkaSettings):
        return settings, RewardSettings()
    reward = getattr(settings, "gateway", None) or RewardSettings()
    if not isinstance(reward, RewardSettings):
        reward = RewardSettings.model_validate({k: v for k, v in dict(reward).items() if k in RewardSettings.model_fields})
    return settings.kafka, reward
