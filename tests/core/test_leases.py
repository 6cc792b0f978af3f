"""The lease rules, table-driven and without any store."""

from __future__ import annotations

import pytest

from app.core import leases
from app.core.leases import Lease, Standing, Timing

TIMING = Timing(ttl=15.0)
NOW = 1_000.0


@pytest.mark.parametrize(
    ("lease", "expected"),
    [
        (None, Standing.FREE),
        (Lease("me", 3, NOW + 5), Standing.MINE),
        (Lease("other", 3, NOW + 5), Standing.HELD),
        (Lease("other", 3, NOW + 5, takeover="me"), Standing.HELD),
        (Lease("other", 3, NOW), Standing.FREE),  # expired at this very second
        (Lease("other", 3, NOW - 1), Standing.FREE),
        (Lease("me", 3, NOW - 1), Standing.FREE),
    ],
)
def test_standing(lease: Lease | None, expected: Standing) -> None:
    assert leases.standing(lease, "me", NOW) is expected


@pytest.mark.parametrize(
    ("lease", "issued", "expected"),
    [
        # A first take is generation 1.
        (None, 0, Lease("me", 1, NOW + 15)),
        # After a release the record still remembers the last generation issued.
        (None, 7, Lease("me", 8, NOW + 15)),
        # A renewal keeps the generation, and a pending request to let go.
        (Lease("me", 4, NOW + 2), 4, Lease("me", 4, NOW + 15)),
        (Lease("me", 4, NOW + 2, takeover="b"), 4, Lease("me", 4, NOW + 15, takeover="b")),
        # Taking over an expired lease moves past it, and drops its request.
        (Lease("other", 4, NOW - 1, takeover="me"), 4, Lease("me", 5, NOW + 15)),
        # My own expired lease is taken anew: someone may have used it meanwhile.
        (Lease("me", 4, NOW - 1), 4, Lease("me", 5, NOW + 15)),
    ],
)
def test_granted(lease: Lease | None, issued: int, expected: Lease) -> None:
    assert leases.granted(lease, issued, "me", NOW, TIMING) == expected


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (Lease("me", 4, NOW + 15), True),
        (Lease("me", 4, NOW + 3, takeover="b"), True),  # asked, not taken
        (Lease("me", 5, NOW + 15), False),  # taken anew by a request that lost track
        (Lease("b", 5, NOW + 15), False),
        (None, False),  # released by someone else: no longer ours to use
    ],
)
def test_still_ours(current: Lease | None, expected: bool) -> None:
    assert leases.still_ours(Lease("me", 4, NOW + 10), current) is expected


def test_asked_names_the_asker_and_keeps_the_rest() -> None:
    lease = Lease("a", 9, NOW + 4)
    assert leases.asked(lease, "b") == Lease("a", 9, NOW + 4, takeover="b")


@pytest.mark.parametrize("doc", [None, ["a", 1, 2.5, None], ["a", 1, 2.5, "b"]])
def test_json_round_trip(doc: object) -> None:
    lease = Lease.from_json(doc)
    assert (None if lease is None else lease.to_json()) == doc


@pytest.mark.parametrize("doc", [["a", 1, 2.5], "a", {"holder": "a"}, ["a", "x", 2.5, None]])
def test_malformed_json_is_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        Lease.from_json(doc)


def test_timing_keeps_a_margin_below_the_renewal_point() -> None:
    timing = Timing(ttl=15.0)
    assert 0 < timing.margin < timing.renew_below < timing.ttl
    assert timing.poll < timing.margin
