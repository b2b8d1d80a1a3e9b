"""The store service in the test's event loop (stoppable and restartable like a process), and
reading back the groups it published."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from shared.bus import Bus
from shared.messages import RunConfig
from services.store.db import create_engine, create_schema
from services.store.runs import RunRepository
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

    async def put_run(self, run_id: str = "r", rows: int = 1) -> None:
        """Make `run_id` a running training run: only such a run's complete groups go on GROUPS."""
        await create_schema(self.engine)
        config = RunConfig(run_id=run_id, agent="copy", dataset=[{"text": str(i)} for i in range(rows)])
        await RunRepository(self.engine).put_run(config, rows)

    async def count(self, table=RolloutRow) -> int:
        async with self.store.repo.sessions() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())
