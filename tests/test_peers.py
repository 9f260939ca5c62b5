"""The peer helpers: the mildest knob meeting a predicted target, found by scan and bisection."""

import pytest

from swpfx.peers import GRID, mildest_meeting


def test_mildest_meeting_finds_the_smallest_knob_at_or_under_the_target():
    calls = []

    def prune(knob):
        calls.append(knob)
        return knob

    found = mildest_meeting(prune, lambda knob: 1 - knob, target=0.61)
    assert found["knob"] == pytest.approx(25 / GRID) and found["meets_target"]  # 1 - 25/64 = 0.609
    assert len(set(calls)) < GRID / 2  # scan and bisection, not every knob


def test_mildest_meeting_returns_the_fastest_model_flagged_when_nothing_meets_the_target():
    found = mildest_meeting(lambda knob: knob if knob < 0.5 else None, lambda knob: 1 - knob / 2, target=0.1)
    scanned = range(0, 32, 8)  # the coarse scan; no interval to refine
    assert not found["meets_target"] and found["predicted_ratio"] == min(1 - k / GRID / 2 for k in scanned)
