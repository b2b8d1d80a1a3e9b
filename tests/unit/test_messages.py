import math

import msgpack
import pytest

from shared.messages import (
    DecodeError,
    Group,
    RolloutRequest,
    SamplingParams,
    TaskSpec,
    Trajectory,
    Transition,
    pack_f32,
    pack_i32,
    unpack_f32,
    unpack_i32,
)
from tests.support.factories import make_trajectory


def test_trajectory_roundtrip_keeps_packed_arrays():
    t = make_trajectory()
    back = Trajectory.decode(t.encode())
    assert back == t
    x = back.transitions[0]
    assert unpack_i32(x.response_ids).tolist() == [0, 1, 2, 3, 4]
    assert unpack_f32(x.response_logprobs).tolist() == [-0.25] * 5
    assert unpack_i32(x.response_versions).tolist() == [7] * 5
    # On the wire the arrays are MessagePack bin fields, not lists of numbers.
    raw = msgpack.unpackb(t.encode())
    assert isinstance(raw["transitions"][0]["response_ids"], bytes)


def test_packing_is_little_endian():
    assert pack_i32([1]) == b"\x01\x00\x00\x00"
    assert unpack_f32(pack_f32([1.5])).tolist() == [1.5]


def test_group_roundtrip():
    g = Group(run_id="r", group_id="t1", task_id="t1", trajectories=[make_trajectory("t1.0"), make_trajectory("t1.1")])
    assert Group.decode(g.encode()) == g


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xc1", "not MessagePack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"rollout_id": "x"}), "run_id: Field required"),
        (msgpack.packb({**make_trajectory().model_dump(), "schema_version": 99}), "schema_version 99"),
        (msgpack.packb({**make_trajectory().model_dump(), "surprise": 1}), "Extra inputs"),
        (msgpack.packb({**make_trajectory().model_dump(), "status": "great"}), "status"),
    ],
)
def test_decode_rejects_with_reason(payload, reason):
    with pytest.raises(DecodeError, match=reason):
        Trajectory.decode(payload)


def test_misaligned_transition_is_rejected():
    with pytest.raises(ValueError, match="equal length"):
        Transition(response_ids=pack_i32([1, 2]), response_logprobs=pack_f32([0.0]), response_versions=pack_i32([0, 0]))
    with pytest.raises(ValueError, match="multiple of 4"):
        Transition(prompt_ids=b"abc")


def test_rollout_requests_for_a_task():
    task = TaskSpec(task_id="abc", run_id="r1", agent="copy", input={"text": "hi"}, group_size=3,
                    sampling=SamplingParams(temperature=0.7))
    reqs = [RolloutRequest.for_task(task, i) for i in range(3)]
    assert [r.rollout_id for r in reqs] == ["abc.0", "abc.1", "abc.2"]
    assert all(r.group_id == "abc" and r.group_size == 3 and math.isclose(r.sampling.temperature, 0.7) for r in reqs)
    assert RolloutRequest.decode(reqs[0].encode()) == reqs[0]


def test_transition_token_counts_are_tokens_not_bytes():
    t = make_trajectory(n_tokens=5).transitions[0]
    assert t.num_prompt_tokens == 3 and t.num_response_tokens == 5
    assert len(t.response_ids) == 20  # the packed field itself is bytes


def test_rewards_recorded_before_source_replaced_event_still_decode():
    """A trajectory published by the previous version (still in a stream during an upgrade)."""
    t = make_trajectory()
    old = {k: v for k, v in t.model_dump().items() if k not in ("events", "eval", "eval_version")}
    old["rewards"] = [{"value": 0.3, "transition": 0, "event": "tool_success"}, {"value": 0.1, "transition": None,
                                                                                   "event": None}]
    back = Trajectory.decode(msgpack.packb(old, use_bin_type=True))
    assert [(r.value, r.source) for r in back.rewards] == [(0.3, "tool_success"), (0.1, None)]
