"""Reading what a test's services left on a stream."""

from __future__ import annotations

from shared import subjects
from shared.bus import Bus
from shared.messages import DeadLetter


async def dead_letters(bus: Bus) -> list[DeadLetter]:
    """Every dead letter on DLQ so far (up to 100), oldest first; [] when there is none."""
    sub = await bus.js.pull_subscribe(subjects.STREAM_SUBJECTS[subjects.STREAM_DLQ], stream=subjects.STREAM_DLQ)
    try:
        msgs = await sub.fetch(100, timeout=1)
    except Exception:  # nats-py's fetch timeout: nothing there
        return []
    finally:
        await sub.unsubscribe()
    return [DeadLetter.decode(m.data) for m in msgs]
