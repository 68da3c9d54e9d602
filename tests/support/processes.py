"""What a test process can learn about, and do to, the processes it started, read from /proc:
CPU time (is an idle daemon really idle), the sockets a process listens on (does it bind only
where it was told), its children (the embedded broker a daemon runs), and a SIGKILL that says
whether the process was still alive to be killed. They exist so the fault tests can inject and
check real process faults rather than mock them; they are Linux-only, like the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_sockets(pid: int, table: str = "tcp") -> list[str]:
    """Local addresses (hex "IP:PORT" as /proc/net/<table> writes them) of the sockets a process
    listens on; table "tcp" is IPv4, "tcp6" IPv6 (absent on a host without IPv6: none)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    path = Path(f"/proc/net/{table}")
    rows = (line.split() for line in (path.read_text().splitlines()[1:] if path.exists() else []))
    return [parts[1] for parts in rows if parts[3] == "0A" and parts[9] in inodes]  # 0A: LISTEN


def listen_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of the TCP sockets a process listens on (IPv4), from /proc."""
    found = set()
    for local in listening_sockets(pid, "tcp"):
        ip_hex, port_hex = local.split(":")
        ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
        found.add((ip, int(port_hex, 16)))
    return found


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (all its threads'), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def sigkill(proc) -> bool:
    """SIGKILL a Popen if it runs; False when it had already exited (a crash of its own)."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return True


def stop(proc, timeout: float = 10) -> None:
    """SIGTERM a Popen and wait for it; SIGKILL it if it has not exited within `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
