"""The trainer service as a real process (`python -m services.trainer --run-id ...`), for tests
that kill and restart it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path


class TrainerProcess:
    def __init__(self, nats_url: str, tmp: Path, run_id: str, *extra: str) -> None:
        self.log = tmp / f"trainer-{run_id}.log"
        args = [
            sys.executable, "-m", "services.trainer", "--run-id", run_id, "--exit-when-done", "--device", "cpu",
            "--model-dir", str(tmp / "models"), "--checkpoint-dir", str(tmp / "checkpoints"),
            "--ack-wait-s", "2", "--poll-s", "0.2", "--log-format", "console", *extra,
        ]  # fmt: skip
        env = {**os.environ, "NATS_URL": nats_url, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait, 10)

    async def wait(self, timeout_s: float) -> int:
        """Wait off the event loop: the store under test runs in this loop."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"trainer did not finish in {timeout_s}s:\n{self.log.read_text()[-3000:]}") from None
