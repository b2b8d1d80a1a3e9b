"""One settings model per service, read from the environment and from command-line flags.

Every service subclasses `ServiceSettings`; `load(SettingsClass, argv)` parses
`RELAYRL_*` environment variables and `--kebab-case` flags (flags win).

Secrets (the workers' inference token, the weights signing key) are `SecretStr` settings so
they never print in a repr or a log line; `require_secret` is how a service refuses to start
without one.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any, Coroutine, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import retention


# A shorter shared secret is refused: it could be guessed (new_secret makes 43 characters).
MIN_SECRET_CHARS = 16


class ConfigError(ValueError):
    """Permanent: a setting is missing or unusable. The service refuses to start with this reason."""


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text) for a token or a signing key."""
    return secrets.token_urlsafe(32)


def require_secret(value: SecretStr | None, setting: str, purpose: str) -> str:
    """The secret in `value`, or `ConfigError` saying which variable to set and why.

    Secure by default: a service that needs a shared secret never runs without one."""
    env = f"RELAYRL_{setting.upper()}"
    text = value.get_secret_value().strip() if value is not None else ""
    if not text:
        raise ConfigError(
            f"{setting} is not set: set {env} (or --{setting.replace('_', '-')}) to {purpose}. `relayrl up` "
            f"generates one into its state dir; generate one with: python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))'"
        )
    if len(text) < MIN_SECRET_CHARS:
        raise ConfigError(f"{env} is too short ({len(text)} characters; at least {MIN_SECRET_CHARS}): use a random secret")
    return text


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAYRL_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        validation_alias=AliasChoices("NATS_URL", "nats_url"),
        description="NATS server URL(s), comma separated",
    )
    nats_user: str | None = Field(
        None,
        description="NATS user this service logs in as (RELAYRL_NATS_USER); one per service, see "
        "shared/nats_auth.py. Unset: connect without credentials (an open server: development, tests)",
    )
    nats_password: SecretStr | None = Field(
        None, description="that user's password (RELAYRL_NATS_PASSWORD); kept out of URLs so logs never carry it"
    )
    nats_connect_timeout_s: float = 5.0
    nats_connect_attempts: int = Field(30, ge=1)
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"),
        description="OTLP/HTTP endpoint for traces; no export when unset",
    )
    request_timeout_s: float = Field(
        retention.REQUEST_TIMEOUT_S, gt=0, description="timeout of every NATS request/publish"
    )
    stream_max_bytes: int | None = Field(
        None,
        gt=0,
        description="caps every stream's byte bound (shared/retention.py has each one's default); a "
        "full stream refuses publishes and publishers retry, nothing is dropped",
    )
    heartbeat_file: Path | None = Field(
        None, description="rewritten every 5 s while the event loop runs (liveness probes of store and trainer)"
    )
    js_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="JetStream replicas of every stream, KV bucket and the object store (3 on a 3-node "
        "cluster); raises existing ones, never lowers them",
    )
    weights_key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key the trainer signs each published weight object with and inference "
        "replicas verify before loading it; the same value on both (RELAYRL_WEIGHTS_KEY). Trainer and "
        "inference refuse to start without it; other services never read it",
    )


S = TypeVar("S", bound=ServiceSettings)


def load(settings_cls: type[S], argv: list[str] | None = None) -> S:
    """Build settings from env and `argv` flags (no flags parsed when argv is None)."""
    if argv is None:
        return settings_cls()
    return settings_cls(_cli_parse_args=argv)


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop where installed (a faster event loop), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
