"""The slot plan of :mod:`worker.amqp.lanes`: weighted, work-conserving, never over capacity."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.amqp.lanes import _LaneState, plan
from worker.settings import Lane

WEIGHTS = {"interactive": 4, "batch": 1}


def test_saturated_lanes_share_by_weight() -> None:
    assert plan(64, WEIGHTS, {"interactive": 10_000, "batch": 20_000}) == {
        "interactive": 51,
        "batch": 13,
    }


def test_an_empty_lane_lends_every_slot() -> None:
    assert plan(64, WEIGHTS, {"interactive": 0, "batch": 20_000}) == {"interactive": 0, "batch": 64}


def test_a_lane_wanting_less_than_its_share_gets_what_it_wants_and_lends_the_rest() -> None:
    assert plan(64, WEIGHTS, {"interactive": 12, "batch": 20_000}) == {
        "interactive": 12,
        "batch": 52,
    }


def test_slots_nobody_wants_are_spread_by_weight() -> None:
    assert plan(64, WEIGHTS, {"interactive": 0, "batch": 0}) == {"interactive": 51, "batch": 13}
    assert plan(10, {"a": 1, "b": 1, "c": 1}, {"a": 2, "b": 0, "c": 0}) == {"a": 4, "b": 3, "c": 3}


@given(
    capacity=st.integers(1, 512),
    lanes=st.lists(st.tuples(st.integers(1, 10), st.integers(0, 1000)), min_size=1, max_size=6),
)
def test_the_plan_fills_the_capacity_and_honours_weights(
    capacity: int, lanes: list[tuple[int, int]]
) -> None:
    weights = {f"q{i}": weight for i, (weight, _) in enumerate(lanes)}
    wants = {f"q{i}": want for i, (_, want) in enumerate(lanes)}
    given_ = plan(capacity, weights, wants)
    assert sum(given_.values()) == capacity
    assert all(count >= 0 for count in given_.values())
    total = sum(weights.values())
    for name in weights:
        # Every lane gets what it wants, or at least its weighted share (rounded down).
        assert given_[name] >= min(wants[name], capacity * weights[name] // total)


@given(st.lists(st.tuples(st.sampled_from("adfc"), st.integers(0, 5)), max_size=60))
def test_slot_counts_kept_as_slots_change_match_a_recount(steps: list[tuple[str, int]]) -> None:
    state = _LaneState(Lane("q"), channel=None, queue=None)  # type: ignore[arg-type]
    for action, n in steps:
        tag = f"c{n}"
        slot = state.slots.get(tag)
        if action == "a" and slot is None:
            state.add(tag)
        elif action == "d" and (slot is None or not slot.busy):
            state.deliver(tag)
        elif action == "f" and slot is not None and slot.busy:
            state.finish(tag, slot)
        elif action == "c" and slot is not None and not slot.cancelled:
            state.mark_cancelled(slot)
            if not slot.busy:
                state.slots.pop(tag)  # what the consumer does once the broker confirms
        slots = state.slots.values()
        assert state.active == sum(not s.cancelled for s in slots)
        assert state.in_flight == sum(s.busy for s in slots)
        assert state.idle == any(not s.busy and not s.cancelled for s in slots)
        assert state.held == len(state.slots)
