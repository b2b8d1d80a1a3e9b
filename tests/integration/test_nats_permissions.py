"""NATS least privilege against a real nats-server configured from shared/nats_auth.py.

Each service's user can do what its code does (publish its streams, consume its durables,
read and write its buckets) and nothing the table does not give it: a rollout worker cannot
publish groups or write the policy KV, inference cannot write weights, no service but the
admin creates topology, only the store serves store RPCs, and a connection without valid
credentials is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import nats
import nats.aio.msg
import nats.errors
import nats.js.errors
import pytest
from nats.js import api as js_api

from services.cli.nats_admin import keep_topology

from shared import nats_auth, subjects
from shared.bus import Bus, ConsumerSpec, CredentialsRefused, Delivery, PullConsumer, TopologyMissing
from shared.config import ServiceSettings
from shared.lease import Lease
from shared.messages import (
    AgentInfo, Group, Ping, PolicyVersion, RolloutRequest, StepMetrics, TaskSpec, TrainerProgress, Trajectory,
)  # fmt: skip
from shared.store_api import Pong, StoreClient
from shared.weights import WeightsError, prune_weights, put_weight_bytes, read_weights
from tests.support.factories import make_trajectory
from tests.support.nats_users import AuthNats
from tests.support.waiting import wait_until

# Failures a denied operation surfaces as: the server drops a denied request (JetStream API or
# publish-with-ack), so the caller times out; nats-py may also raise its own error, and the
# weights writer its WeightsError (a chunk without an ack).
DENIED = (TimeoutError, asyncio.TimeoutError, nats.errors.Error, ConnectionError, WeightsError)


async def messages_on(admin: Bus, stream: str, subject: str) -> int:
    info = await admin.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


def request(run: str = "r", i: int = 0) -> RolloutRequest:
    spec = TaskSpec(run_id=run, task_id=f"t{i}", agent="null", input={}, group_size=1)
    return RolloutRequest.for_task(spec, 0)


def policy(run: str) -> PolicyVersion:
    return PolicyVersion(run_id=run, version=1, object=subjects.weights_object(run, 1), sha256="0" * 64, size=1, step=1)


@contextlib.asynccontextmanager
async def consuming_tasks(rollout: Bus) -> AsyncIterator[list[str]]:
    """The rollout worker's durable on TASKS, consumed as the rollout user: the rollout ids seen."""
    seen: list[str] = []

    async def handle(batch: list[Delivery[RolloutRequest]]) -> None:
        seen.extend(d.value.rollout_id for d in batch)

    spec = ConsumerSpec(stream=subjects.STREAM_TASKS, durable=subjects.CONSUMER_ROLLOUT,
                        filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_TASKS])  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(PullConsumer(rollout, spec, RolloutRequest, handle, fetch_timeout_s=0.2).run(stop))
    try:
        yield seen
    finally:
        stop.set()
        await task



# --- refused ----------------------------------------------------------------------------------


async def test_a_connection_without_credentials_or_with_a_wrong_password_is_refused(auth_nats: AuthNats):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(auth_nats.url, allow_reconnect=False, connect_timeout=2)
    wrong = ServiceSettings(nats_url=auth_nats.url, nats_user="rollout", nats_password="not-the-password-at-all")
    with pytest.raises(CredentialsRefused, match="rollout"):
        await asyncio.wait_for(Bus.connect(wrong, "test"), 10)  # refused at once, not retried


async def test_rollout_cannot_publish_groups_or_write_the_policy_kv(auth_nats: AuthNats):
    admin = await auth_nats.bus(nats_auth.ADMIN, timeout_s=5)
    rollout = await auth_nats.bus("rollout")
    group = Group(run_id="victim", group_id="g", task_id="g", trajectories=[make_trajectory()])
    with pytest.raises(DENIED):
        await rollout.publish(subjects.groups("victim"), group, "group:g")
    with pytest.raises(DENIED):
        await rollout.publish(subjects.groups("victim", replay=True), group, "replay:g")
    with pytest.raises(DENIED):  # it does not even read the policy KV
        await rollout.kv_value(subjects.KV_POLICY, subjects.policy_key("victim"))
    raw = await auth_nats.raw("rollout")
    await raw.nc.publish(f"$KV.{subjects.KV_POLICY}.{subjects.policy_key('victim')}", policy("victim").encode())
    await raw.nc.publish(f"$O.{subjects.OBJ_WEIGHTS}.M.x", b"{}")
    await raw.nc.flush()
    await wait_until(lambda: len(raw.violations()) >= 2, timeout_s=5)
    assert await messages_on(admin, subjects.STREAM_GROUPS, subjects.STREAM_SUBJECTS[subjects.STREAM_GROUPS]) == 0
    assert await admin.kv_value(subjects.KV_POLICY, subjects.policy_key("victim")) is None
    # Its own stream and its own DLQ subject it can publish to; another stream's DLQ it cannot.
    await rollout.publish(subjects.trajectories("r"), make_trajectory(), "t1.0:1")
    with pytest.raises(DENIED):
        await rollout.publish(subjects.dlq(subjects.STREAM_GROUPS), make_trajectory(), "x")


