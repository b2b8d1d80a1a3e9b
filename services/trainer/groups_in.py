"""Groups as they arrive on GROUPS, whole or by reference, made whole.

The store publishes a complete group as one `Group` message when it fits the server's
max_payload, and otherwise a small `GroupRef` (see services/store/service.py for the limit).
`resolve_group` returns the full `Group` either way: for a reference it asks the store for the
members in pages (`get_group_members`, each reply under max_payload) and checks it got them all.

Errors by type (shared/faults.py): `DecodeError` (neither a Group nor a GroupRef), `NotFound`
(the store does not have the group, or not all of it) and other `StoreError`s are permanent:
dead-letter the message. `StoreUnavailable` is transient (no store answered, its database is
down): nak the message and try again later; nothing durable changed.

The limit: a group goes by reference when its packed size exceeds the server's max_payload
(8 MB in the embedded server and deploy/ configs) less 16 KB of header room. Measured: a
20-call trajectory at an 8k-token context packs to about 0.75 MB, so about 10 fit; a group
of 16 such rollouts is about 12 MB and goes by reference.
"""

from __future__ import annotations

from shared.bus import Bus
from shared.faults import NotFound
from shared.messages import Group, GroupRef, decode_group
from shared.store_api import StoreClient


async def resolve_group(bus: Bus, data: bytes, timeout_s: float | None = None) -> Group:
    """The whole group a GROUPS message carries, fetching its members when it is a reference."""
    msg = decode_group(data)
    if isinstance(msg, Group):
        return msg
    return await fetch_group(bus, msg, timeout_s)


async def fetch_group(bus: Bus, ref: GroupRef, timeout_s: float | None = None) -> Group:
    """Every member of a referenced group, page by page (`StoreClient.get_group_members`), in
    sample order; NotFound unless the store has exactly the `size` members the reference names."""
    members = await StoreClient(bus, timeout_s or bus.timeout).get_group_members(ref.group_id)
    if len(members) != ref.size:
        raise NotFound(f"group {ref.group_id!r}: the store has {len(members)} of its {ref.size} members")
    return Group(
        run_id=ref.run_id, group_id=ref.group_id, task_id=ref.task_id, trajectories=members, completed_at=ref.completed_at
    )
