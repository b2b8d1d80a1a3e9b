"""The weight-transfer protocol between the trainer and inference replicas.

The trainer serializes a state dict with safetensors, streams it into the object store
`relayrl-weights` as `<run>/<version>`, then puts a `PolicyVersion` (sha256, size) into the
KV `relayrl-policy` under `<run>`; replicas watch that key, stream the object back and check
size and sha256 before loading it.

The sha256 alone proves nothing: whoever can write the object and the KV entry writes both.
So the PolicyVersion also carries `signature`, an HMAC-SHA256 over (run, version, sha256) with
the key only trainers and inference replicas hold (`RELAYRL_WEIGHTS_KEY`): `sign_weights` makes
it, `verify_weights` refuses an unsigned or mis-signed version (`WeightsSignatureError`).
Binding the run and the version means a signed object cannot be passed off as another run's
weights or another version; binding the digest means its bytes cannot be changed.

Both directions bypass nats-py's `ObjectStore` data paths (bench/weight_sync.py, 1 GiB:
its put 1.9x and its streamed read 2.7x slower than these): its `put` waits for one ack per
128 KiB chunk before sending the next, and its `get()` grows an immutable `bytes` per chunk
(quadratic) or hops to a thread per chunk (`writeinto`). Here the writer pipelines 1 MiB chunks with a bounded window of outstanding
acks, and the reader drains an ordered consumer into a list of chunks while sha256 runs in a
worker thread. The layout on the wire (chunk and meta subjects, `ObjectInfo` JSON, digest)
is the object store's own, so `nats object get`, nats-py's `ObjectStore.get/list/delete`
and other clients still read and manage what this module writes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import nats.errors
import nats.js.errors
import structlog
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.kv import MSG_ROLLUP_SUBJECT, KeyValue
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from nats.nuid import NUID

from shared import subjects
from shared.bus import Bus
from shared.faults import LeaseLost
from shared.messages import DecodeError, PolicyVersion

log = structlog.get_logger("weights")

# 1 MiB fits the default nats-server max_payload (1 MB = 1 MiB); capped by the server's own limit.
CHUNK_SIZE = 1 << 20
# Outstanding chunk acks while writing: 32 MiB in flight keeps loopback and LAN links busy
# without letting one publisher swamp the server.
PUT_WINDOW = 32
# Hash in a worker thread in batches of this many bytes: fewer thread hops, same overlap.
_HASH_BATCH = 8 << 20
# A weights reader the server has not heard from this long is deleted (if ours could not be).
_READER_IDLE_S = 10.0
_nuid = NUID()


class WeightsError(RuntimeError):
    """Weights that cannot be stored or used: missing, truncated, wrong sha256, unreadable."""


class WeightsNotFound(WeightsError):
    """The weights asked for are not in the object store: never published, or pruned since."""


class WeightsSignatureError(WeightsError):
    """Permanent: a PolicyVersion that is unsigned or not signed with this key. Never loaded;
    reading it again cannot help (a new, correctly signed version replaces it)."""


# --- signing -----------------------------------------------------------------------------

SIGNATURE_SCHEME = "hmac-sha256-v1"


def _signed_text(run_id: str, version: int, sha256: str) -> bytes:
    # Newline-separated: a run id is one subject token (no whitespace), so fields cannot run together.
    return f"relayrl-weights\n{SIGNATURE_SCHEME}\n{run_id}\n{version}\n{sha256.lower()}".encode()


def _key_bytes(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if not raw:
        raise ValueError("the weights signing key is empty")
    return raw


def sign_weights(key: str | bytes, run_id: str, version: int, sha256: str) -> str:
    """The signature of version `version` of `run_id` whose bytes hash to `sha256` (hex)."""
    mac = hmac.new(_key_bytes(key), _signed_text(run_id, version, sha256), hashlib.sha256).hexdigest()
    return f"{SIGNATURE_SCHEME}:{mac}"


def verify_weights(key: str | bytes, pv: PolicyVersion) -> None:
    """Raise `WeightsSignatureError` unless `pv` is signed with `key` (constant-time compare).

    A reader that then checks the bytes against `pv.sha256` (`read_weights` does) has bytes
    the key holder published, for this run and version."""
    if not pv.signature:
        raise WeightsSignatureError(
            f"weights {pv.object!r} (run {pv.run_id!r}, version {pv.version}) are unsigned: not published by a "
            "trainer holding RELAYRL_WEIGHTS_KEY"
        )
    expected = sign_weights(key, pv.run_id, pv.version, pv.sha256)
    if not hmac.compare_digest(pv.signature.encode(), expected.encode()):
        raise WeightsSignatureError(
            f"weights {pv.object!r} (run {pv.run_id!r}, version {pv.version}) have a signature that does not "
            "match: signed with another RELAYRL_WEIGHTS_KEY, or run, version or sha256 changed after signing"
        )


@dataclass(frozen=True)
class StoredWeights:
    """What `put_weight_bytes` wrote: the object name and the digest of its bytes."""

    name: str
    sha256: str
    size: int
    chunks: int


# --- serialization ---------------------------------------------------------------------


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of `state_dict`; tied tensors (one storage, several names) are written
    once, under the name registered first, because safetensors refuses shared storage and the
    engine loads one name of a tied group into all of them."""
    seen: set[tuple[int, int]] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        flat[name] = t.to("cpu").contiguous()
    from safetensors.torch import save

    return save(flat, metadata=dict(metadata) if metadata else None)


