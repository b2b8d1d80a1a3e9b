"""Who may do what on NATS: one user per service plus an admin, as data.

This module is the one place the NATS permission table lives. The embedded stack's server
config (`authorization_block`), the deployments' (`authorization_block_env`, printed by
`relayrl nats-config`), the permission tests and docs/security.md all derive from
`PERMISSIONS`; every subject is built from `shared/subjects.py` names.

What each grant is for:
- Stream publishes (`relayrl.tasks.>`, ...) are the service's own messages.
- `$JS.API.*` subjects are JetStream's API: stream/bucket info (binding), consumer
  create/info/next on the service's own durables, KV reads (`DIRECT.GET`, `STREAM.MSG.GET`),
  KV watches and object reads (ordered consumers, created and deleted by the reader), purges.
- `$JS.ACK.<stream>.<durable>.>` acks the service's own deliveries; `$JS.FC.<stream>.>`
  answers flow control of an ordered consumer (KV watches, weight reads).
- `$KV.<bucket>.<key>` writes a KV key; `$O.<bucket>.>` writes object chunks and metadata
  (the trainer only: the store prunes weights by purging).
- `_INBOX_<user>.>` (subscribe) receives replies: store RPC answers, JetStream API answers,
  publish acks, and ordered-consumer deliveries. Each user has its own inbox prefix
  (`Bus.connect` sets it), so no service can read replies addressed to another one (a
  gateway's key lookups, a trainer's datasets).

What cannot be narrowed (NATS wildcards match whole tokens only):
- The trainer's per-run durables `trainer-<run>` on GROUPS: it gets consumer create/info/next
  and acks for any consumer name on GROUPS (`*`), since `trainer-*` is not a subject pattern.
  Only trainers read GROUPS, so this reaches no other service's consumer. Likewise the
  store's run cleanup may delete any consumer on GROUPS (`CONSUMER.DELETE.GROUPS.*`).
- Ordered consumers (KV watches, weight reads) have server-chosen names: a reader may create,
  inspect and delete any consumer on the bucket streams it reads. Those streams have no
  durables.
- `STREAM.MSG.GET` and `STREAM.PURGE` carry the key/subject in the request body, not the
  subject: a bucket reader reads every key of that bucket; a purger can purge any subject of
  that stream (the store's cleanup and the gateway's TASKS purge).
- Replicas of one service share its user and so its inbox prefix (one trust domain).

Nobody but the admin may create, update or delete a stream, a bucket or a durable of another
service: topology is the admin's (`relayrl init`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Literal, get_args

from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.object_store import OBJ_STREAM_TEMPLATE

from shared import subjects

ServiceName = Literal["gateway", "rollout", "store", "trainer", "inference"]
SERVICES: tuple[ServiceName, ...] = get_args(ServiceName)
ADMIN = "admin"
UserName = Literal["gateway", "rollout", "store", "trainer", "inference", "admin"]
USERS: tuple[str, ...] = (*SERVICES, ADMIN)

_API = "$JS.API"


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix `user` connects with (nats-py `inbox_prefix`); only it may
    subscribe below it."""
    return f"_INBOX_{user}"


def _inbox(user: str) -> str:
    return f"{inbox_prefix(user)}.>"


