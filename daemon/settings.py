"""One validated settings model for every process.

Precedence, highest first: CLI flags, environment variables (``ACTPRM_...``, nested with
``__``, e.g. ``ACTPRM_SELECTION__DELTA_STD=0.01``), a TOML file (``--config`` or
``ACTPRM_CONFIG``), then the defaults written here.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from actprm.model.trainer import FitConfig, TrainerConfig

# The TOML file of the load_settings call under way: passed to the settings sources without
# writing ACTPRM_CONFIG into the caller's environment (a library call changes no global state).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("actprm_config_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(_Section):
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


class ModelSettings(_Section):
    backbone: str = Field("smollm2-135m", description="'tiny', 'smollm2-135m', or a local Hugging Face model directory")
    hidden_layer: int | None = Field(None, description="feed the heads from this decoder layer (None: the backbone's default, "
                                     "smollm2-135m 15 of 30, where a probe finds the most step-correctness signal; "
                                     "others the last; -1: the last)")
    n_heads: int = Field(32, ge=1, description="ensemble size E (published 32)")
    head_width: int = Field(128, ge=1)
    max_length: int = Field(2048, ge=16, description="tokens per trajectory; whole trailing steps are dropped beyond it")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="backbone weights; auto is bfloat16 on CUDA, float32 on CPU (bf16 is ~4x slower there); heads are always float32")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field("auto", description="auto takes flash-attn on a CUDA bf16/fp16 backbone when installed, else sdpa")


class SelectionSettings(_Section):
    strategy: Literal["actprm", "random", "confidence", "disagreement", "full"] = "actprm"
    delta_pred: float = Field(0.95, gt=0.5, le=1.0, description="aleatoric threshold (published 0.95)")
    delta_std: float = Field(0.005, ge=0.0, description="epistemic threshold (published 0.005)")
    random_rate: float = Field(0.5, ge=0.0, le=1.0, description="selection rate of the random strategy")


class ScorerSettings(_Section):
    max_batch: int = Field(8, ge=1, description="trajectories per scoring batch")
    max_batch_tokens: int = Field(16384, ge=16, description="padded tokens per scoring batch (rows x longest row); batches are sorted by length and cut by count and by this")
    max_wait_s: float = Field(0.2, gt=0, description="longest wait to fill a batch")
    version_poll_s: float = Field(1.0, gt=0, description="how often the checkpoint store is checked for a newer version")


class JudgeSettings(_Section):
    kind: Literal["oracle", "openai", "vllm"] = "oracle"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/QwQ-32B"
    api_key: SecretStr | None = None
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(3, ge=0)
    temperature: float = Field(0.5, ge=0)
    max_tokens: int = Field(8192, ge=1)
    device: str = Field("cuda", pattern=r"^(auto|cuda(:\d+)?)$", description="vllm: the GPU the engine runs on (a CPU host is refused)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of the GPU's memory the engine may take; lower it to share a GPU with the scorer")


class RoundSettings(_Section):
    budget: int = Field(1000, ge=0, description="annotation requests allowed in a round")


class UpdateSettings(FitConfig, _Section):
    """How labels become versions; steps, mini_batch, replay_share and replay_size (FitConfig)
    say how much each update trains and what it replays."""

    batch_size: int = Field(16, ge=1, description="new labels per incremental update")
    max_wait_s: float = Field(30.0, gt=0, description="update with fewer labels after this long")
    min_batch: int = Field(1, ge=1, description="fewest labels worth an update when the wait runs out")
    canary_size: int = Field(0, ge=0, description="hold back the first N judged labels as a canary set (0: off)")
    canary_tolerance: float = Field(0.05, ge=0, le=1, description="refuse an update that lowers canary F1 by more than this")
    keep_versions: int = Field(50, ge=0, description="weights of the newest N versions (and v0) are kept; older versions keep only their manifest (0: keep all)")
    online_window: int = Field(64, ge=1, description="labels in the prequential window (online F1, step accuracy, first-error agreement)")


class BuiltinStreamSettings(_Section):
    """The built-in stream of the embedded default (and its held-out set): word problems with known errors."""

    kinds: str = Field("carry_over=0.5,misread=0.25,wrong_operation=0.25",
                       description="error kinds and their shares: carry_over, misread, wrong_operation, arithmetic "
                                   "(see the README's learnability table)")
    error_rate: float = Field(0.5, ge=0, le=1, description="share of trajectories with an error")
    markers: bool = Field(False, description="toy 'step j ok/bad' records instead (the tiny test backbone learns them)")
    rate_per_s: float = Field(0.0, ge=0, description="trajectories produced per second, like rollouts of an RL run (0: all at once)")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: str) -> str:
        from actprm.model.synthetic import parse_kinds

        parse_kinds(v)
        return v


class MetricsSettings(_Section):
    host: str = Field("127.0.0.1", description="address of /metrics and /healthz (0.0.0.0 exposes them to the network)")
    port: int = Field(9464, ge=0, le=65535, description="0 turns the metrics server off")
    stuck_after_s: float = Field(600.0, gt=0, description="/healthz fails when a role has been busy on one call this long")


class ControlSettings(_Section):
    max_age_s: float = Field(300.0, gt=0, description="commands issued further from now than this are refused (replays, skew)")
    ack_timeout_s: float = Field(10.0, gt=0, description="how long `actprm ctl` waits for daemons to answer")


class GatewaySettings(_Section):
    """`actprm serve`: the HTTP reward gateway for RL trainers (OpenRLHF, verl, TRL)."""

    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 exposes it to the network: set a token)")
    port: int = Field(5000, ge=1, le=65535)
    token: SecretStr | None = Field(None, description="when set, requests need 'Authorization: Bearer TOKEN'")
    reduce: Literal["min", "mean", "last", "prod"] = Field("min", description="per-step scores to one reward per sample (PURE argues for min)")
    step_split: str = Field("\n\n", description="how a response is cut into steps: a separator, 'lines', or 're:PATTERN'")
    response_marker: str | None = Field(None, description="when a query does not start with its prompt, the response is the text after the last occurrence of this (e.g. '<|im_start|>assistant\\n')")
    max_steps: int = Field(512, ge=1, le=512, description="a response that splits into more steps is refused (422)")
    max_items: int = Field(1024, ge=1, description="samples per request at most")
    timeout_s: float = Field(120.0, gt=0, description="answer 504 naming the ids after this long (OpenRLHF gives up at 180 s); the samples are still scored")

    @field_validator("step_split")
    @classmethod
    def _split_mode(cls, mode: str) -> str:
        from actprm.model.steps import check_split_mode

        return check_split_mode(mode)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACTPRM_", env_nested_delimiter="__", extra="forbid", validate_assignment=True)

    state_dir: Path = Field(Path(".actprm"), description="durable local state: ledgers (rocksdict) and, by default, checkpoints")
    checkpoint_dir: Path | None = Field(None, description="weights versions; may be a shared directory (default STATE_DIR/checkpoints)")
    stop_timeout_s: float = Field(30.0, gt=0, description="a stop (SIGTERM, Ctrl-C) that has not finished after this long exits at once; 5 s while the broker is unreachable")
    kafka: KafkaSettings = KafkaSettings()
    model: ModelSettings = ModelSettings()
    selection: SelectionSettings = SelectionSettings()
    scorer: ScorerSettings = ScorerSettings()
    judge: JudgeSettings = JudgeSettings()
    round: RoundSettings = RoundSettings()
    update: UpdateSettings = UpdateSettings()
    builtin: BuiltinStreamSettings = BuiltinStreamSettings()
    trainer: TrainerConfig = TrainerConfig()
    metrics: MetricsSettings = MetricsSettings()
    control: ControlSettings = ControlSettings()
    gateway: GatewaySettings = GatewaySettings()
    control_secret: SecretStr | None = Field(None, description="HMAC key for control commands")
    log_format: Literal["auto", "json", "console"] = "auto"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _CONFIG_FILE.get() or os.environ.get("ACTPRM_CONFIG")
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.state_dir / "checkpoints"


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