async def test_inference_cannot_write_weights_or_the_policy(auth_nats: AuthNats):
    admin = await auth_nats.bus(nats_auth.ADMIN, timeout_s=5)
    inference = await auth_nats.bus("inference")
    with pytest.raises(DENIED):
        await put_weight_bytes(inference, "victim", 1, b"forged weights" * 10)
    kv = await inference.kv(subjects.KV_POLICY)  # reading is allowed: it follows the policy
    with pytest.raises(DENIED):
        await kv.put(subjects.policy_key("victim"), policy("victim").encode())
    assert await admin.kv_value(subjects.KV_POLICY, subjects.policy_key("victim")) is None
    info = await admin.js.stream_info(f"OBJ_{subjects.OBJ_WEIGHTS}")
    assert info.state.messages == 0


async def test_no_service_creates_or_deletes_topology(auth_nats: AuthNats):
    admin = await auth_nats.bus(nats_auth.ADMIN, timeout_s=5)
    before = {s.config.name for s in await admin.js.streams_info()}
    for user in nats_auth.SERVICES:
        bus = await auth_nats.bus(user)
        assert not bus.creates_topology
        with pytest.raises(DENIED):
            await bus.js.add_stream(js_api.StreamConfig(name=f"EVIL_{user}", subjects=[f"evil.{user}.>"]))
        with pytest.raises(DENIED):
            await bus.js.delete_stream(subjects.STREAM_TRAJECTORIES)
        with pytest.raises(DENIED):  # nor a consumer on another service's stream
            await bus.js.add_consumer(subjects.STREAM_TRAJECTORIES, js_api.ConsumerConfig(durable_name="thief"))
        await bus.bind_topology(timeout_s=5)  # binding is all it does, and it can
    assert {s.config.name for s in await admin.js.streams_info()} == before
    assert subjects.STREAM_TRAJECTORIES in before


async def test_only_the_store_serves_store_rpcs_and_the_trainer_calls_only_its_own(auth_nats: AuthNats):
    store_bus = await auth_nats.bus("store", timeout_s=5)

    async def pong(_: Ping) -> Pong:
        return Pong()

    await store_bus.serve(subjects.store_rpc("ping"), subjects.STORE_RPC_QUEUE, Ping, pong)
    gateway = await auth_nats.bus("gateway", timeout_s=5)
    await StoreClient(gateway, 5).ping()  # the gateway may call every store RPC
    thief = await auth_nats.raw("rollout")
    await thief.nc.subscribe(subjects.store_rpc(">"), queue=subjects.STORE_RPC_QUEUE)
    await thief.nc.flush()
    await wait_until(lambda: any("subscription" in v for v in thief.violations()), timeout_s=5)
    for user in ("rollout", "inference", "trainer"):  # ping is not among the trainer's RPCs
        bus = await auth_nats.bus(user)
        with pytest.raises(DENIED):
            await bus.request(subjects.store_rpc("ping"), Ping(), Pong, timeout=1.0)
    assert "set_run_state" in nats_auth.TRAINER_RPCS and "put_run" not in nats_auth.TRAINER_RPCS


