"""Stream leases: no two live backends share a stream from torch's round-robin pool."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from sam3stream.errors import BackendUnavailableError
from sam3stream.runtime.stream_lease import StreamLease


@dataclass
class FakeStream:
    cuda_stream: int


def round_robin(size: int) -> itertools.cycle[int]:
    return itertools.cycle(range(1, size + 1))


def pool(size: int) -> tuple[object, itertools.cycle[int]]:
    # A device key of its own per test, so leases of other tests never interfere.
    return object(), round_robin(size)


def test_leases_skip_streams_held_by_another_lease() -> None:
    device, ids = pool(4)
    make = lambda: FakeStream(next(ids))  # noqa: E731
    first = StreamLease(device, make, pool_size=4)
    a = [first.draw().cuda_stream for _ in range(3)]
    second = StreamLease(device, make, pool_size=4)
    # The pool wraps after 4: the second lease must not get 1, 2 or 3 again.
    b = second.draw().cuda_stream
    assert b not in a
    assert sorted([*a, b]) == [1, 2, 3, 4]


def test_exhausted_pool_names_the_device_and_the_way_out() -> None:
    device, ids = pool(3)
    make = lambda: FakeStream(next(ids))  # noqa: E731
    first = StreamLease(device, make, pool_size=3)
    for _ in range(3):
        first.draw()
    second = StreamLease(device, make, pool_size=3)
    with pytest.raises(BackendUnavailableError, match="separate processes"):
        second.draw()
    first.release()
    assert first.held == 0
    assert second.draw().cuda_stream in {1, 2, 3}


def test_a_lease_that_runs_dry_gives_back_what_it_drew() -> None:
    device, ids = pool(3)
    make = lambda: FakeStream(next(ids))  # noqa: E731
    first = StreamLease(device, make, pool_size=3)
    first.draw()
    first.draw()
    second = StreamLease(device, make, pool_size=3)
    second.draw()
    with pytest.raises(BackendUnavailableError):
        second.draw()
    assert second.held == 0
    first.release()
    third = StreamLease(device, make, pool_size=3)
    assert sorted(third.draw().cuda_stream for _ in range(3)) == [1, 2, 3]


def test_release_is_idempotent_and_frees_only_its_own_streams() -> None:
    device, ids = pool(4)
    make = lambda: FakeStream(next(ids))  # noqa: E731
    first = StreamLease(device, make, pool_size=4)
    second = StreamLease(device, make, pool_size=4)
    mine = first.draw().cuda_stream
    theirs = second.draw().cuda_stream
    first.release()
    first.release()
    third = StreamLease(device, make, pool_size=4)
    drawn = {third.draw().cuda_stream for _ in range(3)}
    assert theirs not in drawn
    assert mine in drawn


def test_leases_on_other_devices_do_not_collide() -> None:
    ids = round_robin(2)
    make = lambda: FakeStream(next(ids))  # noqa: E731
    full = StreamLease("dev-a", make, pool_size=2)
    full.draw()
    full.draw()
    other = StreamLease("dev-b", make, pool_size=2)
    try:
        assert other.draw().cuda_stream in {1, 2}
    finally:
        full.release()
        other.release()