@dataclass(frozen=True)
class Permissions:
    """One user's allow lists. `allow_responses`: may answer requests it received (the store's RPC)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    notes: tuple[str, ...] = field(default=())


# --- building blocks ----------------------------------------------------------------------


def _kv_stream(bucket: str) -> str:
    return KV_STREAM_TEMPLATE.format(bucket=bucket)


def _obj_stream(bucket: str) -> str:
    return OBJ_STREAM_TEMPLATE.format(bucket=bucket)


def _bind(*streams: str) -> list[str]:
    """See that a stream exists (services bind to topology, they never create it)."""
    return [f"{_API}.STREAM.INFO.{s}" for s in streams]


def _bind_all() -> list[str]:
    """Stream info on every stream and bucket: what `Bus.bind_topology` checks at start (info
    reveals configs and counts, never message contents)."""
    buckets = [_kv_stream(b) for b in (subjects.KV_POLICY, subjects.KV_AGENTS, subjects.KV_LEASES)]
    return _bind(*subjects.STREAM_SUBJECTS, *buckets, _obj_stream(subjects.OBJ_WEIGHTS))


def _durable(stream: str, durable: str) -> list[str]:
    """Create (idempotent: same config), inspect and pull from one durable, and ack its messages.

    nats-py creates a named durable through `CONSUMER.DURABLE.CREATE.<stream>.<durable>`;
    the newer `CONSUMER.CREATE.<stream>.<durable>[.<filter>]` form is allowed too."""
    return [
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"{_API}.CONSUMER.CREATE.{stream}.{durable}",
        f"{_API}.CONSUMER.CREATE.{stream}.{durable}.>",
        f"{_API}.CONSUMER.INFO.{stream}.{durable}",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _ordered_reader(stream: str) -> list[str]:
    """Ordered push consumers on `stream` (KV watch, object read): created without a name,
    inspected, deleted when done; flow-control replies go to `$JS.FC.<stream>.>`."""
    return [
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.*",
        f"{_API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _get(stream: str) -> list[str]:
    """Read single messages: KV gets, object meta lookups (direct get when the bucket allows it)."""
    return [
        f"{_API}.STREAM.MSG.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
    ]


def kv_read(bucket: str) -> list[str]:
    """Get, list and watch every key of a KV bucket."""
    stream = _kv_stream(bucket)
    return [*_bind(stream), *_get(stream), *_ordered_reader(stream)]


def kv_write(bucket: str, key: str = ">") -> list[str]:
    """Put/create/update/delete the keys matching `key` (a subject pattern over the key)."""
    return [f"$KV.{bucket}.{key}"]


def obj_read(bucket: str) -> list[str]:
    """Read objects (meta by get, chunks by an ordered consumer) and list the bucket
    (nats-py's listing looks its stream up by subject: `STREAM.NAMES`, names only)."""
    stream = _obj_stream(bucket)
    return [*_bind(stream), *_get(stream), *_ordered_reader(stream), f"{_API}.STREAM.NAMES"]


def purge(stream: str) -> str:
    return f"{_API}.STREAM.PURGE.{stream}"


def _rpc(*rpc_methods: str) -> list[str]:
    return [subjects.store_rpc(m) for m in rpc_methods]


def _lease(role: str) -> str:
    """A lease key pattern for one role: `<role>.<run>` (or `<role>.<replica>`)."""
    return subjects.lease_key(role, "x").rsplit(".", 1)[0] + ".*"


def _stream_subject(stream: str) -> str:
    return subjects.STREAM_SUBJECTS[stream]


# --- the table ----------------------------------------------------------------------------

_ALL_STREAMS = tuple(subjects.STREAM_SUBJECTS)
_TASKS, _TRAJ, _GROUPS, _METRICS, _DLQ = (
    subjects.STREAM_TASKS, subjects.STREAM_TRAJECTORIES, subjects.STREAM_GROUPS, subjects.STREAM_METRICS,
    subjects.STREAM_DLQ,
)  # fmt: skip
_POLICY, _AGENTS, _LEASES, _WEIGHTS = subjects.KV_POLICY, subjects.KV_AGENTS, subjects.KV_LEASES, subjects.OBJ_WEIGHTS

# Store RPCs the trainer calls (services/trainer: progress.py, groups_in.py, sft_run.py).
TRAINER_RPCS = ("get_run", "list_runs", "set_run_state", "get_group_members", "get_dataset", "get_run_trajectories")


def _dedupe(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


PERMISSIONS: dict[str, Permissions] = {
    "gateway": Permissions(
        publish=_dedupe([
            _stream_subject(_TASKS),  # rollout requests (pacer, POST /v1/tasks)
            purge(_TASKS),  # a finished run's queued training requests are dropped
            subjects.store_rpc(">"),  # every store RPC: the HTTP API is a front for them
            *_bind_all(),
            *kv_read(_POLICY),  # progress (pacing), latest PolicyVersion (weights export)
            *kv_read(_AGENTS),  # agent validation of a new run
            *kv_read(_LEASES), *kv_write(_LEASES, _lease("pace")),  # the run pacer's lease; watch inference adverts
            *obj_read(_WEIGHTS),  # GET /v1/runs/{id}/weights
        ]),
        subscribe=(_inbox("gateway"),),
    ),
    "rollout": Permissions(
        publish=_dedupe([
            _stream_subject(_TRAJ),
            subjects.dlq(_TASKS),  # its own consumer's dead letters only
            *_bind_all(),
            *_durable(_TASKS, subjects.CONSUMER_ROLLOUT),
            *kv_read(_AGENTS), *kv_write(_AGENTS),  # registers the agents it runs
        ]),
        subscribe=(_inbox("rollout"),),
    ),
    "store": Permissions(
        publish=_dedupe([
            _stream_subject(_GROUPS),  # complete groups and replays
            _stream_subject(_DLQ),  # dead letters of its three consumers
            *_bind_all(),
            *_durable(_TRAJ, subjects.CONSUMER_STORE_TRAJECTORIES),
            *_durable(_METRICS, subjects.CONSUMER_STORE_METRICS),
            *_durable(_DLQ, subjects.CONSUMER_STORE_DLQ),
            # Run cleanup (services/store/cleanup.py): the run's trainer durables, queued
            # tasks and groups, its KV keys and weights.
            f"{_API}.CONSUMER.DELETE.{_GROUPS}.*",
            purge(_GROUPS), purge(_TASKS), purge(_kv_stream(_POLICY)), purge(_kv_stream(_LEASES)),
            *kv_read(_POLICY),
            # Pruning purges a version's chunks and meta (shared/weights.prune_weights); the
            # store never writes the bucket.
            *obj_read(_WEIGHTS), purge(_obj_stream(_WEIGHTS)),
        ]),
        subscribe=(_inbox("store"), subjects.store_rpc(">")),
        allow_responses=True,  # answers RPCs on the requester's reply subject
    ),
    "trainer": Permissions(
        publish=_dedupe([
            _stream_subject(_METRICS),
            subjects.dlq(_GROUPS),
            *_rpc(*TRAINER_RPCS),
            *_bind_all(),
            # Its per-run durables `trainer-<run>`: `trainer-*` is no subject pattern, so any name on GROUPS.
            *_durable(_GROUPS, "*"),
            *kv_read(_POLICY), *kv_write(_POLICY),  # PolicyVersion (compare-and-set) and progress
            *kv_read(_LEASES), *kv_write(_LEASES, _lease("train")),
            *obj_read(_WEIGHTS), f"$O.{_WEIGHTS}.>", purge(_obj_stream(_WEIGHTS)),  # write and prune weights
        ]),
        subscribe=(_inbox("trainer"),),
    ),
    "inference": Permissions(
        publish=_dedupe([
            *_bind_all(),
            *kv_read(_POLICY),
            *obj_read(_WEIGHTS),
            *kv_read(_LEASES), *kv_write(_LEASES, _lease("inference")),  # its model advert (services/inference/policy.py)
        ]),
        subscribe=(_inbox("inference"),),
    ),
    ADMIN: Permissions(publish=(">",), subscribe=(">",), notes=("creates topology (`relayrl init`), operators",)),
}


# --- server config ------------------------------------------------------------------------


def generate_password() -> str:
    """A random password (URL-safe: it may appear in a `nats://u:p@host` URL) that starts with a
    letter: nats-server parses a `$VAR` reference's value as config, and one starting with `-`
    is refused as a malformed number (measured: `-rabc` fails, `4rabc` and `abc-def` pass)."""
    return "p" + secrets.token_urlsafe(24)


def generate_passwords() -> dict[str, str]:
    """A fresh random password per user."""
    return {user: generate_password() for user in USERS}


def password_env(user: str) -> str:
    """The variable a deployment keeps `user`'s password in: the nats-server reads it from its
    environment (`authorization_block_env`), the service as RELAYRL_NATS_PASSWORD."""
    return f"RELAYRL_NATS_PASSWORD_{user.upper()}"


_PLACEHOLDER = "@@password@@"


def authorization_block(passwords: dict[str, str]) -> str:
    """The nats-server `authorization { users = [...] }` block for `passwords` (user -> password).

    No `no_auth_user`: a connection without valid credentials is refused."""
    missing = [u for u in USERS if u not in passwords]
    if missing:
        raise ValueError(f"no password for NATS users {missing}")
    return _block({u: json.dumps(passwords[u]) for u in USERS})


def authorization_block_env() -> str:
    """The same block with each password a `$RELAYRL_NATS_PASSWORD_<USER>` reference, which
    nats-server resolves from its environment: deploy/nats/*.conf, filled from secrets."""
    return _block({u: f"${password_env(u)}" for u in USERS})


def _block(password_values: dict[str, str]) -> str:
    lines = ["authorization {", "  users = ["]
    for user in USERS:
        p = PERMISSIONS[user]
        perms: dict[str, object] = {"publish": {"allow": list(p.publish)}, "subscribe": {"allow": list(p.subscribe)}}
        if p.allow_responses:
            perms["allow_responses"] = True
        # JSON strings are valid nats-server config strings, and quoting keeps `$JS...` literal;
        # the password goes in as given (a quoted string, or an unquoted $VARIABLE reference).
        entry = {"user": user, "password": _PLACEHOLDER, "permissions": perms}
        lines.append("    " + json.dumps(entry).replace(json.dumps(_PLACEHOLDER), password_values[user]))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def user_env(user: str, password: str) -> dict[str, str]:
    """The environment a service needs to log in as `user` (see shared.config.ServiceSettings)."""
    return {"RELAYRL_NATS_USER": user, "RELAYRL_NATS_PASSWORD": password}