async def test_no_service_reads_replies_addressed_to_another(auth_nats: AuthNats):
    store_bus = await auth_nats.bus("store", timeout_s=5)

    async def pong(_: Ping) -> Pong:
        return Pong()

    await store_bus.serve(subjects.store_rpc("ping"), subjects.STORE_RPC_QUEUE, Ping, pong)
    gateway = await auth_nats.bus("gateway", timeout_s=5)
    assert gateway.nc._inbox_prefix.decode() == nats_auth.inbox_prefix("gateway")
    snoop = await auth_nats.raw("rollout")
    got: list[bytes] = []

    async def keep(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.data)

    for subject in ("_INBOX.>", f"{nats_auth.inbox_prefix('gateway')}.>", ">"):
        await snoop.nc.subscribe(subject, cb=keep)
    await snoop.nc.flush()
    await wait_until(lambda: sum("subscription" in v for v in snoop.violations()) == 3, timeout_s=5)
    await StoreClient(gateway, 5).ping()  # answered on the gateway's own prefix, seen by nobody else
    await asyncio.sleep(0.2)
    assert got == []


# --- allowed: what each service's code does ----------------------------------------------------


async def test_gateway_publishes_tasks_purges_them_paces_and_reads_progress(auth_nats: AuthNats):
    admin = await auth_nats.bus(nats_auth.ADMIN, timeout_s=5)
    gateway = await auth_nats.bus("gateway", timeout_s=5)
    await gateway.publish_many([(subjects.tasks("r"), request("r", i), f"r-{i}") for i in range(3)])
    assert await messages_on(admin, subjects.STREAM_TASKS, subjects.tasks("r")) == 3
    await gateway.js.purge_stream(subjects.STREAM_TASKS, subject=subjects.tasks("r"))
    assert await messages_on(admin, subjects.STREAM_TASKS, subjects.tasks("r")) == 0
    lease = await Lease.open(gateway, "pace", "r", "gw-1")
    assert await lease.acquire()
    await lease.release()
    with pytest.raises(DENIED):  # the trainer's lease is not the gateway's
        await (await Lease.open(gateway, "train", "r", "gw-1")).acquire()
    progress = TrainerProgress(run_id="r", step=1, version=1)
    await (await admin.kv(subjects.KV_POLICY)).put(subjects.progress_key("r"), progress.encode())
    assert await gateway.kv_value(subjects.KV_POLICY, subjects.progress_key("r")) == progress.encode()
    agents = await admin.kv(subjects.KV_AGENTS)
    await agents.put("null", AgentInfo(name="null", worker_id="w").encode())
    assert await asyncio.wait_for((await gateway.kv(subjects.KV_AGENTS)).keys(), 5) == ["null"]


async def test_rollout_consumes_its_durable_registers_agents_and_dead_letters_tasks(auth_nats: AuthNats):
    gateway = await auth_nats.bus("gateway", timeout_s=5)
    rollout = await auth_nats.bus("rollout", timeout_s=5)
    admin = await auth_nats.bus(nats_auth.ADMIN, timeout_s=5)
    await gateway.publish(subjects.tasks("r"), request("r"), "r-0")
    await admin.js.publish(subjects.tasks("r"), b"\xc1 not msgpack")
    async with consuming_tasks(rollout) as seen:
        await wait_until(lambda: len(seen) == 1, timeout_s=10)
        await wait_until(lambda: messages_on(admin, subjects.STREAM_DLQ, subjects.dlq(subjects.STREAM_TASKS)), timeout_s=10)
        await wait_until(lambda: messages_on(admin, subjects.STREAM_TASKS, subjects.tasks("r")), expect=0, timeout_s=10)
    await (await rollout.kv(subjects.KV_AGENTS)).put("null", AgentInfo(name="null", worker_id="w").encode())
    await rollout.publish(subjects.trajectories("r"), make_trajectory(), "t1.0:1")