def load_state_dict(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Tensors (on CPU) from safetensors bytes; raises `WeightsError` when they do not parse."""
    from safetensors.torch import load

    try:
        return load(data if isinstance(data, bytes) else bytes(data))
    except Exception as exc:  # safetensors raises its own error types, and ValueError/TypeError
        raise WeightsError(f"not a safetensors file: {type(exc).__name__}: {exc}") from None


# --- writing -----------------------------------------------------------------------------


@dataclass
class PolicyFence:
    """Compare-and-set on a run's PolicyVersion entry: the KV revision this writer last saw
    (None: the entry must not exist yet). A publish succeeds only if nobody wrote the entry
    since, so two trainers can never both publish: the second gets `LeaseLost`."""

    revision: int | None

    @classmethod
    async def read(cls, bus: Bus, run_id: str) -> PolicyFence:
        """The fence at the entry's current revision (taken right after acquiring the run's lease)."""
        kv = await bus.kv(subjects.KV_POLICY)
        try:
            entry = await kv.get(subjects.policy_key(run_id))
        except nats.js.errors.NotFoundError:  # also KeyDeletedError
            return cls(None)
        return cls(entry.revision)

    async def check(self, kv: KeyValue, key: str) -> None:
        """Raise `LeaseLost` if the entry moved since this fence's revision."""
        try:
            entry = await kv.get(key)
            current = entry.revision if entry.value else None
        except nats.js.errors.NotFoundError:
            current = None
        if current != self.revision:
            raise LeaseLost(f"KV {subjects.KV_POLICY}/{key} is at revision {current}, this writer saw {self.revision}")

    async def write(self, kv: KeyValue, key: str, value: bytes) -> None:
        try:
            if self.revision is None:
                self.revision = await kv.create(key, value)
            else:
                self.revision = await kv.update(key, value, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise LeaseLost(f"KV {subjects.KV_POLICY}/{key} was written by someone else: {exc}") from None


async def publish_weights(
    bus: Bus,
    run_id: str,
    version: int,
    step: int,
    state_dict: Mapping[str, torch.Tensor],
    keep: int = 2,
    fence: PolicyFence | None = None,
    *,
    signing_key: str | bytes,
) -> PolicyVersion:
    """Store `state_dict` as version `version` of `run_id`, signed with `signing_key` (the
    weights key, `RELAYRL_WEIGHTS_KEY`), and make it the run's latest.

    Order matters for readers: the object is complete (all chunks acked, meta written)
    before the KV entry that points at it, so a replica never sees a version it cannot read.
    Then versions beyond the newest `keep` are deleted (`keep=1` keeps only this one).
    With a `fence` (the trainer's), the entry is written with compare-and-set, and checked
    before the object is written, so a fenced-out writer changes neither.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1: the version just published is always kept")
    kv = await bus.kv(subjects.KV_POLICY)
    key = subjects.policy_key(run_id)
    if fence is not None:
        await fence.check(kv, key)
    # One metadata key: safetensors writes the header's metadata map in hash order, so two
    # keys would make equal weights hash differently from process to process. No run id either:
    # equal weights give an equal sha256 in any run (replay checks this).
    meta = {"relayrl": json.dumps({"version": version, "step": step})}
    data = await asyncio.to_thread(serialize_state_dict, state_dict, meta)
    stored = await put_weight_bytes(bus, run_id, version, data)
    pv = PolicyVersion(
        run_id=run_id, version=version, object=stored.name, sha256=stored.sha256, size=stored.size, step=step,
        signature=sign_weights(signing_key, run_id, version, stored.sha256),
    )
    if fence is None:
        await kv.put(key, pv.encode())
    else:
        await fence.write(kv, key, pv.encode())
    log.debug("weights published", run_id=run_id, version=version, step=step, size=stored.size, chunks=stored.chunks)
    await prune_weights(bus, run_id, keep=keep, current=version)
    return pv


async def put_weight_bytes(
    bus: Bus,
    run_id: str,
    version: int,
    data: bytes,
    *,
    chunk_size: int = CHUNK_SIZE,
    window: int = PUT_WINDOW,
) -> StoredWeights:
    """Stream `data` into the weights bucket as `<run>/<version>` (replacing one of that name).

    Chunks go out in order on this one connection (so the stream stores them in order) with
    up to `window` acks outstanding; every ack is awaited with the bus timeout. sha256 runs
    in a thread meanwhile. On any failure the chunks written so far are purged.
    """
    name = subjects.weights_object(run_id, version)
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    previous = await _object_info(store, name)
    chunk_size = max(1, min(chunk_size, bus.nc.max_payload))
    digest = asyncio.ensure_future(asyncio.to_thread(_sha256, data))
    nuid = _nuid.next().decode()
    chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=subjects.OBJ_WEIGHTS, obj=nuid)
    try:
        chunks = await _publish_chunks(bus.nc, chunk_subject, data, chunk_size, window, bus.timeout)
        sha = await digest
        info = js_api.ObjectInfo(
            name=name,
            bucket=subjects.OBJ_WEIGHTS,
            nuid=nuid,
            size=len(data),
            chunks=chunks,
            mtime=datetime.now(timezone.utc).isoformat(),
            digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(sha).decode()),
            options=js_api.ObjectMetaOptions(max_chunk_size=chunk_size),
        )
        await bus.js.publish(
            _meta_subject(name),
            json.dumps(info.as_dict()).encode(),
            headers={js_api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
            timeout=bus.timeout,
        )
    except BaseException:
        digest.cancel()
        await _purge_quietly(bus, chunk_subject)
        raise
    if previous is not None and not previous.deleted and previous.nuid:
        # Same name written again (a trainer resumed and re-published): drop the old chunks.
        await _purge_quietly(bus, OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=subjects.OBJ_WEIGHTS, obj=previous.nuid))
    return StoredWeights(name=name, sha256=sha.hex(), size=len(data), chunks=chunks)


async def _publish_chunks(nc: NATS, subject: str, data: bytes, chunk_size: int, window: int, timeout: float) -> int:
    """Publish `data` in chunks with a bounded window of JetStream acks; returns the chunk count."""
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    acks: dict[int, asyncio.Future[Msg]] = {}

    async def on_ack(msg: Msg) -> None:
        fut = acks.pop(int(msg.subject.rsplit(".", 1)[1]), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    in_flight: deque[tuple[int, asyncio.Future[Msg]]] = deque()
    view = memoryview(data)
    count = 0
    try:
        for offset in range(0, len(data), chunk_size):
            fut = acks[count] = loop.create_future()
            # Awaited in sequence: the connection sends chunks in this order, the stream keeps it.
            await nc.publish(subject, bytes(view[offset : offset + chunk_size]), reply=f"{inbox}.{count}")
            in_flight.append((count, fut))
            count += 1
            if len(in_flight) >= window:
                await _chunk_acked(*in_flight.popleft(), timeout)
        while in_flight:
            await _chunk_acked(*in_flight.popleft(), timeout)
    finally:
        view.release()
        await sub.unsubscribe()
    return count


async def _chunk_acked(index: int, fut: asyncio.Future[Msg], timeout: float) -> None:
    try:
        msg = await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise WeightsError(f"chunk {index}: no JetStream ack within {timeout}s") from None
    status = (msg.headers or {}).get("Status")
    if status:  # e.g. 503: no stream captures the chunk subject
        raise WeightsError(f"chunk {index}: server answered status {status} {(msg.headers or {}).get('Description', '')}")
    try:
        ack = json.loads(msg.data)
    except ValueError:
        raise WeightsError(f"chunk {index}: unreadable ack {msg.data[:200]!r}") from None
    if "error" in ack:
        raise WeightsError(f"chunk {index}: rejected: {ack['error']}")


# Listing the bucket's objects reads one small meta message per object.
_LIST_TIMEOUT_S = 30.0


async def prune_weights(bus: Bus, run_id: str, keep: int, current: int | None = None) -> list[str]:
    """Delete this run's weight objects except the newest `keep`; returns the names deleted.

    With `current`, that version always survives and "newest" counts only versions up to it:
    versions above it came from a timeline the trainer abandoned (it resumed from an older
    checkpoint), nothing points at them any more, and they are deleted too. `keep=0` (a run
    that ended and keeps nothing) deletes them all.

    A deleted object leaves nothing behind: its chunks and its meta message are purged (no
    delete marker, or a long run would keep one per version). Purging only, never writing
    the bucket, is what lets the store's NATS user prune without being able to write weights.
    """
    if keep < 0 or (keep == 0 and current is not None):
        raise ValueError("keep must be >= 0, and >= 1 with a current version")
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    versions = await _run_versions(store, run_id)
    if not versions:
        return []
    newest = versions[-1] if current is None else current
    older = [v for v in versions if v < newest]
    kept = [] if keep == 0 else (older[-(keep - 1) :] if keep > 1 else []) + [newest]
    doomed = [subjects.weights_object(run_id, v) for v in versions if v not in kept]
    for name in doomed:
        info = await _object_info(store, name)
        if info is not None and info.nuid:  # None: another pruner got there first
            await _purge_quietly(bus, OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=subjects.OBJ_WEIGHTS, obj=info.nuid))
        await _purge_quietly(bus, _meta_subject(name))
    if doomed:
        log.debug("old weights deleted", run_id=run_id, deleted=len(doomed), kept=kept)
    return doomed


async def _run_versions(store: ObjectStore, run_id: str, timeout_s: float = _LIST_TIMEOUT_S) -> list[int]:
    """Sorted versions of `run_id` present (not deleted) in the weights bucket.

    nats-py's `ObjectStore.list` waits without a bound for its watcher's end-of-listing
    marker; it was seen never to arrive (a trainer stuck for good after publishing), so the
    listing gets a deadline, and a listing that misses it is a transient fault (TimeoutError):
    the trainer resumes from its checkpoint and lists again."""
    try:
        infos = await asyncio.wait_for(store.list(ignore_deletes=True), timeout=timeout_s)
    except nats.js.errors.NotFoundError:
        return []
    except asyncio.TimeoutError:
        raise TimeoutError(f"listing the weights bucket took over {timeout_s:.0f}s") from None
    prefix = subjects.weights_object(run_id, 0)[: -len("0")]
    versions = []
    for info in infos:
        if info.deleted or not info.name.startswith(prefix):
            continue
        tail = info.name[len(prefix) :]
        if tail.isdigit():
            versions.append(int(tail))
    return sorted(versions)


# --- reading -----------------------------------------------------------------------------


async def latest_policy(bus: Bus, run_id: str) -> PolicyVersion | None:
    """The run's latest PolicyVersion, or None when it has published none."""
    key = subjects.policy_key(run_id)
    value = await bus.kv_value(subjects.KV_POLICY, key)
    if value is None:
        return None
    try:
        return PolicyVersion.decode(value)
    except DecodeError as exc:
        raise WeightsError(f"KV {subjects.KV_POLICY}/{key} holds no PolicyVersion: {exc}") from None


async def read_weights(bus: Bus, pv: PolicyVersion, *, chunk_timeout_s: float | None = None) -> bytes:
    """Stream the object `pv` names and return its bytes, checked against `pv.size` and `pv.sha256`.

    Chunks come through an ordered consumer (nats-py resets it on a gap) and are kept as a
    list, joined once at the end, so the cost is linear in size. Reads on one connection run
    one at a time (see `_read_locks`); separate connections read in parallel. Each chunk must
    arrive within `chunk_timeout_s` (the bus timeout by default). Raises `WeightsError` on
    anything that makes the bytes unusable.
    """
    started = time.monotonic()
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    info = await _object_info(store, pv.object)
    if info is None or info.deleted:
        raise WeightsNotFound(f"weights object {pv.object!r} not found (deleted by pruning or never written)")
    if info.size != pv.size:
        raise WeightsError(f"weights object {pv.object!r} has {info.size} bytes, the PolicyVersion says {pv.size}")
    async with _read_lock(bus.nc):
        chunks = await _read_chunks(bus, info, chunk_timeout_s or bus.timeout)
    sha, data = await asyncio.gather(chunks.digest.hexdigest(), asyncio.to_thread(b"".join, chunks.parts))
    if len(data) != pv.size:
        raise WeightsError(f"weights object {pv.object!r}: read {len(data)} bytes, expected {pv.size}")
    if sha != pv.sha256:
        raise WeightsError(f"weights object {pv.object!r}: sha256 {sha} does not match the PolicyVersion's {pv.sha256}")
    log.debug("weights read", object=pv.object, size=pv.size, read_s=round(time.monotonic() - started, 3))
    return data


async def read_version(bus: Bus, run_id: str, version: int | None = None) -> tuple[PolicyVersion, bytes]:
    """One version of a run's weights (`None`: the latest the KV names) and the PolicyVersion
    that describes it; the bytes are checked against its size and sha256 like `read_weights`.

    The KV keeps only the latest PolicyVersion, so an older version's is rebuilt from what the
    object store keeps of it: size and sha256 from the object's info (the digest its writer
    computed from the bytes) and the step `publish_weights` records in the safetensors header
    (0 for an object written without it). Raises `WeightsNotFound`, naming the versions that
    are stored, for a version that is not (or, pruned while being read, no longer) there.
    """
    # A newer version may replace the latest (and pruning delete it) while it is read: then
    # the new latest is read instead, a few times at most for a trainer publishing that fast.
    for _ in range(3):
        latest = await latest_policy(bus, run_id)
        if version is not None:
            wanted = version
        elif latest is not None:
            wanted = latest.version
        else:
            raise WeightsNotFound(f"run {run_id!r} has no published weights (none yet, or none kept once it ended)")
        pv = latest if latest is not None and latest.version == wanted else await _stored_policy(bus, run_id, wanted)
        try:
            data = await read_weights(bus, pv)
        except WeightsError:
            store = await bus.object_store(subjects.OBJ_WEIGHTS)
            info = await _object_info(store, pv.object)
            if info is not None and not info.deleted:
                raise  # still there: the bytes themselves are bad
            if version is None and await latest_policy(bus, run_id) != latest:
                continue
            raise WeightsNotFound(
                f"run {run_id!r}: version {wanted} was pruned while being read; "
                f"{_stored_list(await _run_versions(store, run_id))}"
            ) from None
        if pv is not latest:
            pv = pv.model_copy(update={"step": _recorded_step(data) or 0})
        return pv, data
    raise WeightsNotFound(f"run {run_id!r}: its latest version was replaced and pruned on every read; retry")


async def _stored_policy(bus: Bus, run_id: str, version: int) -> PolicyVersion:
    """A PolicyVersion for a stored version the KV no longer names (its step is filled in once read)."""
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    name = subjects.weights_object(run_id, version)
    info = await _object_info(store, name)
    if info is None or info.deleted:
        raise WeightsNotFound(
            f"run {run_id!r} has no weights version {version} (never published, or pruned: only the "
            f"newest versions are kept); {_stored_list(await _run_versions(store, run_id))}"
        )
    algorithm, _, encoded = (info.digest or "").partition("=")
    if algorithm.upper() != "SHA-256" or not encoded:
        raise WeightsError(f"weights object {name!r} has no SHA-256 digest to check its bytes against")
    sha = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return PolicyVersion(
        run_id=run_id, version=version, object=name, sha256=sha, size=info.size or 0, step=0,
        created_at=_mtime(info.mtime),
    )


def _mtime(stamp: str | None) -> float:
    """An object's mtime as a timestamp: ours are isoformat; Go clients write RFC 3339 with
    nanoseconds, which fromisoformat refuses, so the fraction is cut to microseconds."""
    if not stamp:
        return time.time()
    head, dot, tail = stamp.replace("Z", "+00:00").partition(".")
    if dot:
        digits = len(tail) - len(tail.lstrip("0123456789"))
        head = f"{head}.{tail[:min(digits, 6)]}{tail[digits:]}"
    try:
        return datetime.fromisoformat(head).timestamp()
    except ValueError:
        return time.time()


def _stored_list(versions: list[int]) -> str:
    return f"stored: {', '.join(map(str, versions))}" if versions else "it has no weights stored"


def _recorded_step(data: bytes) -> int | None:
    """The step `publish_weights` wrote into the safetensors header's metadata, if any."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        step = json.loads(header["__metadata__"]["relayrl"])["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and step >= 0 else None


# One object read at a time per connection: each ordered consumer may have a flow-control
# window of data in flight, and two at once overran the server's per-client max_pending
# (64 MB), which makes the server drop the whole connection as a slow consumer (measured).
_read_locks: weakref.WeakKeyDictionary[NATS, asyncio.Lock] = weakref.WeakKeyDictionary()


def _read_lock(nc: NATS) -> asyncio.Lock:
    lock = _read_locks.get(nc)
    if lock is None:
        lock = _read_locks[nc] = asyncio.Lock()
    return lock


@dataclass
class _Chunks:
    parts: list[bytes]
    digest: _ThreadedSha256


async def _read_chunks(bus: Bus, info: js_api.ObjectInfo, chunk_timeout_s: float) -> _Chunks:
    size = info.size or 0
    chunks = _Chunks(parts=[], digest=_ThreadedSha256())
    if size == 0:
        return chunks
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=subjects.OBJ_WEIGHTS, obj=info.nuid)
    stream = OBJ_STREAM_TEMPLATE.format(bucket=subjects.OBJ_WEIGHTS)
    # A short inactive threshold, and the consumer deleted once read: the server keeps a
    # lingering consumer's last loaded chunk in memory, one per version read otherwise
    # (measured: nats-server grew by a weights object per read until the threshold).
    sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, inactive_threshold=_READER_IDLE_S)
    received = 0
    try:
        while received < size:
            try:
                msg = await sub.next_msg(timeout=chunk_timeout_s)
            except nats.errors.TimeoutError:
                raise WeightsError(
                    f"weights object {info.name!r}: stalled after {received} of {size} bytes "
                    f"(no chunk within {chunk_timeout_s}s; deleted while reading?)"
                ) from None
            chunks.parts.append(msg.data)
            chunks.digest.update(msg.data)
            received += len(msg.data)
    except BaseException:
        chunks.digest.cancel()
        raise
    finally:
        await _delete_reader(bus, stream, sub)
    if received != size:
        chunks.digest.cancel()
        raise WeightsError(f"weights object {info.name!r}: chunks hold {received} bytes, its meta says {size}")
    return chunks


async def _delete_reader(bus: Bus, stream: str, sub: Any) -> None:
    """Delete the consumer behind `sub` (unsubscribing alone leaves it until its threshold)."""
    try:
        name = (await sub.consumer_info()).name
        await bus.js.delete_consumer(stream, name)
    except (nats.errors.Error, asyncio.TimeoutError) as exc:  # gone already, or NATS away: the threshold ends it
        log.debug("weights reader not deleted", error=repr(exc))
    await sub.unsubscribe()


class _ThreadedSha256:
    """sha256 over chunks as they arrive, hashed in a worker thread in ordered batches.

    hashlib drops the GIL on large buffers, so hashing overlaps the network reads and the
    event loop never spends a millisecond per chunk on it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._batch: list[bytes] = []
        self._batched = 0
        self._job: asyncio.Future[None] | None = None

    def update(self, chunk: bytes) -> None:
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= _HASH_BATCH and (self._job is None or self._job.done()):
            self._flush()

    async def hexdigest(self) -> str:
        self._flush()
        if self._job is not None:
            await self._job
        return self._hash.hexdigest()

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def _flush(self) -> None:
        batch, self._batch, self._batched = self._batch, [], 0
        if batch:
            self._job = asyncio.ensure_future(self._hash_after(self._job, batch))

    async def _hash_after(self, previous: asyncio.Future[None] | None, batch: list[bytes]) -> None:
        if previous is not None:
            await previous  # updates must run in chunk order
        await asyncio.to_thread(self._update_all, batch)

    def _update_all(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)


# --- helpers -------------------------------------------------------------------------------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _meta_subject(name: str) -> str:
    return OBJ_META_PRE_TEMPLATE.format(
        bucket=subjects.OBJ_WEIGHTS, obj=base64.urlsafe_b64encode(name.encode()).decode()
    )


async def _object_info(store: ObjectStore, name: str) -> js_api.ObjectInfo | None:
    try:
        return await store.get_info(name, show_deleted=True)
    except nats.js.errors.NotFoundError:  # ObjectNotFoundError is one
        return None


async def _purge_quietly(bus: Bus, subject: str) -> None:
    try:
        await bus.js.purge_stream(OBJ_STREAM_TEMPLATE.format(bucket=subjects.OBJ_WEIGHTS), subject=subject)
    except (nats.errors.Error, asyncio.TimeoutError) as exc:
        log.warning("could not purge weight chunks or marker", subject=subject, error=str(exc))

