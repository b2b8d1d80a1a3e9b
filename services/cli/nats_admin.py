"""The NATS admin step and the embedded stack's NATS credentials.

`init_topology` is `relayrl init`: it logs in (as the admin user where the server has users)
and creates every stream, consumer-free bucket and the object store relayrl uses. Services
only bind to what it made (`Bus.bind_topology`); it is idempotent, so it is also what brings
the topology back after a server lost its store dir.

`relayrl init --watch` (`keep_topology`) keeps doing it: the deployments' `nats-admin` service.
`relayrl nats-config` prints the server's `authorization` block.

`load_or_create_credentials` keeps one random password per NATS user (shared/nats_auth.py)
in `<state_dir>/nats-users.json`, mode 0600, reused across restarts of the stack.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Optional

import structlog
import typer

from shared import nats_auth, telemetry
from shared.bus import Bus, install_signal_handlers
from shared.config import ServiceSettings
from shared.faults import is_transient

CREDENTIALS_FILE = "nats-users.json"

log = structlog.get_logger("nats-admin")


def credentials_path(state_dir: Path) -> Path:
    return state_dir / CREDENTIALS_FILE


def load_or_create_credentials(state_dir: Path) -> dict[str, str]:
    """user -> password for every NATS user; generated (and written 0600) where the file lacks any."""
    path = credentials_path(state_dir)
    current: dict[str, str] = {}
    if path.exists():
        try:
            current = {k: str(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            current = {}  # unreadable: replaced below (the server config is rewritten with it)
    if all(current.get(u) for u in nats_auth.USERS):
        return current
    fresh = nats_auth.generate_passwords()
    creds = {u: current.get(u) or fresh[u] for u in nats_auth.USERS}
    write_private(path, json.dumps(creds, indent=2))
    return creds


def read_credentials(state_dir: Path) -> dict[str, str] | None:
    path = credentials_path(state_dir)
    if not path.exists():
        return None
    return {k: str(v) for k, v in json.loads(path.read_text()).items()}


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by the owner only, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def init_topology(settings: ServiceSettings, timeout_s: float = 60.0) -> list[str]:
    """Create relayrl's streams and buckets (idempotent); returns the names that were missing.

    `settings` carries the URL and the admin credentials (RELAYRL_NATS_USER/PASSWORD). A
    server just (re)started may answer JetStream 503s for a moment: retried until `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    bus = await asyncio.wait_for(Bus.connect(settings, "relayrl-init"), timeout_s)
    try:
        while True:
            try:
                missing = await bus.missing_topology()
                await bus.ensure_topology()
                return missing
            except Exception as exc:
                if not is_transient(exc) or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await bus.close()


async def keep_topology(settings: ServiceSettings, every_s: float, stop: asyncio.Event) -> None:
    """`relayrl init --watch`: make the topology, then check it every `every_s` and make again
    what is missing (a NATS server that lost its store dir) until `stop` is set. Services only
    wait for it (`Bus.bind_topology`), so this is what brings them back after such a loss."""
    bus = await Bus.connect(settings, "relayrl-init")
    try:
        while not stop.is_set():
            try:
                missing = await bus.missing_topology()
                if missing:
                    await bus.ensure_topology()
                    log.info("topology created", created=missing)
            except Exception as exc:  # noqa: BLE001 - NATS restarting: checked again next round
                log.warning("topology check failed; will retry", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await bus.close()


def admin_settings_from(
    nats_url: str, user: str | None, password: str | None, state_dir: Path, js_replicas: int
) -> ServiceSettings:
    """Admin settings: explicit user/password, else the embedded stack's admin password from
    `<state_dir>/nats-users.json`, else none (an open server)."""
    if password is None:
        creds = read_credentials(state_dir)
        if creds is not None and nats_auth.ADMIN in creds:
            user, password = user or nats_auth.ADMIN, creds[nats_auth.ADMIN]
    return ServiceSettings(
        nats_url=nats_url, nats_user=user if password else None, nats_password=password, js_replicas=js_replicas,
        log_format="console",
    )  # fmt: skip


def init_command(
    nats_url: str = typer.Option("nats://127.0.0.1:4222", "--nats-url", envvar="NATS_URL", help="the NATS server(s)"),
    user: Optional[str] = typer.Option(
        None, "--user", envvar="RELAYRL_NATS_USER", help="admin user (default: admin with the state dir's password)"
    ),
    password: Optional[str] = typer.Option(
        None, "--password", envvar="RELAYRL_NATS_PASSWORD", show_default=False,
        help="admin password (prefer the env var; default: <state-dir>/nats-users.json)",
    ),
    js_replicas: int = typer.Option(1, "--js-replicas", envvar="RELAYRL_JS_REPLICAS", min=1, max=5),
    watch: bool = typer.Option(False, "--watch", help="keep running: re-create what goes missing"),
    every_s: float = typer.Option(10.0, "--every-s", min=0.5, help="with --watch: seconds between checks"),
    timeout_s: float = typer.Option(60.0, "--timeout-s", min=1.0),
    state_dir: Path = typer.Option(Path(".relayrl"), "--state-dir", help="where `relayrl up` keeps nats-users.json"),
) -> None:
    """Create relayrl's NATS streams, KV buckets and object store (the admin step; idempotent)."""
    settings = admin_settings_from(nats_url, user, password, state_dir, js_replicas)
    telemetry.setup("relayrl-init", settings)
    if watch:
        async def run() -> None:
            stop = asyncio.Event()
            install_signal_handlers(stop)
            await keep_topology(settings, every_s, stop)

        asyncio.run(run())
        return
    try:
        missing = asyncio.run(init_topology(settings, timeout_s))
    except Exception as exc:  # noqa: BLE001 - reported with its reason, exit 1
        typer.echo(f"relayrl init failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"created {', '.join(missing)}" if missing else "topology complete: nothing to create")


def nats_config_command(
    env_passwords: bool = typer.Option(
        True, "--env-passwords/--literal-passwords",
        help="passwords as $RELAYRL_NATS_PASSWORD_<USER> references the server reads from its environment",
    ),
) -> None:
    """Print the nats-server `authorization` block (one user per service, shared/nats_auth.py)."""
    if env_passwords:
        typer.echo(nats_auth.authorization_block_env(), nl=False)
    else:
        typer.echo(nats_auth.authorization_block(nats_auth.generate_passwords()), nl=False)
