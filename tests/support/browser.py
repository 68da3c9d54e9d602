"""Open a page in real headless Chromium (Debian's package) and see what a reader would see.

Driven over the Chrome DevTools protocol with aiohttp's websocket client (already a
dependency): load the page, collect console errors, uncaught exceptions and failed loads,
evaluate a script in it, and take a full-page screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from support.processes import stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--remote-allow-origins=*")


class _Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        mine = self.next_id
        await self.ws.send_json({"id": mine, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive_json(timeout=max(deadline - time.monotonic(), 0.01))
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    async def wait_event(self, method: str, timeout: float = 30) -> dict:
        for e in self.events:
            if e["method"] == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive_json(timeout=max(deadline - time.monotonic(), 0.01))
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e["method"] == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


async def _visit(port: int, url: str, script: str, screenshot: Path | None) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = [t for t in await r.json() if t.get("type") == "page"]
        async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = _Page(ws)
            for domain in ("Runtime", "Log", "Page"):
                await page.call(f"{domain}.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_event("Page.loadEventFired")
            value = (await page.call("Runtime.evaluate", expression=script, returnByValue=True,
                                     awaitPromise=True)).get("result", {}).get("value")
            if screenshot is not None:
                size = (await page.call("Page.getLayoutMetrics"))["cssContentSize"]
                shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                       clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            await asyncio.sleep(0)  # let late events in the socket's buffer be read below
            try:
                while True:
                    msg = await ws.receive_json(timeout=0.2)
                    if "method" in msg:
                        page.events.append(msg)
            except (asyncio.TimeoutError, TypeError):
                pass
            return {"value": value, "errors": _errors(page.events)}


def visit(path: Path, script: str, screenshot: Path | None = None, timeout: float = 60) -> dict:
    """Load a local file; returns {"value": what `script` evaluated to, "errors": [...]}."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed")
    # Chromium's helper processes can still write to the profile after the browser exits (CI
    # once failed removing it: "Directory not empty: 'Default'"): they get a process group of
    # their own, which goes with the browser, and the profile is removed once they are gone.
    with tempfile.TemporaryDirectory(prefix="actprm-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.is_file() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not open its DevTools port (exit {proc.poll()})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            return asyncio.run(asyncio.wait_for(_visit(port, path.resolve().as_uri(), script, screenshot), timeout))
        finally:
            stop(proc)
            _end_group(proc.pid)
            _remove(Path(profile))


def _end_group(pgid: int) -> None:
    """SIGKILL what is left of the browser's process group (its helpers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(profile: Path, timeout: float = 10) -> None:
    """Remove the profile, trying again while a helper that is going away still writes to it."""
    deadline = time.monotonic() + timeout
    while profile.exists():
        try:
            shutil.rmtree(profile)
        except OSError:
            if time.monotonic() > deadline:
                return  # left in the temp dir: the test's outcome does not depend on it
            time.sleep(0.1)
