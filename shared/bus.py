"""The NATS JetStream bus every service talks through.

`Bus.connect` retries until the server answers; `ensure_topology` creates streams and
buckets idempotently; `publish` sends one typed message with `Nats-Msg-Id` (so the stream
drops duplicates), the trace context and a timeout; `PullConsumer` fetches in batches,
decodes, hands messages to a handler, and acks only after the handler returned (its effect
is durable). Undecodable messages and messages whose handler keeps failing go to the
dead-letter stream with the reason, and are acked: never retried forever, never fatal.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Iterable, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.client import KV_PRE_TEMPLATE, KV_STREAM_TEMPLATE
from nats.js import api as js_api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared import nats_auth, retention, subjects, telemetry
from shared.config import ServiceSettings
from shared.faults import is_transient
from shared.messages import DeadLetter, DecodeError, Failure, Message
from shared.redact import redact_url
from shared.retention import StreamSpec

log = structlog.get_logger("bus")

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)

# Marks a request/reply answer that is a `Failure` rather than the reply type asked for.
FAILURE_HEADER = "Relayrl-Failure"

# Room kept in a dead letter for the publish's headers (trace context, msg id).
_DEAD_LETTER_HEADROOM = 16 * 1024


class Bus:
    """A connection to NATS plus its JetStream context."""

    def __init__(self, nc: NATS, settings: ServiceSettings) -> None:
        self.nc = nc
        # Logged in as a service user: topology is the admin's (`relayrl init`), this connection
        # may only bind to it. Without credentials (an open server: development, test fixtures)
        # or as the admin, missing streams and buckets are created as before.
        self.creates_topology = settings.nats_user in (None, nats_auth.ADMIN)
        self.js: JetStreamContext = nc.jetstream(timeout=settings.request_timeout_s)
        self.timeout = settings.request_timeout_s
        self.replicas = settings.js_replicas
        self.stream_max_bytes = settings.stream_max_bytes

    @classmethod
    async def connect(cls, settings: ServiceSettings, name: str) -> Bus:
        """Connect, retrying while the server is not up yet (services may start before NATS)."""
        servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]
        last: Exception | None = None
        for attempt in range(1, settings.nats_connect_attempts + 1):
            try:
                # Bounded per attempt: with unlimited reconnects nats-py keeps retrying the first
                # connect forever inside one call, which would make the attempt count meaningless.
                nc = await _connect_once(servers, name, settings)
                return cls(nc, settings)
            except CredentialsRefused:
                raise  # retrying the same credentials cannot help
            except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
                last = exc
                log.warning("nats connect failed", attempt=attempt, url=redact_url(settings.nats_url), error=str(exc))
                await asyncio.sleep(min(0.2 * attempt, 2.0))
        # The URL may carry user:password or a token; the message ends up in logs and /readyz.
        raise ConnectionError(f"could not connect to NATS at {redact_url(settings.nats_url)}: {last}")

    # --- topology --------------------------------------------------------------------

    async def bind_topology(self, timeout_s: float = 120.0) -> None:
        """At a service's start: create the topology where this connection may (see
        `creates_topology`), else wait until `relayrl init` made it, up to `timeout_s`."""
        if self.creates_topology:
            await self.ensure_topology()
            return
        deadline = asyncio.get_running_loop().time() + timeout_s
        delay = 0.2
        while True:
            try:
                missing = await self.missing_topology()
            except Exception as exc:  # a server just started answers 503s and timeouts for a moment
                if not is_transient(exc):
                    raise
                missing = [f"an answer from JetStream ({type(exc).__name__})"]
            if not missing:
                return
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TopologyMissing(
                    f"NATS has no {', '.join(missing)} after {timeout_s:.0f}s; streams and buckets are made by "
                    "the admin step: run `relayrl init` (admin credentials) against this server"
                )
            log.warning("waiting for the NATS topology; run `relayrl init`", missing=missing)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)

    async def missing_topology(self) -> list[str]:
        """Names of relayrl's streams and buckets the server does not have (info requests only)."""
        names = [spec.name for spec in retention.STREAMS]
        names += [KV_STREAM_TEMPLATE.format(bucket=b) for b in (subjects.KV_POLICY, subjects.KV_AGENTS, subjects.KV_LEASES)]
        names.append(f"OBJ_{subjects.OBJ_WEIGHTS}")
        missing = []
        for name in names:
            try:
                await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                missing.append(name)
        return missing

    async def ensure_topology(self) -> None:
        """Create every stream and bucket relayrl uses; safe to call from every service.

        Each gets `js_replicas` replicas (settings); existing ones with fewer are raised."""
        try:
            for spec in retention.STREAMS:
                await self.ensure_stream(spec)
            for bucket, history, ttl_s in (
                (subjects.KV_POLICY, 8, None),
                (subjects.KV_AGENTS, 1, None),
                (subjects.KV_LEASES, 1, subjects.LEASE_TTL_S),
            ):
                await self.kv(bucket, history=history, ttl_s=ttl_s)
                await self._raise_replicas(KV_STREAM_TEMPLATE.format(bucket=bucket))
            await self.object_store(subjects.OBJ_WEIGHTS)
            await self._raise_replicas(f"OBJ_{subjects.OBJ_WEIGHTS}")
        except nats.js.errors.ServerError as exc:
            if exc.err_code == 10074:  # replicas > 1 not supported in non-clustered mode
                raise ValueError(
                    f"RELAYRL_JS_REPLICAS={self.replicas} needs a clustered NATS with at least that many "
                    f"JetStream nodes: {exc.description}"
                ) from exc
            raise

    async def ensure_stream_named(self, name: str) -> None:
        """Create (or bring to our config) relayrl's stream `name`: a server restarted without
        its store has none. Streams that are not relayrl's are left alone."""
        spec = retention.spec(name)
        if spec is None:
            return
        if not self.creates_topology:
            try:
                await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                raise TopologyMissing(f"stream {name} does not exist (NATS lost its store?): run `relayrl init`") from None
            return
        await self.ensure_stream(spec)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        config = retention.stream_config(spec, self.replicas, self.stream_max_bytes)
        try:
            await self.js.add_stream(config)
            return
        except nats.js.errors.BadRequestError:
            pass
        # Exists with another config (an older max_age or bound, fewer replicas): bring it to
        # ours, but never lower its replicas: one service started without the setting must
        # not shrink a cluster's R3 streams to R1.
        current = await self.js.stream_info(spec.name)
        config.num_replicas = max(self.replicas, current.config.num_replicas or 1)
        if current.config.retention != spec.retention:
            await self._recreate_for_retention(spec, config, current)
            return
        await self.js.update_stream(config)

    async def _recreate_for_retention(
        self, spec: StreamSpec, config: js_api.StreamConfig, current: js_api.StreamInfo
    ) -> None:
        """A stream an older relayrl made with `limits` retention: JetStream cannot change a
        stream's retention, so it is deleted and made again, but only when every consumer on
        it has consumed and acked everything (what it holds is then in SQL or a checkpoint).
        Otherwise refuse with what to do: deleting unconsumed messages would lose them."""
        behind = []
        for c in await self.js.consumers_info(spec.name):
            if (c.num_pending or 0) or (c.num_ack_pending or 0):
                behind.append(f"{c.name} ({c.num_pending or 0} pending, {c.num_ack_pending or 0} un-acked)")
        if behind:
            raise RuntimeError(
                f"stream {spec.name} has {current.config.retention} retention; relayrl now keeps it as a "
                f"{spec.retention} and must recreate it, but its consumers have not consumed everything yet: "
                f"{', '.join(behind)}. Let them drain with the previous version (or end the runs), then start "
                f"again; `nats stream rm {spec.name}` drops what it holds instead (SQL keeps stored rollouts)."
            )
        log.warning(
            "recreating stream with work-queue retention (all its consumers are caught up)",
            stream=spec.name, retention=str(current.config.retention), messages=current.state.messages,
        )
        try:
            await self.js.delete_stream(spec.name)
        except nats.js.errors.NotFoundError:
            pass  # another service got there first
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:  # another service recreated it meanwhile
            pass

    async def _raise_replicas(self, stream: str) -> None:
        """Bring a bucket's stream up to `js_replicas` (buckets are created elsewhere too, at R1 by older code)."""
        info = await self.js.stream_info(stream)
        if (info.config.num_replicas or 1) < self.replicas:
            info.config.num_replicas = self.replicas
            await self.js.update_stream(info.config)

    async def kv(self, bucket: str, history: int = 1, ttl_s: float | None = None) -> KeyValue:
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            if not self.creates_topology:
                raise TopologyMissing(f"KV bucket {bucket} does not exist: run `relayrl init`") from None
            try:
                return await self.js.create_key_value(
                    js_api.KeyValueConfig(
                        bucket=bucket, history=history, ttl=ttl_s, storage=js_api.StorageType.FILE, replicas=self.replicas
                    )
                )
            except nats.js.errors.BadRequestError:  # another service created it first
                return await self.js.key_value(bucket)

    async def kv_value(self, bucket: str, key: str) -> bytes | None:
        """The value under `key` in `bucket`; None when it is absent, deleted or empty."""
        kv = await self.kv(bucket)
        try:
            entry = await kv.get(key)
        except nats.js.errors.NotFoundError:  # KeyNotFoundError and KeyDeletedError are ones
            return None
        return entry.value or None

    async def kv_purge(self, bucket: str, key: str) -> None:
        """Remove `key` from `bucket` with every revision and no marker left behind (a KV
        delete or purge keeps one marker per key forever)."""
        await self.js.purge_stream(
            KV_STREAM_TEMPLATE.format(bucket=bucket), subject=KV_PRE_TEMPLATE.format(bucket=bucket) + key
        )

    async def object_store(self, bucket: str) -> ObjectStore:
        try:
            return await self.js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            if not self.creates_topology:
                raise TopologyMissing(f"object store {bucket} does not exist: run `relayrl init`") from None
            try:
                return await self.js.create_object_store(
                    bucket, js_api.ObjectStoreConfig(bucket=bucket, storage=js_api.StorageType.FILE, replicas=self.replicas)
                )
            except nats.js.errors.BadRequestError:
                return await self.js.object_store(bucket)

    # --- publish ---------------------------------------------------------------------

    async def publish(
        self, subject: str, msg: Message, msg_id: str | None = None, headers: dict[str, str] | None = None
    ) -> js_api.PubAck:
        """Publish one message to a stream and wait for the server's ack (bounded by the timeout)."""
        hdrs = telemetry.inject_headers(headers)
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        return await self.js.publish(subject, msg.encode(), timeout=self.timeout, headers=hdrs)

    async def publish_many(
        self, items: Iterable[tuple[str, Message, str | None]], concurrency: int = 256
    ) -> list[js_api.PubAck]:
        """Publish many messages with bounded concurrency; raises if any publish failed.

        `js.publish` (not `publish_async`): the async variant can hang when the server rejects
        a message, so each publish waits for its own ack with a timeout.
        """
        sem = asyncio.Semaphore(concurrency)

        async def one(subject: str, msg: Message, msg_id: str | None) -> js_api.PubAck:
            async with sem:
                return await self.publish(subject, msg, msg_id)

        return list(await asyncio.gather(*(one(s, m, i) for s, m, i in items)))

    async def dead_letter(self, stream: str, consumer: str, msg: Msg, reason: str) -> None:
        meta = _metadata(msg)
        letter = DeadLetter(
            stream=stream,
            subject=msg.subject,
            consumer=consumer,
            reason=reason[:4000],
            data=msg.data,
            headers={k: str(v) for k, v in (msg.headers or {}).items()},
            delivered=meta.num_delivered if meta else 1,
            stream_seq=meta.sequence.stream if meta else None,
        )
        msg_id = f"{stream}:{letter.stream_seq}" if letter.stream_seq is not None else None
        # A message near max_payload plus the reason and headers would not fit: keep the
        # letter (the reason is what matters) and say where the full payload still is.
        room = self.nc.max_payload - _DEAD_LETTER_HEADROOM
        if len(letter.encode()) > room:
            keep = max(room - len(letter.encode()) + len(letter.data), 0)
            # The original leaves its work-queue stream when this letter is acked: say so.
            letter.reason = f"{letter.reason[:3000]} [data truncated from {len(letter.data)} bytes to {keep}]"
            letter.data = letter.data[:keep]
        await self.publish(subjects.dlq(stream), letter, msg_id)
        log.warning("dead-lettered", stream=stream, subject=msg.subject, reason=letter.reason)

    # --- request/reply ---------------------------------------------------------------

    async def request(
        self, subject: str, msg: Message, reply_cls: type[R], timeout: float | None = None
    ) -> R | Failure:
        """Core NATS request: the reply decoded as `reply_cls`, or the `Failure` the server sent
        instead. Raises TimeoutError when nobody answers (no responders, or too late)."""
        try:
            resp = await self.nc.request(
                subject, msg.encode(), timeout=timeout or self.timeout, headers=telemetry.inject_headers()
            )
        except nats.errors.NoRespondersError:
            raise TimeoutError(f"no responders on {subject}") from None
        except nats.errors.TimeoutError:
            raise TimeoutError(f"request on {subject} timed out") from None
        if resp.headers and FAILURE_HEADER in resp.headers:
            return Failure.decode(resp.data)
        return reply_cls.decode(resp.data)

    async def serve(
        self, subject: str, queue: str, request_cls: type[M], handler: Callable[[M], Awaitable[Message]]
    ) -> Any:
        """Answer requests on `subject` (queue group: replicas share) with what `handler` returns.

        A handler may return a `Failure`; an undecodable request gets a 400 Failure, a handler
        that raises gets a 503 (transient, per `is_transient`) or a 500 Failure, and a reply too
        big for one message a 500: the caller always gets an answer, never a timeout."""

        async def on_request(msg: Msg) -> None:
            try:
                req = request_cls.decode(msg.data)
            except DecodeError as exc:
                reply: Message = Failure(code=400, error=str(exc))
            else:
                try:
                    with telemetry.span_from_headers(f"serve {subject}", msg.headers):
                        reply = await handler(req)
                except Exception as exc:  # a failing query must answer, not leave the caller hanging
                    transient = is_transient(exc)
                    log.warning("request handler failed", subject=subject, error=str(exc), exc_info=not transient)
                    reply = Failure(code=503 if transient else 500, error=f"{type(exc).__name__}: {exc}", transient=transient)
            if not msg.reply:
                return
            try:
                await self._respond(msg.reply, reply)
            except nats.errors.MaxPayloadError:
                await self._respond(msg.reply, Failure(code=500, error=f"reply to {subject} exceeds max_payload"))

        return await self.nc.subscribe(subject, queue=queue, cb=on_request)

    async def _respond(self, inbox: str, reply: Message) -> None:
        headers = {FAILURE_HEADER: str(reply.code)} if isinstance(reply, Failure) else None
        await self.nc.publish(inbox, reply.encode(), headers=headers)

    async def close(self) -> None:
        """Drain: finish in-flight callbacks and flush pending publishes, then disconnect."""
        if self.nc.is_connected or self.nc.is_reconnecting:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=self.timeout)
            except (asyncio.TimeoutError, nats.errors.Error):
                await self.nc.close()


