"""Ids scoped to their run: which task ids are the gateway's own, and each project's bucket
for tasks submitted without a run.

Run pacing names a run's tasks `<run>-e<epoch>-r<row>` (pacing.task_id) and its evaluations
`<run>-eval-v<version>-r<index>-<digest>` (evals.eval_task_id). A user's task under such an
id would be taken for the pacer's (the store keeps the first task of an id, and its group is
then "published"), so the run would never get that row: those formats are refused on
`POST /v1/tasks` (422) and only the gateway itself makes them.
"""

from __future__ import annotations

import re

from shared import subjects
from shared.apikeys import DEFAULT_PROJECT

_RESERVED = (
    re.compile(r"-e\d+-r\d+$"),  # pacing.task_id
    re.compile(r"-eval-v\d+-r\d+-[0-9a-f]+$"),  # evals.eval_task_id
)


def is_reserved(task_id: str) -> bool:
    """Whether `task_id` has the form of a task the gateway makes for a run."""
    return any(p.search(task_id) for p in _RESERVED)


def adhoc_run(project: str) -> str:
    """Where a project's tasks go when they name no run: `default` for the default project
    (as before tenancy), `default-<project>` for another (run ids are global)."""
    return subjects.DEFAULT_RUN if project == DEFAULT_PROJECT else f"{subjects.DEFAULT_RUN}-{project}"


def is_other_adhoc_run(run_id: str, project: str) -> bool:
    """Whether `run_id` is, or could become, another project's ad-hoc bucket (not creatable as a run)."""
    mine = adhoc_run(project)
    return run_id != mine and (run_id == subjects.DEFAULT_RUN or run_id.startswith(f"{subjects.DEFAULT_RUN}-"))
