"""load_settings: the TOML file reaches the settings sources without touching the caller's environment."""

from __future__ import annotations

import os

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