def _metadata(msg: Msg) -> Any:
    try:
        return msg.metadata
    except (nats.errors.NotJSMsgError, ValueError, AttributeError):
        return None


# --- consuming ---------------------------------------------------------------------------


@dataclass
class Delivery(Generic[M]):
    """A decoded message plus what is needed to ack it or keep it alive."""

    msg: Msg
    value: M
    # Set by a batch handler (`reject`) for a message it found permanently bad (a row the
    # database refuses): the consumer dead-letters it with this reason and acks the rest.
    rejected: str | None = None

    @property
    def delivered(self) -> int:
        meta = _metadata(self.msg)
        return meta.num_delivered if meta else 1

    @property
    def stream_seq(self) -> int | None:
        meta = _metadata(self.msg)
        return meta.sequence.stream if meta else None

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.msg.headers or {})

    def reject(self, reason: str) -> None:
        """Mark this message permanently bad: dead-lettered with `reason` once the handler returns."""
        self.rejected = reason


Handler = Callable[[list[Delivery[M]]], Awaitable[None]]


class TopologyMissing(ConnectionError):
    """A stream or bucket this service binds to does not exist and it may not create it:
    transient (a ConnectionError) until the admin step (`relayrl init`) makes it."""


class CredentialsRefused(RuntimeError):
    """Permanent: the server refused this user and password (`Authorization Violation`)."""


