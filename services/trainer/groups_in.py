"""Groups as they arrive on GROUPS, whole or by reference, made whole.

The store publishes a complete group as one `Group` message when it fits the server's
max_payload, and otherwise a small `GroupRef` (see services/store/service.py for the limit).
`resolve_group` returns the full `Group` either way: for a reference it asks the store for the
members in pages (`get_group_members`, each reply under max_payload) and checks it got them all.

Errors by type: `DecodeError` (neither a Group nor a GroupRef) and `NotFound` (the store does
not have the group, or not all of it) are permanent: dead-letter the message.
`StoreUnavailable` is transient (no store answered, its database is down): nak the message
and try again later; nothing durable changed.
"""

from __future__ import annotations

import nats.errors

from shared import subjects
from shared.bus import Bus
from shared.faults import NotFound, StoreError, StoreUnavailable
from shared.messages import DecodeError, Failure, GetGroupMembers, Group, GroupMembers, GroupRef, decode_group

# The store method that serves a referenced group's members, one page per call.
GET_GROUP_MEMBERS = "get_group_members"


async def resolve_group(bus: Bus, data: bytes, timeout_s: float | None = None) -> Group:
    """The whole group a GROUPS message carries, fetching its members when it is a reference."""
    msg = decode_group(data)
    if isinstance(msg, Group):
        return msg
    return await fetch_group(bus, msg, timeout_s)


async def fetch_group(bus: Bus, ref: GroupRef, timeout_s: float | None = None) -> Group:
    """Every member of a referenced group, page by page, in sample order."""
    members = []
    after = -1
    # Bounded: each page holds at least one member, so `size` pages (+1 for the last `more`) suffice.
    for _ in range(ref.size + 1):
        page = await _page(bus, ref.group_id, after, timeout_s)
        members.extend(page.trajectories)
        if not page.more or not page.trajectories:
            break
        after = page.trajectories[-1].sample_index
    if len(members) != ref.size:
        raise NotFound(f"group {ref.group_id!r}: the store has {len(members)} of its {ref.size} members")
    return Group(
        run_id=ref.run_id, group_id=ref.group_id, task_id=ref.task_id, trajectories=members, completed_at=ref.completed_at
    )


async def _page(bus: Bus, group_id: str, after_index: int, timeout_s: float | None) -> GroupMembers:
    subject = subjects.store_rpc(GET_GROUP_MEMBERS)
    try:
        reply = await bus.request(subject, GetGroupMembers(group_id=group_id, after_index=after_index), GroupMembers,
                                  timeout=timeout_s)
    except TimeoutError as exc:
        raise StoreUnavailable(f"store {GET_GROUP_MEMBERS}: {exc}") from None
    except nats.errors.Error as exc:  # connection closed or reconnecting
        raise StoreUnavailable(f"store {GET_GROUP_MEMBERS}: {type(exc).__name__}: {exc}") from None
    except DecodeError as exc:  # a store of another version: retrying does not help
        raise StoreError(f"store {GET_GROUP_MEMBERS}: undecodable reply: {exc}") from None
    if isinstance(reply, Failure):
        if reply.transient or reply.code in (502, 503, 504):
            raise StoreUnavailable(f"store {GET_GROUP_MEMBERS}: {reply.error}")
        if reply.code == 404:
            raise NotFound(reply.error)
        raise StoreError(f"store {GET_GROUP_MEMBERS}: {reply.error}")
    return reply
