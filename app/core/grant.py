"""What an authorizer allowed a request to do: the engine's view of auth."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Grant:
    """What an allowed request may do, as decided by the authorizer."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    #: Largest object this client may store; None means only the configured limits.
    max_size: int | None = None
    #: Recorded with the upload and sent with the completion callback.
    owner: str | None = None
    #: The object name the webhook chose, for dialects where the client names
    #: no object (tus, the IETF draft); None: the dialect's own default.
    name: str | None = None
    #: The webhook lets this request replace an object another owner stored.
    allow_replace: bool = False
