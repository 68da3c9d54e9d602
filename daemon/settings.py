"""One validated settings model for every process, composed of the sections each layer owns.

The stream side's sections (Kafka, selection, scorer, judge, rounds, updates, control) are in
streams/config.py, the model's in model/config.py and model/training/trainer.py; the daemon's own parts
(the built-in stream, metrics, the gateway) are here.

Precedence, highest first: CLI flags, environment variables (``ACTPRM_...``, nested with
``__``, e.g. ``ACTPRM_SELECTION__DELTA_STD=0.01``), a TOML file (``--config`` or
``ACTPRM_CONFIG``), then the defaults written here.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from actprm.client.settings import RewardSettings
from actprm.model.data.synthetic import DEFAULT_KINDS
from actprm.client.settings import Section
from actprm.streams.config import ProcessSettings

# The TOML file of the load_settings call under way: passed to the settings sources without
# writing ACTPRM_CONFIG into the caller's environment (a library call changes no global state).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("actprm_config_file", default=None)


class BuiltinStreamSettings(Section):
    """The built-in stream of the embedded default (and its held-out set): word problems with known errors."""

    kinds: str = Field(",".join(f"{k}={v:g}" for k, v in DEFAULT_KINDS.items()),
                       description="error kinds and their shares: carry_over, misread, wrong_operation, arithmetic "
                                   "(see the README's learnability table)")
    error_rate: float = Field(0.5, ge=0, le=1, description="share of trajectories with an error")
    markers: bool = Field(False, description="toy 'step j ok/bad' records instead (the tiny test backbone learns them)")
    rate_per_s: float = Field(0.0, ge=0, description="trajectories produced per second, like rollouts of an RL run (0: all at once)")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: str) -> str:
        from actprm.model.data.synthetic import parse_kinds

        parse_kinds(v)
        return v


class MetricsSettings(Section):
    host: str = Field("127.0.0.1", description="address of /metrics and /healthz (0.0.0.0 exposes them to the network)")
    port: int = Field(9464, ge=0, le=65535, description="0 turns the metrics server off")
    stuck_after_s: float = Field(600.0, gt=0, description="/healthz fails when a role has been busy on one call this long")


class GatewaySettings(RewardSettings):
    """`actprm serve`, the HTTP reward gateway: the reward section every client reads
    (actprm.client.settings.RewardSettings: reduce, step split, deadline, failure policy, address)
    and what only the server needs."""

    max_items: int = Field(1024, ge=1, description="samples per request at most")


class Settings(ProcessSettings, BaseSettings):
    """The stream side's settings (streams/config.py's ProcessSettings: state, Kafka, selection,
    scorer, judge, rounds, updates, control, the model's sections) and the daemon's own."""

    model_config = SettingsConfigDict(env_prefix="ACTPRM_", env_nested_delimiter="__", extra="forbid", validate_assignment=True)

    stop_timeout_s: float = Field(30.0, gt=0, description="a stop (SIGTERM, Ctrl-C) that has not finished after this long exits at once; 5 s while the broker is unreachable")
    # Named so that its variable is ACTPRM_BROKER_MEMORY_LIMIT_MB, which `actprm broker` reads too.
    broker_memory_limit_mb: float | None = Field(None, gt=0, description="the embedded broker (no retention: it keeps every message in memory) is warned about in status, metrics and the log at 80% of this; default half the host's memory")
    builtin: BuiltinStreamSettings = BuiltinStreamSettings()
    metrics: MetricsSettings = MetricsSettings()
    gateway: GatewaySettings = GatewaySettings()
    log_format: Literal["auto", "json", "console"] = "auto"
    allocator: Literal["auto", "jemalloc", "glibc"] = Field(
        "auto", description="the malloc `actprm run` runs on (daemon/memory.py): glibc's heaps fragment over hours "
                            "(RSS +8% in 8 minutes of a soak, +3% on jemalloc); auto takes jemalloc when the system has "
                            "it (apt install libjemalloc2), else glibc")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _CONFIG_FILE.get() or os.environ.get("ACTPRM_CONFIG")
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

def load_settings(config_file: Path | None = None, **overrides) -> Settings:
    """Settings from defaults, a TOML file, the environment and explicit overrides (flags)."""
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
    token = _CONFIG_FILE.set(config_file)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)
