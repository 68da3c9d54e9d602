"""actprm-client installs on its own, on the Pythons RL environments run (3.10 to 3.13), and
works there against a real broker: a virtualenv per Python holding only the client package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.paths import ROOT

CLIENT = ROOT / "streams" / "client"
CACHE = Path(os.environ.get("ACTPRM_CACHE", Path.home() / ".cache" / "actprm")) / "client-venvs"

SCRIPT = r"""
import asyncio, json, sys
from actprm.client import RewardClient, load_client_settings

async def main():
    settings = load_client_settings(gateway={"timeout_s": 1, "on_failure": "fallback"})
    async with RewardClient(settings) as client:
        outcomes = await client.score_each([{"prompt": "2+2?", "response": "2+2 = 4.\n\nSo 4."},
                                            {"prompt": "p", "response": "   "}])
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "faust", "numpy"})
    print(json.dumps({"python": sys.version_info[:2], "failures": [o.failure for o in outcomes],
                      "fallbacks": client.stats["fallbacks"], "heavy": heavy}))

asyncio.run(main())
"""


def _python(version: str) -> str | None:
    """An interpreter of that version: on PATH, or one pyenv installed (its shim may not be active)."""
    found = [shutil.which(f"python{version}"),
             *sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))]
    for python in filter(None, found):
        if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
            return python
    return None


def _venv(python: str) -> Path:
    """A cached venv for `python` with the client's dependencies; the client itself is
    reinstalled each time from the working tree (it is small), so the test sees this code."""
    key = hashlib.sha256((CLIENT / "pyproject.toml").read_bytes()).hexdigest()[:10]
    venv = CACHE / f"{Path(python).name}-{key}"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        str(CLIENT)], check=True)
        (venv / ".ready").touch()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--force-reinstall", str(CLIENT)], check=True, capture_output=True)
    return venv


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.10", "3.13"])
def test_the_client_installs_alone_and_works_on_other_pythons(version, broker, topic_prefix, tmp_path):
    python = _python(version)
    if python is None:
        pytest.skip(reason=f"python{version} is not on this machine")
    venv = _venv(python)
    env = {**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": broker.bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": topic_prefix}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["python"] == [int(x) for x in version.split(".")]
    # No scorer runs: the first sample gets the fallback, the second its reason; nothing heavy loaded.
    assert got["failures"] == ["unavailable", "invalid"] and got["fallbacks"] == 2 and got["heavy"] == []
