"""`python -m services.trainer [--run-id RUN]`: GRPO training of runs, one at a time."""

from __future__ import annotations

import asyncio
import sys

from shared import telemetry
from shared.bus import Bus, install_signal_handlers, wait_for_stop
from shared.config import ConfigError, load, require_secret, run_service
from shared.health import heartbeat
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings


async def main(settings: TrainerSettings) -> None:
    log = telemetry.setup("trainer", settings)
    try:  # at start, not at the first publish: a trainer that cannot sign must not take a run
        require_secret(settings.weights_key, "weights_key", "the key that signs published weights")
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    bus = await Bus.connect(settings, "trainer")
    await bus.bind_topology()
    log.info("trainer ready", trainer_id=settings.trainer_id, run_id=settings.run_id, device=settings.device)
    try:
        beats = [heartbeat(settings.heartbeat_file, stop)] if settings.heartbeat_file else []
        await wait_for_stop(stop, Trainer(bus, settings).run(stop), *beats)
    finally:
        await bus.close()
        log.info("trainer stopped")


if __name__ == "__main__":
    run_service(main(load(TrainerSettings, sys.argv[1:])))