async def test_store_consumes_trajectories_publishes_groups_and_cleans_up_a_run(auth_nats: AuthNats):
    admin = await auth_nats.bus(nats_auth.ADMIN, timeout_s=5)
    store_bus = await auth_nats.bus("store", timeout_s=5)
    rollout = await auth_nats.bus("rollout", timeout_s=5)
    await rollout.publish(subjects.trajectories("r"), make_trajectory(), "t1.0:1")
    got: list[Trajectory] = []

    async def handle(batch: list[Delivery[Trajectory]]) -> None:
        got.extend(d.value for d in batch)

    spec = ConsumerSpec(stream=subjects.STREAM_TRAJECTORIES, durable=subjects.CONSUMER_STORE_TRAJECTORIES,
                        filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_TRAJECTORIES])  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(PullConsumer(store_bus, spec, Trajectory, handle, fetch_timeout_s=0.2).run(stop))
    try:
        await wait_until(lambda: len(got) == 1, timeout_s=10)
    finally:
        stop.set()
        await task
    group = Group(run_id="r", group_id="g", task_id="g", trajectories=got)
    await store_bus.publish(subjects.groups("r"), group, "group:g")
    # Cleanup of an ended run (services/store/cleanup.py): trainer durables, purges, KV keys.
    await admin.js.add_consumer(subjects.STREAM_GROUPS, js_api.ConsumerConfig(
        durable_name=subjects.trainer_durable("r"), filter_subject=subjects.groups("r")))  # fmt: skip
    await store_bus.js.delete_consumer(subjects.STREAM_GROUPS, subjects.trainer_durable("r"))
    await store_bus.js.purge_stream(subjects.STREAM_GROUPS, subject=subjects.groups("r"))
    assert await messages_on(admin, subjects.STREAM_GROUPS, subjects.groups("r")) == 0
    await (await admin.kv(subjects.KV_POLICY)).put(subjects.progress_key("r"), b"p")
    await store_bus.kv_purge(subjects.KV_POLICY, subjects.progress_key("r"))
    assert await admin.kv_value(subjects.KV_POLICY, subjects.progress_key("r")) is None
    with pytest.raises(DENIED):  # it stores groups; it never writes a policy
        await (await store_bus.kv(subjects.KV_POLICY)).put(subjects.policy_key("r"), policy("r").encode())
    # It prunes an ended run's weights (purges only) and cannot write any.
    trainer = await auth_nats.bus("trainer", timeout_s=5)
    for version in (1, 2):
        await put_weight_bytes(trainer, "r", version, b"w%d" % version * 100)
    assert await prune_weights(store_bus, "r", keep=1) == [subjects.weights_object("r", 1)]
    objects = await admin.object_store(subjects.OBJ_WEIGHTS)
    with pytest.raises(nats.js.errors.NotFoundError):
        await objects.get_info(subjects.weights_object("r", 1), show_deleted=True)
    assert (await objects.get_info(subjects.weights_object("r", 2))).size == 200
    with pytest.raises(DENIED):
        await put_weight_bytes(store_bus, "r", 3, b"forged")


async def test_trainer_consumes_its_run_publishes_weights_and_inference_reads_them(auth_nats: AuthNats):
    store_bus = await auth_nats.bus("store", timeout_s=5)
    trainer = await auth_nats.bus("trainer", timeout_s=5)
    inference = await auth_nats.bus("inference", timeout_s=5)
    group = Group(run_id="r", group_id="g", task_id="g", trajectories=[make_trajectory()])
    await store_bus.publish(subjects.groups("r"), group, "group:g")
    spec = ConsumerSpec(stream=subjects.STREAM_GROUPS, durable=subjects.trainer_durable("r"),
                        filter_subject=subjects.groups("r"))  # fmt: skip
    got: list[str] = []

    async def handle(batch: list[Delivery[Group]]) -> None:
        got.extend(d.value.group_id for d in batch)

    stop = asyncio.Event()
    task = asyncio.create_task(PullConsumer(trainer, spec, Group, handle, fetch_timeout_s=0.2).run(stop))
    try:
        await wait_until(lambda: got == ["g"], timeout_s=10)
    finally:
        stop.set()
        await task
    await trainer.publish(subjects.metrics("r"), StepMetrics(run_id="r", step=1, version=1, group_ids=["g"]), "m:r:1")
    lease = await Lease.open(trainer, "train", "r", "trainer-1")
    assert await lease.acquire()
    data = b"weights!" * 1000
    stored = await put_weight_bytes(trainer, "r", 1, data)
    pv = PolicyVersion(run_id="r", version=1, object=stored.name, sha256=stored.sha256, size=stored.size, step=1)
    await (await trainer.kv(subjects.KV_POLICY)).put(subjects.policy_key("r"), pv.encode())
    # Inference follows: watches the policy KV, reads the object, advertises itself.
    watch = await (await inference.kv(subjects.KV_POLICY)).watch(subjects.policy_key("r"))
    entry = await asyncio.wait_for(watch.updates(timeout=5), 10)
    await watch.stop()
    assert entry is not None and PolicyVersion.decode(entry.value) == pv
    assert await read_weights(inference, pv) == data
    await (await inference.kv(subjects.KV_LEASES)).put(subjects.lease_key("inference", "replica-1"), b"{}")
    with pytest.raises(DENIED):  # a trainer's lease is not inference's to take
        await (await inference.kv(subjects.KV_LEASES)).put(subjects.lease_key("train", "r"), b"x")


