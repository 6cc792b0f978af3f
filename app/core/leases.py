"""Write leases shared by instances through the store: who may write an
upload now, and what each instance does about it. Pure: the S3 store carries
these decisions out with conditional writes on the session record.

A lease names its holder (an instance id), a generation (the fencing token,
one higher at every acquisition) and an expiry in wall-clock seconds. Another
instance that wants to write asks the holder to let go by writing its id into
``takeover``; the holder finishes what it received, then releases. A holder
judges its own lease by a monotonic deadline taken when it *sent* the write
that granted it, never by the wall clock in the record, so a slow answer or a
clock step shortens its lease and never lengthens it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Lease:
    holder: str
    generation: int
    #: Wall-clock second after which other instances may take the upload.
    expires_at: float
    #: The instance that asked the holder to let go, if one did.
    takeover: str | None = None

    def to_json(self) -> list[object]:
        return [self.holder, self.generation, self.expires_at, self.takeover]

    @classmethod
    def from_json(cls, doc: object) -> Lease | None:
        if doc is None:
            return None
        if not isinstance(doc, list) or len(doc) != 4:
            raise ValueError(f"malformed lease {doc!r}")
        holder, generation, expires_at, takeover = doc
        return cls(str(holder), int(generation), float(expires_at),
                   None if takeover is None else str(takeover))


@dataclass(frozen=True)
class Timing:
    """How long leases last and how much of one a writer keeps in reserve."""

    ttl: float

    @property
    def margin(self) -> float:
        """No part upload or completion starts with less lease than this left:
        the longest a request may take to land once sent, plus clock skew."""
        return self.ttl / 3

    @property
    def renew_below(self) -> float:
        """A holder whose data still flows renews once this little is left."""
        return self.ttl / 2

    @property
    def poll(self) -> float:
        """How often a request waiting to take an upload over looks for the
        holder's release."""
        return max(0.05, self.ttl / 10)

    @property
    def watch(self) -> float:
        """How often a holder waiting on its client looks for a takeover
        request (one HeadObject each), and how long a write runs before it
        takes the lease it has not needed yet, so that it can be asked."""
        return max(0.1, self.ttl / 5)


class Standing(enum.Enum):
    """Where another instance's lease leaves a would-be writer."""

    FREE = "free"  # no lease, released, or expired: take it
    MINE = "mine"  # this instance holds it: renew it
    HELD = "held"  # another instance holds it and it is live: ask, then wait


def standing(lease: Lease | None, me: str, now: float) -> Standing:
    if lease is None or lease.expires_at <= now:
        return Standing.FREE
    if lease.holder == me:
        return Standing.MINE
    return Standing.HELD


def granted(lease: Lease | None, generation: int, me: str, now: float, timing: Timing) -> Lease:
    """The lease ``me`` writes to take (or renew) an upload whose record
    issued ``generation`` last: a renewal keeps the generation, a take moves
    past every one issued."""
    if lease is not None and lease.holder == me and standing(lease, me, now) is Standing.MINE:
        # A pending takeover request stays: the holder owes the asker its release.
        return replace(lease, expires_at=now + timing.ttl)
    return Lease(me, max(generation, 0 if lease is None else lease.generation) + 1,
                 now + timing.ttl)


def asked(lease: Lease, me: str) -> Lease:
    """The holder's lease with ``me``'s request to let go."""
    return replace(lease, takeover=me)


def still_ours(mine: Lease, current: Lease | None) -> bool:
    """Whether the record's ``current`` lease is the one this writer holds
    (possibly renewed by it, or with a takeover request added): anything else
    means another instance took the upload and this writer is fenced off."""
    return current is not None and current.holder == mine.holder \
        and current.generation == mine.generation
