"""load_settings: the TOML file reaches the settings sources without touching the caller's environment."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from actprm.daemon.settings import Settings, load_settings


def test_load_settings_reads_the_file_and_leaves_os_environ_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("ACTPRM_CONFIG", raising=False)
    config = tmp_path / "actprm.toml"
    config.write_text('[kafka]\ntopic_prefix = "from-toml"\n[round]\nbudget = 7\n')
    before = dict(os.environ)

    s = load_settings(config, round={"budget": 9})  # a flag beats the file
    assert (s.kafka.topic_prefix, s.round.budget) == ("from-toml", 9)
    assert dict(os.environ) == before  # a library call changes no global state
    # The next call without a file does not inherit the previous one's.
    assert load_settings().kafka.topic_prefix == "actprm"


def test_actprm_config_in_the_environment_is_still_read(tmp_path, monkeypatch):
    config = tmp_path / "env.toml"
    config.write_text('[kafka]\ntopic_prefix = "from-env-file"\n')
    monkeypatch.setenv("ACTPRM_CONFIG", str(config))
    assert load_settings().kafka.topic_prefix == "from-env-file"
    assert Settings().kafka.topic_prefix == "from-env-file"
    other = tmp_path / "flag.toml"
    other.write_text('[kafka]\ntopic_prefix = "from-flag-file"\n')
    assert load_settings(other).kafka.topic_prefix == "from-flag-file"  # --config beats ACTPRM_CONFIG


def test_the_daemon_settings_compose_the_sections_each_layer_owns():
    """streams/config.py's sections are the ones Settings reads (ctl set validates against them),
    and the stream side reads the settings without importing the daemon."""
    import subprocess
    import sys

    from actprm.model.config import ModelSettings
    from actprm.streams.config import SECTIONS

    for key, section in SECTIONS.items():
        assert Settings.model_fields[key].annotation is section, key
    assert Settings.model_fields["model"].annotation is ModelSettings
    probe = ("import sys, actprm.streams, actprm.streams.process, actprm.streams.control, actprm.streams.app, actprm.streams.client; "
             "print([m for m in sys.modules if m.startswith('actprm.daemon')])")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_ledger_retention_and_broker_memory_limit_are_settings(tmp_path, monkeypatch):
    """Both read like every other setting (TOML, environment, flags); the broker's limit keeps the
    variable `actprm broker` reads, ACTPRM_BROKER_MEMORY_LIMIT_MB, and a judge-only process's
    ledger gets the retention (0: every key kept)."""

    from actprm.client.topics import Topics
    from actprm.streams.process import build_process
    from actprm.streams.kafka.sender import Sender

    monkeypatch.delenv("ACTPRM_CONFIG", raising=False)
    monkeypatch.delenv("ACTPRM_BROKER_MEMORY_LIMIT_MB", raising=False)
    defaults = load_settings()
    assert (defaults.ledger_retention_s, defaults.broker_memory_limit_mb) == (7 * 24 * 3600.0, None)
    config = tmp_path / "actprm.toml"
    config.write_text("ledger_retention_s = 86400\nbroker_memory_limit_mb = 2048\n")
    assert (load_settings(config).ledger_retention_s, load_settings(config).broker_memory_limit_mb) == (86400, 2048)
    monkeypatch.setenv("ACTPRM_BROKER_MEMORY_LIMIT_MB", "512")
    monkeypatch.setenv("ACTPRM_LEDGER_RETENTION_S", "3600")
    s = load_settings(config, state_dir=tmp_path / "state")  # the environment beats the file
    assert (s.ledger_retention_s, s.broker_memory_limit_mb) == (3600, 512)
    with pytest.raises(ValidationError):
        load_settings(broker_memory_limit_mb=0)

    async def produce(topic, key, value):
        raise AssertionError("nothing is sent while the process is built")

    proc = build_process(s, ("judge",), Topics("t"), Sender(produce, "t.dead"))
    try:
        assert proc.ledger.retention_s == 3600 and proc.ledger.bucket_s == 3600 / 7
    finally:
        proc.ledger.close()
    forever = build_process(load_settings(state_dir=tmp_path / "state2", ledger_retention_s=0), ("judge",), Topics("t"),
                            Sender(produce, "t.dead"))
    try:
        assert forever.ledger.retention_s is None
    finally:
        forever.ledger.close()


def test_the_allocator_is_a_setting(monkeypatch):
    monkeypatch.delenv("ACTPRM_CONFIG", raising=False)
    monkeypatch.delenv("ACTPRM_ALLOCATOR", raising=False)
    assert load_settings().allocator == "auto"
    monkeypatch.setenv("ACTPRM_ALLOCATOR", "glibc")
    assert load_settings().allocator == "glibc"
    with pytest.raises(ValidationError):
        load_settings(allocator="tcmalloc")
