from __future__ import annotations

import re

from fastapi import APIRouter, Depends, HTTPException

from shared.messages import GetById
from services.gateway.deps import StoreClient, get_store
from services.gateway.schemas import ErrorOut, RolloutOut

router = APIRouter(prefix="/v1", tags=["rollouts"])


@router.get("/rollouts/{rollout_id}", responses={404: {"model": ErrorOut}})
async def get_rollout(rollout_id: str, store: StoreClient = Depends(get_store)) -> RolloutOut:
    """One trajectory with its transitions; token ids, logprobs and versions as JSON lists, and
    per transition whether its run trains that role (`trained_roles`)."""
    reply = await store.call("get_rollout", GetById(id=rollout_id))
    assert reply.trajectory is not None
    return RolloutOut.from_trajectory(reply.trajectory, await _trained_roles(store, reply.trajectory.run_id))


async def _trained_roles(store: StoreClient, run_id: str) -> re.Pattern[str] | None:
    try:
        run = (await store.call("get_run", GetById(id=run_id))).run
    except HTTPException as exc:
        if exc.status_code == 404:  # tasks submitted without a run: no run config says what is trained
            return None
        raise
    return re.compile(run.config.trained_roles) if run is not None else None
