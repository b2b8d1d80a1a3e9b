"""Errors by type: what a service waits out and what it refuses.

Transient faults come from outside a message (NATS reconnecting, a JetStream 503 right
after a restart, a timeout, the store or its database restarting): the caller waits with
bounded backoff and never changes durable state because of them. Permanent faults are
about the data or the config: they are refused (a 4xx, a dead letter, a failed run) with
the reason. `is_transient` is the one place that tells them apart for errors raised by
libraries; the project's own errors say what they are by their class.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors


class StoreError(RuntimeError):
    """Base of every error the store client raises."""


class StoreUnavailable(StoreError):
    """Transient: no store answered in time (restarting, database down). Retry later."""


class NotFound(StoreError):
    """Permanent for this request: the named object does not exist."""


class Rejected(StoreError):
    """Permanent: the store refused the request (bad data, a conflicting state). `code` is HTTP-like."""

    def __init__(self, reason: str, code: int = 400) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LeaseLost(RuntimeError):
    """A single-writer role (a run's trainer or pacer) can no longer prove it holds its lease:
    it must stop writing. Not a failure of the run: another holder carries on."""


class PermanentRunError(RuntimeError):
    """An error that will recur however often the run is retried (a bad config, a model that
    does not match, non-finite values step after step): the run is marked failed with it."""


def is_transient(exc: BaseException) -> bool:
    """True for faults outside the message that go away on their own (wait and retry)."""
    if isinstance(exc, (StoreUnavailable, TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):  # JetStream 503 (no stream leader yet)
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code is not None and exc.code >= 500
    if isinstance(exc, nats.errors.MaxPayloadError):  # the message itself is too big: it always will be
        return False
    if isinstance(exc, nats.errors.Error):  # connection closed, no responders, slow consumer...
        return True
    return isinstance(exc, OSError)