def test_the_table_covers_every_user_and_only_the_admin_has_everything() -> None:
    assert set(nats_auth.PERMISSIONS) == set(nats_auth.USERS)
    for user in nats_auth.SERVICES:
        p = nats_auth.PERMISSIONS[user]
        assert ">" not in p.publish and ">" not in p.subscribe, user
        assert not any(s.startswith("$JS.API.STREAM.CREATE") or s.startswith("$JS.API.STREAM.DELETE") for s in p.publish)
    block = nats_auth.authorization_block(nats_auth.generate_passwords())
    assert block.count('"user"') == len(nats_auth.USERS) and "no_auth_user" not in block


# --- the admin step ---------------------------------------------------------------------------


def test_relayrl_init_makes_the_topology_once_and_refuses_a_wrong_password(tmp_path: Path) -> None:
    server = asyncio.run(AuthNats(store_dir=tmp_path / "nats").start(init=False))
    try:
        async def bind_as_store() -> None:
            bus = await Bus.connect(server.settings("store"), "test-store")
            try:
                await bus.bind_topology(timeout_s=1.0)
            finally:
                await bus.close()

        with pytest.raises(TopologyMissing, match="relayrl init"):  # services wait for it, bounded
            asyncio.run(bind_as_store())
        def init(user: str, password: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "services.cli", "init", "--nats-url", server.url, "--user", user,
                    "--state-dir", str(tmp_path / "none"), "--timeout-s", "5"]  # fmt: skip
            env = {**os.environ, "RELAYRL_NATS_PASSWORD": password, "RELAYRL_REQUEST_TIMEOUT_S": "1"}
            return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)

        admin_password = server.passwords[nats_auth.ADMIN]
        as_service = init("store", server.passwords["store"])  # a service user cannot do the admin step
        assert as_service.returncode == 1 and "relayrl init failed" in as_service.stderr, as_service.stderr
        first = init(nats_auth.ADMIN, admin_password)
        assert first.returncode == 0 and "created TASKS" in first.stdout and "OBJ_relayrl-weights" in first.stdout, first
        again = init(nats_auth.ADMIN, admin_password)
        assert again.returncode == 0 and "nothing to create" in again.stdout, again
        asyncio.run(bind_as_store())  # now it binds at once
        wrong = init(nats_auth.ADMIN, "not-the-admin-password")
        assert wrong.returncode == 1 and "refused user 'admin'" in wrong.stderr, wrong.stderr
    finally:
        asyncio.run(server.stop())


async def test_services_wait_for_a_server_that_lost_its_store_until_the_admin_step_remakes_it(auth_nats: AuthNats):
    gateway = await auth_nats.bus("gateway", timeout_s=2)
    rollout = await auth_nats.bus("rollout", timeout_s=2)
    admin_stop = asyncio.Event()
    admin: asyncio.Task[None] | None = None
    async with consuming_tasks(rollout) as seen:
        try:
            await gateway.publish(subjects.tasks("r"), request("r", 0), "r-0")
            await wait_until(lambda: len(seen) == 1, timeout_s=10)
            auth_nats.restart_empty()

            async def missing() -> list[str] | None:
                try:
                    return await gateway.missing_topology()
                except DENIED:  # JetStream still starting
                    return None

            assert await wait_until(missing, timeout_s=15)  # gone, and the services cannot make it
            await asyncio.sleep(2.0)  # the worker's consumer keeps trying meanwhile
            assert await missing()
            admin = asyncio.create_task(keep_topology(auth_nats.settings(nats_auth.ADMIN, 5), 0.5, admin_stop))
            await wait_until(missing, expect=[], timeout_s=15)

            async def published() -> bool:
                try:
                    await gateway.publish(subjects.tasks("r"), request("r", 1), "r-1")
                    return True
                except DENIED:
                    return False

            await wait_until(published, timeout_s=15)
            await wait_until(lambda: len(seen) == 2, timeout_s=20)  # the worker's consumer came back on its own
        finally:
            admin_stop.set()
            if admin is not None:
                await admin
