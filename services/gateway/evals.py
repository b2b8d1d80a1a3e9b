"""Evaluation tasks: a run's eval rows, decoded greedily against one policy version.

Each row becomes one task of group size 1 (greedy decoding makes more samples identical),
flagged `eval` so the store aggregates it per version and never sends it to a trainer. Its
requests carry `min_version`, so inference holds them until it serves that version.
Task ids are deterministic in (run, version, row index, row content): asking twice for the
same evaluation creates nothing twice, and other rows at the same version are new tasks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from shared.messages import RunConfig, TaskSpec


def eval_task_id(run_id: str, version: int, index: int, row: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{run_id}-eval-v{version}-r{index}-{digest}"


def eval_tasks(config: RunConfig, rows: list[dict[str, Any]], version: int) -> list[TaskSpec]:
    sampling = config.sampling.model_copy(update={"temperature": 0.0})
    return [
        TaskSpec(
            task_id=eval_task_id(config.run_id, version, i, row),
            run_id=config.run_id,
            agent=config.agent,
            input=row,
            group_size=1,
            sampling=sampling,
            timeout_s=config.timeout_s,
            eval=True,
        )
        for i, row in enumerate(rows)
    ]
