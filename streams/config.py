"""The settings of the stream side's parts: Kafka, selection, scorer, judge, rounds, updates, control.

Each part reads its own section. daemon/settings.py composes these with the model's sections
(model/config.py, model/training/trainer.py) and the daemon's own into the one Settings it reads from
flags, the environment and a TOML file; `ProcessSettings` is what the stream side reads of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from actprm.client.settings import KafkaSettings, Section
from actprm.model.config import ModelSettings
from actprm.model.uncertainty import Strategy
from actprm.model.training.consolidate import ConsolidateConfig
from actprm.model.training.trainer import FitConfig, TrainerConfig


class SelectionSettings(Section):
    strategy: Strategy = "actprm"
    delta_pred: float = Field(0.95, gt=0.5, le=1.0, description="aleatoric threshold (published 0.95)")
    delta_std: float = Field(0.005, ge=0.0, description="epistemic threshold (published 0.005)")
    random_rate: float = Field(0.5, ge=0.0, le=1.0, description="selection rate of the random strategy")


class ScorerSettings(Section):
    max_batch: int = Field(8, ge=1, description="trajectories per scoring batch")
    max_batch_tokens: int = Field(16384, ge=16, description="padded tokens per scoring batch (rows x longest row); batches are sorted by length and cut by count and by this")
    max_wait_s: float = Field(0.2, gt=0, description="longest wait to fill a batch")
    version_poll_s: float = Field(5.0, gt=0, description="how often the checkpoint store is listed for a newer version: the fallback for an announcement on the versions topic lost with the broker's data")


class JudgeSettings(Section):
    kind: Literal["oracle", "openai", "vllm"] = "oracle"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/QwQ-32B"
    api_key: SecretStr | None = None
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(600.0, gt=0, description="one request to the judge server")
    max_retries: int = Field(3, ge=0, description="retries inside one judge call after its first request (429, 5xx, timeouts, connection errors)")
    backoff_initial_s: float = Field(2.0, gt=0, description="first wait between retries inside a call; doubles per retry, half of it random")
    backoff_max_s: float = Field(60.0, gt=0, description="longest wait between retries inside a call")
    retry_after_max_s: float = Field(300.0, ge=0, description="longest Retry-After honoured inside a call; a server asking for more sends the request to the retry queue with that wait")
    retry_delays_s: list[float] = Field([1800.0, 7200.0, 21600.0], description="after a call's retries run out: when the retry queue asks again (seconds after each failure); empty: give up at once")
    retry_queue_max: int = Field(10000, ge=0, description="requests the retry queue holds; a failure that finds it full is given up (dead letter, budget refunded)")
    drain_timeout_s: float = Field(900.0, ge=0, description="after --max-trajectories, how long the run waits for judge calls in flight before it stops and says how many it abandons")
    answer_max_chars: int = Field(4000, ge=0, description="characters of the judge's answer kept with a label, a dead letter and the verdict log (its end: where the verdict is)")
    audit_max_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="size of the verdict log (state_dir/judge/verdicts.jsonl) before it is rotated; 3 files are kept")
    qualify_data: Path | None = Field(None, description="gold-labelled ProcessBench-format file the judge is checked on at start (with qualify_n)")
    qualify_n: int = Field(0, ge=0, description="records of qualify_data to judge at start (0: no check)")
    min_f1: float | None = Field(None, ge=0, le=1, description="refuse to start when the judge's ProcessBench F1 at start is below this (None: only warn)")
    temperature: float = Field(0.5, ge=0)
    max_tokens: int = Field(8192, ge=1)
    device: str = Field("cuda", pattern=r"^(auto|cuda(:\d+)?)$", description="vllm: the GPU the engine runs on (a CPU host is refused)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of the GPU's memory the engine may take; lower it to share a GPU with the scorer")


class RoundSettings(Section):
    budget: int = Field(1000, ge=0, description="annotation requests allowed in a round")


class UpdateSettings(FitConfig, Section):
    """How labels become versions; steps, mini_batch, replay_share and replay_size (FitConfig)
    say how much each update trains and what it replays."""

    batch_size: int = Field(16, ge=1, description="new labels per incremental update")
    max_wait_s: float = Field(30.0, gt=0, description="update with fewer labels after this long")
    min_batch: int = Field(1, ge=1, description="fewest labels worth an update when the wait runs out")
    canary_size: int = Field(0, ge=0, description="hold back the first N judged labels as a canary set (0: off)")
    canary_tolerance: float = Field(0.05, ge=0, le=1, description="refuse an update that lowers canary F1 by more than this")
    keep_versions: int = Field(50, ge=0, description="weights of the newest N versions (and v0) are kept; older versions keep only their manifest (0: keep all)")
    serve_average: float = Field(0.0, ge=0, lt=1, description="each version serves this share of the last version's weights plus the rest of the newly trained ones, an exponential average of the updates: steadier rewards from one version to the next (0: the trained weights). Training goes on from the trained weights; a restart, a rollback or a consolidation starts the average again from the version it takes up")
    online_window: int = Field(64, ge=1, description="labels in the prequential window (online F1, step accuracy, first-error agreement)")


class ConsolidateSettings(ConsolidateConfig, Section):
    """When the trainer trains a candidate on every label kept (model/training/consolidate.py: how)."""

    every_labels: int = Field(256, ge=0, description="start a consolidation after this many labels trained by updates (0: only on `actprm ctl consolidate`)")
    nice: int = Field(10, ge=0, le=19, description="the candidate's training thread runs at this niceness (Linux; its torch worker threads too), so scoring on the same cores goes first; 0: the same priority. Read when the trainer starts")
    # The end of a bounded run is the one time nothing runs beside a consolidation, and the PRM
    # it leaves is the one a user takes away: the published method trains that one on all the
    # selected data, so it gets a full training rather than the short one that fits between labels.
    at_end: bool = Field(True, description="a bounded run (`actprm run --max-trajectories`) ends with one more consolidation on every label kept, after its last update (published only if it beats the served version, as any other)")
    at_end_min_steps: int | None = Field(None, ge=0, description="min_steps of the consolidation at the end of a bounded run (None: min_steps)")
    at_end_patience: int | None = Field(None, ge=1, description="patience of the consolidation at the end of a bounded run (None: patience)")
    at_end_max_seconds: float | None = Field(None, gt=0, description="max_seconds of the consolidation at the end of a bounded run, and of its refit (None: max_seconds); nothing runs beside it, so it trains faster than the periodic ones")
    at_end_refit: bool = Field(True, description="the consolidation at the end of a bounded run, when its candidate beats the served version on the validation slice, publishes the same recipe trained on the slice's labels too (consolidate.refit; up to another max_seconds, and in lora/full mode a second candidate copy of the trained weights while it trains)")
    # Periodic consolidations must leave the slice unseen: the next one is judged on it.
    refit: Literal[False] = Field(False, description="periodic consolidations never refit (see at_end_refit)")
    at_end_gated: bool = Field(True, description="the consolidation at the end of a bounded run is published only when its candidate beats the served version on the validation slice (consolidate.gated); False: always, its refit too (the PRM the run leaves is then the one trained on every label, as the published method trains the PRM it ships)")
    gated: Literal[True] = Field(True, description="periodic consolidations are always gated by the validation slice (see at_end_gated)")
    # The slice's labels are a sample of the stream, the only labels that are not hard cases; kept
    # out of training for good, they would teach only the PRM that ends a bounded run, and one that
    # never ends would pay their judge calls for gating alone.
    validate_once: bool = Field(True, description="a label of the validation slice judges one consolidation, then trains: later consolidations and the online updates' replay take it, and the next consolidation is judged on the slice's labels that came after it (the end of a bounded run keeps its slice for another try: nothing comes after it); False: the slice never trains (but at the end of a bounded run, consolidate.at_end_refit)")
    at_end_tries: int = Field(1, ge=1, description="candidates the end of a bounded run may train, each with a new seed, until one beats the served version on the validation slice (a slice of ~150 labels moves F1 by +-0.03 from one seed to the next, and refuses candidates better on the stream)")

    def at_end_config(self) -> ConsolidateConfig:
        """How the consolidation at the end of a bounded run trains."""
        return ConsolidateConfig(**{**{k: getattr(self, k) for k in ConsolidateConfig.model_fields},
                                    "min_steps": self.min_steps if self.at_end_min_steps is None else self.at_end_min_steps,
                                    "patience": self.patience if self.at_end_patience is None else self.at_end_patience,
                                    "max_seconds": self.max_seconds if self.at_end_max_seconds is None else self.at_end_max_seconds,
                                    "refit": self.at_end_refit, "gated": self.at_end_gated})


class ControlSettings(Section):
    max_age_s: float = Field(300.0, gt=0, description="commands issued further from now than this are refused (replays, skew)")
    ack_timeout_s: float = Field(10.0, gt=0, description="how long `actprm ctl` waits for daemons to answer")


# Each section by its key in the settings (the TOML table, the ACTPRM_<KEY>__ prefix), for
# `ctl set section.field`, which validates a value against its field before anything is sent.
SECTIONS: dict[str, type[BaseModel]] = {
    "kafka": KafkaSettings, "selection": SelectionSettings, "scorer": ScorerSettings, "judge": JudgeSettings,
    "round": RoundSettings, "update": UpdateSettings, "consolidate": ConsolidateSettings, "control": ControlSettings,
}


class ProcessSettings(BaseModel):
    """What the stream side of a daemon process reads. daemon/settings.py's Settings adds the
    daemon's own sections and reads it all from flags, the environment and a TOML file; tests
    of the roles build this one directly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    state_dir: Path = Field(Path(".actprm"), description="durable local state: ledgers (rocksdict) and, by default, checkpoints")
    checkpoint_dir: Path | None = Field(None, description="weights versions; may be a shared directory (default STATE_DIR/checkpoints)")
    # Dedupe keys guard against redeliveries, which cannot be older than the topics' retention
    # (Kafka's default: 7 days); longer costs disk (about 330 B a trajectory), shorter risks a
    # redelivery scored and charged twice (streams/state/ledger.py).
    ledger_retention_s: float = Field(7 * 24 * 3600.0, ge=0, description="how long the ledger keeps a dedupe key (scored, admitted, judged, trained), in BUCKETS=7 whole buckets; keep it at least the topics' retention; 0 keeps every key forever")
    kafka: KafkaSettings = KafkaSettings()
    selection: SelectionSettings = SelectionSettings()
    scorer: ScorerSettings = ScorerSettings()
    judge: JudgeSettings = JudgeSettings()
    round: RoundSettings = RoundSettings()
    update: UpdateSettings = UpdateSettings()
    consolidate: ConsolidateSettings = ConsolidateSettings()
    control: ControlSettings = ControlSettings()
    control_secret: SecretStr | None = Field(None, description="HMAC key for control commands")
    # The model's (model/config.py, model/training/trainer.py)
    model: ModelSettings = ModelSettings()
    trainer: TrainerConfig = TrainerConfig()

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.state_dir / "checkpoints"
