"""Loopback ports for the local servers: free ones to listen on, and whether one is taken.

The local servers (SeaweedFS, Prometheus, the Ray head) listen on 127.0.0.1 only (`HOST`).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"

# NOTE: a port taken by binding to port 0 comes from the kernel's ephemeral range, the
# same range outgoing connections draw their source ports from. Between choosing it and the
# server binding it, any new connection on the box (Ray opens many) can take it: the Serve
# proxy then died with "Address already in use". Ports are drawn from outside that range
# instead, and outside Ray's default worker ports (10002-19999).
LISTEN_PORTS_LOW = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def listen_port_range() -> range:
    """The ports servers here listen on: [20000, start of the ephemeral range), or above its
    end, whichever is larger; empty when neither leaves room (then bind to port 0)."""
    try:
        low, high = (int(x) for x in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):  # not Linux: no range to avoid is known
        return range(0)
    below = range(LISTEN_PORTS_LOW, low)
    above = range(max(high + 1, LISTEN_PORTS_LOW), 65536)
    best = max(below, above, key=len)
    return best if len(best) >= 1000 else range(0)


def _bind_free(sock: socket.socket, candidates: range) -> int:
    """Bind `sock` to a random free port among `candidates` (a port bound by another socket,
    ours included, fails to bind), else to any free port."""
    for _ in range(200 if candidates else 0):
        port = random.choice(candidates)
        try:
            sock.bind((HOST, port))
        except OSError:
            continue
        return port
    sock.bind((HOST, 0))
    return int(sock.getsockname()[1])


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and that outgoing connections do not
    draw from (see `listen_port_range`)."""
    return find_free_ports(1)[0]


def find_free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1, all held open until every one is chosen."""
    candidates = listen_port_range()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            _bind_free(sock, candidates)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_is_open(port: int, host: str = HOST, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on `host:port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
