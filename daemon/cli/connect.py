"""Where the operator tools (`ctl`, `produce`, `tail`) connect: the one Settings the daemon reads.

The same environment variables (``ACTPRM_KAFKA__...``) and ``--config`` file as `actprm run`,
so a tool reaches a secured cluster (SASL/TLS) the daemon runs on; ``--bootstrap`` and
``--topic-prefix`` only override those two settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"  # a local Kafka, when neither a flag nor the settings name one


@dataclass(frozen=True)
class KafkaTarget:
    bootstrap: str
    topic_prefix: str
    options: dict[str, Any] = field(default_factory=dict)  # aiokafka client kwargs: security_protocol, ssl_context, sasl_*


def kafka_target(config: Path | None = None, bootstrap: str | None = None, topic_prefix: str | None = None) -> KafkaTarget:
    # The kafka section as the daemon reads it (flags, ACTPRM_KAFKA__* env, the TOML file's [kafka]),
    # through the torch-free client settings: `actprm ctl` starts in a fraction of a second.
    from actprm.client.settings import aiokafka_options, load_client_settings

    overrides = {k: v for k, v in (("bootstrap", bootstrap), ("topic_prefix", topic_prefix)) if v is not None}
    k = load_client_settings(config, kafka=overrides).kafka
    return KafkaTarget(k.bootstrap or DEFAULT_BOOTSTRAP, k.topic_prefix, aiokafka_options(k))
