"""Security: signed control commands (unsigned and replayed ones refused, state unchanged),
metrics and health on 127.0.0.1 only, a tampered checkpoint refused by the scorer, and
SASL/TLS settings passed through to the Kafka clients (no broker needed for those).
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from actprm.streams.tools.ctl_client import send_command
from actprm.client.settings import KafkaSettings
from actprm.model.training.checkpoints import WEIGHTS, CheckpointStore
from actprm.streams.app import _credentials, aiokafka_options
from actprm.streams.control import sign
from actprm.client.messages import ControlCommand
from support.daemon import Daemon
from support.wait import wait_until
from support.network import free_port
from support.processes import listen_addresses, listening_sockets
from support.paths import ROOT

SECRET = "s3cret-for-tests"
README = ROOT / "README.md"


def _state(acks) -> dict:
    assert len(acks) == 1, acks
    return acks[0].state


@pytest.mark.broker
@pytest.mark.slow
def test_a_running_daemon_refuses_unsigned_and_replayed_commands_listens_locally_and_refuses_tampered_weights(
        broker, topic_prefix, tmp_path):
    bs = broker.bootstrap
    port = free_port()
    env = {"ACTPRM_CONTROL_SECRET": SECRET, "ACTPRM_METRICS__PORT": str(port)}
    daemon = Daemon(bs, topic_prefix, tmp_path / "d", env=env).start()
    try:
        def status(timeout_s: float = 20) -> dict:
            return _state(send_command(bs, topic_prefix, ControlCommand(command="status"), SECRET, timeout_s, expect=1))

        wait_until(lambda: daemon.store.latest() == 0, 120, interval=0.5, what="version 0")
        # Version 0 is written before the faust worker has joined its group; the control plane
        # starts after that (seconds here, over 20 s on a loaded CI machine). The command waits in
        # the topic and is answered then, so the first one may wait longer.
        first = status(120)
        assert first["round"] == 0 and first["served_version"] == 0

        # A signed reset-round is obeyed once; the same bytes again are a replay and refused.
        signed = sign(ControlCommand(command="reset-round", args={"budget": 7}), SECRET)
        ok = send_command(bs, topic_prefix, signed, None, 20, expect=1)
        assert ok[0].ok, ok[0].message
        replay = send_command(bs, topic_prefix, signed, None, 20, expect=1)
        assert not replay[0].ok and "replayed" in replay[0].message, replay[0].message
        # Unsigned: refused with the reason.
        unsigned = send_command(bs, topic_prefix, ControlCommand(command="reset-round", args={"budget": 99}), None, 20,
                                expect=1)
        assert not unsigned[0].ok and "unsigned" in unsigned[0].message, unsigned[0].message
        after = status()
        assert after["round"] == 1 and after["budget_left"] == 7, "a refused command changed the daemon's state"

        # Metrics and health listen on loopback only (the default), and nothing else listens.
        addresses = listen_addresses(daemon.proc.pid)
        assert ("127.0.0.1", port) in addresses, addresses
        assert all(ip == "127.0.0.1" for ip, _ in addresses), addresses
        assert listening_sockets(daemon.proc.pid, "tcp6") == []  # nothing on IPv6

        # A version whose weights were changed after saving: the scorer refuses it and keeps serving.
        store = daemon.store
        forge = CheckpointStore(tmp_path / "forge")  # written beside the store, moved in whole
        shutil.copytree(store.root / "v000000", forge.root / "v000000")
        manifest, tensors = forge.load(0)
        fields = manifest.model_dump() | {"kind": "update", "parent": 0}
        saved = forge.save(tensors, fields)
        weights = forge.root / f"v{saved.version:06d}" / WEIGHTS
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one bit pattern in the last tensor's data; the size stays the same
        weights.write_bytes(bytes(data))
        (forge.root / f"v{saved.version:06d}").rename(store.root / f"v{saved.version:06d}")

        wait_until(lambda: status()["swap_failures"] >= 1, 60, interval=1, what="the refused swap")
        st = status()
        assert st["served_version"] == 0, st
        assert "checksum" in st["last_error"], st["last_error"]
        assert "swap failed; old version keeps serving" in daemon.stderr()
    finally:
        daemon.terminate(60)
        daemon.kill()


def test_tampered_weights_are_refused_by_the_store(tmp_path):
    from actprm.model.training.checkpoints import CheckpointError
    import torch

    store = CheckpointStore(tmp_path)
    store.save({"w": torch.ones(4)}, {"kind": "init"})
    weights = tmp_path / "v000000" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        store.load(0)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_sasl_ssl_settings_reach_the_aiokafka_and_faust_clients(mechanism, monkeypatch):
    monkeypatch.setenv("ACTPRM_KAFKA__SASL_PASSWORD", "pw")  # not read here; the model below is explicit
    k = KafkaSettings(bootstrap="kafka-1:9093", security_protocol="SASL_SSL", sasl_mechanism=mechanism,
                      sasl_username="actprm", sasl_password="pw")
    opts = aiokafka_options(k)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == mechanism
    assert opts["sasl_plain_username"] == "actprm" and opts["sasl_plain_password"] == "pw"
    assert isinstance(opts["ssl_context"], ssl.SSLContext) and opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    # What the faust worker's consumers and producers get: the same, through faust's own translation.
    auth = credentials_to_aiokafka_auth(_credentials(k))
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == mechanism
    assert auth["sasl_plain_username"] == "actprm" and auth["sasl_plain_password"] == "pw"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert "pw" not in repr(k), "the password must not show in reprs and logs"


def test_ssl_and_plaintext_settings_and_the_ca_file(tmp_path):
    assert aiokafka_options(KafkaSettings()) == {} and _credentials(KafkaSettings()) is None
    ca = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    if not ca.is_file():
        pytest.skip(reason="no system CA bundle to load")
    k = KafkaSettings(security_protocol="SSL", ssl_cafile=ca)
    opts = aiokafka_options(k)
    assert opts["security_protocol"] == "SSL" and "sasl_mechanism" not in opts
    assert opts["ssl_context"].cert_store_stats()["x509_ca"] > 0
    auth = credentials_to_aiokafka_auth(_credentials(k))
    assert auth["security_protocol"] == "SSL" and auth["ssl_context"].cert_store_stats()["x509_ca"] > 0
    sasl_plain = aiokafka_options(KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p"))
    assert sasl_plain["sasl_mechanism"] == "PLAIN" and "ssl_context" not in sasl_plain


def test_readme_documents_the_security_settings():
    text = README.read_text()
    for name in ("ACTPRM_KAFKA__SECURITY_PROTOCOL", "ACTPRM_KAFKA__SASL_MECHANISM", "ACTPRM_KAFKA__SASL_USERNAME",
                 "ACTPRM_KAFKA__SASL_PASSWORD", "ACTPRM_KAFKA__SSL_CAFILE", "ACTPRM_CONTROL_SECRET"):
        assert name in text, f"README does not mention {name}"
    assert "127.0.0.1" in text, "README should say where /metrics listens by default"
