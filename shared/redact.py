"""Credentials out of logs and error text: one place that knows what a credential looks like.

- `redact_url(url)`: a URL (or a comma-separated list of them, as `NATS_URL` allows) with the
  user info masked (`nats://user:***@host`, `nats://***@host` for a bare token) and the values
  of credential-like query parameters masked (`?token=***`).
- `redact_text(text)`: free text (an error message, a traceback) with every URL in it passed
  through `redact_url`, `Bearer` tokens, `token=`/`password=`-style pairs and relayrl API keys
  (`rrl_<id>_<secret>` -> `rrl_<id>_***`) masked.
- `redact_event`: a structlog processor that masks the whole value of every field whose name
  says it holds a credential (`SENSITIVE_KEY`: password, token, secret, key, authorization, ...)
  and runs `redact_text` over every other string, nested dicts and lists included.
  `shared.telemetry` puts it in every service's logging chain, after exception formatting, so
  tracebacks are redacted too.
- `install_stdlib_redaction()`: the same for records of libraries that log through stdlib
  `logging` (uvicorn, nats-py), redacted as each record is created.

Masking is by shape, so it also hides things that only look like credentials (a field named
`key` holding a KV key); that is the safe direction. Values are never partially shown.
"""

from __future__ import annotations

import logging
import re
from typing import Any, MutableMapping
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Field and parameter names that hold a credential: the whole name, or its last `_`/`-` part
# (api_key, weights_key, nats_password, access-token). Names like `tokens` or `key_id` (plural,
# or a public id) are not credentials and stay visible.
_SENSITIVE_WORDS = (
    "password|passwd|pwd|pass|secret|token|key|apikey|authorization|auth|credential|credentials|cookie"
    "|signature|sig|jwt|nkey"
)
SENSITIVE_KEY = re.compile(rf"^(?:.*[_-])?(?:{_SENSITIVE_WORDS})$", re.I)

# A URL in free text: scheme://, then anything up to whitespace, a quote, a bracket or a comma
# (commas separate NATS server lists).
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,()\[\]{}]+")
# `name=value` / `name: value` pairs outside URLs (a query string in a log message, a header).
# An optional quote after the name and before the value catches dict reprs ('password': 'x').
_PAIR = re.compile(
    rf"(?i)\b((?:[\w-]*[_-])?(?:{_SENSITIVE_WORDS}))(['\"]?\s*[=:]\s*['\"]?)(?!\*\*\*)([^\s&,;'\"]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]+")
# relayrl API keys (shared/apikeys.py: rrl_<12 hex key id>_<secret>): the id is public.
_API_KEY = re.compile(r"\b(rrl_[0-9a-f]{12}_)[A-Za-z0-9_-]{8,}")


def _redact_one_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: still mask what looks like user info
        return re.sub(r"(://)[^/@\s]*@", rf"\1{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        # user:password keeps the user name (which NATS user failed is worth knowing); a lone
        # user info is a token (nats://<token>@host), so none of it is shown.
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    query = "&".join(
        f"{name}={MASK}" if sep and SENSITIVE_KEY.match(name) else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&"))
    ) if parts.query else ""  # fmt: skip
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_url(url: str) -> str:
    """`url` with its credentials masked; a comma-separated list is redacted URL by URL."""
    return ",".join(_redact_one_url(part) if "://" in part else part for part in url.split(","))


def redact_text(text: str) -> str:
    """`text` with every credential this module recognises masked (see the module docstring)."""
    if not text:
        return text
    text = _URL.sub(lambda m: _redact_one_url(m.group(0)), text)
    text = _API_KEY.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    return _PAIR.sub(rf"\1\2{MASK}", text)


def redact_value(value: Any) -> Any:
    """`value` with credentials masked: strings by `redact_text`, dicts by key name and value,
    lists and tuples item by item; anything else as it is."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and SENSITIVE_KEY.match(k) else redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, BaseException):
        # Renderers would show str()/repr() of it: the message is where a URL or token would be.
        return redact_text(f"{type(value).__name__}: {value}")
    if not isinstance(value, (int, float, bool, type(None))) and "://" in str(value):
        return redact_text(str(value))  # a URL object (yarl, pydantic AnyUrl) renders its credentials
    return value


def redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask credential fields and credentials inside the other fields."""
    for name, value in event.items():
        if SENSITIVE_KEY.match(name) and value is not None:
            event[name] = MASK
        else:
            event[name] = redact_value(value)
    return event


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """A stdlib log record with its message rendered once, redacted (the arguments that held
    credentials are dropped), and its exception text redacted the same way."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is logging's to report, at emit time
        return record
    record.msg, record.args = redact_text(message), None
    if record.exc_info:
        # Formatted here and cached where logging.Formatter looks first (exc_text).
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None
    return record


def install_stdlib_redaction() -> None:
    """Redact every stdlib log record as it is created: any logger, any handler, including the
    ones a library configures after this call (uvicorn.run installs its own). Idempotent."""
    current = logging.getLogRecordFactory()
    if getattr(current, "relayrl_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(current(*args, **kwargs))

    factory.relayrl_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
