"""`actprm serve` in its own process, for the tests that call it over HTTP."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from support.daemon import ACTPRM
from support.network import free_port
from support.wait import wait_until


class Gateway:
    """`actprm serve` on a free port, its output in `log`; env adds ACTPRM_* settings."""

    def __init__(self, bootstrap: str, prefix: str, log: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.token = env.get("ACTPRM_GATEWAY__TOKEN")  # what post() sends unless told otherwise
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [ACTPRM, "serve", "--port", str(self.port)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "ACTPRM_KAFKA__BOOTSTRAP": bootstrap, "ACTPRM_KAFKA__TOPIC_PREFIX": prefix,
                 "ACTPRM_KAFKA__PARTITIONS": "2", "ACTPRM_LOG_FORMAT": "json", **env})

    def wait_ready(self, timeout: float = 60) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log.read_text()[-2000:]}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, timeout, what="the gateway to answer /healthz")

    def post(self, path: str, body=None, *, content: bytes | None = None, token: str | None | bool = True,
             timeout: float = 120) -> httpx.Response:
        """token: True sends the gateway's own, None or a string that one."""
        token = self.token if token is True else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if content is not None:
            return httpx.post(self.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                              timeout=timeout)
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
