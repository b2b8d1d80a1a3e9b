"""A synthetic agent that calls no model: it fabricates a trajectory of a requested size.

Used by benchmarks to measure the pipeline itself. Input: `size_bytes` (approximate packed
token payload, default 1024), `transitions` (default 1), `sleep_s` (simulated agent work,
default 0: lets tests kill a worker mid-task).
"""

from __future__ import annotations

import asyncio
import zlib

import numpy as np

from shared.messages import Transition, pack_f32, pack_i32
from services.rollout.context import AgentContext
from services.rollout.registry import agent

_BYTES_PER_RESPONSE_TOKEN = 12  # int32 id + float32 logprob + int32 version


@agent("null", description="synthetic trajectory of a given size; calls no model (benchmarks)")
async def null_agent(ctx: AgentContext) -> float:
    size = int(ctx.input.get("size_bytes", 1024))
    count = max(1, int(ctx.input.get("transitions", 1)))
    if sleep_s := float(ctx.input.get("sleep_s", 0)):
        await asyncio.sleep(sleep_s)
    seed = zlib.crc32(ctx.request.rollout_id.encode())
    per_transition = max(1, size // count)
    prompt_len = max(1, per_transition // 4 // 4)  # a quarter of the bytes are prompt ids
    response_len = max(1, (per_transition - 4 * prompt_len) // _BYTES_PER_RESPONSE_TOKEN)
    for _ in range(count):
        ctx.record(
            Transition(
                prompt_ids=pack_i32(np.arange(prompt_len) % 500),
                response_ids=pack_i32(np.arange(response_len) % 500),
                response_logprobs=pack_f32(np.full(response_len, -1.0)),
                response_versions=pack_i32(np.zeros(response_len)),
                finish_reason="stop",
            )
        )
    return (seed % 1000) / 1000.0
