from __future__ import annotations

from fastapi import APIRouter, Depends

from shared.messages import GetById
from services.gateway.deps import StoreClient, get_store
from services.gateway.schemas import ErrorOut, RolloutOut

router = APIRouter(prefix="/v1", tags=["rollouts"])


@router.get("/rollouts/{rollout_id}", responses={404: {"model": ErrorOut}})
async def get_rollout(rollout_id: str, store: StoreClient = Depends(get_store)) -> RolloutOut:
    """One trajectory with its transitions; token ids, logprobs and versions as JSON lists."""
    reply = await store.call("get_rollout", GetById(id=rollout_id))
    assert reply.trajectory is not None
    return RolloutOut.from_trajectory(reply.trajectory)
