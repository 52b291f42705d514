"""What the reliability tests read from /proc: process trees and listening TCP sockets."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (field 3, the state, comes first)."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started (tells a process from a later one with its pid)."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError):
        return None


def cpu_ticks(pid: int) -> int:
    """Clock ticks of CPU ``pid`` has used (user + system, all its threads)."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def descendants(pid: int) -> dict[int, int]:
    """Every living process below ``pid``, as {pid: start time}."""
    parents = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError):
                pass  # gone meanwhile
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {child: started for child in found if (started := start_time(child)) is not None}


def still_running(processes: dict[int, int]) -> dict[int, int]:
    """Those of ``processes`` ({pid: start time}) that are alive and not zombies."""
    alive = {}
    for pid, started in processes.items():
        try:
            state = _stat_fields(pid)[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and start_time(pid) == started:
            alive[pid] = started
    return alive


def wait_gone(processes: dict[int, int], timeout_s: float) -> dict[int, int]:
    """Wait up to ``timeout_s`` for ``processes`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while (alive := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def kill_exactly(processes: dict[int, int]) -> None:
    """SIGKILL each of ``processes`` that is still the process recorded (same pid and start time)."""
    for pid in still_running(processes):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _address(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    raw = b"".join(
        raw[i : i + 4][::-1] for i in range(0, len(raw), 4)
    )  # /proc stores 32-bit words little-endian
    address = ipaddress.ip_address(socket.inet_ntop(family, raw))
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return str(mapped or address)


def listening_sockets() -> list[tuple[str, int, str]]:
    """Every listening TCP socket of this network namespace: (address, port, inode)."""
    sockets = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = PROC / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A":  # TCP_LISTEN
                address, port = local.split(":")
                sockets.append((_address(address, family), int(port, 16), inode))
    return sockets


def listening_addresses(port: int) -> set[str]:
    """The addresses something listens on at TCP ``port``."""
    return {address for address, listened, _ in listening_sockets() if listened == port}


def socket_inodes(pids) -> set[str]:
    """The inodes of the sockets the processes ``pids`` hold open."""
    inodes = set()
    for pid in pids:
        try:
            for fd in (PROC / str(pid) / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except OSError:
            pass
    return inodes


def command_line(pid: int) -> str:
    """The command line of ``pid`` as ``ps`` shows it (Ray renames its workers: ``ray::Name``)."""
    try:
        return (
            (PROC / str(pid) / "cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")
            .strip()
        )
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (e.g. a Ray head's temp dir marks every process it started)."""
    pids = (int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit())
    return [pid for pid in pids if text in command_line(pid)]
