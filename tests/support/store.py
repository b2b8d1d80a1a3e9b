"""The store service in the test's event loop (stoppable and restartable like a process), and
reading back the groups it published."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from shared import subjects
from shared.bus import Bus
from shared.messages import Group
from services.store.db import create_engine, create_schema
from services.store.service import Store
from services.store.settings import StoreSettings
from services.store.tables import RolloutRow


class RunningStore:
    """A store service running in this event loop, stoppable and restartable like a process."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.engine = create_engine(settings.database_url)

    async def start(self) -> "RunningStore":
        await create_schema(self.engine)
        self.bus = await Bus.connect(self.settings, "store")
        await self.bus.ensure_topology()
        self.store = Store(self.bus, self.engine, self.settings)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.store.run(self.stop_event))
        return self

    async def stop(self) -> None:
        self.stop_event.set()
        await self.task
        await self.bus.close()

    async def count(self, table=RolloutRow) -> int:
        async with self.store.repo.sessions() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())


async def published_groups(bus: Bus, subject: str = subjects.STREAM_SUBJECTS[subjects.STREAM_GROUPS]) -> list[Group]:
    """Every group on `subject` (default: all of GROUPS), in stream order."""
    sub = await bus.js.pull_subscribe(subject, stream=subjects.STREAM_GROUPS)
    out: list[Group] = []
    while True:
        try:
            msgs = await sub.fetch(256, timeout=0.5)
        except Exception:
            break
        out.extend(Group.decode(m.data) for m in msgs)
        for m in msgs:
            await m.ack()
    await sub.unsubscribe()
    return out