async def _connect_once(servers: list[str], name: str, settings: ServiceSettings) -> NATS:
    """One connect attempt, bounded by the connect timeout. nats-py retries a refused login
    inside `nats.connect` until the timeout; the server's `Authorization Violation` is final
    (wrong or missing credentials), so it ends the attempt at once with `CredentialsRefused`."""
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        # A permissions violation names the subject this user may not use: worth a log line.
        log.warning("nats error", error=str(exc))
        if "authorization violation" in str(exc).lower():
            refused.set()

    connecting = asyncio.ensure_future(
        nats.connect(
            servers,
            name=name,
            user=settings.nats_user,
            password=settings.nats_password.get_secret_value() if settings.nats_password else None,
            # Replies (RPC answers, JetStream API answers, deliveries) come to this user's own
            # prefix: the only one it may subscribe to (shared/nats_auth.py).
            inbox_prefix=nats_auth.inbox_prefix(settings.nats_user) if settings.nats_user else "_INBOX",
            error_cb=on_error,
            connect_timeout=settings.nats_connect_timeout_s,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
        )
    )
    refusal = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, refusal}, timeout=settings.nats_connect_timeout_s + 1.0,
                           return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled by the caller's own deadline: leave no connect running
        connecting.cancel()
        raise
    finally:
        refusal.cancel()
    if connecting.done() and not refused.is_set():
        return connecting.result()
    connecting.cancel()
    result = (await asyncio.gather(connecting, return_exceptions=True))[0]
    if isinstance(result, NATS):  # connected just as it was refused on another server: not ours to keep
        await result.close()
    if refused.is_set():
        who = f"user {settings.nats_user!r}" if settings.nats_user else "a connection without credentials"
        raise CredentialsRefused(
            f"NATS refused {who} (Authorization Violation): set RELAYRL_NATS_USER and RELAYRL_NATS_PASSWORD "
            "to this service's credentials"
        )
    raise asyncio.TimeoutError()


