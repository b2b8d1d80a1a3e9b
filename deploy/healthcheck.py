"""Container health checks for relayrl services: compose `healthcheck` and Kubernetes exec probes.

Standard library only (it starts on every probe). The images copy it to /app/deploy/.

    python /app/deploy/healthcheck.py http URL   # a 2xx answer from URL within 3 s
    python /app/deploy/healthcheck.py nats       # this container holds an established TCP
                                                 # connection to NATS (ports from NATS_URL)
    python /app/deploy/healthcheck.py heartbeat FILE [MAX_AGE_S]
                                                 # FILE (RELAYRL_HEARTBEAT_FILE of the service)
                                                 # was rewritten in the last MAX_AGE_S (30) s

`heartbeat` is liveness for the store and the trainer: their event loop rewrites the file
every 5 s (shared/health.py), so a stuck loop or a frozen process fails it while a long
training step (in a thread) does not. `http` is for services with an HTTP endpoint on loopback (the rollout worker's capture proxy
answers /healthz from the worker's own event loop). `nats` is the stand-in for services that
expose nothing but their NATS connection (store, trainer): they connect only after their
start-up work (the store after its schema), so "connected" means started and not cut off.
The check reads /proc/net/tcp{,6}, which lists the sockets of the container's network
namespace, so it sees the service's own connection and nothing from other containers.
Exit status 0 = healthy, 1 = not.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ESTABLISHED = "01"  # TCP state column of /proc/net/tcp


def http_ok(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def nats_ports(nats_url: str) -> set[int]:
    """Remote ports of every server in a comma-separated NATS_URL (4222 where none is given)."""
    ports = set()
    for server in nats_url.split(","):
        server = server.strip()
        if server:
            parsed = urllib.parse.urlsplit(server if "://" in server else f"nats://{server}")
            ports.add(parsed.port or 4222)
    return ports


def established_remote_ports(proc_net: str = "/proc/net") -> set[int]:
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc_net, name), encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # fields: sl, local_address, rem_address (HEXIP:HEXPORT), st, ...
            if len(fields) > 3 and fields[3] == ESTABLISHED:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def nats_connected(nats_url: str | None = None, proc_net: str = "/proc/net") -> bool:
    url = nats_url if nats_url is not None else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    return bool(nats_ports(url) & established_remote_ports(proc_net))


def heartbeat_fresh(path: str, max_age_s: float = 30.0) -> bool:
    """`path` exists and was written less than `max_age_s` ago."""
    try:
        return time.time() - os.stat(path).st_mtime < max_age_s
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["heartbeat"] and len(argv) in (2, 3):
        try:
            max_age = float(argv[2]) if len(argv) == 3 else 30.0
        except ValueError:
            print(f"MAX_AGE_S must be a number, got {argv[2]!r}", file=sys.stderr)
            return 2
        return 0 if heartbeat_fresh(argv[1], max_age) else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if http_ok(argv[1]) else 1
    if argv == ["nats"]:
        return 0 if nats_connected() else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
