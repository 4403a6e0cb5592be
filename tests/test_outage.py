"""Outage: warn when a retry loop starts failing, remind while it lasts, report the recovery."""

from __future__ import annotations

from sam3stream.outage import Outage


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_warns_at_the_start_then_once_per_reminder_interval() -> None:
    clock = _Clock()
    outage = Outage(remind_s=60.0, clock=clock)
    loud = []
    for _ in range(10):  # one attempt every 15 s for 150 s
        loud.append(outage.failed())
        clock.now += 15.0
    # Warnings at 0 s, 60 s and 120 s of the outage; the attempts between them are quiet.
    assert loud == [True, False, False, False, True, False, False, False, True, False]
    assert outage.attempts == 10


def test_recovery_reports_the_outage_once_and_starts_afresh() -> None:
    clock = _Clock()
    outage = Outage(remind_s=60.0, clock=clock)
    assert outage.recovered() is None  # a success without an outage is not news
    outage.failed()
    clock.now += 40.0
    outage.failed()
    assert outage.down_s == 40.0
    assert outage.recovered() == (2, 40.0)
    assert outage.recovered() is None
    assert outage.down_s == 0.0
    clock.now += 5.0
    assert outage.failed() is True  # the next outage warns at its start again
