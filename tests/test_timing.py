"""Tests for swpfx/timing.py: what ``interleaved_medians`` runs, and in which order."""

from __future__ import annotations

from swpfx.timing import interleaved_medians


def test_bursts_run_each_callable_back_to_back_and_alternate_the_order():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    seconds = interleaved_medians(runners, rounds=2, warmup=1, blocks=2, burst=3)
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    timed = calls[2:]  # after one warm-up call each
    assert calls[:2] == ["a", "b"] and len(timed) == 2 * 2 * 2 * 3
    assert timed[:12] == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # round 2 runs in reverse order