class TransientError(Exception):
    """Raised by a handler when the failure is outside the message (database down, timeout):
    the messages are retried later and never counted toward poison."""


@dataclass
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str
    ack_wait_s: float = 30.0
    max_ack_pending: int = 10000
    # Handler failures of one message (transient ones excluded) before it is poison (dead-lettered).
    poison_after: int = 5
    retry_delay_s: float = 1.0
    # False for the consumer of the DLQ itself: a message whose handler keeps failing is never
    # dead-lettered (during a database outage that would feed the DLQ from itself); it is
    # logged and retried at a slow pace instead. Undecodable messages are still dead-lettered:
    # the wrapper is a valid DeadLetter (deduplicated by stream sequence), so that happens once.
    dead_letter: bool = True


# Bounds on how long a consumer waits after failing to fetch (server restarting, no leader yet).
_FETCH_BACKOFF_S = (0.2, 5.0)
# Per-message failure counts kept at most (oldest forgotten first).
_MAX_FAILURE_COUNTS = 10000
# Longest wait between retries of a message a consumer must never dead-letter.
_SLOW_RETRY_S = 60.0


@dataclass
class PullConsumer(Generic[M]):
    """Fetch -> decode -> handle -> ack loop over one durable pull consumer.

    `per_message=True` runs the handler on each message in its own task (long agent runs,
    up to `max_in_flight` at once); otherwise the whole fetched batch goes to the handler at
    once (bulk SQL writes), one batch at a time so effects are applied in order. While a
    handler runs, every message it holds gets `in_progress()` so JetStream does not redeliver
    work that is alive.

    The loop outlives the server: when fetching fails (reconnecting, JetStream 503, the
    consumer or stream gone after a restart with a fresh store dir) it waits with bounded
    backoff, recreates the stream if missing, the consumer and the subscription, and goes on.
    It ends only when `stop` is set or the connection was closed on purpose.
    """

    bus: Bus
    spec: ConsumerSpec
    model: type[M]
    handler: Handler[M]
    batch: int = 64
    per_message: bool = False
    max_in_flight: int = 64
    fetch_timeout_s: float = 1.0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _in_flight: int = 0
    _freed: asyncio.Event = field(default_factory=asyncio.Event)
    _batch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Deliveries whose handler is running, kept alive with in_progress().
    _held: dict[int, Delivery[M]] = field(default_factory=dict)
    # Handler failures per stream sequence. Not JetStream's num_delivered: transient naks
    # (a database outage) raise that too, and would make the first real error after an outage
    # poison at once. In memory: a restarted consumer starts counting again, so a poison
    # message gets at most `poison_after` more tries per restart (bounded, never forever).
    _failures: OrderedDict[int, int] = field(default_factory=OrderedDict)

    async def create(self) -> None:
        await self.bus.js.add_consumer(
            self.spec.stream,
            js_api.ConsumerConfig(
                durable_name=self.spec.durable,
                filter_subject=self.spec.filter_subject,
                ack_policy=js_api.AckPolicy.EXPLICIT,
                ack_wait=self.spec.ack_wait_s,
                max_deliver=-1,  # poison handling is ours: dead-letter with the reason
                max_ack_pending=self.spec.max_ack_pending,
                deliver_policy=js_api.DeliverPolicy.ALL,
            ),
        )

    async def _subscribe(self, recreate_stream: bool = False) -> Any:
        if recreate_stream:
            # A server restarted with a fresh store dir has no streams: bring ours back.
            await self.bus.ensure_stream_named(self.spec.stream)
        await self.create()
        return await self.bus.js.pull_subscribe_bind(durable=self.spec.durable, stream=self.spec.stream)

    async def _resubscribe(self, stop: asyncio.Event, old: Any, error: BaseException) -> Any:
        """After a failed fetch: wait (bounded backoff) and rebuild the subscription until it works."""
        log.warning("fetch failed; recreating the consumer", durable=self.spec.durable, error=repr(error))
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception:  # noqa: BLE001 - the old subscription may be gone with the connection
                pass
        delay = _FETCH_BACKOFF_S[0]
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            if stop.is_set() or self.bus.nc.is_closed:
                return None
            if not self.bus.nc.is_connected:  # still reconnecting: nothing to ask yet
                delay = min(delay * 2, _FETCH_BACKOFF_S[1])
                continue
            try:
                sub = await self._subscribe(recreate_stream=True)
            except Exception as exc:  # noqa: BLE001 - any failure here is retried, bounded
                log.warning("consumer not recreated yet", durable=self.spec.durable, error=repr(exc))
                delay = min(delay * 2, _FETCH_BACKOFF_S[1])
                continue
            log.info("consumer recreated", durable=self.spec.durable)
            return sub
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then wait for in-flight handlers (drain)."""
        sub: Any = None
        try:
            sub = await self._subscribe()
        except Exception as exc:  # noqa: BLE001 - e.g. a JetStream 503 right after the server started
            if not is_transient(exc):
                raise
            sub = await self._resubscribe(stop, None, exc)
        keepalive = asyncio.create_task(self._keep_alive())
        try:
            while not stop.is_set() and sub is not None:
                free = self.max_in_flight - self._in_flight
                if free <= 0:
                    self._freed.clear()
                    try:  # bounded wait so `stop` is noticed
                        await asyncio.wait_for(self._freed.wait(), timeout=self.fetch_timeout_s)
                    except asyncio.TimeoutError:
                        pass
                    continue
                try:
                    msgs = await sub.fetch(min(self.batch, free), timeout=self.fetch_timeout_s)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                except Exception as exc:  # noqa: BLE001 - connection, 503, consumer gone: all recoverable
                    if self.bus.nc.is_closed:  # closed on purpose (shutdown): nothing to come back to
                        break
                    sub = await self._resubscribe(stop, sub, exc)
                    continue
                await self._dispatch(msgs)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            keepalive.cancel()
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # noqa: BLE001
                    pass

    async def _dispatch(self, msgs: list[Msg]) -> None:
        good: list[Delivery[M]] = []
        for msg in msgs:
            try:
                good.append(Delivery(msg, self.model.decode(msg.data)))
            except DecodeError as exc:
                await self._dead_letter(msg, str(exc))
        if not good:
            return
        self._in_flight += len(good)
        for group in ([d] for d in good) if self.per_message else [good]:
            task = asyncio.create_task(self._handle(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, deliveries: list[Delivery[M]]) -> None:
        try:
            if self.per_message:
                await self._handle_with_retry(deliveries)
            else:
                async with self._batch_lock:
                    await self._handle_with_retry(deliveries)
        except Exception:  # acking itself failed: JetStream redelivers after ack_wait
            log.exception("delivery handling failed", durable=self.spec.durable)
        finally:
            self._in_flight -= len(deliveries)
            self._freed.set()

    async def _handle_with_retry(self, deliveries: list[Delivery[M]]) -> None:
        try:
            await self._call(deliveries)
        except Exception as exc:
            if _is_transient(exc):
                log.warning("transient failure; will retry", durable=self.spec.durable, error=str(exc))
                await asyncio.gather(*(d.msg.nak(delay=self.spec.retry_delay_s) for d in deliveries))
                return
            if len(deliveries) == 1:
                await self._failed(deliveries[0], exc)
                return
            # A batch failed: handle members alone so one poison message cannot block the rest.
            log.warning("batch handler failed; isolating", durable=self.spec.durable, size=len(deliveries), error=str(exc))
            for d in deliveries:
                try:
                    await self._call([d])
                except Exception as one_exc:
                    if _is_transient(one_exc):
                        await d.msg.nak(delay=self.spec.retry_delay_s)
                    else:
                        await self._failed(d, one_exc)
                else:
                    await self._done(d)
            return
        await asyncio.gather(*(self._done(d) for d in deliveries))

    async def _done(self, d: Delivery[M]) -> None:
        """The handler returned: dead-letter what it rejected, ack the rest."""
        if d.rejected is not None:
            await self._dead_letter(d.msg, d.rejected)
        else:
            self._forget(d)
            await d.msg.ack()

    async def _call(self, deliveries: list[Delivery[M]]) -> None:
        for d in deliveries:
            d.rejected = None  # a retried batch decides again
        self._held.update((id(d), d) for d in deliveries)
        try:
            await self.handler(deliveries)
        finally:
            for d in deliveries:
                self._held.pop(id(d), None)

    async def _keep_alive(self) -> None:
        """One loop for all held messages: `in_progress()` every ack_wait/3 while a handler runs.

        Runs until `run()` cancels it, after the last handler finished."""
        period = max(self.spec.ack_wait_s / 3, 0.05)
        while True:
            await asyncio.sleep(period)
            for d in list(self._held.values()):
                try:
                    await d.msg.in_progress()
                except Exception:  # noqa: BLE001 - disconnected: redelivered after ack_wait at worst
                    pass

    async def _failed(self, delivery: Delivery[M], exc: Exception) -> None:
        seq = delivery.stream_seq
        failures = self._count_failure(seq) if seq is not None else delivery.delivered
        reason = f"handler failed {failures}x: {type(exc).__name__}: {exc}"
        if failures >= self.spec.poison_after and not self.spec.dead_letter:
            log.error("handler keeps failing; retried slowly, never dead-lettered", durable=self.spec.durable,
                      seq=seq, error=reason)
            await delivery.msg.nak(delay=min(self.spec.retry_delay_s * failures, _SLOW_RETRY_S))
        elif failures >= self.spec.poison_after:
            await self._dead_letter(delivery.msg, reason)
        else:
            log.warning("handler failed; will retry", durable=self.spec.durable, error=reason)
            await delivery.msg.nak(delay=self.spec.retry_delay_s * failures)

    def _count_failure(self, seq: int) -> int:
        n = self._failures.pop(seq, 0) + 1
        self._failures[seq] = n  # most recent last: eviction drops the longest-untouched
        while len(self._failures) > _MAX_FAILURE_COUNTS:
            self._failures.popitem(last=False)
        return n

    def _forget(self, d: Delivery[M] | Msg) -> None:
        if self._failures:
            meta = _metadata(d.msg if isinstance(d, Delivery) else d)
            if meta is not None:
                self._failures.pop(meta.sequence.stream, None)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        """Give up on `msg` with the reason. If the dead letter cannot be published (NATS down),
        the message is nak'ed to come back later: a failed publish never ends the consumer."""
        try:
            await self.bus.dead_letter(self.spec.stream, self.spec.durable, msg, reason)
        except Exception as exc:  # noqa: BLE001 - anything: the message must come back, not vanish
            log.warning("dead-letter publish failed; will retry", durable=self.spec.durable,
                        seq=_seq(msg), error=repr(exc))
            await _quietly(msg.nak(delay=self.spec.retry_delay_s))
            return
        self._forget(msg)
        await _quietly(msg.ack())


def _is_transient(exc: BaseException) -> bool:
    """A handler failure that is not the message's fault: retried, never counted toward poison."""
    if isinstance(exc, nats.errors.MaxPayloadError):  # too big now, too big on every retry
        return False
    return isinstance(exc, TransientError) or is_transient(exc)


def _seq(msg: Msg) -> int | None:
    meta = _metadata(msg)
    return meta.sequence.stream if meta else None


async def _quietly(op: Awaitable[Any]) -> None:
    """An ack/nak that may fail while disconnected: JetStream redelivers after ack_wait then."""
    try:
        await op
    except Exception as exc:  # noqa: BLE001
        log.warning("ack/nak failed", error=repr(exc))


async def wait_for_stop(stop: asyncio.Event, *tasks: Awaitable[Any]) -> None:
    """Run `tasks` until `stop` is set or one of them ends; re-raise the first failure."""
    running = [asyncio.ensure_future(t) for t in tasks]
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*running, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    results = await asyncio.gather(*running, return_exceptions=True)
    stopper.cancel()
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            raise r


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set `stop` so the service drains instead of dying mid-write."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
