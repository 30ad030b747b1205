"""Which TCP ports a set of processes listens on, read from /proc (Linux; no psutil needed).

from tests.net_probe import descendants, listening
listening(descendants(os.getpid()))   # {("127.0.0.1", 6379): pid, ...}
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _parents() -> dict[int, int]:
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parent


def descendants(*pids: int) -> set[int]:
    """The given pids and every process below them."""
    parent = _parents()
    found, frontier = set(pids), list(pids)
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def listening(pids: set[int]) -> dict[tuple[str, int], int]:
    """(address, port) -> pid of every listening TCP socket (IPv4 and IPv6) owned by one of `pids`."""
    inodes = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = pid
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                    continue
                hexaddr, hexport = local.split(":")
                raw = bytes.fromhex(hexaddr)  # 32-bit words in host (little endian) byte order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found[(socket.inet_ntop(family, raw), int(hexport, 16))] = inodes[inode]
    return found
