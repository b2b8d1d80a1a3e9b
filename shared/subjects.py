"""Every NATS subject, stream, consumer and bucket name relayrl uses, in one place."""

from __future__ import annotations

import re

PREFIX = "relayrl"

# Streams (JetStream, file storage) and the subjects they capture.
STREAM_TASKS = "TASKS"
STREAM_TRAJECTORIES = "TRAJECTORIES"
STREAM_GROUPS = "GROUPS"
STREAM_METRICS = "METRICS"
STREAM_DLQ = "DLQ"

STREAM_SUBJECTS: dict[str, str] = {
    STREAM_TASKS: f"{PREFIX}.tasks.>",
    STREAM_TRAJECTORIES: f"{PREFIX}.trajectories.>",
    STREAM_GROUPS: f"{PREFIX}.groups.>",
    STREAM_METRICS: f"{PREFIX}.metrics.>",
    STREAM_DLQ: f"{PREFIX}.dlq.>",
}

# Durable consumers.
CONSUMER_ROLLOUT = "rollout"  # TASKS: one shared durable, replicas compete
CONSUMER_STORE_TRAJECTORIES = "store-trajectories"
CONSUMER_STORE_DLQ = "store-dlq"
CONSUMER_STORE_METRICS = "store-metrics"

# Key-value and object buckets.
KV_POLICY = "relayrl-policy"
KV_AGENTS = "relayrl-agents"  # agent name -> AgentInfo, written by rollout workers
OBJ_WEIGHTS = "relayrl-weights"
KV_LEASES = "relayrl-leases"  # "<role>.<run>" -> holder id; entries expire unless renewed
LEASE_TTL_S = 10.0

# Core NATS request/reply (not JetStream): the store's query API; queue group so replicas share.
STORE_RPC_QUEUE = "store"
STORE_RPC_PREFIX = f"{PREFIX}.rpc.store"

# Runs named in subjects must be one subject token.
DEFAULT_RUN = "default"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str) -> str:
    """Return `value` if it can be one subject token (run ids end up in subjects)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} must match {_TOKEN.pattern} (letters, digits, '_' and '-')")
    return value


def tasks(run: str, eval: bool = False) -> str:
    """Rollout requests of a run; evaluation requests on their own subject so finishing a run
    can drop its queued training requests and keep the evaluations."""
    return f"{PREFIX}.tasks.{check_token(run)}" + (".eval" if eval else "")


def trajectories(run: str) -> str:
    return f"{PREFIX}.trajectories.{check_token(run)}"


def groups(run: str, replay: bool = False) -> str:
    return f"{PREFIX}.groups.{check_token(run)}" + (".replay" if replay else "")


def metrics(run: str) -> str:
    return f"{PREFIX}.metrics.{check_token(run)}"


def dlq(stream: str) -> str:
    return f"{PREFIX}.dlq.{stream.lower()}"


def store_rpc(method: str) -> str:
    return f"{STORE_RPC_PREFIX}.{method}"


def trainer_durable(run: str, replay: bool = False) -> str:
    """The trainer's durable on GROUPS for one run: one trainer per run consumes it."""
    return f"trainer-{check_token(run)}" + ("-replay" if replay else "")


def policy_key(run: str) -> str:
    """KV `relayrl-policy` key holding the run's latest PolicyVersion."""
    return check_token(run)


def progress_key(run: str) -> str:
    """KV `relayrl-policy` key holding the run's TrainerProgress."""
    return f"{check_token(run)}.progress"


def weights_object(run: str, version: int) -> str:
    """Object-store name of one weight version."""
    return f"{check_token(run)}/{version}"


def lease_key(role: str, run: str) -> str:
    return f"{role}.{check_token(run)}"

