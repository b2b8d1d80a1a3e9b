"""Rollouts: one stored trajectory, with what its run trains."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends

from shared.faults import NotFound
from shared.store_api import StoreClient
from services.gateway.deps import CurrentKey, authorize, get_store
from services.gateway.schemas import AUTH_ERRORS, ErrorOut, RolloutOut

router = APIRouter(prefix="/v1", tags=["rollouts"], dependencies=[Depends(authorize)])


@router.get("/rollouts/{rollout_id}", responses={404: {"model": ErrorOut}, 503: {"model": ErrorOut}, **AUTH_ERRORS})
async def get_rollout(rollout_id: str, key: CurrentKey, store: StoreClient = Depends(get_store)) -> RolloutOut:
    """One trajectory with its transitions; token ids, logprobs and versions as JSON lists, and
    per transition whether its run trains that role (`trained_roles`)."""
    trajectory = await store.get_rollout(rollout_id, key.project)
    return RolloutOut.from_trajectory(trajectory, await _trained_roles(store, trajectory.run_id))


async def _trained_roles(store: StoreClient, run_id: str) -> re.Pattern[str] | None:
    try:
        run = await store.get_run(run_id)
    except NotFound:  # tasks submitted without a run: no run config says what is trained
        return None
    return re.compile(run.config.trained_roles)
